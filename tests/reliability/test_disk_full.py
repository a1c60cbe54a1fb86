"""A full disk during training: the run stops with one clear sentence, every earlier checkpoint and output stays
loadable, nothing half-written is left, and the run resumes once space is back, ending where an unbroken run
ends.

Two ways to fill the disk: a patched write that fails with ENOSPC at a chosen save (always runs), and a real
small tmpfs in a private mount namespace (`unshare -rm`, where the machine permits it), where the kernel itself
says "No space left on device" to whichever write comes first: torch.save, safetensors, the log, a preview.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from crashes import ROOT, check_equal_to, check_on_disk, shared_reference, train_args
from sdstudio.errors import UserError
from sdstudio.events import Failed
from sdstudio.jobs import JobManager
from sdstudio.train.checkpoint import checkpoint_dirs
from sdstudio.train.config import load_config
from sdstudio.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(ds, run):
    """The crash tests' run (same settings as their unbroken reference), in this process."""
    args = train_args(ds, run)
    return load_config(args[1], [a for i, a in enumerate(args) if args[i - 1] == "--set"])


def _run_job(cfg, resume=False):
    job = JobManager().start("run", "train", lambda ctx: train(cfg, ctx.emit, ctx.commands, resume=resume))
    job.join(600)
    return job.log.snapshot()["end"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    ref = shared_reference(tmp_path_factory)
    return ref.ds, ref


def _same_lora(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = load_file(a / "character-lora.safetensors"), load_file(b / "character-lora.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("where", ["checkpoint", "log", "lora"])
def test_enospc_stops_cleanly_and_the_run_resumes(unbroken, tmp_path, monkeypatch, where):
    """ENOSPC at the second checkpoint's data, at the log line of step 5, or in the final LoRA's data."""
    ds, ref = unbroken
    run = tmp_path / "run"
    import sdstudio.formats.safe_io as safe_io
    import sdstudio.train.loop as loop

    real_fsync = os.fsync
    # The final LoRA is written in the run's scratch folder of the last step (periodic saves, numbered
    # name-000002.safetensors, pass through .saving-2/, .saving-4/ first).
    final = f"/.saving-{_cfg(ds, run).max_steps}/"

    def full_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if (where == "checkpoint" and "/.step-4." in path) or (where == "lora" and final in path
                                                                and "character-lora.safetensors" in path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    class FullLog:
        """log.jsonl whose 5th line finds the disk full."""

        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    if where == "log":
        monkeypatch.setattr(loop, "open", lambda *a, **k: FullLog(open(*a, **k)), raising=False)
    else:
        monkeypatch.setattr(safe_io.os, "fsync", full_fsync)
    end = _run_job(_cfg(ds, run))
    monkeypatch.undo()  # space is back

    assert isinstance(end, Failed) and "disk is full" in end.message.lower() and "\n" not in end.message, end
    assert "Traceback" not in end.message
    steps = [s for s, _ in checkpoint_dirs(run)]
    assert steps == {"checkpoint": [2], "log": [2, 4], "lora": [4, 6]}[where], steps
    check_on_disk(run, tmp_path / "nothing")
    from sdstudio.formats.safe_io import stale_temporaries

    assert stale_temporaries(run) == []  # a failed save removes its own temporary
    assert not (run / "character-lora.safetensors").exists()

    assert not isinstance(_run_job(_cfg(ds, run), resume=True), Failed)
    _same_lora(run, ref.run())
    log = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    assert stale_temporaries(run) == []


def test_a_full_disk_refuses_nothing_it_already_wrote(tmp_path, monkeypatch):
    """atomic_write_bytes over an existing file: ENOSPC leaves the old file as it was."""
    from sdstudio.formats.safe_io import atomic_write_bytes

    target = atomic_write_bytes(tmp_path / "a.bin", b"old contents")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match="disk is full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def _can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


TMPFS_SCRIPT = r"""
set -u
mount -t tmpfs -o size=12m tmpfs "$MNT" || exit 97
"$PY" -m sdstudio "$@" > /dev/null 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
cp -a "$MNT/run" "$OUT/after-full"
mount -o remount,size=96m "$MNT" || exit 98
"$PY" -m sdstudio "$@" --resume > /dev/null 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
cp -a "$MNT/run" "$OUT/final"
"""


@pytest.mark.slow
def test_a_real_full_tmpfs(tmp_path, unbroken):
    """12 MB hold the cache, the previews and two 5 MB checkpoints; the third does not fit."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("this machine does not allow a private tmpfs (unshare -rm)")
    ds, ref = unbroken
    mnt, out, home = tmp_path / "mnt", tmp_path / "out", tmp_path / "ws"
    mnt.mkdir()
    out.mkdir()
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SDSTUDIO_HOME=str(home), MNT=str(mnt),
               OUT=str(out), PY=sys.executable)
    args = train_args(ds, mnt / "run")[:]
    r = subprocess.run(["unshare", "-rm", "bash", "-c", TMPFS_SCRIPT, "tmpfs", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    first_err = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() in ("1", "2"), first_err
    last = first_err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk is full" in last.lower() and "Traceback" not in first_err, first_err
    check_on_disk(out / "after-full", home)
    assert checkpoint_dirs(out / "after-full"), "no checkpoint survived the full disk"
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()
    # The published copy went to the workspace on the normal disk: compare with the unbroken run there too.
    check_on_disk(out / "final", home)
    check_equal_to(out / "final", home, ref.run())
