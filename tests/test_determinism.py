"""Determinism: converting the same checkpoint twice gives byte-identical files, with 1 or 2 threads, for every kind
of conversion the command line offers.

The option sets come from `occrt convert`'s own parser, so conversions added later (`--bpw`, `--lossless`, a seed,
...) are covered as they appear: each becomes one more parametrized case, converted once with NUMBA_NUM_THREADS /
OMP_NUM_THREADS = 1 and once with 2, in separate processes (thread pools are sized when a process starts), into
differently named outputs (no path may leak into the file).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

import pytest

from occrt.cli import build_parser
from occrt.format import OccFile

THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def convert_options() -> dict[str, tuple[str, ...]]:
    """Option sets worth comparing, from the options `occrt convert` has (what `occrt convert --help` lists)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {s: a for a in sub.choices["convert"]._actions for s in a.option_strings}
    cases: dict[str, tuple[str, ...]] = {"default": ()}
    if "--dtype" in actions and "bf16" in (actions["--dtype"].choices or ()):
        cases["bf16"] = ("--dtype", "bf16")  # the rounding path
    seed = ("--seed", "1") if "--seed" in actions else ()
    if "--bpw" in actions:  # the compressed codecs: rotations, rate control, entropy coding
        cases["bpw-3"] = ("--bpw", "3", *seed)
        cases["bpw-2.5"] = ("--bpw", "2.5", *seed)
    if "--lossless" in actions:
        cases["lossless"] = ("--lossless", *seed)
    return cases


def test_convert_help_lists_what_the_parser_has():
    r = subprocess.run([sys.executable, "-m", "occrt", "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for options in convert_options().values():
        for flag in options:
            if flag.startswith("--"):
                assert flag in r.stdout


def _convert(src: str, out: str, options: tuple[str, ...], threads: int) -> str:
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARIABLES}}
    r = subprocess.run([sys.executable, "-m", "occrt", "convert", src, "-o", out, *options], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("case", sorted(convert_options()))
def test_conversion_is_byte_identical_across_runs_and_threads(case, tiny_llama_dir, tmp_path):
    options = convert_options()[case]
    one = _convert(tiny_llama_dir, str(tmp_path / "one-thread.occ"), options, threads=1)
    two = _convert(tiny_llama_dir, str(tmp_path / "two-threads.occ"), options, threads=2)
    assert one == two, f"occrt convert {' '.join(options)}: 1 and 2 threads give different files"
    OccFile.open(tmp_path / "two-threads.occ").verify()
