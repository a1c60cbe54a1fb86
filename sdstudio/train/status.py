"""A run's state on disk: `runs/<name>/status.json`, so that every runs table (the Train tab's, the Library's,
another process's) can say whether a run is running, paused, stopped, failed or finished, and why it failed.

`train.loop.train` writes it at each change of state (not per step: steps done and the last loss come from
log.jsonl). A run whose process died without saying so (kill -9, a closed terminal) still reads "running" in
the file; `read_status` notices that its process is gone and reports it as stopped.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..formats.safe_io import atomic_write_text

STATUS_FILE = "status.json"
STATES = ("running", "paused", "stopped", "failed", "finished")


class RunStatus:
    """Writes one run's status.json; every write also bumps the workspace's change counter when the run lives in
    a workspace's runs/ folder, so the tabs' runs tables refresh without a poll of every run."""

    def __init__(self, run_dir: Path, total: int, *, enabled: bool = True) -> None:
        self.run_dir, self.total, self.enabled = Path(run_dir), int(total), enabled
        self.state = ""

    def set(self, state: str, *, step: int | None = None, reason: str = "") -> None:
        assert state in STATES, state
        self.state = state
        if not self.enabled:
            return
        doc = {"state": state, "total": self.total, "reason": reason, "pid": os.getpid(),
               "host": socket.gethostname(), "updated": time.time()}
        if step is not None:
            doc["step"] = int(step)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / STATUS_FILE, json.dumps(doc))
        except OSError:
            return  # a full disk must not turn a finished run into a failed one over a status line
        _note_change(self.run_dir)


def _note_change(run_dir: Path) -> None:
    if run_dir.parent.name != "runs":
        return
    from ..workspace import Workspace

    Workspace(run_dir.parent.parent.resolve()).note_change()


def read_status(run_dir: Path) -> dict:
    """{"state", "total", "reason", "step"?} of a run ({} when it has no status.json: an older run, or one made
    elsewhere). A running or paused run whose process is gone reads as stopped."""
    try:
        doc = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("state") not in STATES:
        return {}
    if doc["state"] in ("running", "paused") and not _alive(doc.get("pid"), doc.get("host")):
        doc["state"] = "stopped"
        doc["reason"] = "its process ended without a clean stop (closed or killed): Resume continues it"
    return doc


def _alive(pid, host) -> bool:
    if host and host != socket.gethostname():
        return True  # another machine's run (a shared folder): we cannot tell, so believe the file
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def last_log_line(path: Path, max_bytes: int = 4096) -> dict:
    """The last complete JSON line of a log.jsonl ({} when there is none), read from the file's end: a long run's
    log is not read whole on every refresh. A half-written last line (a kill mid-write) is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    for line in reversed(tail.splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}
