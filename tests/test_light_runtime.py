"""The CPU runtime imports neither torch nor transformers: load and generate in a fresh interpreter and look."""
from __future__ import annotations

import subprocess
import sys


def test_generate_imports_no_torch_or_transformers(tiny_occ):
    code = (
        "import sys, occrt\n"
        f"m = occrt.load({tiny_occ!r})\n"
        "m.generate('the cat', max_new_tokens=4)\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'safetensors'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "numpy" in imported and not imported & {"torch", "transformers"}
