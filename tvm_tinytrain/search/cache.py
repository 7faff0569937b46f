"""What a search measured, on disk: an interrupted search resumes, a repeated one fine-tunes nothing.

One small JSON file per measured thing (a fine-tuning run's accuracy, a planned memory figure) and one
compiled library per training step, each named by the SHA-256 of everything it depends on: the model
file's bytes, how it is loaded, the data (for runs), the settings and the scheme. A file is written to a
temporary name and renamed, so a search killed mid-write leaves no half-written entry.

Location: ``--cache-dir``, else ``$TINYTRAIN_CACHE``, else ``$XDG_CACHE_HOME/tvm-tinytrain``, else
``~/.cache/tvm-tinytrain``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..files import cache_dir, replacing_file


def digest(*parts) -> str:
    """SHA-256 of ``parts``: bytes and arrays as their bytes (arrays with shape and dtype), the rest as
    canonical JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


class Cache:
    """``get(kind, key)`` / ``put(kind, key, value)`` of JSON values; ``path(kind, key, suffix)`` for files.
    ``hits`` and ``misses`` count the ``get`` calls."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_dir()
        self.enabled = enabled
        self.hits = self.misses = 0

    def path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.root / kind / f"{key}{suffix}"

    def has(self, kind: str, key: str) -> bool:
        """Whether ``get`` would find a value (not counted as a hit or a miss)."""
        return self.enabled and self.path(kind, key).is_file()

    def get(self, kind: str, key: str):
        path = self.path(kind, key)
        if self.enabled and path.is_file():
            try:
                value = json.loads(path.read_text())
                self.hits += 1
                return value
            except (OSError, ValueError):
                pass  # unreadable: measure again and overwrite
        self.misses += 1
        return None

    def put(self, kind: str, key: str, value) -> None:
        if self.enabled:
            path = self.path(kind, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing_file(path) as tmp:
                tmp.write_text(json.dumps(value, sort_keys=True))
