"""Device and dtype choice (cuda > mps > cpu) and memory readings.

The one GPU lock is `jobs.JobManager`'s exclusivity: every heavy job (training, generation, captioning with a
model, class images) starts through the app's JobManager as an exclusive job, and a second one is refused
with a message naming the first. A separate threading lock here was never taken by anything, so it went."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def pick_device(preferred: str = "auto") -> str:
    import torch

    if preferred not in ("auto", "cuda", "mps", "cpu") and not preferred.startswith("cuda:"):
        raise UserError(f"Unknown device {preferred!r}: use auto, cuda, cuda:N, mps or cpu.")
    if preferred == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if preferred.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no CUDA GPU is visible: install a CUDA build of torch, or "
                        "use --set device=cpu.")
    return preferred


def pick_dtype(device: str, precision: str = "auto"):
    """The compute dtype for inference/frozen weights. fp16/bf16 only on accelerators; CPU runs fp32."""
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32" or device == "cpu":
        if precision in ("fp16",) and device == "cpu":
            raise UserError("fp16 needs a GPU: use precision fp32 (or bf16) on the CPU.")
        return torch.bfloat16 if (precision == "bf16") else torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 where the GPU supports it well (Ampere+), else fp16.
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass(frozen=True)
class MemoryReading:
    device: str
    used_gb: float
    peak_gb: float
    total_gb: float

    def __str__(self) -> str:
        if self.total_gb:
            return f"{self.used_gb:.1f}/{self.total_gb:.1f} GB (peak {self.peak_gb:.1f})"
        return f"{self.used_gb:.2f} GB RSS (peak {self.peak_gb:.2f})"


def memory(device: str = "auto") -> MemoryReading:
    """How much memory the device uses now and at peak; process RSS on the CPU."""
    import torch

    device = pick_device(device) if device == "auto" else device
    if device.startswith("cuda"):
        gb = 1024**3
        free, total = torch.cuda.mem_get_info()
        return MemoryReading(device, torch.cuda.memory_allocated() / gb, torch.cuda.max_memory_allocated() / gb,
                             total / gb)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            import os

            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except OSError:
        rss = peak
    return MemoryReading(device, rss, peak, 0.0)


def gpu_summary() -> dict:
    """Name and total memory of the first GPU, for pre-filling memory-dependent choices; {} without one."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "total_gb": round(props.total_memory / 1024**3, 1)}


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) ran out of memory: torch's OutOfMemoryError (CUDA), MPS's RuntimeError, MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # a broken torch install must not hide the original error
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def has_xformers() -> bool:
    try:
        import xformers  # noqa: F401
    except Exception:
        return False
    return True
