"""`occrt bench MODEL.occ`: how fast a model loads and generates here, and how much memory it holds.

    result = bench("smol3.occ", prompt_tokens=64, new_tokens=128, runs=3)
    print(render(result))

Each run loads the file (`occrt.load`), prefills a prompt of `prompt_tokens` tokens (a fixed English text, repeated
as needed) and decodes `new_tokens` greedily without stopping at end-of-sequence. Reported, as the median of the runs:

    load_s          occrt.load: open, validate, decode the weights into their runtime form
    first_token_s   load + prefill + sampling the first new token ("file -> first token ready")
    prefill_tok_s   prompt tokens / prefill seconds
    decode_tok_s    (new_tokens - 1) / seconds of the decode steps (each one forward of one token)
and once: startup_s (process start -> first token of the first run: imports and kernel loading included), the peak
resident memory of the process at the end of the first run (VmHWM: everything it ever held, imports included; later
runs load again and only add the allocator's leftovers, reported as peak_rss_all_runs_bytes), the
bytes of the weights in their runtime form and of the KV cache.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

import numpy as np

PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
               "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
               "far faster than scribes. Within fifty years presses were at work in more than two hundred cities "
               "across Europe, and the price of books fell sharply. ")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere). Resolution: one clock tick (~10 ms)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's peak resident set: VmHWM of /proc/self/status (this program's own memory; getrusage's
    ru_maxrss also counts what a parent held when it forked this process), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _array_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the numpy arrays / torch tensors an object holds (attributes, lists, dicts), each counted once."""
    if isinstance(obj, np.ndarray):
        while isinstance(obj.base, np.ndarray):  # a view counts as the array it views (once)
            obj = obj.base
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if type(obj).__module__ == "torch" and hasattr(obj, "element_size"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_array_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("occrt"):
        return sum(_array_bytes(o, seen) for k, o in vars(obj).items() if k not in ("cfg", "rotary"))
    return 0


def weight_bytes(network: Any) -> int:
    """Bytes of a network's weights in their runtime form (compact codes, multipliers, norms; a tied head once)."""
    seen: set[int] = set()
    return sum(_array_bytes(getattr(network, name), seen) for name in ("embed", "layers", "norm", "head"))


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def bench(path: str | os.PathLike, *, prompt_tokens: int = 64, new_tokens: int = 128, runs: int = 3,
          device: str = "cpu", log=None) -> dict[str, Any]:
    import occrt

    if prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise ValueError("bench needs prompt_tokens >= 1, new_tokens >= 2 and runs >= 1")
    rows = []
    startup = None
    model = net = cache = None
    for run in range(runs):
        if model is not None:  # drop the previous run's model before loading again: peak memory is one model's
            model.close()
            model = net = cache = logits = None
        t0 = time.perf_counter()
        model = occrt.load(path, device=device)
        t1 = time.perf_counter()
        ids = prompt_ids(model.tokenizer, prompt_tokens)
        net = model.network
        cache = net.new_cache(prompt_tokens + new_tokens)
        logits = net.forward(np.asarray(ids), cache)
        token = int(np.argmax(logits))
        t2 = time.perf_counter()
        if startup is None:
            age = process_age_s()
            startup = None if age is None else age
        tokens = [token]
        for _ in range(new_tokens - 1):
            logits = net.forward(np.asarray([token]), cache)
            token = int(np.argmax(logits))
            tokens.append(token)
        t3 = time.perf_counter()
        if run == 0:
            peak_first = peak_rss_bytes()
        rows.append({"load_s": t1 - t0, "first_token_s": t2 - t0, "prefill_tok_s": prompt_tokens / (t2 - t1),
                     "decode_tok_s": (new_tokens - 1) / (t3 - t2)})
        if log:
            log(f"run {run + 1}/{runs}: load {t1 - t0:.3f} s, prefill {prompt_tokens / (t2 - t1):.1f} tok/s, "
                f"decode {(new_tokens - 1) / (t3 - t2):.1f} tok/s")
    kv_bytes = _array_bytes(cache, set())
    result = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    result.update({"path": os.fspath(path), "device": device, "prompt_tokens": prompt_tokens,
                   "new_tokens": new_tokens, "runs": runs, "startup_s": startup, "runs_detail": rows,
                   "weight_bytes": weight_bytes(net), "kv_cache_bytes": kv_bytes, "peak_rss_bytes": peak_first,
                   "peak_rss_all_runs_bytes": peak_rss_bytes(),
                   "file_bytes": os.path.getsize(path), "text": model.tokenizer.decode(tokens)})
    model.close()
    return result


def render(r: dict[str, Any]) -> str:
    mib = 1 << 20
    lines = [f"{r['path']} on {r['device']}: prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens "
             f"(greedy), median of {r['runs']} run{'s' if r['runs'] != 1 else ''}",
             f"  load            {r['load_s']:8.3f} s       (file -> weights ready)",
             f"  first token     {r['first_token_s']:8.3f} s       (file -> first new token)"]
    if r.get("startup_s") is not None:
        lines.append(f"  startup         {r['startup_s']:8.3f} s       (process start -> first new token, run 1)")
    lines += [f"  prefill         {r['prefill_tok_s']:8.1f} tok/s",
              f"  decode          {r['decode_tok_s']:8.1f} tok/s",
              f"  peak RSS        {r['peak_rss_bytes'] / mib:8.1f} MiB     (weights {r['weight_bytes'] / mib:.1f} MiB "
              f"in runtime form, KV cache {r['kv_cache_bytes'] / mib:.1f} MiB, file {r['file_bytes'] / mib:.1f} MiB)"]
    return "\n".join(lines) + "\n"
