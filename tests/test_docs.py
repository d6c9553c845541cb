"""docs/unet_backward.md quotes what docs/unet_backward.py prints, block for block: the guide cannot go stale."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_backward_guide_quotes_its_script_exactly():
    result = subprocess.run([sys.executable, os.path.join("docs", "unet_backward.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.rstrip("\n").split("\n")
    with open(os.path.join(ROOT, "docs", "unet_backward.md")) as f:
        quoted = [line for block in re.findall(r"```text\n(.*?)\n```", f.read(), re.S) for line in block.split("\n")]
    assert quoted == printed, "docs/unet_backward.md no longer matches python docs/unet_backward.py: paste its output"
    assert "relative difference below 1e-8" in result.stdout
    assert result.stdout.count("two gradients meet") == 4              # the four skip connections
