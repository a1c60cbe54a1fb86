"""`python fault_child.py ARGS...` is `sdstudio ARGS...` with fault points, for the crash tests.

Every place a kill can do harm is a numbered *point*: each fsync of a file being saved (the data is written but
not yet renamed into place), each rename (before and after), each directory sync, each training step and each
latent being cached. The points are labelled by what is being written (`ckpt:optimizer.pt`, `lora`,
`cache:write`, `log`, ...) and, when $SDSTUDIO_TRACE names a file, appended to it as they pass.

$SDSTUDIO_FAULT (JSON `{"match": REGEX, "n": N, "torn": BOOL}`) kills this process with SIGKILL at the N-th point
whose label matches: a real kill -9, nothing runs after it (no finally, no atexit, no flush). With `torn`, a file
caught at its fsync is first cut to half its length, as a kill in the middle of a write leaves it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys

SPEC = json.loads(os.environ.get("SDSTUDIO_FAULT") or "{}")
TRACE = os.environ.get("SDSTUDIO_TRACE")
_seen = {"n": 0}
_real_fsync, _real_replace = os.fsync, os.replace
_trace_fd = os.open(TRACE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if TRACE else None


def label_of(path: str) -> str:
    """What a path being written is, for the run layout the crash tests use."""
    name = os.path.basename(path.rstrip("/"))
    tmp = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)  # an atomic write's temporary: name it by its file
    name = tmp[1] if tmp else name
    if "/checkpoints/" in path or path.endswith("/checkpoints"):
        if re.search(r"/checkpoints/step-\d+$", path):
            return "ckpt:swap"
        if re.search(r"/checkpoints/\.step-\d+\.[^/]*\.tmp/", path):
            return f"ckpt:{name}"
        return "ckpt:dir"
    if "/cache/" in path:
        return "cache:write"
    if "/models/" in path:
        return "publish"
    if "/samples/" in path:
        return "sample"
    for key in ("log.jsonl", "config.toml", ".changes"):
        if key in name:
            return {"log.jsonl": "log", "config.toml": "config", ".changes": "changes"}[key]
    if name.endswith(".safetensors") or ".safetensors." in name:
        return "lora"
    return "other"


def point(label: str, fd: int | None = None) -> None:
    """Record the point; die here when it is the one asked for."""
    if _trace_fd is not None:
        os.write(_trace_fd, (label + "\n").encode())
    if SPEC and re.fullmatch(SPEC["match"], label):
        _seen["n"] += 1
        if _seen["n"] == SPEC["n"]:
            if SPEC.get("torn") and fd is not None:
                try:
                    os.ftruncate(fd, os.fstat(fd).st_size // 2)
                except OSError:
                    pass
            if _trace_fd is not None:
                os.write(_trace_fd, f"KILLED {label}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)


def fsync(fd):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = ""
    is_dir = os.path.isdir(path)
    point(("dirsync:" if is_dir else "fsync:") + label_of(path), None if is_dir else fd)
    return _real_fsync(fd)


def replace(src, dst, *a, **kw):
    label = label_of(os.fspath(dst))
    point(f"replace:{label}")
    out = _real_replace(src, dst, *a, **kw)
    point(f"replaced:{label}")
    return out


def install() -> None:
    import sdstudio.train.loop as loop
    import sdstudio.train.noise as noise

    os.fsync, os.replace = fsync, replace
    make_batch, encode = loop._make_batch, noise.encode_images

    def counted_batch(*a, **kw):
        point("step")
        return make_batch(*a, **kw)

    def counted_encode(*a, **kw):
        point("cache:encode")
        return encode(*a, **kw)

    loop._make_batch, noise.encode_images = counted_batch, counted_encode


if __name__ == "__main__":
    install()
    from sdstudio.cli import main

    sys.exit(main(sys.argv[1:]))
