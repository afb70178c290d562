"""Sequential coding: each linear layer's error feedback sees the inputs the coded model gives it.

The calibration's second moments H = E[x xᵀ] (converters/calibrate.py) are the source model's: every layer is coded
as if the layers below it were exact. Below ~3 bits they are far from exact, and a layer's input in the coded model
differs from the source's by the error of everything beneath it. Here the layers are coded in the order the model
runs them, on the calibration's windows, carrying two activations: the source model's (x, float weights) and the coded
model's (x̂, coded weights below, and the coded embedding). For each group of projections that read one activation
(q/k/v, o, gate/up, down):

    Ĥ = E[x̂ x̂ᵀ],   C = E[x x̂ᵀ]
    W' = W + α · W (C − Ĥ) (Ĥ + λI)⁻¹          (α = 0: the coded inputs' moments only)
    code W' with error feedback weighted by Ĥ

Minimizing E‖W x − Q x̂‖² over Q: its least-squares optimum is W C Ĥ⁻¹ (W' at α = 1), and the loss splits into that
optimum's residual plus (W' − Q) Ĥ (W' − Q)ᵀ, which is exactly what error feedback minimizes with Ĥ. So α = 1 asks
each layer to undo the error of the layers below it, α = 0 only to adapt its rounding to the inputs it will see.
Same idea as GPTQ's sequential mode and quantization error propagation (QEP, Arai & Ichikawa 2025), written here
from those descriptions.

Needs the family's torch model to hold every coded linear layer as occrt stores it (`finetune.tunable`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from occrt.converters.calibrate import _decoder_layers
from occrt.converters.source import SourceTensor

# (the projection whose input is captured, the projections coded from it), in the order a layer runs them
STAGES = (("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("self_attn.o_proj", ("self_attn.o_proj",)),
          ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.down_proj", ("mlp.down_proj",)))
BATCH_TOKENS = 4096  # tokens per layer call: bounds the activations (SmolLM2's MLP: 4,104 x 1,536 float32 = 25 MB)
CORRECTION_DAMP = 0.01  # λ of the correction, as a fraction of Ĥ's mean diagonal


def by_default(bpw: float | None) -> bool:
    """Whether `--calib` codes sequentially when `--sequential` is not given, for a file of `bpw` bits per linear
    weight: below 2.5 bits, where the layers below are far from exact. Measured on SmolLM2 with alice29 (enwiki
    perplexity ratio, tuning after; seeds 0 and 1 of the rotations): at 2.0 bits 2.482 and 2.491 against 2.611 and
    2.529; at 2.5 bits 1.606 and 1.558 against 1.568 and 1.580, and at 3.0 bits 1.251 and 1.273 (the same statistics
    summed in float64 and in float32) against 1.257: no gain beyond what the seed alone moves. On other text (enwiki's
    last lines) the 2.0-bit gain held on the mean of the two seeds (2.7 %) but not for seed 1: about one run's
    spread. It costs ~60 s and ~190 MB more (benchmarks/quality_results.md)."""
    return bpw is not None and bpw < 2.5


class _Stop(Exception):
    pass


def _batches(windows: list[list[int]]) -> list[list[list[int]]]:
    out: list[list[list[int]]] = []
    for w in windows:
        if out and len(out[-1][0]) == len(w) and len(w) * (len(out[-1]) + 1) <= BATCH_TOKENS:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _layer_calls(model, layers, batches, embedding=None):
    """Per batch: (the hidden states entering the first layer, the keyword arguments each layer is called with),
    the model's own (masks, positions and rotary tables per layer type), recorded by running it with every layer
    replaced by the identity. `embedding`: the input embedding's matrix to use instead of the model's."""
    import torch

    emb = model.get_input_embeddings()
    original = emb.weight
    calls = []
    for batch in batches:
        seen: list = []

        def stub(hidden, *args, **kwargs):
            seen.append((hidden, kwargs))
            return hidden

        for layer in layers:
            layer.forward = stub
        if embedding is not None:
            emb._parameters["weight"] = embedding
        try:
            with torch.no_grad():
                model.base_model(input_ids=torch.tensor(batch), use_cache=False)
        finally:
            emb._parameters["weight"] = original
            for layer in layers:
                del layer.forward
        if len(seen) != len(layers):
            raise RuntimeError(f"the model called {len(seen)} of its {len(layers)} decoder layers")
        calls.append((seen[0][0], [kw for _, kw in seen]))
    return calls


def _run(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _capture(layer, module, hidden, kwargs):
    """The input (tokens, n_in) `module` gets when `layer` runs on `hidden`; the layer stops there."""
    got = []

    def pre(mod, args):
        got.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        layer(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    x = got[0]
    return x.reshape(-1, x.shape[-1]).float()


def _run_capturing(layer, modules, hidden, kwargs):
    """`layer`'s output on `hidden`, and the inputs (tokens, n_in) of `modules` (name -> module) on the way."""
    got = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, key=key: got.__setitem__(key, args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for key, m in modules.items()]
    try:
        return _run(layer, hidden, kwargs), got
    finally:
        for handle in handles:
            handle.remove()


def corrected(w, h, c, alpha: float, damp: float = CORRECTION_DAMP):
    """W + α W (C − Ĥ)(Ĥ + λI)⁻¹ (torch float64): at α = 1 and λ = 0 the least-squares solution of W' x̂ ≈ W x
    given Ĥ = E[x̂ x̂ᵀ] and C = E[x x̂ᵀ]; λ is `damp` times Ĥ's mean diagonal."""
    import torch

    n = h.shape[0]
    lam = damp * float(torch.diagonal(h).mean())
    shift = torch.linalg.solve(h + lam * torch.eye(n, dtype=h.dtype), (c - h).T).T  # (C − Ĥ)(Ĥ + λI)⁻¹, Ĥ symmetric
    return w + alpha * (w @ shift)


def sequential_records(model, windows: list[list[int]], coded_embedding: np.ndarray,
                       encode: Callable[[SourceTensor, np.ndarray], object], decode: Callable[[object], np.ndarray], *,
                       alpha: float = 0.0, log: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """Code every linear layer of `model` (transformers' float32 model of the source, linear weights loaded) in
    order, each from the coded model's inputs on `windows` (see the module's docstring). `encode(tensor, Ĥ)` codes
    one weight with error feedback weighted by Ĥ; `decode(record)` gives the weight it decodes to. Returns
    HF name -> record. The model's linear weights are left on the meta device (released as each layer is done)."""
    import torch

    started = time.monotonic()
    cfg = model.config
    layers = _decoder_layers(model, cfg.num_hidden_layers)
    batches = _batches(windows)
    n_tokens = sum(len(w) for w in windows)
    embedding = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(coded_embedding, dtype=np.float32)),
                                   requires_grad=False)
    calls = _layer_calls(model, layers, batches)
    source_states = [h for h, _ in calls] if alpha else []  # the source model's side, needed for the correction
    coded_states = [h for h, _ in _layer_calls(model, layers, batches, embedding)]
    records: dict[str, object] = {}
    prefix = next(n for n, m in model.named_modules() if m is layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            modules = {s: layer.get_submodule(s) for _, group in STAGES for s in group}
            coded_w: dict[str, torch.Tensor] = {}
            source_x = []  # per batch: {first projection of a stage: its input in the source model}
            for b, (_, kwargs) in enumerate(calls if alpha else []):  # one run of the source layer per batch
                source_states[b], got = _run_capturing(layer, {f: modules[f] for f, _ in STAGES},
                                                       source_states[b], kwargs[i])
                source_x.append(got)

            def use(weights):
                for s, w in weights.items():
                    modules[s].weight.data = w

            for first, group in STAGES:
                n_in = modules[first].weight.shape[1]
                h = torch.zeros(n_in, n_in, dtype=torch.float64)
                c = torch.zeros_like(h) if alpha else None
                for b, (_, kwargs) in enumerate(calls):
                    x_hat = _capture(layer, modules[first], coded_states[b], kwargs[i])
                    h += (x_hat.T @ x_hat).double()
                    if alpha:
                        c += (source_x[b].pop(first).T @ x_hat).double()
                    del x_hat
                h /= n_tokens
                if alpha:
                    c /= n_tokens
                hn = h.numpy()
                for s in group:
                    w = modules[s].weight.detach().double()  # still the source's: replaced once coded
                    if alpha:
                        w = corrected(w, h, c, alpha)
                    name = f"{prefix}.{i}.{s}.weight"
                    records[name] = rec = encode(SourceTensor(name, w.float().numpy(), "f32"), hn)
                    coded_w[s] = torch.from_numpy(np.ascontiguousarray(decode(rec), dtype=np.float32))
                use(coded_w)
            for b, (_, kwargs) in enumerate(calls):
                coded_states[b] = _run(layer, coded_states[b], kwargs[i])
            for s, m in modules.items():  # done with this layer's float weights
                m.weight = torch.nn.Parameter(torch.empty(m.weight.shape, device="meta"), requires_grad=False)
            gap = ""
            if alpha:
                err = sum(float(((q - p) ** 2).sum()) for q, p in zip(coded_states, source_states))
                gap = f", relative output error {err / sum(float((p ** 2).sum()) for p in source_states):.4f}"
            log(f"sequential coding: layer {i + 1}/{len(layers)}{gap} ({time.monotonic() - started:.0f} s)")
    return records
