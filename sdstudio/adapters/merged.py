"""Merged weights kept between calls: per adapter layer, W + its active adapters' deltas, made at the layer's first
call after a change and reused until the plan changes, within a memory budget. The Playground keeps one."""
from __future__ import annotations

import logging

log = logging.getLogger("sdstudio.adapters")


class MergedWeights:
    """The Playground's kept merged weights: per layer, W + the active adapters' deltas, computed at the
    layer's first call after a change and reused by every later call and generation until the plan changes.

    Without it an unfused stack pays a merge or a low-rank branch on every call. With it, once the first
    generation after a weight change has run, an unfused stack costs what the base costs, and a weight
    change stays a plan change that reads nothing and computes nothing up front.

    The price is memory: one extra copy of each covered weight. So it stays within a budget, worked out at
    each weight change from what is free (on CUDA, half of what is free beyond 3 GiB left for activations and
    the VAE; on the CPU and MPS, a quarter of available RAM beyond 2 GiB). Layers past the budget merge per
    call as before. `limit_bytes` fixes the budget instead (0 turns keeping off)."""

    CUDA_HEADROOM = 3 << 30
    CPU_HEADROOM = 2 << 30

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.used = 0
        self._held: dict[int, "_Slot"] = {}
        self._budget: dict[str, int] = {}  # device -> bytes this refresh may hold there

    def new_budget(self) -> None:
        """Forget the budgets: the next reservation on each device reads its free memory again."""
        self._budget = {}

    def budget(self, device) -> int:
        key = str(device)
        if key not in self._budget:
            self._budget[key] = self.limit_bytes if self.limit_bytes is not None else self._free_budget(device)
        return self._budget[key]

    def _free_budget(self, device) -> int:
        held_here = sum(s.nbytes for s in self._held.values() if str(s.device) == str(device))
        try:
            if device.type == "cuda":
                import torch

                free, _total = torch.cuda.mem_get_info(device)
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                return held_here + max(0, free - self.CUDA_HEADROOM) // 2
            if device.type in ("cpu", "mps"):  # MPS shares the machine's RAM
                import psutil

                return held_here + max(0, psutil.virtual_memory().available - self.CPU_HEADROOM) // 4
        except Exception:  # no reading (a driver quirk, no psutil): keep nothing rather than guess
            log.debug("no free-memory reading for %s; merged weights are not kept", device, exc_info=True)
        return 0

    def slot(self, layer, base) -> "_Slot":
        self.release(layer)
        w = base.weight
        slot = _Slot(self, id(layer), base, w.device, w.numel() * w.element_size())
        self._held[id(layer)] = slot
        return slot

    def release(self, layer) -> None:
        slot = self._held.pop(id(layer), None)
        if slot is not None:
            slot.drop()


class _Slot:
    """One layer's place in MergedWeights: empty, refused (no room), or holding the merged weight."""

    __slots__ = ("owner", "layer_id", "base", "device", "nbytes", "tensor", "stamp", "refused", "counted")

    def __init__(self, owner: MergedWeights, layer_id: int, base, device, nbytes: int) -> None:
        self.owner, self.layer_id, self.base, self.device, self.nbytes = owner, layer_id, base, device, nbytes
        self.tensor, self.stamp, self.refused, self.counted = None, None, False, False

    def _stamp(self) -> tuple:
        # The base weight the merged one was made from. A move (.to) or an in-place write (fusing, a user's
        # edit) changes its data pointer or version counter, and the kept tensor is then stale. The LoRA
        # weights only change through Stack._refresh, which replans (and so releases) the layer.
        w = self.base.weight
        return w.data_ptr(), w._version

    def get(self):
        t = self.tensor
        if t is None:
            return None
        if self._stamp() != self.stamp:
            self.tensor = None
            return None
        return t

    def reserve(self) -> bool:
        if self.refused or self.owner._held.get(self.layer_id) is not self:
            return False
        if not self.counted:
            if self.owner.used + self.nbytes > self.owner.budget(self.device):
                self.refused = True
                return False
            self.owner.used += self.nbytes
            self.counted = True
        return True

    def keep(self, tensor):
        self.tensor, self.stamp = tensor, self._stamp()
        return tensor

    def drop(self) -> None:
        if self.counted:
            self.owner.used -= self.nbytes
            self.counted = False
        self.tensor, self.stamp, self.refused = None, None, True
