"""Save and resume the full training state: trained weights, optimizer, scheduler, EMA, grad scaler, RNG
states, step and elapsed time. The data order needs no state: it is a function of (seed, step).

A checkpoint is a folder `checkpoints/step-N/` built in a temporary sibling and swapped in (atomic_dir), so a
kill -9 at any moment leaves the previous checkpoints intact. Only safetensors and weights_only pickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..formats.safe_io import atomic_dir, load_state_dict, save_safetensors, torch_save

_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What the loop needs besides tensors to continue a run."""

    step: int
    elapsed: float  # wall seconds of training so far (log.jsonl's `time` continues from it)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each complete checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    for d in root.iterdir() if root.is_dir() else []:
        m = _STEP_RE.match(d.name)
        if m and (d / "state.json").is_file():
            out.append((int(m[1]), d))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, state: TrainState, *, trainable: dict, optimizer, scheduler, ema=None,
                    scaler=None, keep: int = 3) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{state.step}"
    with atomic_dir(final) as tmp:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        if ema is not None:
            save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        torch_save(extra, tmp / "optimizer.pt")  # a full disk is an OSError (ENOSPC), not torch's RuntimeError
        # state.json last: its presence marks a complete checkpoint.
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "elapsed": state.elapsed}))
    prune_checkpoints(run_dir, keep)
    return final


PUBLISHED_FILE = "published.json"  # the steps whose artefacts were published into models/


def mark_published(run_dir: Path, step: int) -> None:
    """Remember that the artefacts of `step` were published: pruning never deletes that checkpoint, so a
    published file can always be traced back to (and continued from) the state that made it."""
    from ..formats.safe_io import atomic_write_text

    steps = sorted(set(published_steps(run_dir)) | {int(step)})
    atomic_write_text(Path(run_dir) / PUBLISHED_FILE, json.dumps({"steps": steps}))


def published_steps(run_dir: Path) -> list[int]:
    try:
        return [int(s) for s in json.loads((Path(run_dir) / PUBLISHED_FILE).read_text())["steps"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the last `keep` checkpoints, except those whose artefacts were published; returns what
    went."""
    protected = set(published_steps(run_dir))
    gone = []
    for step, old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        if step in protected:
            continue
        shutil.rmtree(old, ignore_errors=True)
        gone.append(old)
    return gone


def load_checkpoint(folder: Path) -> tuple[TrainState, dict, dict | None, dict]:
    """(state, trainable tensors, EMA tensors or None, {"optimizer", "scheduler", "rng", "scaler"?})."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "state.json").read_text())
        trainable = load_state_dict(folder / "trainable.safetensors")
        ema = load_state_dict(folder / "ema.safetensors") if (folder / "ema.safetensors").is_file() else None
        extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise UserError(f"The checkpoint {folder.name} is damaged ({type(exc).__name__}): delete that folder to "
                        f"resume from the one before it.") from exc
    return TrainState(int(meta["step"]), float(meta.get("elapsed", 0.0))), trainable, ema, extra


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for one training at a time, across processes (the app, `sdstudio train`, a second
    tab): a second one is refused, naming the holder, instead of interleaving checkpoints and log lines. An OS
    lock (flock): a process killed with -9 releases it by dying, so a crash never leaves a run locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the app's JobManager still runs one training at a time
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{run_dir.name} is being trained right now ({holder}): wait for that training to end or "
                            f"stop it, or train under another output_name.") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def clear_leftovers(run_dir: Path) -> list[Path]:
    """Delete what kills left in this run's folder: half-built checkpoints (`checkpoints/.step-5.<random>.tmp`),
    a checkpoint caught mid-swap (`.step-5.old-<pid>`), and the temporaries of interrupted file writes (LoRA,
    log, latents, previews). A resume and a finished run call it, so they never pile up. Returns what went."""
    from ..formats.safe_io import remove_paths, stale_temporaries

    found = stale_temporaries(run_dir)
    remove_paths(found)
    return found
