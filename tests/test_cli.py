"""The command line: convert, generate, inspect, chat, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from occrt.cli import main


def run(args, capsys, stdin_text=None, monkeypatch=None):
    if stdin_text is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_generate_inspect(tiny_llama_dir, tmp_path, capsys):
    out_path = str(tmp_path / "m.occ")
    code, _, err = run(["convert", tiny_llama_dir, "-o", out_path], capsys)
    assert code == 0 and "wrote" in err
    code, out, _ = run(["generate", out_path, "--prompt", "the cat", "--max-new-tokens", "8",
                        "--temperature", "0"], capsys)
    assert code == 0 and out.endswith("\n") and len(out) > 1
    code, out, _ = run(["inspect", out_path], capsys)
    assert code == 0 and "model.layers.1.mlp.down_proj.weight" in out and "raw" in out
    code, out, _ = run(["inspect", out_path, "--json"], capsys)
    info = json.loads(out)
    assert info["version"] == "1.0" and len(info["tensors"]) == 2 * 9 + 3


def test_sampling_flags(tiny_occ, capsys):
    args = ["generate", tiny_occ, "--prompt", "the", "--max-new-tokens", "6", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    _, a, _ = run(args, capsys)
    _, b, _ = run(args, capsys)
    assert a == b


def test_chat_keeps_the_conversation(tiny_occ, capsys, monkeypatch):
    seen = []
    import occrt.api

    original = occrt.api.Model.chat

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        return original(self, messages, **kw)

    monkeypatch.setattr(occrt.api.Model, "chat", spy)
    code, out, _ = run(["generate", tiny_occ, "--max-new-tokens", "4"], capsys, "hello\nand more\n", monkeypatch)
    assert code == 0
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][2]["content"] == "and more"


def test_existing_output_needs_force(tiny_llama_dir, tiny_occ, capsys):
    code, _, err = run(["convert", tiny_llama_dir, "-o", tiny_occ], capsys)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("setup,message", [
    ("garbage", "wrong magic"),
    ("missing", "cannot open"),
])
def test_errors_are_one_line(setup, message, tmp_path, capsys):
    path = tmp_path / "x.occ"
    if setup == "garbage":
        path.write_bytes(b"hello world, this is not a model file at all")
    code, out, err = run(["generate", str(path), "--prompt", "x"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"],
                                                      "model_type": "falcon"}))
    code, _, err = run(["convert", str(tmp_path), "-o", str(tmp_path / "o.occ")], capsys)
    assert code == 2 and "FalconForCausalLM" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o.occ").exists()


def test_bad_flag_values_are_refused(tiny_occ, capsys):
    with pytest.raises(SystemExit):
        main(["generate", tiny_occ, "--prompt", "x", "--top-p", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_module_entry_point(tiny_occ):
    done = subprocess.run([sys.executable, "-m", "occrt", "inspect", tiny_occ], capture_output=True, text=True)
    assert done.returncode == 0 and "tensors (21)" in done.stdout
