"""A one-line progress bar on stderr, for anything that takes over a second."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.start = self._last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None, loss: float | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        if not self.enabled or (done < total and now - self._last < 0.1):
            return
        self._last = now
        width = 24
        filled = int(width * done / max(total, 1))
        extra = f"  loss {loss:.3f}" if loss is not None else ""
        line = f"\r{self.label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{extra}"
        self.stream.write(line + (f"  {now - self.start:.1f}s\n" if done >= total else ""))
        self.stream.flush()
