"""Regularization (class) images for prior preservation: generated with the base model, or imported.

Generation is resumable (images already in the folder are kept and skipped) and stoppable: it checks the
job's commands before every image. Image i always uses seed `seed + i`, so a resumed run makes the same set.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..events import Progress, Saved, Status
from ..formats.safe_io import atomic_write_bytes
from .folder import concept_dir_name
from .images import inspect_image, walk_files


@dataclass
class RegularizationConfig:
    class_word: str  # the class the subject belongs to: "dog", "woman", "car"
    count: int = 100  # how many class images in total (existing ones count)
    prompt: str = ""  # default "photo of a <class>"
    negative_prompt: str = ""  # what to steer away from
    steps: int = 25  # sampling steps per image
    guidance: float = 7.0  # classifier-free guidance scale
    size: int = 0  # image side in pixels; 0 = the model's native resolution
    seed: int = 0  # image i uses seed + i
    batch_size: int = 1  # images per pipeline call

    @property
    def full_prompt(self) -> str:
        return self.prompt.strip() or f"photo of a {self.class_word.strip()}"


def reg_dir(dataset: Path, class_word: str) -> Path:
    """`DS/reg/1_<class>`: one repeat, the class word as the folder's token (kohya reads it as the prompt)."""
    return Path(dataset) / "reg" / concept_dir_name(1, class_word.strip())


def _name(i: int) -> str:
    return f"class_{i:05d}.png"


def generate_class_images(components, cfg: RegularizationConfig, out_dir: Path,
                          emit: Callable = lambda ev: None, check: Callable = lambda: None) -> list[Path]:
    """Write `cfg.count` images to `out_dir`; returns the paths made this time (not the ones already there)."""
    import torch

    if not cfg.class_word.strip():
        raise UserError("Regularization images need a class word (e.g. 'dog' or 'woman'): fill it in.")
    if cfg.count < 1:
        raise UserError("The number of class images must be at least 1.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(cfg.count) if not (out_dir / _name(i)).is_file()]
    done = cfg.count - len(todo)
    emit(Status(f"{done} of {cfg.count} class images already there; generating {len(todo)}", stage="regularize"))
    emit(Progress(done, cfg.count, stage="regularize", message=cfg.full_prompt))
    if not todo:
        return []
    pipe = components.pipeline()
    size = cfg.size or components.resolution
    made: list[Path] = []
    for start in range(0, len(todo), max(1, cfg.batch_size)):
        check()  # Stop and pause land between images, never inside one
        idx = todo[start:start + max(1, cfg.batch_size)]
        gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + i) for i in idx]
        with torch.inference_mode():
            images = pipe(prompt=[cfg.full_prompt] * len(idx), negative_prompt=[cfg.negative_prompt] * len(idx)
                          if cfg.negative_prompt else None, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                          height=size, width=size, generator=gens).images
        for i, image in zip(idx, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            path = atomic_write_bytes(out_dir / _name(i), buf.getvalue())
            made.append(path)
            done += 1
            emit(Progress(done, cfg.count, stage="regularize", message=path.name))
    emit(Saved(str(out_dir), kind="regularization"))
    return made


def import_class_folder(src: Path, out_dir: Path, emit: Callable = lambda ev: None,
                        check: Callable = lambda: None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Copy the usable images of an existing class folder into `out_dir` (bad files are skipped with a reason).
    Returns (copied, [(name, why skipped)])."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder: choose the folder that holds your class images.")
    files = walk_files(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied, skipped = [], []
    for n, path in enumerate(files, 1):
        check()
        info = inspect_image(path)
        if info.error:
            skipped.append((path.name, info.error))
        else:
            target = out_dir / f"{path.stem}.png"
            if not target.exists():
                buf = io.BytesIO()
                info.image.save(buf, format="PNG")
                atomic_write_bytes(target, buf.getvalue())
            copied.append(target)
        emit(Progress(n, len(files), stage="regularize", message=path.name))
    return copied, skipped

