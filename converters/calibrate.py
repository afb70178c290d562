"""Calibration: what the model's linear layers see on real text, and how much the loss cares about each weight.

From a calibration text (`occrt convert --calib FILE`), in windows of `ctx` tokens with BOS prepended, or from text
the source model writes itself (`--calib self`: `sampled_windows`, no calibration data needed):

  - H = E[x xᵀ] for the input of every linear layer, one per input space (q/k/v share theirs, gate/up theirs): the
    Hessian of the layer's output error, used by error-feedback rounding (converters/gptq.py);
  - F_t = mean over tensor t's entries of E[(∂L/∂w)²], the empirical Fisher diagonal averaged per tensor: the
    loss's sensitivity to t's weight error, used to weight each tensor's distortion in the rate allocation
    (ΔL ≈ ½ Σ F_ij e_ij², so D_t = F_t ‖E_t‖²; equal slopes then scale t's step by 1/√F_t).

H comes from a forward pass per window and F from a forward and backward pass per window (of at most
FISHER_TOKENS tokens' worth, `fisher_windows`) of a float32 copy of the model in torch (transformers'
implementation of the family, `AutoModelForCausalLM` on the config an export would write, its tensors put back in the
family's layout by the converter's rules: Phi-3's fused q/k/v, GPT-2's Conv1D) -- conversion may use torch; the
runtime never does. A fused module's input is the input space of all its parts, and its gradient splits into the
parts' Fisher values by the same rules. Memory: the model in float32 plus one window's layer inputs and a slice of logits; the
H matrices (one n_in × n_in matrix per input space) wait in a temporary directory (`calibrate` says how).
"""
from __future__ import annotations

import functools
import gc
import inspect
import itertools
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from occrt.converters.source import MallocThresholds, Source, heap_reuse
from occrt.errors import ConversionError
from occrt.model.config import ModelConfig

DEFAULT_TOKENS = 8192
# tokens the gradient pass reads at most (windows spread evenly over the calibration's): the Fisher is one figure
# per tensor, and only its ratios across tensors steer the allocation, while the second moments and the tuning are
# what gains from more text of the right kind. The gradient pass costs twice the moments' time per token (~3 s per
# 512-token window of SmolLM2 on 2 cores). SmolLM2 at 3.0 bits, 32,768 Wikipedia tokens: 1.134 / 1.139 (perplexity
# ratio, seeds 0 / 1) in ~285 s, against 1.121 / 1.136 in ~440 s with every window; inside one run's spread
# (benchmarks/quality_results.md, "The gradient pass on a subset")
FISHER_TOKENS = 8192
SELF = "self"  # `--calib self`: the calibration windows are sampled from the source model (a file named self: ./self)
# bytes of key/value cache while sampling windows together (--calib self): one window a step reads every weight
# for one token, so as many windows as fit share each read; 16 windows of 512 tokens on SmolLM2 (~0.15 s a step
# on 2 cores, compute-bound)
_SAMPLE_CACHE_BYTES = 400 << 20
# tensor name suffix -> input space suffix (projections reading the same activation share one H)
_SPACE = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
          "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}
# decoder-layer passes between two hand-backs of the heap's free pages while checkpointed layers reuse it: in
# tuning steps on SmolLM2 (30 layers) every 5 or 10 gave the same peak, 70-130 MB above the streaming setting's,
# and without trims it was ~500 MB above
TRIM_EVERY = 10
_LINEAR = re.compile(r"(model\.layers\.\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight")


@dataclass
class Calibration:
    tokens: int
    hessians: Mapping[str, np.ndarray]  # "model.layers.{i}.{space}" -> (n_in, n_in) float64, E[x xᵀ]
    fisher: dict[str, float]  # tensor name -> mean squared gradient of its entries
    windows: list[list[int]] = field(default_factory=list)  # the token windows the statistics came from
    # the windows the tuning reads (converters/finetune.py), spread over `windows` (all of them unless `calibrate`
    # was asked for fewer), and the source model's last hidden states (T, d) float32 on each, from the
    # second-moment pass: the teacher's side of the tuning, so it needs no float32 copy of the linear weights
    tuning: list[list[int]] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)

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


def sample_start(source: Source) -> int:
    """The token every sampled window starts from: BOS, or EOS where the tokenizer has no BOS."""
    tok = source.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ConversionError("--calib self: the tokenizer has neither a BOS nor an EOS token to start samples from")
    return start


def window_cache_bytes(cfg: ModelConfig, ctx: int) -> int:
    """Bytes of float32 keys and values one sampled window of `ctx` tokens after its start holds."""
    return 2 * 4 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (ctx + 1)


def sampled_windows(model, source: Source, *, n_tokens: int, ctx: int, seed: int = 0,
                    log: Callable[[str], None] = lambda msg: None) -> list[list[int]]:
    """Calibration windows written by the model itself: each starts at BOS (EOS where the tokenizer has no BOS) and
    continues with `ctx` tokens drawn one at a time from the model's next-token distribution, unmodified (temperature
    1, no truncation: the distillation's KL is an average over the model's own text, so that is the distribution to
    draw from). The windows are sampled together, as many as `_SAMPLE_CACHE_BYTES` of key/value cache holds; the
    draws come from a torch generator seeded with `seed`, so the same seed gives the same windows on one machine."""
    import torch

    start = sample_start(source)
    n_windows = -(-n_tokens // ctx)
    per_batch = max(1, min(n_windows, _SAMPLE_CACHE_BYTES // window_cache_bytes(source.config, ctx)))
    gen = torch.Generator().manual_seed(seed)
    # transformers 5 names the key/value cache `cache`; 4.x `past_key_values`
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    windows: list[list[int]] = []
    started = time.monotonic()
    with torch.no_grad():
        while len(windows) < n_windows:
            batch = min(per_batch, n_windows - len(windows))
            ids = torch.full((batch, 1), start, dtype=torch.long)
            drawn, cache = [ids], _static_cache(model, batch, ctx + 1)
            for t in range(ctx):
                out = model(input_ids=drawn[-1], use_cache=True, cache_position=torch.tensor([t]),
                            **{cache_key: cache})
                probs = torch.softmax(out.logits[:, -1].double(), dim=-1)
                drawn.append(torch.multinomial(probs, 1, generator=gen))
                del out
            del cache
            windows += torch.cat(drawn, dim=1).tolist()
            log(f"calibration: sampled {len(windows)}/{n_windows} windows from the model "
                f"({time.monotonic() - started:.0f} s)")
    return windows


def _static_cache(model, batch: int, length: int):
    """A key/value cache of `length` positions allocated once (transformers' StaticCache), written in place: a
    growing cache copies every layer's keys and values at every step, which on SmolLM2 made sampling ~25 % slower
    (and each copy a fresh mapping to fault in)."""
    from transformers import StaticCache

    wants = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"max_batch_size": batch} if "max_batch_size" in wants else {}  # transformers 4.x also asks the batch
    return StaticCache(config=model.config, max_cache_len=length, **kwargs)


def calibration_model(source: Source, *, linear_weights: bool = True):
    """transformers' float32 model of the source's family, its weights the source's tensors; returns (model, the
    family's tensor rules that hold linear weights). `linear_weights=False`: those rules' weights are not read and
    stay on the meta device (no memory; the model cannot run until something else computes those layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from occrt.converters.architectures import for_architecture

    cfg = source.config
    family = for_architecture(cfg.architecture)
    hf = dict(family.hf_config(cfg))
    hf.pop("architectures")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf),
                                                 dtype=torch.float32)
    rules = family.hf_rules(cfg)
    linear = [r for r in rules if _LINEAR.fullmatch(r.parts[0])]
    state = _streamed_state(source, rules if linear_weights else [r for r in rules if r not in linear])
    if cfg.tie_word_embeddings:
        embed = next(r.source for r in rules if r.parts == ("model.embed_tokens.weight",))
        state["lm_head.weight"] = state[embed]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if not linear_weights:
        missing = [n for n in missing if n not in {r.source for r in linear}]
    if missing or unexpected:
        raise ConversionError(f"calibration model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _materialize_rotary(model, cfg)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ConversionError(f"calibration model: buffers {left[:3]} have no values")
    model.float().eval()
    return model, linear


def _streamed_state(source: Source, rules) -> dict:
    """The model's tensors, assembled while the source streams: each source tensor is held (float32) only until
    every rule that reads it has been assembled, so memory stays at the model plus a few tensors. The state owns
    copies (a source's arrays may be read-only views of its files)."""
    import torch

    from occrt.converters.policy import as_f32
    from occrt.converters.tensor_rules import assemble

    readers: dict[str, int] = {}
    for r in rules:
        for p in r.parts:
            readers[p] = readers.get(p, 0) + 1
    pending: dict[str, np.ndarray] = {}
    state = {}
    waiting = list(rules)
    for t in source.tensors():
        if t.name not in readers:
            continue
        pending[t.name] = as_f32(t)
        ready = [r for r in waiting if all(p in pending for p in r.parts)]
        for r in ready:
            state[r.source] = torch.from_numpy(np.array(assemble(r, pending.__getitem__), dtype=np.float32,
                                                        order="C"))
            waiting.remove(r)
            for p in r.parts:
                readers[p] -= 1
                if not readers[p]:
                    del pending[p]
    if waiting:
        raise ConversionError(f"calibration model: the source lacks {waiting[0].parts}")
    return state


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


def calibrate(source: Source, text: str | None, *, n_tokens: int = DEFAULT_TOKENS, ctx: int = 512, seed: int = 0,
              log: Callable[[str], None] = lambda msg: None, heap: MallocThresholds | None = None,
              moments: bool = True, tuning_windows: int | None = None) -> Calibration:
    """The windows: `text`'s tokens, or (text None) `sampled_windows` from the source model with `seed`. Then two
    passes over them, so the two statistics never share memory:

      1. forward only (no graph, windows batched): each call's xᵀx for every input space added to a float32 file in
         a temporary directory (`SpilledArrays`: read back one matrix at a time when a tensor is coded);
      2. forward and backward over `fisher_windows(windows)` (at most FISHER_TOKENS tokens), each decoder layer
         checkpointed (its activations recomputed in the backward pass, so only the layers' inputs are kept), each
         weight's gradient reduced to its Fisher value and dropped the moment it is complete: never the whole
         model's gradients at once.
    Peak: the float32 model plus one window's layer inputs and a slice of its logits. `heap`: glibc's malloc
    thresholds as the command line installs them (converters/source.py): the gradient pass reuses the heap.
    `moments=False`: pass 1 keeps only the last hidden states (sequential coding measures its own moments).
    `tuning_windows`: how many windows the tuning will read (one a step); pass 1 keeps the last hidden states of
    that many, `spread` over the windows (None: all), so their memory does not grow with `n_tokens`."""
    started = time.monotonic()
    ctx = min(ctx, source.config.max_position_embeddings - 1)  # a window and its BOS fit the model's positions
    if text is not None:
        windows = calibration_windows(source, text, n_tokens=n_tokens, ctx=ctx)
    model, rules = calibration_model(source)
    try:
        if text is None:
            windows = sampled_windows(model, source, n_tokens=n_tokens, ctx=ctx, seed=seed, log=log)
        keep = spread(len(windows), tuning_windows)
        hessians, hidden = _second_moments(model, rules if moments else [], windows, set(keep), started, log)
        fisher = _fisher(model, rules, fisher_windows(windows, FISHER_TOKENS), source.config, started, log, heap)
    finally:
        del model
        gc.collect()  # transformers' modules hold reference cycles: free the float32 model before coding starts
    return Calibration(tokens=sum(len(w) for w in windows), hessians=hessians, fisher=fisher, windows=windows,
                       tuning=[windows[i] for i in keep], hidden=hidden)


def spread(n: int, k: int | None) -> list[int]:
    """`k` indices of `n` items spread evenly from the first to the last (all `n` when k is None or >= n; at
    least one when n > 0)."""
    if k is None or k >= n:
        return list(range(n))
    k = max(1, k)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def fisher_windows(windows: list[list[int]], n_tokens: int = FISHER_TOKENS) -> list[list[int]]:
    """The windows the gradient pass reads: all of them when they hold at most `n_tokens` tokens, else as many as
    hold about that many, `spread` over the calibration's."""
    total = sum(len(w) for w in windows)
    if total <= n_tokens:
        return windows
    return [windows[i] for i in spread(len(windows), round(len(windows) * n_tokens / total))]


def _space_modules(model, rules) -> dict[str, object]:
    """input space key -> the module whose input it is (one per space: q, k and v read the same activation)."""
    spaces = {}
    for rule in rules:
        m = _LINEAR.fullmatch(rule.parts[0])
        spaces.setdefault(f"{m.group(1)}.{_SPACE[m.group(2)]}", model.get_submodule(rule.source.rsplit(".", 1)[0]))
    return spaces


HEAD_CHUNK = 128  # positions per slice of logits in the gradient pass and the tuning
_MOMENT_BATCH_TOKENS = 2048  # windows per forward call in the second-moment pass: bounds its activations


def _second_moments(model, rules, windows, keep: set[int], started,
                    log) -> tuple["SpilledArrays", list[np.ndarray]]:
    """E[x xᵀ] per input space, through the base model (no output head, no graph), windows of one length batched;
    each call's xᵀx goes straight onto the space's running sum on disk, so no sum is held in memory. Also returns
    the base model's last hidden states (float32, (T, d)) of the windows whose indices are in `keep`, in order:
    1.2 MB per 512-token window of SmolLM2, kept for the tuning."""
    import torch

    n_seen = sum(len(w) for w in windows)
    moments = SpilledArrays(scale=1.0 / n_seen)

    def hook(mod, args, output, key):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, n_in)
        moments.add(key, (x.T @ x).numpy())

    handles = [module.register_forward_hook(lambda mod, args, out, key=key: hook(mod, args, out, key))
               for key, module in _space_modules(model, rules).items()]
    batches: list[list[list[int]]] = []
    for window in windows:
        if batches and len(batches[-1][0]) == len(window) and \
                len(window) * (len(batches[-1]) + 1) <= _MOMENT_BATCH_TOKENS:
            batches[-1].append(window)
        else:
            batches.append([window])
    done = 0
    hidden: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in batches:
                out = model.base_model(input_ids=torch.tensor(batch), use_cache=False).last_hidden_state
                hidden += [h.float().numpy().copy() for j, h in enumerate(out, start=done) if j in keep]
                del out
                done += len(batch)
                log(f"calibration: second moments, window {done}/{len(windows)} ({time.monotonic() - started:.0f} s)")
    finally:
        for h in handles:
            h.remove()
    return moments, hidden


def _decoder_layers(model, n_layers: int):
    import torch

    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise ConversionError(f"calibration model: cannot tell its list of {n_layers} decoder layers")
    return found[0]


@contextmanager
def checkpointed_layers(model, n_layers: int, heap: MallocThresholds | None = None):
    """Within: each decoder layer of `model` (a transformers causal LM) is checkpointed: its activations are
    recomputed in the backward pass, so a forward keeps only the layers' inputs. Call the model with
    use_cache=False (a cache would grow in the recomputation).

    `heap` (glibc's malloc thresholds, converters/source.py): within, the heap is reused (`heap.reuse()`: a layer's
    activations of a few MiB are not mapped and faulted in anew each time) and its free pages are handed back every
    TRIM_EVERY layer passes (after a layer's forward, and as its backward begins). Without the trims the heap's
    free blocks stay resident: fragmented by the layers' mix of sizes, it held ~550 MB more than the live tensors
    in a tuning step on SmolLM2 (benchmarks/quality_results.md, "The tuning's heap, trimmed")."""
    from torch.utils.checkpoint import checkpoint

    layers = _decoder_layers(model, n_layers)
    passes = itertools.count(1)

    def layer_pass(*_):  # a forward hook's and a gradient hook's signature; returns None: the gradient unchanged
        if next(passes) % TRIM_EVERY == 0:
            heap.trim()

    def forward(*args, plain, **kwargs):
        out = checkpoint(plain, *args, use_reentrant=False, **kwargs)
        if heap is not None:
            layer_pass()
            first = out[0] if isinstance(out, tuple) else out  # the layer's hidden states
            if first.requires_grad:
                first.register_hook(layer_pass)  # runs as the layer's backward begins
        return out

    for layer in layers:  # an instance attribute over the class's method; deleted afterwards (no reference cycle)
        layer.forward = functools.partial(forward, plain=type(layer).forward.__get__(layer))
    try:
        with heap_reuse(heap):
            yield
    finally:
        for layer in layers:
            del layer.forward


def head_logits(model, weight=None):
    """hidden (T, d) -> float32 logits (T, vocab): the causal LM's output head and its final soft cap (Gemma);
    `weight`: the head's matrix to use instead of the module's current one."""
    import torch

    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden):
        out = (head(hidden) if weight is None else torch.nn.functional.linear(hidden, weight, head.bias)).float()
        return torch.tanh(out / softcap) * softcap if softcap else out

    return logits


def backward_through_head(hidden, loss, chunk: int = HEAD_CHUNK) -> float:
    """Backpropagate sum over slices of loss(hidden[a:b], a, b) (a scalar per slice of `chunk` positions) into the
    graph that made `hidden` (T, d): each slice's logits are made, differentiated and dropped before the next, so
    never (T, vocab) at once and nothing computed twice; the layers below run backward once. Returns the sum."""
    import torch

    leaf = hidden.detach().requires_grad_()
    total = 0.0
    for a in range(0, len(leaf), chunk):
        part = loss(leaf[a:a + chunk], a, min(a + chunk, len(leaf)))
        part.backward()
        total += float(part.detach())
        del part
    torch.autograd.backward(hidden, leaf.grad)
    return total


def _fisher(model, rules, windows, cfg: ModelConfig, started, log,
            heap: MallocThresholds | None = None) -> dict[str, float]:
    import torch

    from occrt.converters.architectures import hf_mapper

    mapper = hf_mapper(cfg)
    by_param = {rule.source: rule for rule in rules}
    fisher = {part: 0.0 for rule in rules for part in rule.parts}

    def reduce(param, name):
        g2 = (param.grad.double() ** 2).numpy()
        rule = by_param[name]
        for part, piece in zip(rule.parts, mapper.split(rule, g2)):  # a fused gradient split like its weight
            fisher[part] += float(piece.mean())
        param.grad = None  # the next weight's gradient takes its place

    handles = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in by_param)
        if name in by_param:
            handles.append(param.register_post_accumulate_grad_hook(lambda p, name=name: reduce(p, name)))
    head = head_logits(model)

    def head_nll(hidden, targets):  # the causal LM's head and loss on a slice of positions
        return torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")

    try:
        with checkpointed_layers(model, cfg.num_hidden_layers, heap):
            for k, window in enumerate(windows):
                ids = torch.tensor([window])
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
                backward_through_head(hidden, lambda h, a, b: head_nll(h, ids[0, 1 + a:1 + b]))
                del hidden
                log(f"calibration: gradients, window {k + 1}/{len(windows)} ({time.monotonic() - started:.0f} s)")
    finally:
        for h in handles:
            h.remove()
    return {n: v / len(windows) for n, v in fisher.items()}


class SpilledArrays(Mapping):
    """name -> float64 array (times `scale`), kept in a temporary directory as float32 `.npy` files and read back
    on access, one at a time: the input second moments of a model (about 0.4 GB for SmolLM2 in float32) stay out of
    memory while they are summed and while the tensors are coded. The directory goes when the mapping does."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self._dir = tempfile.mkdtemp(prefix="occrt-calib-")
        self._files: dict[str, str] = {}
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)

    def add(self, key: str, value: np.ndarray) -> None:
        """The stored array for `key` += value (stored = value the first time)."""
        path = self._files.get(key)
        if path is None:
            path = self._files[key] = os.path.join(self._dir, f"{len(self._files)}.npy")
        else:
            value = np.load(path) + value
        np.save(path, np.asarray(value, dtype=np.float32))

    def __getitem__(self, key: str) -> np.ndarray:
        return np.load(self._files[key]).astype(np.float64) * self.scale

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
