"""Atomic writes: a crash or a full disk leaves the old file, never half of a new one."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.formats import safe_io


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "a.bin"
    safe_io.atomic_write_bytes(p, b"old")
    safe_io.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert oct(p.stat().st_mode & 0o777) != "0o600"  # readable like any other saved file
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]  # no temp files left


def test_full_disk_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.bin"
    safe_io.atomic_write_bytes(p, b"old")

    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the new bytes are flushed (simulated: no real way to fill it here)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="disk is full"):
        safe_io.atomic_write_bytes(p, b"new" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_keeps_old_on_error(tmp_path):
    final = tmp_path / "model"
    with safe_io.atomic_dir(final) as d:
        (d / "x.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_dir(final) as d:
            (d / "x.txt").write_text("v2-partial")
            raise RuntimeError("killed halfway")
    assert (final / "x.txt").read_text() == "v1"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model"]
    with safe_io.atomic_dir(final) as d:
        (d / "x.txt").write_text("v2")
    assert (final / "x.txt").read_text() == "v2"


def test_safetensors_round_trip_with_metadata(tmp_path):
    p = safe_io.save_safetensors({"w": torch.arange(6.0).view(2, 3)}, tmp_path / "w.safetensors", {"ss_network_dim": 4})
    assert safe_io.read_safetensors_metadata(p) == {"ss_network_dim": "4"}
    assert torch.equal(safe_io.load_state_dict(p)["w"], torch.arange(6.0).view(2, 3))
    assert safe_io.read_safetensors_keys(p) == ["w"]


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported"):
        safe_io.load_state_dict(p)


def _build_slowly(folder: str, log: str) -> None:
    """One process's attempt at a shared cache folder; it records a build and is slow about it."""
    import time
    from pathlib import Path

    with safe_io.build_once(Path(folder), "done") as tmp:
        if tmp is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.5)  # a second process arrives while this one builds
            (tmp / "done").write_text(str(os.getpid()))
    assert (Path(folder) / "done").exists()


def test_build_once_builds_a_shared_folder_once_across_processes(tmp_path):
    # Two app windows or two test workers asking for the tiny model at once: one builds, the other waits and
    # reads that folder; before, both built and the second swapped its copy over a folder the first was reading.
    import multiprocessing

    folder, log = tmp_path / "cache" / "tiny", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(folder), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert sorted(f.name for f in folder.parent.iterdir()) == [".tiny.lock", "tiny"]  # no temporaries left over
