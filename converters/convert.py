"""Convert a checkpoint (HF directory or GGUF file) into one `.occ` file.

    source = open_source(path)                 # config, tokenizer, template, tensors under HF names
    [--bpw: pass 1]  for each tensor: measure its rate-distortion curves; allocate the bit budget
    with OccWriter(out) as w:                  # temporary file until finish(): a failure leaves nothing
        metadata -> w.set_metadata / w.add_blob("tokenizer.json")
        for each tensor (streamed):  check name and shape -> encode (converters/policy.py) -> w.add_tensor
        w.finish()                             # header + data, fsync, rename onto `out`
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

import occrt
from occrt.converters.source import MallocThresholds, Source, SourceTensor
from occrt.codecs import ans
from occrt.converters.policy import CodingOptions, Policy, record_bits
from occrt.errors import ConversionError
from occrt.format.writer import OccWriter
from occrt.progress import Progress
from occrt.model.loader import tensor_shapes

# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ConvertOptions(CodingOptions):
    overwrite: bool = False


def open_source(path: str) -> Source:
    """A checkpoint directory, a GGUF file or a Hugging Face model id in the local cache (converters/locate.py)."""
    from occrt.converters.locate import locate

    where = locate(path)
    if where.kind == "gguf":
        from occrt.converters.gguf_file import GGUFSource

        source: Source = GGUFSource(where.path)
    else:
        from occrt.converters.hf_dir import HFDirectorySource

        source = HFDirectorySource(where.path)
    if where.model_id is not None:
        source.provenance.update(source_name=where.model_id, source_revision=where.revision)
    return source


def convert(src: str, out: str, options: ConvertOptions = ConvertOptions(), *,
            log: Callable[[str], None] | None = None, progress: bool = False,
            heap: MallocThresholds | None = None) -> dict[str, Any]:
    """Convert `src` to `out`. Returns a summary (tensor count, bytes, parameters, achieved bits per weight).
    `progress`: a bar per pass on stderr (occrt/progress.py). `heap`: glibc's malloc thresholds as the command line
    installs them (converters/source.py), for the calibration's gradient pass."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    with opened(src, options) as (source, options, policy):
        return _write(source, out, options, policy, log, progress, heap)


@contextmanager
def opened(src: str, options: ConvertOptions):
    """(source, options with the model-dependent defaults settled, policy) for converting or planning `src`; the
    options are checked before the source is opened, and the source is closed on the way out."""
    options.validate()
    source = open_source(src)
    try:
        options = options.for_source(source.config)
        yield source, options, Policy(options)
    finally:
        source.close()


def _checked_tensors(source: Source, expected: dict[str, tuple[int, ...]]) -> Iterator[SourceTensor]:
    cfg = source.config
    for t in source.tensors():
        if t.name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and t.name == "lm_head.weight"):
            continue
        if t.name not in expected:
            raise ConversionError(f"unexpected tensor {t.name!r} for a {cfg.architecture} model")
        if tuple(t.data.shape) != expected[t.name]:
            raise ConversionError(f"tensor {t.name!r} has shape {list(t.data.shape)}, "
                                  f"the config implies {list(expected[t.name])}")
        if t.dtype != "bf16" and not np.isfinite(t.data).all():
            raise ConversionError(f"tensor {t.name!r} holds NaN or infinite values")
        yield t


def checked_pass(source: Source, expected: dict[str, tuple[int, ...]], desc: str, *,
                 progress: bool) -> Iterator[SourceTensor]:
    """One pass over the source's tensors (checked), with a progress bar named `desc` when asked for."""
    with Progress(desc, sum(int(np.prod(s, dtype=np.int64)) for s in expected.values()), enabled=progress) as bar:
        for t in _checked_tensors(source, expected):
            bar.start(t.name)
            n_weights, n_bytes = int(t.data.size), int(t.data.nbytes)
            yield t
            bar.done(n_weights, n_bytes)


def prepare(source: Source, options: ConvertOptions, policy: Policy, log, progress: bool,
            heap: MallocThresholds | None = None) -> None:
    """What comes before writing: calibration (--calib; its statistics go to the policy) and the rate control's
    measure pass (--bpw)."""
    expected = tensor_shapes(source.config)
    if options.calib is not None:
        from occrt.converters.calibrate import SELF, calibrate

        text = None  # --calib self: windows sampled from the source model
        if options.calib != SELF:
            try:
                with open(options.calib, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConversionError(f"--calib {options.calib}: {e}") from None
        started = time.monotonic()
        # sequential coding measures the second moments itself, on the coded model
        calibration = calibrate(source, text, n_tokens=options.calib_tokens, seed=options.seed, log=log, heap=heap,
                                moments=not options.sequential, tuning_windows=options.tune_steps)
        policy.use_calibration(calibration)
        log(f"calibration: {calibration.tokens} tokens in {time.monotonic() - started:.1f} s")
    if policy.two_pass:
        started = time.monotonic()
        log(f"rate control: measuring {len(expected)} tensors")
        for t in checked_pass(source, expected, "measure", progress=progress):
            policy.measure(t)
        policy.finalize()
        log(f"rate control: {len(policy.chosen)} tensors measured and allocated in "
            f"{time.monotonic() - started:.1f} s")


def file_metadata(source: Source, options: ConvertOptions, policy: Policy) -> dict[str, Any]:
    """The metadata a conversion writes (format_spec/occ.md 4)."""
    cfg, tok = source.config, source.tokenizer
    meta: dict[str, Any] = {
        "general.architecture": cfg.architecture, "model.config": cfg.to_json(),
        "tokenizer.format": "huggingface-tokenizers-json", "tokenizer.bos_token_id": tok.bos_token_id,
        "tokenizer.eos_token_ids": list(tok.eos_token_ids), "tokenizer.add_bos_token": tok.add_bos_token,
        "chat.template": tok.chat_template, "generation.defaults": source.generation_defaults,
        "provenance": {**source.provenance, "converter": f"occrt {occrt.__version__}"}}
    if policy.two_pass or options.lossless:
        meta["codec.entropy_coder"] = ans.CODER_INFO
    return meta


def _write(source: Source, out: str, options: ConvertOptions, policy: Policy, log, progress: bool,
           heap: MallocThresholds | None) -> dict[str, Any]:
    cfg = source.config
    expected = tensor_shapes(cfg)
    if not source.tokenizer.chat_template:
        log("note: the source has no chat template: the .occ file continues plain prompts, and chat "
            "(occrt generate without --prompt, /v1/chat/completions) will refuse")
    prepare(source, options, policy, log, progress, heap)
    seen: set[str] = set()
    n_params = 0
    linear_bits = linear_params = 0
    with OccWriter(out, overwrite=options.overwrite) as w:
        w.add_blob("tokenizer.json", source.tokenizer.tokenizer_json)
        for key, value in file_metadata(source, options, policy).items():
            w.set_metadata(key, value)
        tuned = None
        if options.tune_steps or options.sequential:
            tuned = _tuned_records(source, expected, policy, options, log, heap)
        log(f"writing {out}: {len(expected)} tensors")
        for t in checked_pass(source, expected, "encode", progress=progress):
            enc = policy.encode(t) if tuned is None else tuned.pop(t.name)
            w.add_tensor(t.name, enc)
            seen.add(t.name)
            n_params += t.data.size
            if policy.is_linear(t.name):
                linear_bits += record_bits(enc)
                linear_params += t.data.size
            del enc, t  # before the next tensor is read: one tensor and its record in memory at a time
        missing = sorted(set(expected) - seen)
        if missing:
            raise ConversionError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
        w.finish()
    size = os.path.getsize(out)
    summary: dict[str, Any] = {"tensors": len(seen), "parameters": n_params, "bytes": size,
                               "linear_parameters": linear_params,
                               "linear_bpw": linear_bits / linear_params if linear_params else 0.0}
    log(f"wrote {out}: {len(seen)} tensors, {n_params:,} parameters, {size:,} bytes "
        f"({8 * size / max(n_params, 1):.3f} bits per parameter overall)")
    if options.bpw is not None:
        off = 100 * (summary["linear_bpw"] / options.bpw - 1)
        log(f"linear layers: {summary['linear_bpw']:.4f} bits per weight (target {options.bpw}, {off:+.2f} %)")
    return summary


def _tuned_records(source: Source, expected: dict[str, tuple[int, ...]], policy: Policy, options: ConvertOptions,
                   log, heap: MallocThresholds | None = None) -> dict[str, Any]:
    """--tune-steps: code every tensor first (records held in memory: the compressed model), then fit the linear
    layers' step multipliers by distillation from the source (converters/finetune.py)."""
    from occrt.converters.calibrate import calibration_model
    from occrt.converters import finetune
    from occrt.converters.policy import EMBEDDINGS

    started = time.monotonic()
    calibration = policy.calibration
    if calibration is None:
        raise ConversionError("--tune-steps needs the calibration's statistics (--calib)")
    # the source model's side of the distillation is the calibration's hidden states: the teacher's linear
    # weights are never needed, so they are not read (the codes stand in for them); sequential coding reads them
    # and releases each layer's once it is coded
    sequential = bool(options.sequential)
    teacher, _ = calibration_model(source, linear_weights=sequential)
    params = {name for name, _ in teacher.named_parameters()}  # names only: sequential coding releases the weights
    records: dict[str, Any] = {}
    for t in _checked_tensors(source, expected):
        if not (sequential and policy.is_linear(t.name)):
            records[t.name] = policy.encode(t)
    fixed = {n: finetune.decode_record(e) for n, e in records.items() if n in EMBEDDINGS and n in params}
    if sequential:
        from occrt.converters.sequential import sequential_records

        records.update(sequential_records(
            teacher, calibration.windows, fixed["model.embed_tokens.weight"],
            encode=lambda t, h: policy.encode(t, hessian=h), decode=finetune.decode_record,
            alpha=options.correction, log=log))
        log(f"sequential coding: {time.monotonic() - started:.1f} s")
    linear = {n: e for n, e in records.items() if policy.is_linear(n)}
    unknown = sorted(set(linear) - params)
    if unknown:
        raise ConversionError(f"--tune-steps: the torch model of a {source.config.architecture} model has no "
                              f"parameter {unknown[0]!r}")
    linear = finetune.tune_scales(teacher, linear, fixed, calibration.tuning, teacher_hidden=calibration.hidden,
                                  steps=options.tune_steps, lr=finetune.peak_rate(options.bpw),
                                  decay=finetune.decays(options.bpw, options.tune_steps), log=log, heap=heap)
    records.update(linear)
    log(f"tuning: {len(linear)} tensors in {time.monotonic() - started:.1f} s")
    return records
