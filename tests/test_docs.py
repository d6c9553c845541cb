"""The guides in docs/ cannot go stale: their code runs, their output blocks are what it prints, and
every number their prose states is one the code printed (or a setting the page names as such).

* docs/unet_backward.md and docs/worked_example_1d.md quote what their scripts print, block for block.
* docs/your_first_layer.md is run block by block, in order, in one namespace: each ```text block is
  what the ```python blocks since the last one printed; a block marked <!-- file: NAME --> is also
  written to NAME, and its ```bash commands are run next to it.
* In all three, a number in the prose (outside code) must be printed by the code, to the digits
  the prose gives (0.49 for a printed 0.4931), or be one of the page's settings listed below with
  why: "three to five times" over printed ratios of 2.66 to 4.84 would fail here.
"""
import ast
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

BLOCK = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w+)\n(.*?)\n```", re.S)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w])")


def read(name):
    with open(os.path.join(DOCS, name)) as f:
        return f.read()


def quoted_text(markdown):
    return [line for lang, _, text in blocks(markdown) if lang == "text" for line in text.split("\n")]


def blocks(markdown):
    """(language, file tag or None, text) of every fenced block, in order."""
    return [(lang, tag or None, text) for tag, lang, text in BLOCK.findall(markdown)]


def prose_numbers(markdown):
    """The numbers a reader sees in running text: not in code blocks, `code`, link targets or headings."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"^#+ .*$", " ", text, flags=re.M)
    text = re.sub(r"(\d)x(\d)", r"\1 x \2", text)          # 32x32, 1x1
    return NUMBER.findall(text)


def script_constants(path):
    """Every int and float literal in a script: the settings of the run a page describes."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return {float(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and type(node.value) in (int, float)}


def unprinted(markdown, output, settings):
    """The prose numbers of ``markdown`` that ``output`` does not print, to the prose's own digits."""
    printed = [abs(float(n)) for n in NUMBER.findall(output)]
    missing = []
    for token in prose_numbers(markdown):
        value = float(token)
        if value in settings:
            continue
        digits = len(token.split(".")[1]) if "." in token and "e" not in token else None
        if not any(abs((round(p, digits) if digits is not None else p) - value) <= 1e-12 * max(1.0, value)
                   for p in printed):
            missing.append(token)
    return missing


def run_script(name):
    result = subprocess.run([sys.executable, os.path.join("docs", name)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ----- docs/unet_backward.md ------------------------------------------------------------------------

def adam_settings():
    from minitensor.optimizers import Adam

    adam = Adam()
    return {adam.beta_1, adam.beta_2, round(1 - adam.beta_1, 12), round(1 - adam.beta_2, 12)}


def test_the_backward_guide_quotes_its_script_exactly_and_its_prose_numbers_are_printed():
    output = run_script("unet_backward.py")
    markdown = read("unet_backward.md")
    assert quoted_text(markdown) == output.rstrip("\n").split("\n"), \
        "docs/unet_backward.md no longer matches python docs/unet_backward.py: paste its output"
    assert "relative difference below 1e-8" in output
    assert output.count("two gradients meet") == 4              # the four skip connections
    # Settings: the script's literals (32 pixels, data seed 22, h = 1e-6, ...) and Adam's betas, whose
    # first step the page derives by hand (m = 0.1 g, v = 0.001 g^2).
    settings = script_constants(os.path.join(DOCS, "unet_backward.py")) | adam_settings()
    assert unprinted(markdown, output, settings) == []
    # The check itself can fail: the sentence the issue found false would be caught.
    wrong = markdown.replace("2.7 to 4.8 times", "2.7 to 5.5 times")
    assert wrong != markdown and unprinted(wrong, output, settings) == ["5.5"]


# ----- docs/your_first_layer.md -----------------------------------------------------------------------

# The page's settings, and the facts of float arithmetic it argues from (not outputs of its code).
FIRST_LAYER_SETTINGS = {
    1.5: "the layer's initial scale in every example", 0.5: "the missing gain, 1.5 - 1",
    1e-6: "the default h and tolerance", 2e-6: "2h",
    1e-16: "float64's rounding", 1e-7: "float32's rounding", 0.1: "float32's rounding over 2h, in order",
    0.01: "tie_free's spacing", 1: "exit status 1; O(1)", 2: "the power of O(h^2)",
}


def run_first_layer_page(workdir):
    """Run the page's blocks in order; returns everything its python blocks printed."""
    markdown = read("your_first_layer.md")
    namespace = {"__name__": "your_first_layer"}
    printed, all_output = "", ""
    for lang, tag, text in blocks(markdown):
        if lang == "python":
            if tag:
                with open(os.path.join(workdir, tag), "w") as f:
                    f.write(text + "\n")
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(text, f"docs/your_first_layer.md ({text.splitlines()[0]})", "exec"), namespace)
            printed += buffer.getvalue()
        elif lang == "text":
            assert printed.rstrip("\n") == text, f"docs/your_first_layer.md shows\n{text}\nbut its code printed\n{printed}"
            all_output += printed
            printed = ""
        elif lang == "bash":
            for command in text.split("\n"):
                done = subprocess.run(command.split(), cwd=workdir, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stdout + done.stderr
                all_output += done.stdout
                assert "passed" in done.stdout and " scale " in done.stdout, done.stdout
    assert printed == "", f"the page's last python blocks printed output it does not show:\n{printed}"
    return markdown, all_output


def test_your_first_layer_runs_as_written(tmp_path, monkeypatch):
    from minitensor import layers

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        markdown, output = run_first_layer_page(str(tmp_path))
    finally:
        layers.LAYER_CLASSES.pop("ScaledReLU", None)             # the page registers its layer
    assert (tmp_path / "scaled_relu.py").exists()
    assert unprinted(markdown, output, set(FIRST_LAYER_SETTINGS)) == []


def test_a_page_whose_output_block_is_wrong_fails(tmp_path, monkeypatch):
    """The runner compares output blocks for real: one changed figure fails the page."""
    markdown = read("your_first_layer.md").replace("False x: 0.33", "False x: 0.34")
    monkeypatch.setattr(sys.modules[__name__], "read", lambda name: markdown)
    monkeypatch.chdir(tmp_path)
    from minitensor import layers
    try:
        with pytest.raises(AssertionError, match="0.34"):
            run_first_layer_page(str(tmp_path))
    finally:
        layers.LAYER_CLASSES.pop("ScaledReLU", None)


# ----- docs/worked_example_1d.md and docs/figures.py --------------------------------------------------

def test_the_worked_example_quotes_its_script_and_every_number_is_printed():
    output = run_script("worked_example_1d.py")
    markdown = read("worked_example_1d.md")
    assert quoted_text(markdown) == output.rstrip("\n").split("\n"), \
        "docs/worked_example_1d.md no longer matches python docs/worked_example_1d.py: paste its output"
    assert "gives the same y, dx, dw, db: True" in output
    assert "give dx = [2, -3, 6, -3, 2]" in output and "dx = [2, -3, 6, -3, 2]" in output
    assert unprinted(markdown, output, script_constants(os.path.join(DOCS, "worked_example_1d.py"))) == []


def test_the_figures_are_drawn_by_the_script_and_shown_by_the_docs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join("docs", "figures.py"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["conv_dx_transposed.png", "im2col.png", "maxpool_routing.png", "unet_graph.png"]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)
    shown = read("unet_backward.md") + read("worked_example_1d.md")
    for name in names:
        assert f"](figures/{name})" in shown, f"no page shows docs/figures/{name}"
        assert os.path.exists(os.path.join(DOCS, "figures", name)), f"docs/figures/{name}: run python docs/figures.py"
