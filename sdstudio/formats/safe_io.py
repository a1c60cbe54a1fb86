"""Atomic writes (tmp file, fsync, rename) and safe reads (safetensors unless the user opts in to pickle).

A killed process or a full disk leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_full(path: Path, exc: BaseException) -> UserError:
    return UserError(f"The disk is full while writing {path.name}: free some space, then resume or try again "
                     f"(nothing was overwritten).")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a full quota) however a library reports it: an OSError from Python's own writes, or the text
    of a Rust/C++ error (safetensors writes "No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _atomic_file(path: Path, fill) -> Path:
    """Write a file through a temporary sibling: `fill(f)` writes into the open file, then fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a saved model should be readable like any file
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise _disk_full(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_file(Path(path), lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: Path | str, dst: Path | str, *, link: bool = False) -> Path:
    """Put a copy of the file `src` at `dst` atomically, streaming (a 7 GB checkpoint never sits in memory).
    `link`: a hard link instead when both are on one filesystem (no second copy on disk), else a copy."""
    src, dst = Path(src), Path(dst)
    if link:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
            return dst
        except OSError:  # another filesystem, or links not allowed: copy instead
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def fill(f) -> None:
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, f, 16 << 20)

    return _atomic_file(dst, fill)


def save_safetensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as .safetensors, atomically. Metadata values must be strings."""
    from safetensors.torch import save

    clean, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors that share memory (tied weights): store a copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[k] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if "ss_network_module" in meta:  # a network (LoRA, LyCORIS, EDLoRA): the hashes A1111 shows, as sd-scripts does
        from .metadata import network_hashes

        meta.update(network_hashes(clean, meta))
    return atomic_write_bytes(path, save(clean, metadata=meta))


class _WholeWrites:
    """A file for torch.save that writes every byte it is given or raises, and remembers the OSError. torch's
    zip writer, when a write fails, finishes the archive anyway and raises its own "unexpected pos" RuntimeError
    over the real cause (a full disk nobody could then act on)."""

    def __init__(self, raw) -> None:
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = self.raw.write(view)
                if not n:
                    raise OSError(errno.ENOSPC, "No space left on device")
                view = view[n:]
        except OSError as exc:
            self.error = self.error or exc
            raise
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def torch_save(obj, path: Path | str) -> Path:
    """torch.save to `path` (a file inside an atomic_dir or a temporary), where a full disk is an OSError."""
    import torch

    path = Path(path)
    with open(path, "wb", buffering=0) as raw:
        writer = _WholeWrites(raw)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
    return path


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Build a folder in a temporary sibling, then swap it into place; on error, the old folder stays."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, UserError) and is_disk_full(exc):
            raise _disk_full(final, exc) from exc
        raise


@contextlib.contextmanager
def build_once(final: Path | str, ready: str) -> Iterator[Path | None]:
    """Build a shared cache folder once across processes (two app windows, parallel test workers): the builder
    holds an OS lock beside the folder; a process that waited on it finds `final/ready` and gets None (nothing to
    build) instead of swapping a second copy over a folder the first process is already reading."""
    final = Path(final)
    if (final / ready).exists():
        yield None
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+") as lock:
        with contextlib.suppress(ImportError):  # Windows: no flock; atomic_dir alone still never leaves half a folder
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (final / ready).exists():
            yield None
            return
        with atomic_dir(final) as tmp:
            yield tmp


# What a killed atomic write leaves behind: `.<name>.<8 random>.tmp` (a file from atomic_write_bytes, a folder
# from atomic_dir, both named by tempfile) and `.<name>.old-<pid>` (atomic_dir's previous folder, mid-swap).
_TEMPORARY_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\..+\.old-\d+$")


def stale_temporaries(folder: Path | str, name: str | None = None) -> list[Path]:
    """The leftovers of killed atomic writes under `folder` (recursively, links not followed); with `name`,
    only those of that one file or folder, directly in `folder`. Deleting them never loses data: a
    temporary only becomes data by its final rename."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if name is not None:
        return sorted(p for p in folder.glob(f".{glob.escape(name)}.*") if _TEMPORARY_RE.match(p.name)
                      and p.name[len(name) + 2:].count(".") <= 1)
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for d in list(dirs):
            if _TEMPORARY_RE.match(d):
                found.append(Path(root) / d)
                dirs.remove(d)  # its insides go with it
        found += [Path(root) / f for f in files if _TEMPORARY_RE.match(f)]
    return sorted(found)


def remove_paths(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def load_state_dict(path: Path | str, allow_pickle: bool = False, device: str = "cpu") -> dict:
    """Load tensors from .safetensors; a pickle (.ckpt/.pt/.bin) only when the user opted in, and then with
    `weights_only=True` so that it cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=device)
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise UserError(f"{path.name} is not a valid .safetensors file ({exc}); re-download it.") from exc
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{path.name} is a pickle file, which can run code when loaded: convert it to "
                            f".safetensors, or opt in with allow_pickle (--allow-pickle) if you trust it.")
        import torch

        try:
            sd = torch.load(str(path), map_location=device, weights_only=True)
        except Exception as exc:
            raise UserError(f"{path.name} could not be loaded safely (weights_only=True): {exc}") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return sd
    raise UserError(f"{path.name}: unsupported file type {path.suffix!r}; use a .safetensors file.")


def check_tensors(sd: dict, name: str) -> dict:
    """`sd` when every tensor holds usable values; otherwise one sentence. NaN or infinity (a training that
    diverged and was saved anyway, or a damaged download) would turn every image black, and a tensor with no
    values (rank 0) cannot be applied: both are refused by name rather than discovered as a black picture or a
    division by zero."""
    import torch

    tensors = [(k, v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    empty = [k for k, v in tensors if v.numel() == 0]
    if empty:
        raise UserError(f"{name} has {len(empty)} empty tensor(s) (e.g. {empty[0]}): the file is damaged; "
                        f"re-download or re-save it.")
    bad = [k for k, v in tensors if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{name} has NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[0]}): it is damaged or "
                        f"was saved from a training that diverged; use another file.")
    return sd


def read_safetensors_metadata(path: Path | str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_safetensors_header(path: Path | str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """({tensor name: shape}, metadata) of a .safetensors file, read from its header alone, after checking that
    the header is sound and the file holds every byte it promises (a cut-off download is caught here)."""
    import json

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 1 or n > 100_000_000 or 8 + n > size:
            raise UserError(f"{path.name} is not a .safetensors file (its header is missing or damaged): "
                            f"download it again, or pick the right file.")
        try:
            header = json.loads(f.read(n))
            meta = header.pop("__metadata__", None) or {}
            shapes = {k: list(v["shape"]) for k, v in header.items()}
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{path.name} has a damaged .safetensors header ({type(exc).__name__}): download it "
                            f"again.") from exc
    if 8 + n + end > size:
        raise UserError(f"{path.name} is cut off ({size:,} of {8 + n + end:,} bytes): the download did not finish; "
                        f"download it again.")
    return shapes, {str(k): str(v) for k, v in meta.items()}


def read_safetensors_keys(path: Path | str) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def save_model_folder(model, folder: Path | str, dtype=None) -> Path:
    """A diffusers model's folder (config.json + weights), written atomically, with the floating-point weights in
    `dtype` (the live model keeps its own): what ControlNets and T2I-Adapters are saved as."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if dtype is not None:
            for f in tmp.glob("*.safetensors"):
                sd = load_state_dict(f)
                save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, f,
                                 {"format": "pt"})
    return Path(folder)
