"""The Python API: `occrt.load(path)` -> `Model`, with `generate`, `chat` and `complete`.

    model = occrt.load("smol.occ")
    print(model.generate("The capital of France is", max_new_tokens=16))
    for piece in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)
    done = model.complete("The capital of France is", max_new_tokens=16)   # Completion: text + token counts
    print(done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason)

Everything the model needs (weights, config, tokenizer, chat template, generation defaults) comes from the file.

Threads: a `Model` may be shared by several threads. Every forward step (a prompt's prefill, or one new token) runs
under the model's lock, so concurrent requests are serialized step by step: they interleave token by token (each with
its own KV cache and random generator, so a seed gives the same text whatever runs beside it), and a half-read stream
holds no lock. There is no batching: n concurrent requests each run at about 1/n of the single-request speed.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator, Sequence

from occrt.completion import Completion, CompletionStream
from occrt.errors import FormatError
from occrt.format.reader import OccFile
from occrt.generate import SamplingParams, generate_tokens
from occrt.model.config import ModelConfig
from occrt.model.devices import DEVICES, torch_device  # noqa: F401 (DEVICES: the names `load` accepts)
from occrt.tokenizer import Tokenizer


class Model:
    def __init__(self, occ: OccFile, network, config: ModelConfig, tokenizer: Tokenizer,
                 generation_defaults: dict[str, Any]):
        self.file = occ
        self.network = network
        self.config = config
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults
        self._lock = threading.Lock()  # held for one forward step at a time (see the module docstring)

    @property
    def context_length(self) -> int:
        """Prompt and new tokens together fit in this many positions."""
        return self.config.max_position_embeddings

    # -- low level --------------------------------------------------------------------------------------------------
    def new_cache(self, capacity: int):
        return self.network.new_cache(capacity)

    def forward(self, tokens, cache, *, all_logits: bool = False):
        with self._lock:
            return self.network.forward(tokens, cache, all_logits=all_logits)

    # -- text in, text out ----------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                 add_special_tokens: bool = True) -> str | Iterator[str]:
        """Continue `prompt` (text, or token ids). Returns the new text, or an iterator of pieces if `stream`
        (a `CompletionStream`, which also counts tokens). `complete` returns the token counts with the text."""
        result = self.complete(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop=stop, stream=stream,
                               add_special_tokens=add_special_tokens)
        return result if stream else result.text

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": "user", "content": ...}, ...]) using the model's chat template."""
        return self.generate(self.chat_prompt_ids(messages), **kwargs)

    def complete(self, prompt: str | Sequence[int], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                 add_special_tokens: bool = True) -> Completion | CompletionStream:
        """Continue `prompt`; returns a `Completion` (text, prompt_tokens, completion_tokens, finish_reason "stop" or
        "length"), or with `stream` a `CompletionStream` of text pieces whose counts are final once it is exhausted.

        Options left as None take the file's generation defaults, then greedy decoding and 256 new tokens. Bad
        options, an empty prompt or one that fills the context raise ValueError here, before any work."""
        ids = (self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str)
               else [int(t) for t in prompt])
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the model's context of "
                             f"{self.context_length}")
        n_new = self._default("max_new_tokens", max_new_tokens, 256)
        if n_new < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {n_new}")
        sampling = self._sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        # end-of-sequence tokens are passed through so that the stream can tell "stop" from "length"
        tokens = generate_tokens(self, ids, max_new_tokens=n_new, sampling=sampling)
        out = CompletionStream(self.tokenizer, tokens, prompt_tokens=len(ids),
                               eos_token_ids=self.tokenizer.eos_token_ids, stop=stop)
        return out if stream else out.completion

    def complete_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Completion | CompletionStream:
        """`complete` for a conversation, with the model's chat template."""
        return self.complete(self.chat_prompt_ids(messages), **kwargs)

    def chat_prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt's token ids for a conversation: the chat template with the generation prompt, tokenized as is
        (the template writes any BOS itself)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int | None = None, **sampling: Any
                     ) -> Iterator[int]:
        return generate_tokens(self, prompt_ids,
                               max_new_tokens=self._default("max_new_tokens", max_new_tokens, 256),
                               sampling=self._sampling(**sampling), stop_token_ids=self.tokenizer.eos_token_ids)

    def _sampling(self, *, temperature=None, top_k=None, top_p=None, seed=None) -> SamplingParams:
        return SamplingParams(temperature=self._default("temperature", temperature, 0.0),
                              top_k=self._default("top_k", top_k, 0),
                              top_p=self._default("top_p", top_p, 1.0), seed=seed)

    def _default(self, key: str, given: Any, fallback: Any) -> Any:
        if given is not None:
            return given
        return self.generation_defaults.get(key, fallback)

    def close(self) -> None:
        self.file.close()


def load(path: str | os.PathLike, *, device: str = "cpu", progress: bool = False) -> Model:
    """Open a `.occ` file and make it ready to generate. Raises FormatError if the file is not valid.

    `device`: "cpu" (numpy + numba, compact weights), "cuda" / "cuda:N" (torch on that GPU, from the same compact
    weights; OccError if CUDA is not available), or "torch-cpu" (that torch path on the CPU). `progress`: a bar on
    stderr while the compressed tensors decode (occrt/progress.py)."""
    on_torch = torch_device(device)
    occ = OccFile.open(path)
    try:
        config, tokenizer, defaults = check_model(occ)
        from occrt.model.loader import load_model

        network = load_model(occ, config, progress=progress)
        if on_torch is not None:
            from occrt.model.decoder_torch import TorchDecoder

            network = TorchDecoder.from_model(network, on_torch)
    except FormatError as e:
        occ.close()
        raise FormatError(e.reason, e.offset, path=os.fspath(path)) from None
    except BaseException:
        occ.close()
        raise
    return Model(occ, network, config, tokenizer, defaults)


def check_model(occ: OccFile) -> tuple[ModelConfig, Tokenizer, dict[str, Any]]:
    """What `load` checks beyond the container, without decoding a tensor: the metadata it uses (config, tokenizer and
    its token ids, generation defaults) and that the file holds every tensor the config implies, in its shape."""
    from occrt.model.loader import check_tensors

    meta = occ.metadata
    config = ModelConfig.from_json(meta.get("model.config"))
    if meta.get("general.architecture") != config.architecture:
        raise FormatError(f"metadata 'general.architecture' is {meta.get('general.architecture')!r:.40}, "
                          f"model.config says {config.architecture!r}")
    tokenizer = Tokenizer(occ.blob("tokenizer.json"), **_tokenizer_metadata(meta, config.vocab_size))
    defaults = _generation_defaults(meta.get("generation.defaults"))
    check_tensors(occ, config)
    return config, tokenizer, defaults


def _tokenizer_metadata(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The tokenizer keys of format_spec/occ.md section 4, checked: token ids index the embedding."""
    def token_id(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise FormatError(f"metadata {key!r} must hold token ids in [0, {vocab_size}), got {v!r:.40}")
        return v

    bos = meta.get("tokenizer.bos_token_id")
    eos = meta.get("tokenizer.eos_token_ids", [])
    if not isinstance(eos, list):
        raise FormatError("metadata 'tokenizer.eos_token_ids' must be a list of token ids")
    add_bos = meta.get("tokenizer.add_bos_token", False)
    template = meta.get("chat.template")
    if not isinstance(add_bos, bool):
        raise FormatError("metadata 'tokenizer.add_bos_token' must be true or false")
    if template is not None and not isinstance(template, str):
        raise FormatError("metadata 'chat.template' must be a string or null")
    return {"bos_token_id": None if bos is None else token_id(bos, "tokenizer.bos_token_id"),
            "eos_token_ids": [token_id(e, "tokenizer.eos_token_ids") for e in eos],
            "chat_template": template, "add_bos_token": add_bos}


def _generation_defaults(value: Any) -> dict[str, Any]:
    """`generation.defaults`, checked as the sampling options are; unknown keys are ignored (format_spec/occ.md 4)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FormatError("metadata 'generation.defaults' must be an object")
    rules = {"temperature": lambda v: _number(v) and 0 <= v <= 1e6, "top_p": lambda v: _number(v) and 0 < v <= 1,
             "top_k": lambda v: _integer(v) and v >= 0, "max_new_tokens": lambda v: _integer(v) and v >= 1}
    out = {}
    for key, ok in rules.items():
        if key in value:
            if not ok(value[key]):
                raise FormatError(f"metadata 'generation.defaults.{key}' has a bad value {value[key]!r:.40}")
            out[key] = value[key]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
