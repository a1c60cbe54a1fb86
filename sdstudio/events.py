"""What a job tells the world: small frozen dataclasses, emitted from the worker thread.

Training, captioning, regularization and generation all speak this one language, so the UI and the CLI
draw progress, plots and galleries the same way for every kind of work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    t: float = field(default_factory=time.time, kw_only=True)


@dataclass(frozen=True)
class Status(Event):
    """A phase change or a note: "caching latents", "validating dataset", "paused"."""

    message: str
    stage: str = ""  # a short machine-readable stage name: "validate", "cache", "train", "caption", ...


@dataclass(frozen=True)
class Progress(Event):
    """Progress of a non-training stage (caching, captioning, generating class images)."""

    done: int
    total: int
    stage: str = ""
    message: str = ""


@dataclass(frozen=True)
class Step(Event):
    """One optimizer step of training."""

    step: int
    total: int
    loss: float
    lr: float
    it_per_s: float = 0.0
    eta_s: float | None = None
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Preview(Event):
    """Images made during a job (training previews, a generated image, a crop preview)."""

    step: int
    paths: tuple[str, ...]
    captions: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()  # per image, the control image it was made from ("" for none)


@dataclass(frozen=True)
class Saved(Event):
    """A file or folder written: a checkpoint, a LoRA, a dataset."""

    path: str
    kind: str = ""  # what the artefact is: "checkpoint", "lora", "controlnet", "t2i_adapter", "dataset", ...
    step: int | None = None
    published: bool = False  # a copy in the workspace's models/<kind>/ (sdstudio.publish), not the run's own


@dataclass(frozen=True)
class Finished(Event):
    message: str = "done"
    outputs: tuple[str, ...] = ()
    stopped: bool = False  # True when the user stopped it


@dataclass(frozen=True)
class Failed(Event):
    """The job ended with an error. `message` is one sentence for the user; `details` is for the log."""

    message: str
    details: str = ""
