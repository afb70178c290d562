"""Tokenizer and chat template, both read from the `.occ` file (Hugging Face `tokenizers` JSON; a Jinja template).

The chat template is rendered in a sandboxed Jinja environment with the same conventions as Hugging Face's
`apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text), so templates written for it render the same here.
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Iterable, Sequence

from occrt.errors import FormatError, OccError


class Tokenizer:
    def __init__(self, tokenizer_json: bytes, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 chat_template: str | None = None, add_bos_token: bool = False):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises its own exception type for bad JSON
            raise FormatError(f"tokenizer.json cannot be loaded: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._template = None

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the tokenizer's own post-processing (e.g. BOS) applies,
        and BOS is prepended when the model asks for it and the post-processor did not add it."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise OccError("this model has no chat template; use a plain prompt (--prompt) instead")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.token_text(self.bos_token_id),
                                     eos_token=self.token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
                                     **extra)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces as they become complete characters.

    Byte-level BPE splits multi-byte characters across tokens; decoding the tokens since the last emitted point and
    holding back a trailing U+FFFD (an incomplete UTF-8 sequence) gives the same text as decoding everything at once.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this are context only
        self.read_offset = 0  # text of tokens up to here has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise OccError(f"chat template: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise FormatError(f"chat template does not compile: {e}") from None
