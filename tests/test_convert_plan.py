"""`occrt convert --dry-run` (the plan, nothing written) and the progress bars of conversion and loading (issue 6,
item 5)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from occrt.cli import main
from occrt.converters.convert import ConvertOptions, convert
from occrt.converters.plan import plan_conversion
from occrt.format import OccFile


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("flags, tolerance", [((), 0.001), (("--dtype", "f16"), 0.001), (("--bpw", "3"), 0.03),
                                              (("--bpw", "2", "--ranks", "0,8"), 0.03), (("--lossless",), 0.01)],
                         ids=["raw", "f16", "bpw3", "bpw2-ranks", "lossless"])
def test_dry_run_writes_nothing_and_estimates_the_size(tiny_llama_dir, tmp_path, capsys, flags, tolerance):
    out = tmp_path / "m.occ"
    before = _listing(tmp_path), _listing(tiny_llama_dir)
    assert main(["convert", tiny_llama_dir, "-o", str(out), "--dry-run", *flags]) == 0
    assert (_listing(tmp_path), _listing(tiny_llama_dir)) == before  # no output, no temporaries
    text = capsys.readouterr().out
    with_tensor_rows = [line for line in text.splitlines() if line.startswith("model.") or line.startswith("lm_head")]
    estimate = int(text.split("estimated file size: ")[1].split(" bytes")[0].replace(",", ""))
    assert main(["convert", tiny_llama_dir, "-o", str(out), "-q", *flags]) == 0
    real = os.path.getsize(out)
    assert abs(estimate / real - 1) <= tolerance, (estimate, real)
    with OccFile.open(out) as occ:
        assert len(with_tensor_rows) == len(occ.tensors)
        codecs = {0: "raw", 1: "ecsq", 2: "planes", 3: "tcq"}
        for line in with_tensor_rows:  # each row names the codec the conversion then used
            name, shape, codec = line.split()[:3]
            assert codecs[occ.tensors[name].codec] == codec
            assert shape == "x".join(map(str, occ.tensors[name].shape))


def test_dry_run_json_and_without_output(tiny_llama_dir, tmp_path, capsys):
    assert main(["convert", tiny_llama_dir, "--dry-run", "--bpw", "3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "bpw 3" and plan["estimated_file_bytes"] > 0
    assert {t["codec"] for t in plan["tensors"]} == {"tcq", "ecsq", "raw"}  # linear layers, embedding, norms
    linear = [t for t in plan["tensors"] if t["name"].endswith("_proj.weight")]
    n = sum(t["estimated_bytes"] * 8 / t["bits_per_weight"] for t in linear)
    assert abs(sum(t["estimated_bytes"] * 8 for t in linear) / n - 3) < 0.1  # the budget the rate control met
    assert main(["convert", tiny_llama_dir]) == 2  # neither -o nor --dry-run
    assert "-o/--output is required" in capsys.readouterr().err
    assert main(["convert", tiny_llama_dir, "-o", str(tmp_path / "m.occ"), "--json"]) == 2
    assert "--json prints the plan of --dry-run" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_plan_matches_each_tensor_of_a_real_conversion(tiny_llama_dir, tmp_path):
    options = ConvertOptions(bpw=3.0)
    plan = plan_conversion(tiny_llama_dir, options, log=lambda msg: None)
    out = str(tmp_path / "m.occ")
    convert(tiny_llama_dir, out, options, log=lambda msg: None)
    with OccFile.open(out) as occ:
        for t in plan.tensors:
            e = occ.tensors[t.name]
            real = e.length + (len(json.dumps(e.params, separators=(",", ":"))) if e.codec in (1, 3) else 0)
            assert abs(t.record_bytes - real) <= max(0.1 * real, 64), (t.name, t.record_bytes, real)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "occrt", *args], capture_output=True, text=True, timeout=300, env=env)


def test_progress_bars_name_tensors_only_when_asked(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "m.occ")
    r = _run("convert", tiny_llama_dir, "-o", out, "--bpw", "3", "--progress")
    assert r.returncode == 0, r.stderr
    for bar in ("measure:", "encode:"):  # one bar a pass, each showing a tensor, bytes, rate and time left
        frames = [f for f in r.stderr.replace("\r", "\n").splitlines() if f.startswith(bar)]
        assert frames and frames[-1].startswith(f"{bar} 100%"), r.stderr
        # e.g. "encode: 100%|####| 103k/103k [00:00<00:00, 5.57M weights/s, model.norm.weight, 401 KiB]"
        assert any(re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+\w? weights/s, (model|lm_head)[\w.]*weight, \d+ KiB\]", f)
                   for f in frames), frames
    r = _run("generate", out, "--prompt", "the cat", "--max-new-tokens", "2", "--progress")
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stderr.replace("\r", "\n").splitlines() if f.startswith("decode:")]
    assert frames and any(re.search(r"weights/s, model[\w.]*_proj\.weight, \d+ KiB\]", f) for f in frames), frames
    # stderr is a pipe here: without --progress no bar, with --quiet nothing at all
    r = _run("convert", tiny_llama_dir, "-o", out, "--bpw", "3", "--force")
    assert r.returncode == 0 and "\r" not in r.stderr and "encode:" not in r.stderr and "wrote" in r.stderr
    r = _run("convert", tiny_llama_dir, "-o", out, "--bpw", "3", "--force", "--progress", "--quiet")
    assert r.returncode == 0 and r.stderr == ""
