"""Load test of `occrt serve`: concurrent streaming clients (the official `openai` package) for a bounded time, then a
burst past the admission limit.

    python benchmarks/serve_load.py MODEL.occ [--clients 16] [--duration 120] [--max-tokens 64]
                                    [--parallel 4] [--queue 16] [--out benchmarks/serve_load_results.md]

Phase 1 (steady): `--clients` threads, each with its own client, send streaming chat requests one after another
(prompts from a fixed list, temperature 0.7, a distinct seed per request, `include_usage`) until `--duration` seconds
have passed; requests in flight then finish. Per request: latency (request sent -> [DONE]), time to first text, tokens.
With clients <= parallel + queue no request is refused, so errors should be 0.

Phase 2 (burst): parallel + queue + 8 non-streaming requests at once: the first parallel + queue are served, the
rest must get 503 at once (the figure is how long a refused request took).

The server runs in its own process (`occrt serve --port 0`, on 127.0.0.1 only); its resident memory (VmRSS, and
the peak VmHWM) is read from /proc before phase 1, after phase 1 and after phase 2. Every loop is bounded in time
and count; the script stops the server at the end.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import openai

PROMPTS = [
    "Name three rivers in Europe.",
    "Write a haiku about the sea.",
    "What is the capital of France, and why is it famous?",
    "Explain what a transformer model is in two sentences.",
    "Give me a short recipe for pancakes.",
    "List four prime numbers and say why they are prime.",
    "What should I pack for a weekend hike?",
    "Summarize the plot of Romeo and Juliet.",
]


def start_server(model: str, parallel: int, queue: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "occrt", "serve", model, "--host", "127.0.0.1", "--port", "0",
                             "--parallel", str(parallel), "--queue", str(queue), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain the log so the pipe never fills
    return proc, m.group(1)


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def wait_ready(base_url: str, timeout_s: float = 120) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=10)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.models.list().data[0].id
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def steady(base_url: str, model_id: str, clients: int, duration: float, max_tokens: int) -> dict:
    deadline = time.monotonic() + duration
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(10**9))

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            t0 = time.monotonic()
            first = None
            usage = None
            error = None
            try:
                stream = client.chat.completions.create(
                    model=model_id, messages=[{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0.7, seed=n, stream=True,
                    stream_options={"include_usage": True})
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic() - t0
                    if chunk.usage is not None:
                        usage = chunk.usage
            except Exception as e:  # noqa: BLE001 - counted and reported
                error = f"{type(e).__name__}: {str(e)[:120]}"
            record = {"latency": time.monotonic() - t0, "first": first, "error": error,
                      "tokens": usage.completion_tokens if usage else 0, "end": time.monotonic()}
            with lock:
                results.append(record)

    t_start = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 900)
    wall = time.monotonic() - t_start
    ok = [r for r in results if r["error"] is None]
    return {"wall_s": wall, "completed": len(ok), "errors": [r["error"] for r in results if r["error"]],
            "latency": [r["latency"] for r in ok], "first": [r["first"] for r in ok if r["first"] is not None],
            "tokens": sum(r["tokens"] for r in ok)}


def burst(base_url: str, model_id: str, n: int) -> dict:
    statuses: list[tuple[int, float]] = []
    lock = threading.Lock()
    go = threading.Event()

    def one() -> None:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        go.wait()
        t0 = time.monotonic()
        try:
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi!"}],
                                           max_tokens=16, temperature=0)
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        except Exception:  # noqa: BLE001 - a connection failure counts as status 0
            status = 0
        with lock:
            statuses.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(900)
    refused = [dt for s, dt in statuses if s == 503]
    return {"sent": n, "ok": sum(s == 200 for s, _ in statuses), "refused": len(refused),
            "other": sum(s not in (200, 503) for s, _ in statuses),
            "refused_max_s": max(refused) if refused else None}


def percentiles(xs: list[float]) -> str:
    if not xs:
        return "-"
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return f"{q[49]:.2f} / {q[89]:.2f} / {q[98]:.2f}"


def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs visible, {mem:.0f} GiB, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, model_id, mem, steady_r, burst_r) -> str:
    mib = {k: {m: v / 1024 for m, v in d.items()} for k, d in mem.items()}
    lines = [
        "# `occrt serve` under load",
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {commit()}, by `python benchmarks/serve_load.py "
        f"{os.path.basename(args.model)} --clients {args.clients} --duration {args.duration:g} --max-tokens "
        f"{args.max_tokens} --parallel {args.parallel} --queue {args.queue}`.",
        "",
        f"- Machine: {machine()}.",
        f"- Model: `{os.path.basename(args.model)}` ({os.path.getsize(args.model) / 2**20:.0f} MiB, served as "
        f"{model_id!r}), CPU device (numpy + numba).",
        f"- Steady phase: {args.clients} clients streaming chat completions back to back for {args.duration:g} s "
        f"(then in-flight requests finish), max_tokens {args.max_tokens}, temperature 0.7, a seed per request.",
        f"- Machine load (1-minute load average) at the start / end of the steady phase: "
        f"{steady_r['load'][0]:.1f} / {steady_r['load'][1]:.1f} (the load generator and anything else running "
        f"share the same CPUs with the server).",
        "",
        "| steady phase | value |",
        "| --- | --- |",
        f"| requests completed | {steady_r['completed']} |",
        f"| errors | {len(steady_r['errors'])} |",
        f"| wall time (s) | {steady_r['wall_s']:.1f} |",
        f"| latency p50 / p90 / p99 (s), request to [DONE] | {percentiles(steady_r['latency'])} |",
        f"| time to first text p50 / p90 / p99 (s) | {percentiles(steady_r['first'])} |",
        f"| completion tokens | {steady_r['tokens']} |",
        f"| aggregate tokens/s | {steady_r['tokens'] / steady_r['wall_s']:.1f} |",
        f"| server RSS before / after (MiB) | {mib['before']['VmRSS']:.0f} / {mib['after']['VmRSS']:.0f} |",
        f"| server peak RSS (MiB) | {mib['after']['VmHWM']:.0f} |",
        "",
        f"Burst: {burst_r['sent']} non-streaming requests at once against parallel {args.parallel} + queue "
        f"{args.queue}: {burst_r['ok']} served, {burst_r['refused']} refused with 503"
        + (f" (the slowest refusal took {burst_r['refused_max_s']:.2f} s)" if burst_r['refused_max_s'] is not None
           else "") + f", {burst_r['other']} other outcomes. Server RSS after the burst: "
        f"{mib['burst']['VmRSS']:.0f} MiB (peak {mib['burst']['VmHWM']:.0f} MiB).",
    ]
    if steady_r["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in sorted(set(steady_r["errors"]))[:10]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .occ file")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of the steady phase (new requests stop)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--queue", type=int, default=16)
    p.add_argument("--out", help="write the markdown report here (also printed)")
    args = p.parse_args()
    if not 1 <= args.clients <= 256 or not 1 <= args.duration <= 3600:
        p.error("--clients must be in [1, 256] and --duration in [1, 3600] s")
    proc, base_url = start_server(args.model, args.parallel, args.queue)
    try:
        model_id = wait_ready(base_url)
        mem = {"before": memory_kib(proc.pid)}
        load_before = os.getloadavg()[0]
        steady_r = steady(base_url, model_id, args.clients, args.duration, args.max_tokens)
        steady_r["load"] = (load_before, os.getloadavg()[0])
        mem["after"] = memory_kib(proc.pid)
        burst_r = burst(base_url, model_id, args.parallel + args.queue + 8)
        mem["burst"] = memory_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = report(args, model_id, mem, steady_r, burst_r)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if not steady_r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
