"""One loaded base model, shared by the trainer and the Playground, so that nothing loads it twice.

The Playground `get`s the base and keeps using it across generations. Training mutates weights (adapters,
full fine-tunes), so it `take`s the base: the cache hands its copy over and forgets it, and the next `get`
loads a clean one. Asking for another base evicts the current one (one base in memory at a time).
"""
from __future__ import annotations

import gc
import threading

from .loading import Components, load_base


class ModelCache:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._key: tuple | None = None
        self._comps: Components | None = None
        self.loads = 0  # how many times a base was read from disk (tests count this)

    def _load(self, ref: str, device: str, dtype, **kw) -> Components:
        key = (str(ref), str(device), str(dtype), tuple(sorted(kw.items())))
        if self._key != key or self._comps is None:
            self.evict()
            self._comps = load_base(ref, device=device, dtype=dtype, **kw)
            self._key = key
            self.loads += 1
        return self._comps

    def get(self, ref: str, device: str = "cpu", dtype=None, **kw) -> Components:
        """The shared base; loaded only when it is not the one already in memory."""
        with self._lock:
            return self._load(ref, device, dtype, **kw)

    def take(self, ref: str, device: str = "cpu", dtype=None, **kw) -> Components:
        """The base for exclusive use (training); the cache forgets it."""
        with self._lock:
            comps = self._load(ref, device, dtype, **kw)
            self._key, self._comps = None, None
            return comps

    def evict(self) -> None:
        with self._lock:
            self._key, self._comps = None, None
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass

    @property
    def loaded_ref(self) -> str | None:
        return self._key[0] if self._key else None


# The app's one cache. The CLI makes its own short-lived loads.
CACHE = ModelCache()
