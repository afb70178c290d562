"""Progress bars on stderr for conversion and loading (tqdm), off unless asked for.

    encode:  45%|████▌     | 52.4M/117M weights [00:03<00:04, 15.2M weights/s, model.layers.4.mlp.up_proj.weight, 210.3 MiB]

A bar counts weights, the measure of the work every pass does (reading, measuring, coding, decoding all go in
proportion to them), so its ETA holds whatever the tensors' dtypes; it also shows the tensor at work and the bytes
handled so far. The command line turns bars on when stderr is a terminal or with --progress, off with --quiet; the
library's functions take `progress=False` by default, so logs, pipes and tests stay clean.
"""
from __future__ import annotations

import sys
import threading


class Progress:
    """One bar over `total` weights. `start(name)` names the tensor at work; `done(n_weights, n_bytes)` after it.
    Disabled, every call does nothing (tqdm is not even imported). Safe to call from several threads."""

    def __init__(self, desc: str, total: int, *, enabled: bool):
        self._bar = None
        self._bytes = 0
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=" weights", unit_scale=True, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.1, leave=True)

    def start(self, name: str) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.set_postfix_str(f"{name}, {self._size()}", refresh=False)

    def done(self, n_weights: int, n_bytes: int, name: str | None = None) -> None:
        if self._bar is not None:
            with self._lock:
                self._bytes += n_bytes
                if name is not None:
                    self._bar.set_postfix_str(f"{name}, {self._size()}", refresh=False)
                self._bar.update(n_weights)

    def _size(self) -> str:
        """Bytes handled so far."""
        b = self._bytes
        return f"{b / (1 << 20):.1f} MiB" if b >= 1 << 20 else f"{b / 1024:.0f} KiB"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
