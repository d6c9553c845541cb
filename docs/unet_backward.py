"""Print the numbers of docs/unet_backward.md: one small_unet training step, traced backward.

    python docs/unet_backward.py

float64, a 32x32 input, batch 2 (two images of the generated Shape data set), the post's
small_unet with its 32 base channels. tests/test_docs.py runs this script and checks that the
guide quotes its output exactly, so the text cannot drift from the code.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitensor import losses, set_seed  # noqa: E402  (the repository root is put on the path first)
import numpy as np  # noqa: E402  (after minitensor, which sets the CPU's threads up before NumPy loads)
from minitensor.optimizers import Adam  # noqa: E402
from unet import small_unet  # noqa: E402
from unet.data import one_hot  # noqa: E402
from unet.shapes import make_sample  # noqa: E402

SIZE, SEED = 32, 22


def norm(array):
    return f"{float(np.sqrt(np.sum(np.square(array)))):.4g}"


def batch():
    """Two images and their one-hot masks, scaled as train.py scales them."""
    samples = [make_sample(SEED, index, SIZE) for index in (0, 1)]
    images = np.stack([image for image, _ in samples]).astype(np.float64) / 127.5 - 1
    return images, one_hot(np.stack([mask for _, mask in samples]), 4, np.float64)


def model():
    set_seed(0)
    return small_unet((SIZE, SIZE, 3), dtype="float64")


def loss_start(net, images, targets):
    """Where backward starts: dL/dz at conv_softmax for the three losses, at one pixel."""
    probabilities = net.forward(images)
    logits = net.get_layer("conv_softmax").pre_activation()
    pixels = logits.size // logits.shape[-1]
    pixel = (0, 16, 16)
    print(f"pixel {pixel}: target {targets[pixel].astype(int).tolist()}")
    print(f"  softmax p         = {np.round(probabilities[pixel], 4).tolist()}")
    softmax_ce = losses.SoftmaxCrossEntropy()
    softmax_ce.forward(logits, targets)
    start = softmax_ce.backward()
    print(f"  softmax-ce   P * dL/dz = {np.round(pixels * start[pixel], 4).tolist()}   (= p - t)")
    bce_logits = losses.BinaryCrossentropy(from_logits=True)
    bce_logits.forward(logits, targets)
    start = bce_logits.backward()
    sigmoid = 1 / (1 + np.exp(-logits[pixel]))
    print(f"  bce-logits   P * dL/dz = {np.round(pixels * start[pixel], 4).tolist()}   "
          f"(= (sigmoid(z) - t) / 4; sigmoid(z) = {np.round(sigmoid, 4).tolist()})")
    bce = losses.BinaryCrossentropy()
    bce.forward(probabilities, targets)
    dp = bce.backward()
    p = probabilities[pixel]
    dz = p * (dp[pixel] - np.dot(dp[pixel], p))                 # the softmax Jacobian-vector product
    print(f"  bce on p     P * dL/dz = {np.round(pixels * dz, 4).tolist()}   (dL/dp through the softmax)")
    net.clear_cache()


def trace(net, images, targets):
    """Model.backward's loop, printing every node's upstream gradient, and where two gradients meet."""
    net.forward(images)
    loss = losses.SoftmaxCrossEntropy()
    print(f"loss (softmax-ce) = {float(loss.forward(net.get_layer('conv_softmax').pre_activation(), targets)):.6f}")
    grads = {id(net.output): loss.backward()}
    first_reader, shares, ratios = {}, {}, []
    print(f"{'node':24s} {'upstream dL/d(output) shape':28s} norm")
    for node in reversed(net.nodes[1:]):
        dout = grads.pop(id(node.output))
        if id(node.output) in shares:
            (first, a), (second, b) = shares.pop(id(node.output))
            print(f"  {node.layer.name} output: two gradients meet, from {first} ({norm(a)}) and from {second} "
                  f"({norm(b)}); their sum has norm {norm(dout)}")
            ratios.append(float(np.linalg.norm(a) / np.linalg.norm(b)))     # the skip's share over the pooled one
        print(f"{node.layer.name:24s} {str(dout.shape):28s} {norm(dout)}")
        options = {"from_logits": True} if node.output is net.output else {}
        dinputs = node.layer.backward(dout, **options)
        dinputs = [dinputs] if len(node.inputs) == 1 else dinputs
        for tensor, grad in zip(node.inputs, dinputs):
            if id(tensor) in grads:
                shares[id(tensor)] = [(first_reader[id(tensor)], grads[id(tensor)]), (node.layer.name, grad)]
                grads[id(tensor)] = grads[id(tensor)] + grad
            else:
                grads[id(tensor)], first_reader[id(tensor)] = grad, node.layer.name
    print(f"skip share / pooled share (norms), deepest skip first: {', '.join(f'{r:.3g}' for r in ratios)}; "
          f"from {min(ratios):.3g} to {max(ratios):.3g}")


def numerical_check(net, images, targets):
    """The weight of encoder_conv1_2 with the largest gradient: its output gets both the skip and
    the pooled gradient, so dropping either share would show here."""
    net.compile(Adam(1e-3), losses.SoftmaxCrossEntropy())
    net.forward(images)
    net.loss.forward(net.get_layer("conv_softmax").pre_activation(), targets)
    net.backward(net.loss.backward(), from_logits=True, input_grad=False)
    layer = net.get_layer("encoder_conv1_2")
    gradient = layer.grads[0]
    index = np.unravel_index(np.argmax(np.abs(gradient)), gradient.shape)
    analytic, kernel, eps = gradient[index], layer.params[0], 1e-6
    kernel[index] += eps
    plus = float(net.test_step(images, targets))
    kernel[index] -= 2 * eps
    minus = float(net.test_step(images, targets))
    kernel[index] += eps
    numeric = (plus - minus) / (2 * eps)
    relative = abs(analytic - numeric) / abs(numeric)
    print(f"dL/dW encoder_conv1_2 kernel{[int(i) for i in index]}: backprop {analytic:.8e}, central difference "
          f"{numeric:.8e}, relative difference " + ("below 1e-8" if relative < 1e-8 else f"{relative:.1e}: WRONG"))


def adam_step(net, images, targets):
    """What Adam's first step does with the gradients: every weight moves by about the learning rate."""
    net.compile(Adam(1e-3), losses.SoftmaxCrossEntropy())
    before = [w.copy() for w in net.get_weights()]
    net.train_on_batch(images, targets)
    layer_names = [layer.name for layer in net.layers for _ in layer.params]
    weight_names = [name for layer in net.layers for name in layer.weight_names]
    for name, weight, old, new in zip(layer_names, weight_names, before, net.get_weights()):
        if name in ("encoder_conv1_1", "conv_softmax"):
            step = np.abs(new - old)
            print(f"  {name}/{weight}: largest |step| {step.max():.4g}, median {np.median(step):.4g}")


def main():
    np.set_printoptions(precision=4, suppress=True)
    images, targets = batch()
    print("== where backward starts (conv_softmax, P = 2 * 32 * 32 = 2048 pixels)")
    loss_start(model(), images, targets)
    print("== the trace, output to input (softmax-ce)")
    trace(model(), images, targets)
    print("== a numerical check through the skip connection")
    numerical_check(model(), images, targets)
    print("== Adam's first step (learning rate 1e-3)")
    adam_step(model(), images, targets)


if __name__ == "__main__":
    main()
