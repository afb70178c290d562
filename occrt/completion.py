"""One request's result: `Completion` (text, token counts, why it ended) and `CompletionStream`, the same delivered as
text pieces while they are generated.

    stream = model.complete("The capital of France is", stream=True, max_new_tokens=16)
    for piece in stream:                      # pieces join to the whole text
        print(piece, end="")
    stream.completion                         # Completion(text, prompt_tokens, completion_tokens, finish_reason)

finish_reason is "stop" when the model ended the text (an end-of-sequence token) or a stop string was reached, and
"length" when `max_new_tokens` ran out or the context window is full, as in the OpenAI API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from occrt.generate import stream_text
from occrt.tokenizer import Tokenizer

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated, including those of a stop string cut from `text`; no end token
    finish_reason: str  # "stop" or "length"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class CompletionStream:
    """An iterator of text pieces with live counts: `completion_tokens` so far, and `finish_reason` (None until the
    iterator is exhausted). `close()`, or leaving a `with` block, ends generation early (finish_reason stays None).

    `tokens` yields every sampled token id, end-of-sequence ones included: this class stops at the first of
    `eos_token_ids`, so it knows which of the three endings happened without asking the generation loop."""

    def __init__(self, tokenizer: Tokenizer, tokens: Iterator[int], *, prompt_tokens: int,
                 eos_token_ids: Sequence[int], stop: Sequence[str] = ()):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._tokens = tokens
        self._eos = frozenset(eos_token_ids)
        self._counted = self._count()
        self._pieces = stream_text(tokenizer, self._counted, stop=stop)
        self._text: list[str] = []
        self._closed = False

    def _count(self) -> Iterator[int]:
        for token in self._tokens:
            if token in self._eos:
                self.finish_reason = "stop"
                return
            self.completion_tokens += 1
            yield token
        self.finish_reason = "length"  # the loop ran out of max_new_tokens or of context

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        try:
            piece = next(self._pieces)
        except StopIteration:
            if self.finish_reason is None:  # stream_text returned early: a stop string was reached
                self.finish_reason = "stop"
            self._release()
            raise
        except BaseException:
            self.close()
            raise
        self._text.append(piece)
        return piece

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self._text)

    @property
    def completion(self) -> Completion:
        """The whole result; reads the rest of the stream first if it is not exhausted."""
        for _ in self:
            pass
        if self.finish_reason is None:
            raise RuntimeError("the stream was closed before it finished")
        return Completion(self.text, self.prompt_tokens, self.completion_tokens, self.finish_reason)

    def close(self) -> None:
        """Stop generating; the KV cache and the rest of the work are dropped."""
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            for gen in (self._pieces, self._counted, self._tokens):
                close = getattr(gen, "close", None)
                if close is not None:
                    close()

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
