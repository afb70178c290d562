"""Where a conversion's source is: a checkpoint directory, a GGUF file, or a Hugging Face model id in the local cache.

    occrt convert ./SmolLM2-135M-Instruct -o m.occ          a directory: config.json, tokenizer files, *.safetensors
    occrt convert SmolLM2-135M-Instruct.Q4_1.gguf -o m.occ  a GGUF file (known by its first four bytes, not its name)
    occrt convert HuggingFaceTB/SmolLM2-135M -o m.occ       a model id: its snapshot in the local Hugging Face cache
    occrt convert HuggingFaceTB/SmolLM2-135M@v1.0 -o m.occ  ... at a revision (branch, tag or 40-digit commit hash)

A model id is only looked up in the cache, never downloaded: populate the cache with `hf download ORG/NAME` (or
`huggingface-cli download`) where there is a network, or copy a cache folder over. The cache folder follows
huggingface_hub's rules, read when the id is resolved: $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub. A local path wins over a model id spelled the same.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from occrt.errors import ConversionError

# ORG/NAME[@REVISION]: Hugging Face's repo id characters; a revision is a branch, tag or commit (branches may hold "/")
_MODEL_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,256}))?")
# first bytes of files people pass by mistake -> what they are and what to do instead
_NOT_A_SOURCE = (
    (b"\x89OCC", "already a .occ file (occrt inspect / generate read it as it is)"),
    (b"PK\x03\x04", "a zip archive, likely PyTorch weights (torch.save): occrt reads safetensors or GGUF; save the "
                    "model with save_pretrained(..., safe_serialization=True)"),
    (b"\x80", "a Python pickle, likely PyTorch weights: occrt reads safetensors or GGUF; save the model with "
              "save_pretrained(..., safe_serialization=True)"),
)
WHAT_CONVERTS = ("a Hugging Face checkpoint directory (config.json, tokenizer, *.safetensors), a GGUF file, or a "
                 "model id ORG/NAME[@REVISION] in the local Hugging Face cache")


@dataclass(frozen=True)
class Located:
    kind: str  # "hf_dir" | "gguf"
    path: str  # the directory or file to read
    model_id: str | None = None  # ORG/NAME when it came from the cache
    revision: str | None = None  # the snapshot's commit hash, when it came from the cache


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder, by huggingface_hub's rules, from the environment as it is now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def locate(src: str) -> Located:
    """Resolve `src` (a path or a model id) to what to read; ConversionError says what is wrong and where it looked."""
    if os.path.isdir(src):
        return Located("hf_dir", src)
    if os.path.isfile(src):
        return Located("gguf", src) if _file_kind(src) == "gguf" else _not_a_source(src)
    m = _MODEL_ID.fullmatch(src)
    if m is None:
        raise ConversionError(f"{src}: no such file or directory (occrt converts {WHAT_CONVERTS})")
    return _from_cache(m.group("repo"), m.group("revision"), src)


def _file_kind(path: str) -> str:
    with open(path, "rb") as f:
        return "gguf" if f.read(4) == b"GGUF" else "other"


def _not_a_source(path: str) -> Located:
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, what in _NOT_A_SOURCE:
        if head.startswith(magic):
            raise ConversionError(f"{path}: {what}")
    if len(head) >= 9 and head[8:9] == b"{" and path.endswith(".safetensors"):
        raise ConversionError(f"{path}: a single safetensors file; convert the directory that holds it with "
                              f"config.json and the tokenizer files")
    raise ConversionError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); occrt converts "
                          f"{WHAT_CONVERTS}")


def _from_cache(repo_id: str, revision: str | None, src: str) -> Located:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ConversionError(_not_cached(repo_id, revision, src, cache)) from None
    where = f"{repo_id}{'@' + revision if revision else ''} (Hugging Face cache: {snapshot})"
    if os.path.isfile(os.path.join(snapshot, "config.json")):
        return Located("hf_dir", snapshot, repo_id, os.path.basename(snapshot))
    ggufs = sorted(f for f in os.listdir(snapshot) if f.endswith(".gguf") and os.path.isfile(os.path.join(snapshot, f)))
    if len(ggufs) == 1:
        return Located("gguf", os.path.join(snapshot, ggufs[0]), repo_id, os.path.basename(snapshot))
    if ggufs:
        listing = "\n  ".join(os.path.join(snapshot, f) for f in ggufs)
        raise ConversionError(f"{where} holds {len(ggufs)} GGUF files; pass the one to convert:\n  {listing}")
    present = sorted(os.listdir(snapshot))
    raise ConversionError(f"{where}: no config.json and no .gguf file (cached files: {present or 'none'}); the "
                          f"snapshot is incomplete: `hf download {repo_id}` fetches the rest")


def _not_cached(repo_id: str, revision: str | None, src: str, cache: str) -> str:
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    how = (f"occrt does not download; populate the cache with `hf download {repo_id}` where there is a network "
           f"(or point HF_HUB_CACHE / HF_HOME at a cache that has it)")
    if not os.path.isdir(folder):
        return (f"{src}: not a local file or directory, and model {repo_id} is not in the Hugging Face cache "
                f"(looked for {folder}); {how}")
    refs_dir = os.path.join(folder, "refs")
    refs = sorted(os.path.relpath(os.path.join(d, f), refs_dir) for d, _, fs in os.walk(refs_dir) for f in fs)
    snapshots = sorted(os.listdir(os.path.join(folder, "snapshots"))) if os.path.isdir(
        os.path.join(folder, "snapshots")) else []
    return (f"{src}: revision {revision or 'main'!r} of {repo_id} is not in the Hugging Face cache at {folder} "
            f"(cached refs: {refs or 'none'}; snapshots: {snapshots or 'none'}); {how}")
