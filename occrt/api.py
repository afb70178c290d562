"""The Python API: `occrt.load(path)` -> `Model`, with `generate` and `chat`.

    model = occrt.load("smol.occ")
    print(model.generate("The capital of France is", max_new_tokens=16))
    for piece in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)

Everything the model needs (weights, config, tokenizer, chat template, generation defaults) comes from the file.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from occrt.errors import FormatError, OccError
from occrt.format.reader import OccFile
from occrt.generate import SamplingParams, generate_tokens, stream_text
from occrt.model.config import ModelConfig
from occrt.tokenizer import Tokenizer

DEVICES = ("cpu",)


class Model:
    def __init__(self, occ: OccFile, network, config: ModelConfig, tokenizer: Tokenizer,
                 generation_defaults: dict[str, Any]):
        self.file = occ
        self.network = network
        self.config = config
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults

    # -- low level --------------------------------------------------------------------------------------------------
    def new_cache(self, capacity: int):
        return self.network.new_cache(capacity)

    def forward(self, tokens, cache, *, all_logits: bool = False):
        return self.network.forward(tokens, cache, all_logits=all_logits)

    # -- text in, text out ----------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                 add_special_tokens: bool = True) -> str | Iterator[str]:
        """Continue `prompt` (text, or token ids). Returns the new text, or an iterator of pieces if `stream`."""
        ids = (self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str)
               else [int(t) for t in prompt])
        pieces = self._pieces(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop=stop)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": "user", "content": ...}, ...]) using the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(text, add_special_tokens=False, **kwargs)

    def generate_ids(self, prompt_ids: Sequence[int], *, max_new_tokens: int | None = None, **sampling: Any
                     ) -> Iterator[int]:
        return generate_tokens(self.network, prompt_ids,
                               max_new_tokens=self._default("max_new_tokens", max_new_tokens, 256),
                               sampling=self._sampling(**sampling), stop_token_ids=self.tokenizer.eos_token_ids)

    def _pieces(self, ids: list[int], *, max_new_tokens, stop, **sampling) -> Iterator[str]:
        tokens = self.generate_ids(ids, max_new_tokens=max_new_tokens, **sampling)
        return stream_text(self.tokenizer, tokens, stop=stop)

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


def load(path: str | os.PathLike, *, device: str = "cpu") -> Model:
    """Open a `.occ` file and make it ready to generate. Raises FormatError if the file is not valid."""
    if device not in DEVICES:
        raise OccError(f"device {device!r} is not supported (supported: {', '.join(DEVICES)})")
    occ = OccFile.open(path)
    try:
        meta = occ.metadata
        config = ModelConfig.from_json(meta.get("model.config"))
        tokenizer = Tokenizer(occ.blob("tokenizer.json"), bos_token_id=meta.get("tokenizer.bos_token_id"),
                              eos_token_ids=meta.get("tokenizer.eos_token_ids") or [],
                              chat_template=meta.get("chat.template"),
                              add_bos_token=bool(meta.get("tokenizer.add_bos_token", False)))
        from occrt.model.loader import load_llama

        network = load_llama(occ, config)
    except FormatError as e:
        occ.close()
        raise FormatError(e.reason, e.offset, path=os.fspath(path)) from None
    except BaseException:
        occ.close()
        raise
    defaults = meta.get("generation.defaults") or {}
    return Model(occ, network, config, tokenizer, defaults if isinstance(defaults, dict) else {})
