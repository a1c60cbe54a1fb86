"""Job: background thread + commands in (stop, pause, resume, sample now, save now) + events out.

This is the only module that makes threads. A job's work function receives a `JobContext`; it emits
events through `ctx.emit(...)` and checks `ctx.commands` often (every step, every cached item). The UI polls
`job.log.snapshot()`; it never waits on the work. State lives in the Job, not in a browser session, so a page
reload reconnects through `JobManager.latest()`.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError
from .events import Event, Failed, Finished, Preview, Progress, Saved, Status, Step

log = logging.getLogger("sdstudio.jobs")


class Stopped(Exception):
    """Raised inside a job's work when the user pressed Stop; the job then ends as 'stopped', not failed."""


class Commands:
    """Thread-safe commands from the UI/CLI to a running job."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._requests: set[str] = set()

    # -- sent by the UI --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._running.set()  # a paused job must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def request(self, what: str) -> None:
        """Ask for a one-off action at the next check: "sample" or "save"."""
        with self._lock:
            self._requests.add(what)

    # -- read by the work ------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def take(self, what: str) -> bool:
        """True once per request of `what`."""
        with self._lock:
            if what in self._requests:
                self._requests.discard(what)
                return True
            return False

    def check(self, on_pause: Callable[[], None] | None = None) -> None:
        """Call often from the work: raises Stopped on stop, blocks while paused."""
        if not self._running.is_set():
            if on_pause:
                on_pause()
            while not self._running.wait(0.1):
                pass
        if self._stop.is_set():
            raise Stopped()


class RunLog:
    """Every event a job emitted, kept in memory, with a cheap snapshot for the UI to poll."""

    def __init__(self, max_steps_kept: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._steps: list[Step] = []
        self._previews: list[Preview] = []
        self._saved: list[Saved] = []
        self._last_status: Status | None = None
        self._last_progress: Progress | None = None
        self._end: Finished | Failed | None = None
        self._max = max_steps_kept

    def add(self, ev: Event) -> None:
        with self._lock:
            if isinstance(ev, Step):
                self._steps.append(ev)
                if len(self._steps) > self._max:
                    del self._steps[: len(self._steps) - self._max]
                return
            self._events.append(ev)
            if isinstance(ev, Status):
                self._last_status = ev
            elif isinstance(ev, Progress):
                self._last_progress = ev
            elif isinstance(ev, Preview):
                self._previews.append(ev)
            elif isinstance(ev, Saved):
                self._saved.append(ev)
            elif isinstance(ev, (Finished, Failed)):
                self._end = ev

    def snapshot(self) -> dict:
        """A plain-data view of the job for a UI poll: cheap, consistent, safe to share across threads."""
        with self._lock:
            last = self._steps[-1] if self._steps else None
            return {
                "status": self._last_status.message if self._last_status else "",
                "stage": self._last_status.stage if self._last_status else "",
                "progress": (self._last_progress.done, self._last_progress.total, self._last_progress.stage,
                             self._last_progress.message) if self._last_progress else None,
                "steps": [(s.step, s.loss, s.lr) for s in self._steps],
                "last_step": last,
                "previews": [p for p in self._previews],
                "saved": [s for s in self._saved],
                "end": self._end,
                "events": len(self._events) + len(self._steps),
            }

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)


@dataclass
class JobContext:
    """What a job's work function gets: a way to speak and a way to listen."""

    emit: Callable[[Event], None]
    commands: Commands
    job: "Job"


@dataclass
class Job:
    """One unit of background work. Create through JobManager.start()."""

    name: str
    kind: str  # "train", "caption", "regularize", "generate", ...
    work: Callable[[JobContext], object]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    commands: Commands = field(default_factory=Commands)
    log: RunLog = field(default_factory=RunLog)
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float | None = None
    result: object = None
    queued: bool = False  # waiting for the GPU (JobManager.start(queue=True)); Stop works while it waits
    granted_at: float | None = None  # when it began its work (after its wait in the queue, if it had one)
    # Set by JobManager for exclusive jobs: `before` waits for this job's turn, `after` hands the GPU on.
    before: Callable[[JobContext], None] | None = field(default=None, repr=False)
    after: Callable[["Job"], None] | None = field(default=None, repr=False)
    _turn: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = None

    # 1. Emit: record, then tell each listener. A listener's fault (a UI bug, a closed pipe) never reaches
    #    the work: a 3-hour run must not die because a plot failed to draw.
    def emit(self, ev: Event) -> None:
        self.log.add(ev)
        for fn in list(self.listeners):
            with contextlib.suppress(Exception):
                fn(ev)

    @property
    def state(self) -> str:
        end = self.log.snapshot()["end"]
        if end is None and self.queued:
            return "queued"
        if end is None:
            return "paused" if self.commands.paused else ("running" if self.started_at else "new")
        if isinstance(end, Failed):
            return "failed"
        return "stopped" if end.stopped else "finished"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        ctx = JobContext(emit=self.emit, commands=self.commands, job=self)
        try:
            if self.before is not None:
                self.before(ctx)  # a queued job waits here for the GPU
            self.granted_at = time.time()
            self.result = self.work(ctx)
            if self.log.snapshot()["end"] is None:  # work may end itself with its own words (the wizard does)
                self.emit(Finished(message="done", outputs=_paths(self.result)))
        except Stopped:
            self.emit(Finished(message="stopped", stopped=True))
        except UserError as exc:
            self.emit(Failed(message=str(exc)))
        except Exception as exc:  # a bug or an environment fault: one sentence on screen, details in the log
            details = traceback.format_exc()
            # A full disk or exhausted memory is the machine's state, not a bug: its sentence says what to do, and
            # the traceback goes to the log only at debug level (a CLI user sees one line, -v shows it).
            log.log(logging.DEBUG if _known_fault(exc) else logging.ERROR, "job %s failed:\n%s", self.name, details)
            self.emit(Failed(message=_explain(exc, self.kind), details=details))
        finally:
            self.ended_at = time.time()
            try:
                _free_memory(full=self.kind not in LIGHT_KINDS)
            except Exception:  # a cleanup fault must never keep the GPU from the jobs queued behind this one
                log.exception("freeing memory after job %s failed", self.name)
            finally:
                if self.after is not None:
                    self.after(self)  # the next queued job starts once this one's memory is freed

    def start(self) -> "Job":
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run, name=f"sdstudio-{self.kind}-{self.id}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> "Job":
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def stop(self) -> None:
        self.commands.stop()


def _paths(result: object) -> tuple[str, ...]:
    """The files a job's work returned (a list of paths, as training returns), for its Finished event."""
    if isinstance(result, (list, tuple)) and result and all(isinstance(p, (str, os.PathLike)) for p in result):
        return tuple(str(p) for p in result)
    return ()


# What to do when a job of this kind runs out of memory (GPU, or RAM on the CPU). Training's own loop says it
# better when it can (it knows the step it kept, see train.loop.OutOfMemory); this is the fallback.
OOM_ADVICE = {
    "train": ("Out of memory while training: turn on gradient checkpointing and the latent/text caches and Resume, "
              "or lower the batch size or resolution, or pick a smaller preset (the -6gb/-8gb ones), for a new run."),
    "generate": ("Out of memory while generating: lower the width/height or the batch, use fewer ControlNets and "
                 "T2I-Adapters at once, or wait until the training that shares the GPU ends."),
}
OOM_ADVICE["quick"] = OOM_ADVICE["train"]


def _known_fault(exc: BaseException) -> bool:
    from .devices import is_out_of_memory
    from .formats.safe_io import is_disk_full

    return is_disk_full(exc) or is_out_of_memory(exc)


def _explain(exc: BaseException, kind: str = "") -> str:
    from .devices import is_out_of_memory

    text = str(exc)
    if is_out_of_memory(exc):
        return OOM_ADVICE.get(kind, "Out of memory: close other work on the GPU, or lower the size of the job.")
    from .formats.safe_io import is_disk_full

    if is_disk_full(exc):
        return "The disk is full: free some space, then resume."
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}"


# Jobs whose memory stays with a long-lived owner (a generation's model stays loaded in the Playground session):
# ending one needs no full collection, which scans every object the process has (0.6 s of CPU per generation,
# measured with the app loaded, in a row of queued ones) and would empty the CUDA cache the next one refills.
# Their own garbage goes by reference counting and the collector's young generation.
LIGHT_KINDS = {"generate"}


def _free_memory(full: bool = True) -> None:
    import gc

    if not full:
        gc.collect(0)
        return
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class JobManager:
    """Keeps the app's jobs. One heavy job (training, generation on the GPU) holds the GPU at a time; others
    either wait for it in order (`queue=True`: generations from any number of browser tabs) or are refused with
    a message naming the job that holds it (a second training is never run on top of the first)."""

    KEEP_ENDED = 200  # ended jobs remembered (their logs); older ones are forgotten so memory stays flat

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[Job] = []
        self._holder: Job | None = None  # the exclusive job that has the GPU
        self._waiting: collections.deque[Job] = collections.deque()  # queued for it, first come, first served

    def start(self, name: str, kind: str, work: Callable[[JobContext], object], *, exclusive: bool = True,
              listeners: list[Callable[[Event], None]] | None = None, queue: bool = False) -> Job:
        """Start `work` in the background. An exclusive job (the default) needs the GPU: while another holds
        it, a `queue=True` job waits its turn (and says so in its status); any other is refused with a
        message that names the holder."""
        with self._lock:
            job = Job(name=name, kind=kind, work=work, listeners=list(listeners or []))
            job._exclusive = exclusive  # type: ignore[attr-defined]
            if exclusive:
                if self._holder is None and not self._waiting:
                    self._holder = job
                elif queue:
                    self._waiting.append(job)
                    job.queued, job.before = True, self._wait_turn
                else:
                    first = self._holder or self._waiting[0]
                    raise UserError(f"'{first.name}' ({first.kind}) is still running: stop it or wait for it "
                                    f"to finish before starting another.")
                job.after = self._hand_on
            self._jobs.append(job)
            self._forget_old()
        return job.start()

    def _wait_turn(self, ctx: JobContext) -> None:
        """Runs in a queued job's thread: wait until it holds the GPU, or end it as stopped."""
        job = ctx.job
        with self._lock:
            ahead = list(self._waiting).index(job) + (1 if self._holder is not None else 0)
            holder = self._holder
        if holder is not None:
            ctx.emit(Status(f"queued: {ahead} ahead, behind '{holder.name}' ({holder.kind})", stage="queued"))
        while not job._turn.wait(0.1):
            if job.commands.stop_requested:
                with self._lock:
                    if job in self._waiting:
                        self._waiting.remove(job)
                        job.queued = False
                        raise Stopped()
                # it got the GPU at this very moment: start, and stop at its first check like any job
        job.queued = False

    def _hand_on(self, job: Job) -> None:
        """Runs when an exclusive job ends: the GPU goes to the first queued job."""
        with self._lock:
            if self._holder is job:
                self._holder = self._waiting.popleft() if self._waiting else None
                if self._holder is not None:
                    self._holder._turn.set()

    def _forget_old(self) -> None:
        ended = [j for j in self._jobs if j.ended_at is not None]
        if len(ended) > self.KEEP_ENDED:
            drop = {id(j) for j in ended[: len(ended) - self.KEEP_ENDED]}
            self._jobs = [j for j in self._jobs if id(j) not in drop]

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._waiting)

    def latest(self, kind: str | None = None) -> Job | None:
        with self._lock:
            for job in reversed(self._jobs):
                if kind is None or job.kind == kind:
                    return job
        return None

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.id == job_id), None)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs if j.running]


def foreground_exit(job: Job, verbose: bool = False, stopped_note: str | None = "stopped") -> int | None:
    """How a CLI command ends after `run_foreground`: None when the job finished; otherwise the exit code.

    A user mistake raises its UserError again (the CLI prints one line and exits 2); a bug prints one line
    (its traceback with -v) and gives 1; a stop prints `stopped_note` and gives 130."""
    import sys

    end = job.log.snapshot()["end"]
    if isinstance(end, Failed):
        if not end.details:
            raise UserError(end.message)
        print(end.details if verbose else f"error: {end.message} (run with -v for details)", file=sys.stderr)
        return 1
    if isinstance(end, Finished) and end.stopped:
        if stopped_note:
            print(stopped_note, file=sys.stderr)
        return 130
    return None


def run_foreground(name: str, kind: str, work: Callable[[JobContext], object],
                   listeners: list[Callable[[Event], None]] | None = None) -> Job:
    """Run a job and wait for it, as the CLI does; Ctrl-C becomes a clean Stop (checkpoints kept)."""
    job = Job(name=name, kind=kind, work=work, listeners=list(listeners or [])).start()
    try:
        while job.running:
            job.join(0.2)
    except KeyboardInterrupt:
        job.stop()
        job.join()
    return job
