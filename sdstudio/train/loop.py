"""THE training loop. Every method runs through it; the UI and the CLI start it the same way.

`train(cfg, emit, commands, resume=...)` is the entry point: it validates the dataset (before any model loads),
loads the base, lets the method attach what trains, caches, and runs `run_loop`. It talks to the world only
through `emit(event)` and `commands` (stop / pause / sample now / save now), checked every step and every
cached item. It never touches the UI.

Exact resume: the data order, caption augmentations and the noise of each step are pure functions of
(seed, step, rank); everything else (weights, optimizer, scheduler, EMA, scaler, RNG, elapsed time) is in the
checkpoint. A resumed run therefore logs the same losses as one never stopped.

Distributed (accelerate launch / torchrun): every rank trains on its own batches; gradients are averaged with
one all-reduce per step; only rank 0 writes files and emits previews.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..data.conditioning import to_batch
from ..events import Event, Progress, Saved, Status, Step
from ..formats.kinds import detect_kind
from ..formats.safe_io import atomic_write_text, load_state_dict, save_safetensors
from ..jobs import Commands, Stopped
from ..methods.base import Batch, RunInfo, hook
from ..methods.registry import get_method
from .checkpoint import (TrainState, clear_leftovers, latest_checkpoint, load_checkpoint, mark_published, run_lock,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig, run_workspace
from .preview import check_sample_conditions, preview_conditions, render_previews
from .speed import SpeedOptions, check_speed_settings
from .status import RunStatus, last_log_line
from .text import TextCond, encode_prompt, tokenize_prompt

# Settings that must not change across a resume: they fix the data order and the shapes of what trains.
RESUME_FIXED = ("method", "base_model", "dataset", "seed", "batch_size", "resolution", "gradient_accumulation",
                "buckets", "optimizer")


class Diverged(UserError):
    """The loss became NaN or infinite."""


class OutOfMemory(UserError):
    """The device ran out of memory during training; the message says what to change and where Resume starts."""


# -- small helpers --------------------------------------------------------------------------------------

def _seed_for(*key) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & (2**63 - 1)


class EMA:
    """Exponential moving average of the trained parameters (fp32 shadows, kept on their device)."""

    def __init__(self, params: list, decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Use the averaged weights inside the block (previews, saving), then put the live ones back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {f"{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd: dict) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"{i}"])


class TextCache:
    """Text-encoder outputs by caption, for frozen text encoders: computed once, reused every step. On SDXL it
    holds both encoders' hidden states (side by side) and the pooled embedding (train/text.py)."""

    def __init__(self, c, device) -> None:
        self.c, self.device, self.memo = c, device, {}

    def get(self, captions: list[str]) -> TextCond:
        missing = [t for t in dict.fromkeys(captions) if t not in self.memo]
        if missing:
            with torch.no_grad():
                out = encode_prompt(self.c, tokenize(self.c, missing, self.device))
            self.memo.update({t: (out.hidden[i], None if out.pooled is None else out.pooled[i])
                              for i, t in enumerate(missing)})
        hidden = torch.stack([self.memo[t][0] for t in captions])
        pooled = torch.stack([self.memo[t][1] for t in captions]) if self.c.family.is_xl else None
        return TextCond(hidden, pooled)


def tokenize(c, captions: list[str], device=None):
    """Token ids per tokenizer (a list of two on SDXL), as `encode_prompt` takes them."""
    return tokenize_prompt(c, captions, device)


def _make_accelerator(cfg: TrainConfig, device: str):
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from ..devices import pick_dtype

    dtype = pick_dtype(device, cfg.precision)
    mp = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # In one process (the app, tests) runs follow each other with different settings: start clean.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    acc = Accelerator(mixed_precision=mp, cpu=device == "cpu", gradient_accumulation_steps=1)
    return acc, dtype


# -- the entry point ------------------------------------------------------------------------------------

@dataclass
class Preflight:
    """What `preflight` found: the validated dataset, the run folder and the checkpoint to resume from."""

    layout: object
    data: object
    run_dir: Path
    checkpoint: Path | None


def preflight(cfg: TrainConfig, *, resume: bool = False, home: Path | None = None, method=None) -> Preflight:
    """Check everything a user can get wrong, in seconds and before any model loads: the dataset's folder
    level, images, captions and conditioning, class images, the base model's family, the resume state.
    Raises UserError. `method`: the instance that will train (default: the registered `cfg.method`)."""
    from ..data.dataset import TrainDataset
    from ..data.folder import read_dataset
    from ..models.loading import family_of_ref

    method = method if method is not None else get_method(cfg.method)()
    hook(method, "check_settings")(cfg)
    family = family_of_ref(cfg.base_model)
    refusal = (getattr(method, "unsupported_families", None) or {}).get(family.name)
    if refusal:
        raise UserError(refusal)
    run_dir = cfg.run_dir(home)
    layout = read_dataset(cfg.dataset, default_caption=cfg.instance_prompt, need_class=cfg.prior_preservation,
                          class_root=cfg.class_data or None)
    # Conditioning the method needs (control images...) is found and checked here: every bad pair at once. SDXL
    # also takes each image's micro-conditioning (original size, crop, target size), cut like its pixels.
    conditioning = tuple(getattr(method, "conditioning", ())) + (("time_ids",) if family.is_xl else ())
    data = TrainDataset(layout, cfg, conditioning=conditioning)
    check_sample_conditions(cfg)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"--resume found no checkpoint in {run_dir}: start without --resume, or point "
                            f"output_dir at the run to continue.")
        _check_resume_config(run_dir, cfg)
    elif (run_dir / "log.jsonl").is_file() and latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run: resume it (--resume), or choose another output_name.")
    return Preflight(layout, data, run_dir, ckpt)


def train(cfg: TrainConfig, emit: Callable[[Event], None], commands: Commands | None = None, *,
          resume: bool = False, home: Path | None = None, publish: Callable[[list[Path]], list[Path]] | None = None,
          checked: Preflight | None = None, method=None) -> list[Path]:
    """Validate, load, train, save. Returns the final artefacts. Raises UserError for user mistakes and
    Stopped when stopped (after saving a resumable checkpoint). `checked`: a preflight already done;
    `method`: a method instance to use instead of the registered `cfg.method` (plug-ins, tests)."""
    commands = commands or Commands()
    method = method if method is not None else get_method(cfg.method)()

    # 1. Validate everything a user can get wrong, before any model loads (seconds, not minutes).
    emit(Status("checking the dataset", stage="validate"))
    pre = checked or preflight(cfg, resume=resume, home=home, method=method)
    run_dir, layout = pre.run_dir, pre.layout
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # One training per run folder, across processes: a second is refused (naming the first) before it touches
    # anything of the run, status.json included; never run on top. Rank 0 holds it.
    with run_lock(run_dir) if rank0 else contextlib.nullcontext():
        return _train_locked(cfg, method, pre, run_dir, layout, emit, commands, resume, home, publish, rank0)


def _train_locked(cfg, method, pre, run_dir, layout, emit, commands, resume, home, publish, rank0):
    """train() from loading on, under the run's lock."""
    from ..data.dataset import dataset_hash, tag_frequency
    from ..devices import pick_device
    from ..models.loading import load_base
    from ..models.refs import Places

    # From here on the run exists: its status.json says running, paused, stopped, failed (and why) or finished.
    status = RunStatus(run_dir, cfg.max_steps, enabled=rank0)
    status.set("running", step=_logged_steps(run_dir) if resume else 0)
    emit = _status_tracking(emit, status)
    try:
        device = pick_device(cfg.device)
        check_speed_settings(cfg, device)
        acc, weight_dtype = _make_accelerator(cfg, device)
        commands.check()

        # 2. Load the base (a hub id is downloaded into the workspace first, by the main process, with progress)
        #    and let the method attach what trains.
        emit(Status(f"loading {cfg.base_model}", stage="load"))
        places = Places.cli(home)
        half = weight_dtype in (torch.float16, torch.bfloat16)
        if acc.is_main_process:
            base = places.local_model(cfg.base_model, half=half, emit=emit, check=commands.check)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            base = places.local_model(cfg.base_model, half=half)
        pred = None if cfg.prediction_type == "auto" else cfg.prediction_type
        c = load_base(base, dtype=weight_dtype, device=str(acc.device), prediction_type=pred)
        c.ref = cfg.base_model  # what the files' metadata name: the hub id, not the folder it was downloaded to
        from ..formats.metadata import bucket_info

        method.run = RunInfo(cfg=cfg, run_dir=run_dir, layout=layout, dataset_hash=dataset_hash(layout),
                             tag_frequency=tag_frequency(layout), started=time.time(), mixed_precision=acc.mixed_precision,
                             world=acc.num_processes, batches_per_epoch=pre.data.batches_per_epoch,
                             bucket_info=bucket_info(pre.data))
        outputs = run_loop(method, c, pre.data, cfg, emit, commands, acc=acc, run_dir=run_dir,
                           resume_from=pre.checkpoint, publish=publish)
    except Stopped:
        status.set("stopped", step=_logged_steps(run_dir))
        raise
    except BaseException as exc:
        status.set("failed", step=_logged_steps(run_dir), reason=_failure_reason(exc))
        raise
    status.set("finished", step=_logged_steps(run_dir))
    return outputs


def _status_tracking(emit, status: "RunStatus"):
    """`emit`, also keeping status.json's paused/running in step with the loop's pause."""
    def tracked(ev: Event) -> None:
        if isinstance(ev, Status) and ev.stage == "paused":
            status.set("paused")
        elif status.state == "paused" and isinstance(ev, (Step, Status)):
            status.set("running")
        emit(ev)
    return tracked


def _failure_reason(exc: BaseException) -> str:
    """The sentence a runs table shows for a failed run."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory: lower the batch size or resolution, or turn on gradient checkpointing"
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _logged_steps(run_dir: Path) -> int:
    """The last step in log.jsonl (0 without one), read from the end of the file."""
    return int(last_log_line(Path(run_dir) / "log.jsonl").get("step", 0))


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    import tomllib

    from .config import run_workspace, workspace_paths

    p = run_dir / "config.toml"
    if not p.is_file():
        return
    old = workspace_paths(tomllib.loads(p.read_text(encoding="utf-8")), run_workspace(p))
    new = cfg.to_dict()

    def same(a, b) -> bool:  # one folder written two ways (relative to the workspace, absolute) is the same
        if a == b:
            return True
        return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(a).resolve() == Path(b).resolve()

    for key in RESUME_FIXED:
        if key in old and not same(old[key], new.get(key)):
            raise UserError(f"{key} changed from {old[key]!r} to {new.get(key)!r} since the run started: resume with "
                            f"the same {key}, or start a new run.")


def run_loop(method, c, data, cfg: TrainConfig, emit, commands: Commands, *, acc, run_dir: Path,
             resume_from: Path | None = None, publish=None) -> list[Path]:
    """The loop proper, over a loaded base `c` and a `TrainDataset`."""
    main = acc.is_main_process
    rank, world = acc.process_index, acc.num_processes
    device = acc.device
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_leftovers(run_dir)  # what earlier kills of this run left half-written
        # Workspace-relative paths when the run lives in a workspace: the file never holds this machine's folders.
        atomic_write_text(run_dir / "config.toml", cfg.to_toml(run_workspace(run_dir / "config.toml")))

    # 3. What trains. Same seed on every rank, so adapters start identical everywhere.
    torch.manual_seed(cfg.seed)
    groups = method.prepare(c, cfg)
    params = [p for g in groups for p in g.params]
    for p in params:  # trainable weights stay fp32 whatever the compute precision
        if p.dtype != torch.float32:
            p.data = p.data.float()
    if world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    te_trains = hook(method, "text_encoder_trainable")(c)
    trained = [m for _prefix, m in hook(method, "trainable_modules")(c)]
    for m in trained:  # what trains runs in train mode; the frozen base stays in eval mode
        m.train()
    # The loss always back-propagates through the UNet (into residuals, adapters or embeddings), so
    # checkpointing and the attention kernel cover it as well as what trains.
    on_backward_path = list({id(m): m for m in (c.unet, *trained)}.values())
    if cfg.gradient_checkpointing:
        for m in on_backward_path:
            _enable_checkpointing(m)
    # The attention kernel, torch.compile, channels_last, cuDNN autotuning (train/speed.py).
    speed = SpeedOptions(c, cfg, device, modules=on_backward_path).apply()

    # 4. Optimizer, schedule, EMA; the noise scheduler for training (DDPM over the base's betas).
    from diffusers import DDPMScheduler

    from .optim import build_optimizer, build_scheduler

    pred = c.scheduler.config.get("prediction_type", "epsilon")
    c.extra["train_scheduler"] = DDPMScheduler.from_config(c.scheduler.config, prediction_type=pred)
    optimizer = acc.prepare_optimizer(build_optimizer(cfg.optimizer, groups, cfg, str(device)))
    if getattr(method, "run", None) is not None:  # the files' metadata names the real class (ss_optimizer)
        method.run.optimizer = f"{type(optimizer.optimizer).__module__}.{type(optimizer.optimizer).__name__}"
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer.optimizer, cfg.warmup_steps, cfg.max_steps)
    ema = EMA(params, cfg.ema_decay) if cfg.ema else None
    scaler = getattr(acc, "scaler", None)

    # 5. Resume: weights, optimizer, scheduler, EMA, scaler, RNG, step, elapsed time.
    start_step, elapsed0 = 0, 0.0
    if resume_from is not None:
        state, trainable, ema_sd, extra = load_checkpoint(resume_from)
        hook(method, "load_trainable_state_dict")(c, {k: v.to(device) for k, v in trainable.items()})
        optimizer.optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if ema is not None and ema_sd is not None:
            ema.load_state_dict(ema_sd)
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        set_rng_state(extra["rng"])
        start_step, elapsed0 = state.step, state.elapsed
        if main:
            _truncate_log(run_dir / "log.jsonl", start_step)
        emit(Status(f"resumed from step {start_step}", stage="resume"))
        if start_step >= cfg.max_steps:
            emit(Status(f"the run already reached max_steps = {cfg.max_steps}: raise max_steps to train more",
                        stage="train"))
    elif main:
        (run_dir / "log.jsonl").unlink(missing_ok=True)

    # 6. Caches: latents with each item's conditioning (memory or disk), and text embeddings. Stop works here too.
    latents = _cache_latents(c, data, cfg, emit, commands, run_dir, acc) if cfg.cache_latents != "off" else None
    text_cache = None
    if cfg.cache_text and not te_trains:
        text_cache = TextCache(c, device)
        caps = data.all_captions()
        for i in range(0, len(caps), 16):
            commands.check()
            text_cache.get(caps[i:i + 16])
            emit(Progress(done=min(i + 16, len(caps)), total=len(caps), stage="cache", message="caching captions"))
    if (cfg.flip or cfg.random_crop) and latents is not None:
        emit(Status("flip and random_crop are off while latents are cached (cached latents are cut once, centred)",
                    stage="cache"))
    sample_conditions = preview_conditions(cfg, data, run_dir) if main else []  # control images for previews

    # 7. Training.
    @contextlib.contextmanager
    def autocast():
        with acc.autocast(), speed.step():
            yield

    log_f = open(run_dir / "log.jsonl", "a", encoding="utf-8") if main else None
    t0 = time.time()
    step = start_step
    last_saved = start_step if resume_from is not None else -1
    rate = None  # steps per second, smoothed
    outputs: list[Path] = []

    def elapsed() -> float:
        return elapsed0 + (time.time() - t0)

    def checkpoint(numbered: bool = False) -> None:
        """A resumable checkpoint; `numbered` (the periodic saves and Save now) also writes the artefacts as
        name-000020.safetensors beside the run, as kohya's save_every_n_steps does."""
        nonlocal last_saved
        if not main or step == last_saved:
            return
        with torch.no_grad():
            folder = save_checkpoint(run_dir, TrainState(step, elapsed()),
                                     trainable=hook(method, "trainable_state_dict")(c), optimizer=optimizer.optimizer,
                                     scheduler=scheduler, ema=ema, scaler=scaler, keep=cfg.keep_checkpoints)
        last_saved = step
        emit(Saved(path=str(folder), kind="checkpoint", step=step))
        if numbered:
            method.run.step = step
            with (ema.swapped() if ema else contextlib.nullcontext()):
                for p in save_artefacts(method, c, run_dir, step, cfg.output_name, numbered=True):
                    emit(Saved(path=str(p), kind=cfg.method, step=step))

    def preview() -> None:
        if not main:
            return
        emit(Status(f"drawing previews at step {step}", stage="sample"))
        with (ema.swapped() if ema else contextlib.nullcontext()), speed.uncompiled():
            ev = render_previews(method, c, cfg, run_dir, step, autocast, conditions=sample_conditions)
        if ev:
            emit(ev)
        emit(Status(f"training (step {step})", stage="train"))

    def on_pause() -> None:
        emit(Status("paused", stage="paused"))

    try:
        if start_step == 0:
            preview()
        emit(Status("training", stage="train"))
        while step < cfg.max_steps:
            commands.check(on_pause)
            if commands.take("sample"):
                preview()
            if commands.take("save"):
                checkpoint(numbered=True)
            t_step = time.time()
            micro_losses = []
            for k in range(cfg.gradient_accumulation):
                micro = step * cfg.gradient_accumulation + k
                batch = _make_batch(c, data, cfg, micro * world + rank, latents, text_cache, device, c.dtype,
                                    seed=_seed_for(cfg.seed, micro, rank))
                with autocast():
                    loss = method.loss(c, batch, step)
                acc.backward(loss / cfg.gradient_accumulation)
                micro_losses.append(loss.detach().float())
            loss_value = torch.stack(micro_losses).mean()
            if world > 1:
                _average_gradients(params, world)
                torch.distributed.all_reduce(loss_value)
                loss_value = loss_value / world
            loss_f = float(loss_value)
            if not math.isfinite(loss_f):
                raise Diverged(f"The loss became {loss_f} at step {step + 1}: lower the learning rate (or use fp32/bf16); "
                               f"the last good checkpoint is kept" + (f" (step {last_saved})." if last_saved > 0
                                                                     else "."))
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            report = hook(method, "after_optimizer_step")(c, step) or {}  # gradients still there (AdaLoRA)
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            hook(method, "on_step_end")(c, step)
            step += 1

            # Report: log.jsonl line, Step event with it/s and ETA.
            dt = time.time() - t_step
            rate = 1 / dt if rate is None else 0.9 * rate + 0.1 / max(dt, 1e-9)
            lr = scheduler.get_last_lr()[0]
            if main:
                log_f.write(json.dumps({"step": step, "loss": loss_f, "lr": lr, "time": round(elapsed(), 3)}) + "\n")
                log_f.flush()
            emit(Step(step=step, total=cfg.max_steps, loss=loss_f, lr=lr, it_per_s=rate,
                      eta_s=(cfg.max_steps - step) / rate if rate else None, elapsed_s=elapsed(), extra=report))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint(numbered=True)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                preview()

        # 8. The end: previews, a final checkpoint (so a later run can extend it), the artefacts.
        if main:
            if step > start_step:
                preview()
            checkpoint()
            speed.restore()
            method.run.step = step
            emit(Status("saving", stage="save"))
            with (ema.swapped() if ema else contextlib.nullcontext()):
                outputs = save_artefacts(method, c, run_dir, step, cfg.output_name, numbered=False)
            for p in outputs:
                emit(Saved(path=str(p), kind=detect_kind(p), step=step))
            if publish:
                published = publish(outputs)
                if published:
                    mark_published(run_dir, step)  # pruning keeps the checkpoint these files came from
                for p in published:
                    emit(Saved(path=str(p), kind=detect_kind(p), step=step, published=True))
            clear_leftovers(run_dir)
        acc.wait_for_everyone()
        # The job that runs us (train tab, CLI) ends with Finished carrying these outputs; a caller that runs the
        # loop as one stage of its own job (the wizard) goes on after it.
        emit(Status(f"finished {step} steps", stage="done"))
        return outputs
    except Stopped:
        # A clean stop keeps the work: a checkpoint at the last finished step, so Resume continues it.
        if step > 0:
            checkpoint()
        raise
    except Exception as exc:
        from ..devices import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        # The failed step changed no weights: keep the last finished one (best effort, memory is short), so
        # Resume with lighter settings loses nothing.
        with contextlib.suppress(Exception):
            if step > 0:
                _free_after_oom(optimizer)
                checkpoint()
        kept = f"step {last_saved}" if last_saved > 0 else "the start"
        raise OutOfMemory(f"Out of memory at step {step + 1}: turn on gradient_checkpointing and the latent/text "
                          f"caches, then Resume (it continues from {kept}); or lower batch_size or resolution, or "
                          f"pick a smaller preset (the -6gb/-8gb ones), for a new run.") from exc
    finally:
        speed.restore()
        if log_f:
            log_f.close()


def _free_after_oom(optimizer) -> None:
    """Drop the failed step's gradients and cached blocks before saving the checkpoint."""
    import gc

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_artefacts(method, c, run_dir: Path, step: int, stem: str, *, numbered: bool) -> list[Path]:
    """`method.save` into a scratch folder, then into the run folder: as name-000020.* mid-run (`numbered`), or
    under the final names at the end, where a previous final file (an earlier "Train again") is first kept
    under its own step's number, never overwritten."""
    import shutil

    from ..formats.numbered import keep_previous, numbered_name

    scratch = run_dir / f".saving-{step}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    out: list[Path] = []
    try:
        for p in map(Path, method.save(c, scratch)):
            if p.parent.resolve() != scratch.resolve():  # a method that wrote elsewhere on purpose
                out.append(p)
                continue
            dest = run_dir / (numbered_name(p.name, stem, step) if numbered else p.name)
            if numbered:
                shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
            else:
                keep_previous(dest, stem)
                if dest.exists():  # the same step saved before (its numbered copy exists): replace it
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(p, dest)
            out.append(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _make_batch(c, data, cfg, g: int, latents, text_cache, device, dtype, seed: int) -> Batch:
    epoch, idxs = data.batch_indices(g)
    pos = g % data.batches_per_epoch
    captions = [data.caption(i, epoch, pos) for i in idxs]
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = Batch(captions=captions, generator=gen, index=list(idxs),
                  is_class=torch.tensor([data.items[i].is_class for i in idxs], device=device))
    # Cached latents were cut once (centred, unflipped); otherwise each item gets this step's flip and crop.
    flips = [False if latents is not None else data.flip(i, epoch, pos) for i in idxs]
    shifts = [None if latents is not None else data.crop_shift(i, epoch, pos) for i in idxs]
    if latents is not None:
        batch.latents = torch.stack([latents.get(i) for i in idxs]).to(device)
    else:
        batch.pixel_values = torch.stack([data.pixels(i, f, s) for i, f, s in zip(idxs, flips, shifts)]).to(device,
                                                                                                             dtype)
    for name, cond in data.conditions.items():  # control images, masks, SDXL's time ids: cut like the images
        values = [latents.cond[i][name] if latents is not None else data.cond(i, name, f, s)
                  for i, f, s in zip(idxs, flips, shifts)]
        batch.cond[name] = to_batch(cond, values, device)
    if text_cache is not None:
        text = text_cache.get(captions)
        batch.encoder_hidden_states, batch.pooled_embeds = text.hidden, text.pooled
    else:
        batch.input_ids = tokenize(c, captions, device)
    return batch


def _enable_checkpointing(module) -> None:
    """Gradient checkpointing on a diffusers model or a transformers text encoder, where it supports it."""
    if getattr(module, "_supports_gradient_checkpointing", False):  # diffusers ModelMixin
        module.enable_gradient_checkpointing()
    elif getattr(module, "supports_gradient_checkpointing", False):  # transformers PreTrainedModel
        module.gradient_checkpointing_enable()


def _average_gradients(params, world: int) -> None:
    """One flat all-reduce of every gradient (what DDP does, without wrapping the modules)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _LatentStore:
    def __init__(self) -> None:
        self.mem: dict[int, torch.Tensor] = {}
        self.cond: dict[int, dict[str, torch.Tensor]] = {}  # item -> its conditioning, cut like its latent

    def get(self, i: int) -> torch.Tensor:
        return self.mem[i]


def _cache_latents(c, data, cfg, emit, commands, run_dir: Path, acc) -> _LatentStore:
    """Encode every image once (the VAE then stays idle), and read its conditioning once. `disk` also keeps them
    in the run folder, so a resume or a second run on the same images skips the work."""
    from .noise import encode_images

    store = _LatentStore()
    folder = run_dir / "cache" / "latents"
    n = len(data.items)
    for i in range(n):
        commands.check()  # Stop works during caching
        path = folder / f"{data.latent_key(i, str(cfg.base_model))}.safetensors" if cfg.cache_latents == "disk" else None
        saved = load_state_dict(path) if path is not None and path.is_file() else {}
        if "latent" in saved:  # conditioning that is not a tensor (boxes with phrases) is not on disk: read it
            store.mem[i] = saved["latent"].to(acc.device if cfg.cache_on_gpu else "cpu")
            store.cond[i] = {name: saved[f"cond.{name}"] if f"cond.{name}" in saved else data.cond(i, name)
                             for name in data.conditions}
        else:
            gen = torch.Generator(device=acc.device).manual_seed(_seed_for(cfg.seed, "latent", i))
            pix = data.pixels(i)[None].to(acc.device, c.dtype)
            with torch.no_grad(), acc.autocast():
                latent = encode_images(c.vae, pix, gen, dtype=c.dtype)[0].float()
            store.mem[i] = latent if cfg.cache_on_gpu else latent.cpu()
            store.cond[i] = {name: data.cond(i, name) for name in data.conditions}
            if path is not None:
                save_safetensors({"latent": store.mem[i], **{f"cond.{k}": v for k, v in store.cond[i].items()
                                                             if isinstance(v, torch.Tensor)}}, path)
        if i % 4 == 0 or i == n - 1:
            emit(Progress(done=i + 1, total=n, stage="cache", message="caching latents"))
    return store


def _truncate_log(path: Path, step: int) -> None:
    """After a resume, keep only the log lines up to the checkpoint (a killed run may have gone further)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a half-written last line from a kill
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
