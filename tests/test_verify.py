"""`occrt verify`: a summary and exit status 0 for a good file; one line and exit status 2 for anything wrong."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from occrt.cli import main
from tests import hostile_corpus
from tests.occ_samples import tiny_model_bytes


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return tiny_model_bytes()


def test_verify_good_file(model_bytes, tmp_path, capsys):
    path = tmp_path / "m.occ"
    path.write_bytes(model_bytes)
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: OK") and "every checksum matches" in out and "12 tensors decoded" in out
    assert "raw" in out and "model: llama, 1 layers" in out
    assert main(["verify", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 12 and summary["codecs"]["raw"]["tensors"] == 12
    assert summary["codecs"]["raw"]["bytes"] == 4 * summary["elements"]


def test_verify_reports_a_flipped_bit(model_bytes, tmp_path, capsys):
    data = bytearray(model_bytes)
    data[-5] ^= 0x10
    path = tmp_path / "m.occ"
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum mismatch" in err and "at byte" in err


def test_verify_checks_the_model_not_only_the_container(tmp_path, capsys):
    path = tmp_path / "c.occ"
    path.write_bytes(hostile_corpus.base())  # a valid container that holds no model
    assert main(["verify", str(path)]) == 2
    assert "model.config" in capsys.readouterr().err


def test_verify_exit_status_from_a_shell(tmp_path):
    path = tmp_path / "x.occ"
    path.write_bytes((hostile_corpus.FOLDER / "overlapping-sections.occ").read_bytes())
    r = subprocess.run([sys.executable, "-m", "occrt", "verify", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "overlaps" in r.stderr and len(r.stderr.splitlines()) == 1
