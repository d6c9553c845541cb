"""Draw the figures of the guides into docs/figures/ (or the folder given):

    python docs/figures.py [OUT_DIR]

im2col.png              the im2col layout of a 4x4 input and a 3x3 kernel
conv_dx_transposed.png  a stride-1 convolution's dx as a convolution of dZ with the flipped kernel,
                        dZ padded by K-1-P on each side (the bottom/right padding included)
maxpool_routing.png     max-pool's backward: each window's gradient goes to its maximum
unet_graph.png          small_unet's graph, and the four forks where the skip and pooled gradients add

Every number drawn is computed here with minitensor's own layers, and the dx figure first checks
its formula against Conv2D.backward, so a figure cannot show what the code does not do.
tests/test_docs.py runs this script.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minitensor  # noqa: E402  (the repository root is put on the path first; before NumPy, as train.py)
from minitensor.layers.base import window_output_and_padding  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

F64 = "float64"
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]


def grid(ax, values, origin=(0, 0), colors=None, fmt="{:g}", title=None, shade=None, fontsize=10):
    """Draw a matrix as labelled cells; row 0 at the top. ``colors``/``shade``: per-cell face colours."""
    rows, cols = values.shape
    x0, y0 = origin
    for r in range(rows):
        for c in range(cols):
            face = "white"
            if shade is not None and shade[r][c]:
                face = shade[r][c]
            if colors is not None and colors[r][c]:
                face = colors[r][c]
            ax.add_patch(Rectangle((x0 + c, y0 - r - 1), 1, 1, facecolor=face, edgecolor="black", lw=0.8))
            text = "" if values[r, c] is None else fmt.format(values[r, c])
            ax.text(x0 + c + 0.5, y0 - r - 0.5, text, ha="center", va="center", fontsize=fontsize)
    if title:
        ax.text(x0 + cols / 2, y0 + 0.4, title, ha="center", va="bottom", fontsize=11)


def finish(ax, fig, path):
    ax.set_aspect("equal")
    ax.axis("off")
    ax.autoscale_view()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----- im2col --------------------------------------------------------------------------------------

def draw_im2col(path):
    x = np.arange(1, 17, dtype=float).reshape(1, 4, 4, 1)
    kernel = 3
    cols = np.zeros((4, 9))
    for r, (oh, ow) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cols[r] = x[0, oh:oh + kernel, ow:ow + kernel, 0].ravel()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    grid(ax, x[0, :, :, 0], (0, 0), title="x (4x4, one channel)")
    # Outline each window in its row's colour, slightly inset so the four can be told apart.
    for r, (oh, ow) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        inset = 0.06 + 0.06 * r
        ax.add_patch(Rectangle((ow + inset, -oh - kernel + inset), kernel - 2 * inset, kernel - 2 * inset,
                               fill=False, edgecolor=COLORS[r], lw=2.2))
    colors = [[COLORS[r] + "55"] * 9 for r in range(4)]
    grid(ax, cols, (6, 0), colors=colors, title="im2col(x): one row per output pixel (oh, ow), 4 x (3*3*1)")
    for r, (oh, ow) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        ax.text(5.9, -r - 0.5, f"({oh}, {ow})", ha="right", va="center", fontsize=9, color=COLORS[r])
    for q in range(9):
        ax.text(6 + q + 0.5, -4.3, f"({q // 3},{q % 3})", ha="center", va="top", fontsize=7)
    ax.text(10.5, -5.0, "column q = (i*KW + j)*C + c: the window offset (i, j) and channel c", ha="center",
            va="top", fontsize=9)
    ax.text(7.5, -6.0, "y = im2col(x) @ W.reshape(KH*KW*C, F): the whole convolution is one matrix product",
            ha="center", va="top", fontsize=10)
    finish(ax, fig, path)


# ----- dx as a transposed convolution --------------------------------------------------------------

def conv_dx_by_flipped_kernel(dz, w, pad_top, pad_bottom, pad_left, pad_right):
    """dx = correlation of dZ, padded by K-1-P on each side, with the kernel flipped in space and
    its channel axes swapped: the formula the figure draws."""
    kh, kw = w.shape[:2]
    padded = np.pad(dz, ((0, 0), (kh - 1 - pad_top, kh - 1 - pad_bottom), (kw - 1 - pad_left, kw - 1 - pad_right),
                         (0, 0)))
    flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)           # (KH, KW, F, C)
    out_h, out_w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
    dx = np.zeros((dz.shape[0], out_h, out_w, w.shape[2]))
    for i in range(kh):
        for j in range(kw):
            dx += padded[:, i:i + out_h, j:j + out_w, :] @ flipped[i, j]
    return dx


def conv_case(size, kernel, padding, rng):
    """Conv2D's own dx next to the flipped-kernel formula, for one geometry: (dx, pads)."""
    layer = minitensor.Conv2D(1, kernel, padding=padding, dtype=F64, seed=0)
    x = rng.standard_normal((1, size, size, 1))
    y = layer.forward(x)
    dz = rng.standard_normal(y.shape)
    dx = layer.backward(dz)
    _, top, bottom = window_output_and_padding(size, kernel, 1, padding)
    formula = conv_dx_by_flipped_kernel(dz, layer.params[0], top, bottom, top, bottom)
    np.testing.assert_allclose(formula, dx, rtol=1e-12, atol=1e-12)
    return top, bottom


def draw_conv_dx(path):
    rng = np.random.default_rng(0)
    cases = [(5, 3, "valid"), (5, 4, "same")]
    fig, axes = plt.subplots(2, 1, figsize=(11, 9.5))
    for ax, (size, kernel, padding) in zip(axes, cases):
        top, bottom = conv_case(size, kernel, padding, rng)
        out = size + top + bottom - kernel + 1
        # Forward: x padded by P (top/left P_top, bottom/right P_bottom).
        n_in = size + top + bottom
        shade = [["#dddddd" if not (top <= r < top + size and top <= c < top + size) else None
                  for c in range(n_in)] for r in range(n_in)]
        labels = np.array([["0" if shade[r][c] else "x" for c in range(n_in)] for r in range(n_in)], dtype=object)
        grid(ax, labels, (0, 0), shade=shade, fmt="{}", fontsize=8,
             title=f"forward: x {size}x{size}, '{padding}'\npadded by P = {top} top/left, {bottom} bottom/right")
        ax.add_patch(Rectangle((0, -kernel), kernel, kernel, fill=False, edgecolor=COLORS[0], lw=2.5))
        ax.text(n_in / 2, -n_in - 0.4, f"a {kernel}x{kernel} window of W -> y {out}x{out}", ha="center", va="top",
                fontsize=9)
        # Backward: dZ padded by K-1-P on each side, the flipped kernel slides over it.
        pad_a, pad_b = kernel - 1 - top, kernel - 1 - bottom
        n_back = out + pad_a + pad_b
        shade = [["#dddddd" if not (pad_a <= r < pad_a + out and pad_a <= c < pad_a + out) else None
                  for c in range(n_back)] for r in range(n_back)]
        labels = np.array([["0" if shade[r][c] else "dZ" for c in range(n_back)] for r in range(n_back)],
                          dtype=object)
        x0 = n_in + 6
        grid(ax, labels, (x0, 0), shade=shade, fmt="{}", fontsize=7,
             title=f"backward: dZ {out}x{out}\npadded by K-1-P = {pad_a} top/left, {pad_b} bottom/right")
        ax.add_patch(Rectangle((x0, -kernel), kernel, kernel, fill=False, edgecolor=COLORS[3], lw=2.5))
        ax.text(x0 + n_back / 2, -n_back - 0.4,
                f"the flipped W[::-1, ::-1], in and out channels swapped\n-> dx {size}x{size}", ha="center", va="top",
                fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.autoscale_view()
    fig.suptitle("A stride-1 convolution's dx is a convolution of dZ with the flipped kernel "
                 "(checked against Conv2D.backward)", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----- max-pool routing ----------------------------------------------------------------------------

def draw_maxpool(path):
    x = np.array([[1, 3, 2, 0], [4, 2, 1, 5], [0, 6, 3, 3], [2, 1, 7, 1]], dtype=float)
    pool = minitensor.MaxPool2D(2, dtype=F64)
    y = pool.forward(x.reshape(1, 4, 4, 1))
    dy = np.array([[0.5, -1.0], [2.0, 0.25]])
    dx = pool.backward(dy.reshape(1, 2, 2, 1))[0, :, :, 0]
    window = [[COLORS[(r // 2) * 2 + c // 2] + "40" for c in range(4)] for r in range(4)]
    argmax = [[COLORS[(r // 2) * 2 + c // 2] if dx[r, c] != 0 else None for c in range(4)] for r in range(4)]
    fig, ax = plt.subplots(figsize=(12, 3.6))
    grid(ax, x, (0, 0), colors=[[a or w for a, w in zip(ra, rw)] for ra, rw in zip(argmax, window)],
         title="x: 2x2 windows, the maximum in bold colour")
    grid(ax, y[0, :, :, 0], (5.5, -1), colors=[[COLORS[0] + "40", COLORS[1] + "40"],
                                               [COLORS[2] + "40", COLORS[3] + "40"]], title="y = max")
    grid(ax, dy, (9.5, -1), colors=[[COLORS[0] + "40", COLORS[1] + "40"], [COLORS[2] + "40", COLORS[3] + "40"]],
         title="dy")
    grid(ax, dx, (13, 0), colors=argmax, title="dx: dy at the argmax, 0 elsewhere")
    for x0 in (4.3, 8.1, 11.9):
        ax.add_patch(FancyArrowPatch((x0, -2), (x0 + 1.0, -2), arrowstyle="->", mutation_scale=15))
    ax.text(10.5, -4.6, "A 3 tied with a 3 would send the gradient to the first one in row-major order, "
            "as TensorFlow does", ha="center", fontsize=9)
    finish(ax, fig, path)


# ----- the U-Net graph and its four forks ----------------------------------------------------------

def draw_unet(path):
    from unet import small_unet

    model = small_unet((32, 32, 3), dtype=F64)
    readers = {}
    for node in model.nodes:
        for tensor in node.inputs:
            readers.setdefault(tensor.producer.name, []).append(node.layer.name)
    forks = [name for name, names in readers.items() if len(names) == 2]
    assert len(forks) == 4, forks
    fig, ax = plt.subplots(figsize=(13, 7.5))
    box = dict(boxstyle="round,pad=0.3", facecolor="#eef2fa", edgecolor="#4C72B0")
    gray = dict(arrowstyle="->", mutation_scale=12, color="#999999", lw=1.0)
    levels, width = 4, 18.0
    enc_x = {k: 1.3 * k for k in range(1, levels + 1)}
    dec_x = {k: width - 1.3 * k for k in range(1, levels + 1)}
    level_y = {k: -1.5 * k for k in range(1, levels + 2)}
    bottom = (width / 2, level_y[levels + 1])
    for k in range(1, levels + 1):
        y = level_y[k]
        ax.text(enc_x[k], y, f"encoder_conv{k}_1, _2", ha="center", va="center", fontsize=9, bbox=box)
        ax.text(dec_x[k], y, f"decoder_concatenate{k}\ndecoder_conv{k}_1, _2", ha="center", va="center",
                fontsize=9, bbox=box)
        # The fork: encoder_conv{k}_2's output is read by the pool (down) and by the concatenation (across).
        fx = enc_x[k] + 1.9
        ax.text(fx, y, "+", ha="center", va="center", fontsize=14, color="#C44E52",
                bbox=dict(boxstyle="circle,pad=0.15", facecolor="white", edgecolor="#C44E52"))
        ax.add_patch(FancyArrowPatch((dec_x[k] - 1.6, y), (fx + 0.35, y), arrowstyle="->", mutation_scale=14,
                                     color="#C44E52", lw=1.6))
        ax.text((fx + dec_x[k] - 1.6) / 2, y + 0.12, f"skip: decoder_concatenate{k}'s share", ha="center",
                va="bottom", fontsize=8, color="#C44E52")
        below = (enc_x[k + 1], level_y[k + 1]) if k < levels else bottom
        ax.add_patch(FancyArrowPatch((below[0] - 0.2, below[1] + 0.3), (fx + 0.05, y - 0.3), arrowstyle="->",
                                     mutation_scale=14, color="#55A868", lw=1.6))
        ax.text(fx + 0.45, y - 0.75, f"encoder_maxpool{k}'s share", fontsize=8, color="#55A868", va="center")
        # Forward, in gray: the decoder climbs back up, one UpSampling2D per level.
        above = (dec_x[k - 1], level_y[k - 1]) if k > 1 else (dec_x[1], 0.1)
        ax.add_patch(FancyArrowPatch((dec_x[k] + 0.3, y + 0.45), (above[0] + 0.1, above[1] - 0.45), **gray))
    ax.text(*bottom, "encoder_conv5_1, _2 (bottleneck)", ha="center", va="center", fontsize=9, bbox=box)
    ax.add_patch(FancyArrowPatch((bottom[0] + 1.6, bottom[1] + 0.2), (dec_x[levels] - 0.6, level_y[levels] - 0.45),
                                 **gray))
    ax.text(enc_x[1], 0.3, "input", ha="center", fontsize=10)
    ax.text(dec_x[1], 0.3, "conv_softmax -> loss: backward starts here", ha="center", fontsize=10)
    ax.text(width / 2, -8.7, "Backward: the output of each encoder_conv{k}_2 is read twice (forward: by the "
            "max-pool below it and by the\nconcatenation across), so its gradient is the sum (+) of two shares: "
            "the skip's (red) and the pooled one (green),\nback up from the level below. Model.backward adds them "
            "with +; docs/unet_backward.md prints both at each fork.", ha="center", va="top", fontsize=9.5)
    ax.set_xlim(-0.2, width + 0.5)
    ax.set_ylim(-10, 0.9)
    ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


FIGURES = {"im2col.png": draw_im2col, "conv_dx_transposed.png": draw_conv_dx, "maxpool_routing.png": draw_maxpool,
           "unet_graph.png": draw_unet}


def main(out_dir=None):
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
    os.makedirs(out_dir, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(os.path.join(out_dir, name))
        print(os.path.join(out_dir, name))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
