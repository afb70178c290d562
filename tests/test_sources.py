"""Where `occrt convert SRC` reads from (issue 6, item 4): a directory, a GGUF file, or a Hugging Face model id
resolved through the local hub cache only (a cache laid out as huggingface_hub lays it out, built here in tmp); what
each missing or unknown piece says."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import numpy as np
import pytest

from occrt.cli import main
from occrt.converters.convert import convert
from occrt.converters.locate import hub_cache_dir, locate
from occrt.errors import ConversionError
from occrt.format import OccFile

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def make_hub_cache(cache, repo_id: str, files_from: str, *, commit: str = COMMIT, refs=("main",)) -> str:
    """`files_from`'s files in a hub cache: blobs named by content hash, the snapshot's entries symlinks to them,
    refs/<branch> holding the commit. Returns the snapshot folder."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(files_from)):
        with open(os.path.join(files_from, name), "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    for ref in refs:
        os.makedirs(os.path.dirname(os.path.join(repo, "refs", ref)), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # occrt must stay offline on its own


def _tensors(path: str) -> dict[str, np.ndarray]:
    with OccFile.open(path) as occ:
        return {n: np.array(occ.tensor(n)) for n in occ.tensors}


def test_model_id_converts_from_the_cache(tiny_llama_dir, tmp_path, monkeypatch, no_network):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "acme/tiny-llama", tiny_llama_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out, ref = str(tmp_path / "id.occ"), str(tmp_path / "dir.occ")
    assert main(["convert", "acme/tiny-llama", "-o", out, "-q"]) == 0
    convert(tiny_llama_dir, ref, log=lambda msg: None)
    got, want = _tensors(out), _tensors(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[n], want[n]) for n in want)
    with OccFile.open(out) as occ:
        prov = occ.metadata["provenance"]
        assert prov["source_name"] == "acme/tiny-llama" and prov["source_revision"] == COMMIT
        assert occ.blob("tokenizer.json") == open(os.path.join(tiny_llama_dir, "tokenizer.json"), "rb").read()
        assert occ.metadata["chat.template"]  # the template came along
    # a revision: a branch, a commit hash; one not cached names what is
    assert locate(f"acme/tiny-llama@{COMMIT}").path.endswith(COMMIT)
    assert locate("acme/tiny-llama@main").revision == COMMIT
    with pytest.raises(ConversionError, match=r"revision 'v2' of acme/tiny-llama is not in the Hugging Face cache"
                                              r".*cached refs: \['main'\].*hf download acme/tiny-llama"):
        locate("acme/tiny-llama@v2")


def test_cache_folder_follows_the_environment(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == str(tmp_path / "hfhome" / "hub")
    make_hub_cache(tmp_path / "hfhome" / "hub", "acme/tiny", tiny_llama_dir, refs=("main", "refs/pr/1"))
    assert locate("acme/tiny").kind == "hf_dir"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(ConversionError) as e:
        locate("acme/tiny")
    msg = str(e.value)
    assert "not a local file or directory" in msg and str(tmp_path / "elsewhere" / "models--acme--tiny") in msg
    assert "hf download acme/tiny" in msg and "does not download" in msg


def test_a_local_path_wins_over_a_model_id(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("acme")
    shutil.copytree(tiny_llama_dir, "acme/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    where = locate("acme/tiny")
    assert where.kind == "hf_dir" and where.path == "acme/tiny" and where.model_id is None


def test_gguf_in_the_cache(tmp_path, monkeypatch, no_network):
    from tests.test_families import make_family_dir
    from tests.test_families_gguf import write_gguf

    pytest.importorskip("gguf")
    src = make_family_dir(tmp_path / "hf", "qwen2", seed=3)
    files = tmp_path / "files"
    files.mkdir()
    write_gguf(src, str(files / "m.Q8.gguf"), "qwen2")
    (files / "README.md").write_text("a model card")
    cache = tmp_path / "hub"
    make_hub_cache(cache, "acme/qwen-gguf", str(files))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    where = locate("acme/qwen-gguf")
    assert where.kind == "gguf" and where.path.endswith("m.Q8.gguf")
    out = str(tmp_path / "g.occ")
    assert main(["convert", "acme/qwen-gguf", "-o", out, "-q"]) == 0
    with OccFile.open(out) as occ:
        assert occ.metadata["provenance"]["source_name"] == "acme/qwen-gguf"
        assert occ.metadata["provenance"]["source_format"] == "gguf"
    # two quantizations in one repo: the error lists both paths to choose from
    shutil.copy(files / "m.Q8.gguf", files / "m.F16.gguf")
    make_hub_cache(cache, "acme/two-gguf", str(files), commit=OTHER_COMMIT)
    with pytest.raises(ConversionError, match=r"holds 2 GGUF files; pass the one to convert") as e:
        locate("acme/two-gguf")
    assert "m.F16.gguf" in str(e.value) and "m.Q8.gguf" in str(e.value)


def test_incomplete_snapshot(tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    (files / "README.md").write_text("only the card was downloaded")
    make_hub_cache(tmp_path / "hub", "acme/partial", str(files))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConversionError, match=r"no config.json and no .gguf file.*README.md.*hf download acme/partial"):
        locate("acme/partial")


def test_missing_tokenizer(tiny_llama_dir, tmp_path):
    src = tmp_path / "no_tok"
    shutil.copytree(tiny_llama_dir, src)
    os.remove(src / "tokenizer.json")
    with pytest.raises(ConversionError, match=r"no tokenizer: tokenizer.json is missing.*copy the model's tokenizer"):
        convert(str(src), str(tmp_path / "x.occ"), log=lambda msg: None)
    assert not os.path.exists(tmp_path / "x.occ")


def test_missing_chat_template_converts_and_chat_refuses(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "no_template"
    shutil.copytree(tiny_llama_dir, src)
    with open(src / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    out = str(tmp_path / "plain.occ")
    assert main(["convert", str(src), "-o", out]) == 0
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", out]) == 2  # chat mode: refused before loading, in one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err and "--prompt" in err
    assert main(["generate", out, "--prompt", "the cat", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("content, name, message", [
    (b"\x89OCC" + bytes(60), "m.occ", "already a .occ file"),
    (b"PK\x03\x04" + bytes(60), "pytorch_model.bin", "zip archive, likely PyTorch weights"),
    (b"\x80\x02" + bytes(60), "model.pt", "Python pickle"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + bytes(14), "model.safetensors", "a single safetensors file"),
    (b"hello world", "notes.txt", "not a GGUF file"),
])
def test_unknown_files_are_named(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["convert", str(path), "-o", str(tmp_path / "x.occ")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.occ")


def test_nonexistent_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "x.occ")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["convert", "acme/missing", "-o", str(tmp_path / "x.occ")]) == 2  # looks like an id: the cache
    assert "is not in the Hugging Face cache" in capsys.readouterr().err
