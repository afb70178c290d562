"""Calibration: what the model's linear layers see on real text, and how much the loss cares about each weight.

From a calibration text (`occrt convert --calib FILE`), in windows of `ctx` tokens with BOS prepended:

  - H = E[x xᵀ] for the input of every linear layer, one per input space (q/k/v share theirs, gate/up theirs): the
    Hessian of the layer's output error, used by error-feedback rounding (converters/gptq.py);
  - F_t = mean over tensor t's entries of E[(∂L/∂w)²], the empirical Fisher diagonal averaged per tensor: the
    loss's sensitivity to t's weight error, used to weight each tensor's distortion in the rate allocation
    (ΔL ≈ ½ Σ F_ij e_ij², so D_t = F_t ‖E_t‖²; equal slopes then scale t's step by 1/√F_t).

Both come from one forward and backward pass per window of a float32 copy of the model in torch (transformers'
implementation of the family, `AutoModelForCausalLM` on the config an export would write, its tensors put back in the
family's layout by the converter's rules: Phi-3's fused q/k/v, GPT-2's Conv1D) -- conversion may use torch; the
runtime never does. A fused module's input is the input space of all its parts, and its gradient splits into the
parts' Fisher values by the same rules. Memory: the model in float32 plus the H matrices (one n_in × n_in float64
matrix per input space).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from occrt.converters.source import Source
from occrt.errors import ConversionError
from occrt.model.config import ModelConfig

DEFAULT_TOKENS = 8192
# tensor name suffix -> input space suffix (projections reading the same activation share one H)
_SPACE = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
          "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}
_LINEAR = re.compile(r"(model\.layers\.\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight")


@dataclass
class Calibration:
    tokens: int
    hessians: dict[str, np.ndarray]  # "model.layers.{i}.{space}" -> (n_in, n_in) float64, E[x xᵀ]
    fisher: dict[str, float]  # tensor name -> mean squared gradient of its entries

    def hessian_for(self, tensor_name: str) -> np.ndarray | None:
        m = _LINEAR.fullmatch(tensor_name)
        return None if m is None else self.hessians.get(f"{m.group(1)}.{_SPACE[m.group(2)]}")


def calibration_windows(source: Source, text: str, *, n_tokens: int, ctx: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(source.tokenizer.tokenizer_json.decode("utf-8"))
    ids = tok.encode(text[: 64 * n_tokens], add_special_tokens=False).ids[:n_tokens]
    if len(ids) < 16:
        raise ConversionError(f"the calibration text has only {len(ids)} tokens; give at least a few hundred")
    bos = source.tokenizer.bos_token_id
    return [([bos] if bos is not None else []) + ids[s:s + ctx] for s in range(0, len(ids), ctx)]


def calibration_model(source: Source):
    """transformers' float32 model of the source's family, its weights the source's tensors; returns (model, the
    family's tensor rules that hold linear weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from occrt.converters.architectures import for_architecture
    from occrt.converters.policy import as_f32
    from occrt.converters.tensor_rules import assemble

    cfg = source.config
    family = for_architecture(cfg.architecture)
    hf = dict(family.hf_config(cfg))
    hf.pop("architectures")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf),
                                                 dtype=torch.float32)
    tensors = {t.name: np.ascontiguousarray(as_f32(t)) for t in source.tensors()}
    rules = family.hf_rules(cfg)
    # copies: the model owns its float32 weights (a source's arrays may be read-only views of its files)
    state = {r.source: torch.from_numpy(np.array(assemble(r, tensors.__getitem__), dtype=np.float32, order="C"))
             for r in rules}
    del tensors
    if cfg.tie_word_embeddings:
        embed = next(r.source for r in rules if r.parts == ("model.embed_tokens.weight",))
        state["lm_head.weight"] = state[embed]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConversionError(f"calibration model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _materialize_rotary(model, cfg)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ConversionError(f"calibration model: buffers {left[:3]} have no values")
    model.float().eval()
    return model, [r for r in rules if _LINEAR.fullmatch(r.parts[0])]


def _materialize_rotary(model, cfg: ModelConfig) -> None:
    """Buffers the checkpoint does not hold (the model was built on the meta device): occrt's own rotary
    frequencies, one set per layer type where the model keeps several (Gemma 3's `{layer_type}_inv_freq`, the local
    rope on sliding layers), and Gemma's embedding scale."""
    import torch

    from occrt.model.rope import inverse_frequencies

    ropes = {"": cfg.rope, "full_attention_": cfg.rope, "sliding_attention_": cfg.rope_local or cfg.rope}
    for module in model.modules():
        for prefix, rope in ropes.items():
            inv = getattr(module, prefix + "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.is_meta:
                inv_freq, scaling = inverse_frequencies(rope, cfg.rotary_dims)
                setattr(module, prefix + "inv_freq", torch.from_numpy(inv_freq.copy()))
                setattr(module, prefix + "original_inv_freq", getattr(module, prefix + "inv_freq"))
                setattr(module, prefix + "attention_scaling", scaling)
        scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.is_meta:
            module.embed_scale = torch.tensor(cfg.embedding_scale, dtype=torch.float32)


def calibrate(source: Source, text: str, *, n_tokens: int = DEFAULT_TOKENS, ctx: int = 512,
              log: Callable[[str], None] = lambda msg: None) -> Calibration:
    import torch

    from occrt.converters.architectures import hf_mapper

    started = time.monotonic()
    ctx = min(ctx, source.config.max_position_embeddings - 1)  # a window and its BOS fit the model's positions
    windows = calibration_windows(source, text, n_tokens=n_tokens, ctx=ctx)
    model, rules = calibration_model(source)
    mapper = hf_mapper(source.config)

    hessians: dict[str, torch.Tensor] = {}
    hooks = []
    for rule in rules:
        m = _LINEAR.fullmatch(rule.parts[0])
        key = f"{m.group(1)}.{_SPACE[m.group(2)]}"  # every part of a fused module reads the same input
        if key in (h_key for h_key, _ in hooks):
            continue  # one module per input space (q, k and v read the same activation)
        module = model.get_submodule(rule.source.rsplit(".", 1)[0])

        def hook(mod, args, output, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, n_in)
            hessians[key] = hessians.get(key, 0) + x.T @ x

        hooks.append((key, module.register_forward_hook(hook)))
    weights = {rule.source: model.get_parameter(rule.source) for rule in rules}
    fisher = {part: 0.0 for rule in rules for part in rule.parts}
    n_tokens_seen = n_grads = 0
    for k, window in enumerate(windows):
        ids = torch.tensor([window])
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        nll.backward()
        for rule in rules:
            g2 = (weights[rule.source].grad.double() ** 2).numpy()
            for part, piece in zip(rule.parts, mapper.split(rule, g2)):  # a fused gradient split like its weight
                fisher[part] += float(piece.mean())
        n_grads += 1
        n_tokens_seen += ids.shape[1]
        log(f"calibration: window {k + 1}/{len(windows)} ({time.monotonic() - started:.0f} s)")
    for _, h in hooks:
        h.remove()
    return Calibration(tokens=n_tokens_seen,
                       hessians={k: (v / n_tokens_seen).numpy() for k, v in hessians.items()},
                       fisher={n: v / n_grads for n, v in fisher.items()})
