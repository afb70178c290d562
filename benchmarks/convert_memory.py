"""Peak resident memory of `occrt convert` on a synthetic multi-shard Llama checkpoint, measured from outside.

    python benchmarks/convert_memory.py [--layers 10] [--dtype f32] [--work DIR] [--out benchmarks/convert_memory.md]

The checkpoint is written with numpy and safetensors only (random weights, a few-word BPE tokenizer), as many
shards as layers / 3; its largest tensor is one MLP matrix (intermediate × hidden). Each measurement is a fresh
child process, started by a small launcher; its peak resident set is the kernel's high-water mark (`ru_maxrss`
from `wait4`, see `peak_rss`), which counts the pages of memory-mapped shards while they are mapped in. The baseline is a child that only imports what the
conversion imports (the CLI, the converter, the codecs and their numba kernels), so

    growth = peak(convert) - peak(imports)

is what the conversion itself holds. The claim (issue 6, item 3) is growth <= K x (largest tensor in float32),
whatever the model's size; tests/test_convert_memory.py checks it for the raw and the --bpw path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

# Growth allowed, in units of the largest tensor's float32 size. What a step holds at once, at most: the source
# tensor and its float32 copy, the coding frame's residual, the ecsq codes (int32) and the ANS stream; rounded up.
K = 6

# What `occrt convert` imports on its way (the baseline child imports the same, and loads the same kernels: the
# trellis quantizer's numba kernels bring numba's compiler machinery, ~45 MiB whatever the model's size).
_IMPORTS = ("import occrt.cli, occrt.converters.convert, occrt.converters.hf_dir, occrt.converters.policy, "
            "occrt.converters.ratecontrol, occrt.codecs.ecsq, occrt.codecs.planes, occrt.codecs.ans, "
            "occrt.format.writer, tokenizers, numpy; from occrt.codecs import tcq; "
            "tcq.encode_codes(tcq.trellis_codes(numpy.zeros((2, 2), numpy.float32), 1.0, tcq.parity_table(64, 55)), "
            "64, 55, chunk_size=64)")


@dataclass(frozen=True)
class Shape:
    layers: int = 10
    hidden: int = 1024
    intermediate: int = 2816
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Hugging Face Llama names and shapes, in state-dict order."""
        h, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                    (p + "mlp.down_proj.weight", (h, f)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def largest_f32_bytes(self) -> int:
        return max(4 * int(np.prod(s)) for _, s in self.tensors())

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on a few words (ids < vocab_size; <unk> <s> </s> are 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 300), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat and the dog ran in the park"] * 10, trainer=trainer)
    return tok.to_str()


def write_checkpoint(root: str, shape: Shape = Shape(), *, dtype: str = "f32", layers_per_shard: int = 3,
                     seed: int = 0) -> int:
    """Write a random Llama checkpoint in shards of `layers_per_shard` layers; returns its weights' bytes.
    Memory: one shard's tensors at a time."""
    from safetensors.numpy import save_file

    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    layer_of = lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else -1  # noqa: E731
    for name, s in shape.tensors():
        current = groups[-1]
        if current and layer_of(name) >= 0 and layer_of(name) % layers_per_shard == 0 and \
                layer_of(current[-1][0]) != layer_of(name):
            groups.append([])
        groups[-1].append((name, s))
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, s in group:
            if len(s) == 1:
                w = 1 + 0.1 * rng.standard_normal(s, dtype=np.float32)
            else:
                w = rng.standard_normal(s, dtype=np.float32) * np.float32(1 / np.sqrt(s[1]))
            tensors[name] = w.astype(np_dtype)
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_file(tensors, os.path.join(root, fname))
        del tensors
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg = shape.config() | {"torch_dtype": {"f32": "float32", "f16": "float16"}[dtype]}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json(shape.vocab))
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>",
                   "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, f)
    return total


def child_env() -> dict[str, str]:
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# A child's peak resident set, as the kernel reports it to its parent (`ru_maxrss` from `wait4`), is the largest of
# its own and that of every image it replaced by exec -- including, after vfork or posix_spawn, its parent's. So a
# large parent (pytest with torch loaded, or this script after writing the checkpoint) would be measured instead of
# the conversion. The launcher is a small process that forks (a new memory image, as large as the launcher's) and
# execs the command, and reports the command's figure: the command's own peak, or the launcher's few MiB.
_LAUNCHER = """
import os, sys
report, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """Run `cmd`; returns (its peak resident set in bytes, seconds, stderr). Raises if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report, err_path = os.path.join(tmp, "report"), os.path.join(tmp, "stderr")
        started = time.monotonic()
        with open(err_path, "wb") as err:
            subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report, *cmd], stdout=subprocess.DEVNULL,
                           stderr=err, env=child_env(), check=True)
        seconds = time.monotonic() - started
        with open(err_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        with open(report) as f:
            code, max_rss = (int(x) for x in f.read().split())
    if code != 0:
        raise RuntimeError(f"{cmd} exited with {code}: {text[-2000:]}")
    return max_rss * 1024, seconds, text  # Linux reports kilobytes


def baseline_cmd() -> list[str]:
    return [sys.executable, "-c", _IMPORTS]


def convert_cmd(src: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "occrt", "convert", src, "-o", out, "--force", *extra]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default: a temporary one)")
    ap.add_argument("--out", default=None, help="append the results as a markdown section to this file")
    args = ap.parse_args()
    shape = Shape(layers=args.layers)
    mib = 1 << 20
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        src = os.path.join(work, "ckpt")
        total = write_checkpoint(src, shape, dtype=args.dtype)
        n_shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
        base, _, _ = peak_rss(baseline_cmd())
        limit = K * shape.largest_f32_bytes()
        rows = []
        for label, extra in (("raw", ()), ("lossless", ("--lossless",)), (f"--bpw {args.bpw:g}",
                                                                          ("--bpw", f"{args.bpw:g}"))):
            out = os.path.join(work, "out.occ")
            peak, seconds, _ = peak_rss(convert_cmd(src, out, *extra))
            rows.append((label, peak, peak - base, seconds, os.path.getsize(out)))
            print(f"{label}: peak {peak / mib:.0f} MiB, growth {(peak - base) / mib:.0f} MiB "
                  f"(limit {limit / mib:.0f}), {seconds:.1f} s", file=sys.stderr)
    lines = [f"## {time.strftime('%Y-%m-%d')}, commit {_commit()}",
             "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"{platform.system()} {platform.release()}.",
             f"Checkpoint: synthetic Llama, {args.layers} layers, hidden {shape.hidden}, intermediate "
             f"{shape.intermediate}, vocab {shape.vocab}, {args.dtype}, {n_shards} shards, "
             f"{total / mib:.0f} MiB of weights; largest tensor {shape.largest_f32_bytes() / mib:.1f} MiB in float32.",
             f"Baseline (a child that only imports the converter): {base / mib:.0f} MiB. "
             f"Limit on growth: {K} x largest tensor = {limit / mib:.0f} MiB "
             f"({total / limit:.1f}x smaller than the checkpoint).",
             "",
             "| conversion | peak RSS (MiB) | growth over baseline (MiB) | growth / largest f32 tensor | time (s) "
             "| output (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, peak, growth, seconds, size in rows:
        lines.append(f"| {label} | {peak / mib:.0f} | {growth / mib:.0f} | "
                     f"{growth / shape.largest_f32_bytes():.2f} | {seconds:.1f} | {size / mib:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
