"""The crash campaigns: kill -9 a real `sdstudio train` process at chosen points, resume, repeat, and compare the
end with a run that was never interrupted. Shared by the fast test (a few targeted kills) and the soak (many
seeded random ones). See fault_child.py for the points."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "fault_child.py"
MAX_STEPS = 6
LORA = "character-lora.safetensors"


def train_args(ds: Path, run: Path) -> list[str]:
    """A small LoRA run with every kind of write: disk latent cache, checkpoints (keep 2), previews, the LoRA."""
    sets = dict(base_model="tiny", dataset=ds, output_dir=run, resolution=64, max_steps=MAX_STEPS, batch_size=1,
                save_every=2, sample_every=3, sample_steps=1, device="cpu", cache_latents="disk",
                keep_checkpoints=2, sample_prompts='["a photo of sks person"]')
    return ["train", "character-lora-sd15", *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]


@dataclass
class Outcome:
    returncode: int
    killed_at: str | None  # the point's label when the process was killed there
    stderr: str
    trace: list[str] = field(default_factory=list)


def start_child(args: list[str], home: Path, *, kill: dict | None = None, trace: Path | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SDSTUDIO_HOME=str(home),
               SDSTUDIO_FAULT=json.dumps(kill or {}), SDSTUDIO_TRACE=str(trace or ""))
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish_child(proc, trace: Path | None, timeout: float = 900) -> Outcome:
    _out, err = proc.communicate(timeout=timeout)
    lines = trace.read_text().splitlines() if trace and trace.exists() else []
    killed = next((ln[len("KILLED "):] for ln in lines if ln.startswith("KILLED ")), None)
    if killed is None and proc.returncode == -signal.SIGKILL:
        killed = "external"
    return Outcome(proc.returncode, killed, err, [ln for ln in lines if not ln.startswith("KILLED ")])


def run_child(args, home, *, kill=None, trace=None, kill_after_s: float | None = None) -> Outcome:
    proc = start_child(args, home, kill=kill, trace=trace)
    if kill_after_s is not None:
        try:
            proc.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # kill -9 from outside, at a moment the test does not choose
    return finish_child(proc, trace)


def resume_args(args: list[str], run: Path) -> list[str]:
    """How a user continues after a crash: --resume once a checkpoint exists, else start again."""
    from sdstudio.train.checkpoint import latest_checkpoint

    return args + ["--resume"] if latest_checkpoint(run) is not None else args


# -- what must hold after every kill, and at the end ------------------------------------------------------------

def check_on_disk(run: Path, home: Path) -> int:
    """Every file a kill can leave, except the temporaries a resume clears, must load. Returns how many."""
    from PIL import Image
    from safetensors.torch import load_file

    from sdstudio.formats.safe_io import stale_temporaries
    from sdstudio.train.checkpoint import checkpoint_dirs, load_checkpoint

    temporaries = set(stale_temporaries(run)) | set(stale_temporaries(home))
    checked = 0
    for root in (run, home):
        for p in sorted(root.rglob("*")):
            if any(t == p or t in p.parents for t in temporaries) or not p.is_file():
                continue
            if p.suffix == ".safetensors":
                load_file(p)
            elif p.suffix == ".png":
                with Image.open(p) as im:
                    im.load()
            elif p.name == "log.jsonl":
                text = p.read_text()
                lines = text.splitlines()
                if lines and not text.endswith("\n"):
                    lines = lines[:-1]  # a line cut by the kill: the resume truncates it
                [json.loads(ln) for ln in lines]
            elif p.suffix == ".toml":
                import tomllib

                tomllib.loads(p.read_text())
            elif p.name in ("state.json", "scan.json"):
                json.loads(p.read_text())
            checked += 1
    for _step, folder in checkpoint_dirs(run):
        load_checkpoint(folder)
    return checked


def check_equal_to(run: Path, home: Path, ref: Path) -> None:
    """Finished: the same weights as the unbroken run, the same log (no step missing or twice), no leftovers."""
    import torch
    from safetensors.torch import load_file

    from sdstudio.formats.safe_io import stale_temporaries

    a, b = load_file(ref / LORA), load_file(run / LORA)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the unbroken run, e.g. {different[:3]}"
    assert torch.equal(load_file(home / "models" / "lora" / LORA)[next(iter(a))], a[next(iter(a))])
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(ln) for ln in (ref / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in log]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    assert stale_temporaries(run) == [] and stale_temporaries(home / "models") == []


# -- campaigns ----------------------------------------------------------------------------------------------

@dataclass
class Tally:
    tried: int = 0  # kills that happened
    survived: int = 0  # kills after which the campaign still ended equal to the unbroken run
    campaigns: int = 0
    where: list[str] = field(default_factory=list)  # the label of each kill


def campaign(work: Path, ds: Path, ref, kills: list[dict], tally: Tally) -> None:
    """One run killed at each of `kills` in turn (a process that ends before its kill finished the run), then
    resumed to the end and compared with `ref` (the unbroken run's folder, or a function that waits for it and
    returns it). Raises AssertionError on any damage."""
    run, home = work / "run", work / "ws"
    work.mkdir(parents=True, exist_ok=True)  # the children's trace files go here (the soak's soak-N/ is new)
    args = train_args(ds, run)
    mine = 0
    for i, spec in enumerate(kills):
        timed = spec.get("after_s")
        out = run_child(resume_args(args, run), home, kill=None if timed else spec, trace=work / f"trace-{i}.txt",
                        kill_after_s=timed)
        if out.killed_at is None:
            assert out.returncode == 0, out.stderr[-3000:]
            break  # it finished before reaching the point: the campaign is over
        mine += 1
        tally.where.append(out.killed_at)
        check_on_disk(run, home)
    out = run_child(resume_args(args, run), home)
    assert out.returncode == 0, out.stderr[-3000:]
    check_on_disk(run, home)
    check_equal_to(run, home, ref() if callable(ref) else ref)
    tally.tried += mine
    tally.survived += mine
    tally.campaigns += 1


def reference_trace(ref_work: Path) -> list[str]:
    return (ref_work / "trace.txt").read_text().splitlines()


def random_kills(rng: random.Random, trace: list[str], n: int, timed_share: float = 0.0) -> list[dict]:
    """`n` kill points drawn from an unbroken run's points: label, its occurrence, torn or not; a share of them
    are timed kills from outside (a SIGKILL after a random delay) instead."""
    kills = []
    for _ in range(n):
        if rng.random() < timed_share:
            kills.append({"after_s": round(rng.uniform(1.0, 12.0), 2)})
            continue
        i = rng.randrange(len(trace))
        label = trace[i]
        occurrence = trace[: i + 1].count(label)
        kills.append({"match": re.escape(label), "n": occurrence, "torn": label.startswith("fsync:") and rng.random() < 0.5})
    return kills


def start_reference(ds: Path, ref_work: Path):
    """The unbroken run, started in the background (it runs beside a campaign on the second core)."""
    ref_work.mkdir(parents=True, exist_ok=True)
    return start_child(train_args(ds, ref_work / "run"), ref_work / "ws", trace=ref_work / "trace.txt")


@dataclass
class Reference:
    """The dataset and the unbroken run every crash and disk-full test compares with."""

    work: Path
    ds: Path
    proc: object

    def run(self) -> Path:
        """The unbroken run's folder, once it has finished."""
        if self.proc.returncode is None:
            out = finish_child(self.proc, self.work / "ref" / "trace.txt")
            assert out.returncode == 0, out.stderr[-3000:]
        return self.work / "ref" / "run"

    def trace(self) -> list[str]:
        self.run()
        return reference_trace(self.work / "ref")


_SHARED: dict = {}


def shared_reference(tmp_path_factory) -> Reference:
    """One unbroken run per test session, started in the background the first time a test asks for it (it runs
    on the second core while the asking test goes on). The same run in-process gives the same bytes (checked:
    one torch thread in both), so the in-process disk-full runs compare with it too."""
    if "ref" not in _SHARED:
        from train_helpers import make_kohya_dataset

        work = tmp_path_factory.getbasetemp() / "unbroken"
        work.mkdir()
        ds = make_kohya_dataset(work / "ds", n=4)
        _SHARED["ref"] = Reference(work, ds, start_reference(ds, work / "ref"))
    return _SHARED["ref"]


def wait_time(start: float) -> float:
    return round(time.time() - start, 1)
