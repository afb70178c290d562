"""Which family module handles a checkpoint: HF `architectures[0]` / `model_type`, GGUF `general.architecture`, or a
.occ file's architecture label -> one `converters/arch_*.py` module.

Each family module holds everything that differs per family, in one place:

    HF_ARCHITECTURES, HF_MODEL_TYPES    HF class / model_type -> occrt architecture label
    GGUF_ARCHITECTURES                  GGUF general.architecture -> occrt architecture label
    HF_CLASSES                          occrt architecture label -> (HF class, model_type) an export writes
    config_from_hf(hf, architecture)    config.json -> ModelConfig (UnsupportedModelError for what it cannot run)
    config_from_gguf(fields, shapes, architecture)
    hf_rules(cfg), gguf_rules(cfg)      checkpoint tensors -> occrt tensors (converters/tensor_rules.py); hf_rules
                                        lists the family's HF checkpoint in its state-dict order (export writes it)
    hf_config(cfg)                      the family's own config.json for cfg (export, calibration)
    HF_IGNORED, GGUF_IGNORED            optional: checkpoint tensors that carry nothing the model needs (a regex /
                                        a set of names)
    normalize_hf_name(name)             optional: one spelling for tensor names checkpoints spell two ways
"""
from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

from occrt.converters.tensor_rules import TensorMapper
from occrt.errors import UnsupportedModelError
from occrt.model.config import ModelConfig
from occrt.model.loader import tensor_shapes

FAMILY_MODULES = ("arch_llama", "arch_qwen", "arch_phi3", "arch_gpt2", "arch_gemma")
# Buffers some HF checkpoints save that the model recomputes.
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def families() -> list[ModuleType]:
    return [importlib.import_module(f"occrt.converters.{name}") for name in FAMILY_MODULES]


def supported_list() -> str:
    hf = sorted({a for f in families() for a in f.HF_ARCHITECTURES})
    gguf = sorted({a for f in families() for a in f.GGUF_ARCHITECTURES})
    return ", ".join(hf + [f"GGUF '{a}'" for a in gguf])


def for_hf(hf: dict[str, Any]) -> tuple[ModuleType, str]:
    """The family module and architecture label of a `config.json`."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for family in families():
        for a in archs:
            if a in family.HF_ARCHITECTURES:
                return family, family.HF_ARCHITECTURES[a]
    for family in families():
        if model_type in family.HF_MODEL_TYPES:
            return family, family.HF_MODEL_TYPES[model_type]
    name = archs[0] if archs else model_type
    raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: {supported_list()}")


def for_gguf(fields: dict[str, Any]) -> tuple[ModuleType, str]:
    arch = fields.get("general.architecture")
    for family in families():
        if arch in family.GGUF_ARCHITECTURES:
            return family, family.GGUF_ARCHITECTURES[arch]
    raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; supported: {supported_list()}")


def for_architecture(architecture: str) -> ModuleType:
    """The family module that writes a .occ architecture label back as a Hugging Face checkpoint."""
    for family in families():
        if architecture in family.HF_CLASSES:
            return family
    raise UnsupportedModelError(f"no Hugging Face class is known for architecture {architecture!r}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    family, architecture = for_hf(hf)
    return family.config_from_hf(hf, architecture)


def config_from_gguf(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    family, architecture = for_gguf(fields)
    return family.config_from_gguf(fields, shapes, architecture)


def hf_mapper(cfg: ModelConfig) -> TensorMapper:
    """HF checkpoint tensors -> occrt tensors for `cfg`'s family."""
    family = for_architecture(cfg.architecture)
    extra = getattr(family, "HF_IGNORED", None)

    def ignored(name: str) -> bool:
        return (_HF_IGNORED.fullmatch(name) is not None or (cfg.tie_word_embeddings and name == "lm_head.weight")
                or (extra is not None and extra.fullmatch(name) is not None))

    return TensorMapper(family.hf_rules(cfg), tensor_shapes(cfg), family=cfg.architecture, ignored=ignored,
                        normalize=getattr(family, "normalize_hf_name", lambda name: name))


def gguf_mapper(cfg: ModelConfig) -> TensorMapper:
    family = for_architecture(cfg.architecture)
    extra = getattr(family, "GGUF_IGNORED", frozenset())
    return TensorMapper(family.gguf_rules(cfg), tensor_shapes(cfg), family=cfg.architecture,
                        ignored=lambda name: name in extra)
