"""Interrupting `occrt convert`: SIGKILL or SIGINT at random points never leaves a file under the output name; SIGINT
leaves nothing at all, whichever phase it lands in (calibration, the rate control's measure pass, encoding); what a SIGKILL leaves (hidden temporaries) the next writer for that name removes once stale;
an existing output is kept unless --force.

The kill points are seeded (OCCRT_KILL_SEED, default 0; OCCRT_KILL_ITERATIONS, default 4): half at a random time
in the whole run (start-up, writing, or after the rename, while the interpreter shuts down), half at a random time in
the writing window (from the writer's spool file appearing to the rename: reading and storing every tensor, the
header, the copy, fsync). The checkpoint is a 10 MB Llama, so that window is tens of milliseconds, not a few.
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from occrt.format import OccFile
from occrt.format.writer import STALE_SECONDS, OccWriter, remove_stale_temporaries
from tests.conftest import sigint_default

SEED = int(os.environ.get("OCCRT_KILL_SEED", "0"))
ITERATIONS = int(os.environ.get("OCCRT_KILL_ITERATIONS", "4"))
WRITING_WINDOW = 0.08  # seconds from the spool's appearance to the rename, about, for the checkpoint below


@pytest.fixture(scope="module")
def medium_llama_dir(tmp_path_factory) -> str:
    from tests.conftest import make_llama_dir

    return make_llama_dir(tmp_path_factory.mktemp("medium_llama"), hidden_size=256, intermediate_size=512,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def _convert_cmd(src: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "occrt", "convert", src, "-o", str(out), *extra]


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def _durations(src: str, out: Path) -> tuple[float, float]:
    """One conversion left alone: seconds from start to exit, and from the spool's appearance to exit (at least
    WRITING_WINDOW / 4, so a fast machine still gets a spread of delays)."""
    start = time.monotonic()
    proc = subprocess.Popen(_convert_cmd(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spool = None
    while proc.poll() is None:
        if spool is None and _temporaries(out):
            spool = time.monotonic()
        time.sleep(0.0005)
    end = time.monotonic()
    assert proc.returncode == 0 and out.exists()
    out.unlink()
    return end - start, max(end - (spool or start), WRITING_WINDOW / 4)


def _kill_once(src: str, out: Path, sig: int, after_spool: bool, delay: float) -> tuple[bool, int]:
    """Start a conversion, send `sig` after `delay` seconds (counted from the spool's appearance if `after_spool`).
    Returns (whether the signal arrived before the process ended, its exit status)."""
    earlier = set(_temporaries(out))  # an earlier SIGKILL's leftovers: not this writer's spool
    proc = subprocess.Popen(_convert_cmd(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    try:
        start = time.monotonic()
        if after_spool:
            while proc.poll() is None and not set(_temporaries(out)) - earlier and time.monotonic() - start < 60:
                time.sleep(0.0005)
            start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.0005)
        delivered = proc.poll() is None
        if delivered:
            proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        _reap(proc)
    return delivered, proc.returncode


def test_killing_convert_never_leaves_an_output(medium_llama_dir, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out.occ"
    plans = itertools.cycle(itertools.product((signal.SIGKILL, signal.SIGINT), (True, False)))
    whole, writing = _durations(medium_llama_dir, tmp_path / "timed.occ")  # delays inside them, on this machine
    log = []
    for _, (sig, after_spool) in zip(range(ITERATIONS), plans):
        delay = rng.uniform(0, 0.8 * writing) if after_spool else rng.uniform(0, 0.8 * whole)
        left_before = set(_temporaries(out))  # an earlier SIGKILL's, not yet stale
        delivered, status = _kill_once(medium_llama_dir, out, sig, after_spool, delay)
        log.append((sig.name, "writing" if after_spool else "any time", round(delay, 3), delivered, status))
        if out.exists():
            # The rename is the commit point: a signal after it (while the interpreter shuts down) finds a
            # complete file; before it, there is no file. Never a partial one.
            OccFile.open(out).verify()
            out.unlink()
        if sig == signal.SIGINT:  # removes its own temporaries (a SIGKILL's wait until they are stale)
            assert set(_temporaries(out)) == left_before, (log, _temporaries(out))
            assert status in (0, 130, -signal.SIGINT), log  # 130: occrt's own exit after cleaning up
        else:
            for p in _temporaries(out):  # what a SIGKILL left: hidden, and only these names
                assert p.name.startswith(".out.occ.") and p.name.endswith(".tmp")
    assert sum(d for *_, d, _ in log) >= ITERATIONS // 2, f"most runs should be interrupted, not finish: {log}"
    # SIGKILL leftovers are unlocked: the next writer for this name removes them once they are stale
    for p in _temporaries(out):
        old = time.time() - STALE_SECONDS - 1
        os.utime(p, (old, old))
    with OccWriter(out):
        pass
    assert not _temporaries(out)
    print(log)


def test_stale_temporaries_only_are_removed(tmp_path):
    out = tmp_path / "m.occ"
    old = time.time() - STALE_SECONDS - 1
    stale = [tmp_path / ".m.occ.abcd1234.data.tmp", tmp_path / ".m.occ.zz_9yy8x.tmp"]
    fresh = tmp_path / ".m.occ.fresh123.tmp"
    other = tmp_path / ".m.occ.x.abcd1234.tmp"  # a temporary of the output "m.occ.x", not of "m.occ"
    unrelated = tmp_path / "m.occ.abcd1234.tmp"  # not hidden: not ours
    for p in stale + [fresh, other, unrelated]:
        p.write_bytes(b"x")
    for p in stale + [other, unrelated]:
        os.utime(p, (old, old))
    live = OccWriter(out)  # holds the lock on its own spool, however old the spool looks
    try:
        spool = next(p for p in _temporaries(out) if p.name.endswith(".data.tmp") and p not in stale)
        os.utime(spool, (old, old))
        removed = remove_stale_temporaries(out)
        assert sorted(removed) == []  # the writer removed the stale ones when it started
        assert not any(p.exists() for p in stale)
        assert fresh.exists() and other.exists() and unrelated.exists() and spool.exists()
    finally:
        live.abort()
    assert not spool.exists()


def test_existing_output_is_kept_unless_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "m.occ"
    out.write_bytes(b"precious")
    r = subprocess.run(_convert_cmd(tiny_llama_dir, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious" and not _temporaries(out)
    r = subprocess.run(_convert_cmd(tiny_llama_dir, out, "--force"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert OccFile.open(out).verify()["tensors"] == 21 and not _temporaries(out)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigint_while_writing_cleans_up_in_process(tmp_path):
    """The writer's own guarantee, without a subprocess: KeyboardInterrupt anywhere inside the `with` removes all."""
    import numpy as np

    from occrt.codecs.raw import RawCodec

    out = tmp_path / "x.occ"
    with pytest.raises(KeyboardInterrupt):
        with OccWriter(out) as w:
            w.add_tensor("a", RawCodec.encode(np.ones(8, np.float32)))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# phase -> (extra flags, the line that starts it, the line that would end it)
PHASES = {
    "calibration": (("--bpw", "3", "--calib", "{calib}", "--calib-tokens", "8192"),
                    "calibration: second moments, window ", " tokens in "),  # batched: the first line says 8/33
    "gradients": (("--bpw", "3", "--calib", "{calib}", "--calib-tokens", "8192"), "calibration: gradients, window 1/",
                  " tokens in "),
    "tuning": (("--bpw", "3", "--calib", "{calib}", "--calib-tokens", "1024"), "tuning: step 1/", "tuning: KL"),
    "measure": (("--bpw", "3"), "rate control: measuring", "measured and allocated"),
    "encode": (("--bpw", "3"), "writing ", "wrote "),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_ctrl_c_in_each_phase_leaves_nothing(medium_llama_dir, tmp_path, phase):
    """SIGINT as each phase starts (read off the log): exit 130 with a one-line message, no output, no temporary
    (the output's, or calibration's in the temporary directory)."""
    from tests.conftest import WORDS

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(WORDS * 800))
    flags, start, end = PHASES[phase]
    out = tmp_path / "out.occ"
    cmd = _convert_cmd(medium_llama_dir, out, *(f.format(calib=calib) for f in flags))
    scratch = tmp_path / "tmp"  # the child's temporary directory (calibration spills its statistics there)
    scratch.mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)}, preexec_fn=sigint_default)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(start):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        _reap(proc)
    log = "".join(seen) + rest
    assert seen and seen[-1].startswith(start), log  # the signal went in during the phase ...
    after = rest.splitlines()
    assert not any(end in line and not line.startswith(start) for line in after), log  # ... which did not finish
    assert proc.returncode == 130, log
    assert after[-1] == f"occrt: interrupted; {out} was not written (no partial or temporary file is left)", log
    assert not out.exists() and not _temporaries(out), os.listdir(tmp_path)
    assert os.listdir(scratch) == []  # nor a spilled statistic


def _reap(proc: subprocess.Popen) -> None:
    """Kill the child if it is still running (a failed assertion must not leave it behind) and close its stderr."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stderr.close()
