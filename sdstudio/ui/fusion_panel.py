"""Fusion panel (a section of the Train tab): fuse several EDLoRA concepts into one model, as a Job.

Pick the base and the EDLoRA files, press Fuse; a timer polls the Job for progress (layer by layer) and the
objective report; Stop stops between layers. The fused model lands in models/checkpoints/ and can be used as
a base in the Playground (its concept tokens work in prompts and regions).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..events import Failed, Finished
from .context import AppContext

JOB_KIND = "fuse"


def edlora_files(ctx: AppContext) -> list[str]:
    """Workspace-relative paths of EDLoRA files: models/edlora/ and finished runs."""
    from ..formats.kinds import detect_kind

    ws = ctx.workspace
    found = []
    for root in (ws.models("edlora"), ws.root / "runs"):
        if root.is_dir():
            found += [p for p in sorted(root.rglob("*.safetensors"))
                      if "checkpoints" not in p.parts and detect_kind(p) == "edlora"]
    return [ws.relative(p) for p in found]


def start_fuse(ctx: AppContext, base: str, files: list[str], name: str, te_iters: int, unet_iters: int):
    """Validate in the click (cheap), then run the fusion as a Job."""
    from ..methods.fusion import FuseConcept, FuseConfig, check_concepts, run_fuse
    from ..formats.edlora import read_edlora

    if len(files or []) < 2:
        raise UserError("Pick at least two EDLoRA files to fuse.")
    paths = [ctx.workspace.resolve(f, must_exist=True) for f in files]
    base = _confined_base(ctx, (base or "tiny").strip())
    check_concepts([read_edlora(p) for p in paths])  # overlapping tokens: say so now, not after loading
    cfg = FuseConfig(base_model=base or "tiny", output_name=name or "fused", text_encoder_iters=int(te_iters),
                     unet_iters=int(unet_iters))
    cfg.concepts = [FuseConcept(path=str(p)) for p in paths]
    return ctx.jobs.start(cfg.output_name, JOB_KIND, lambda jc: run_fuse(cfg, jc.emit, jc.commands,
                                                                        ctx.workspace.root))


def _confined_base(ctx: AppContext, base: str) -> str:
    """'tiny', a hub id, or a model inside the workspace: the UI reads no model from elsewhere."""
    from ..models.loading import TINY, looks_like_hub_id

    if base == TINY or (looks_like_hub_id(base) and ".." not in base.split("/")):
        return base
    return str(ctx.workspace.resolve(base, must_exist=True))


def view(job) -> tuple[str, float]:
    snap = job.log.snapshot()
    end = snap["end"]
    if isinstance(end, Failed):
        return f"**Failed:** {end.message}", 0.0
    if isinstance(end, Finished):
        if end.stopped:
            return "**Stopped.**", 0.0
        return f"**Fused.** {', '.join(Path(p).name for p in end.outputs)} · {snap['status'] or ''}", 1.0
    if snap["progress"]:
        done, total, _stage, msg = snap["progress"]
        return f"{msg} ({done}/{total})", done / max(total, 1)
    return snap["status"] or "starting", 0.0


def build(ctx: AppContext) -> None:
    from .library_tab import base_model_choices, current_base

    with gr.Accordion("Fuse EDLoRA concepts (Mix-of-Show)", open=False, elem_id="fuse-panel"):
        gr.Markdown("Merge several EDLoRA concepts into one model that knows all of them; then use it as the base "
                    "and place each concept in its own region.")
        with gr.Row():
            base = gr.Dropdown(base_model_choices(ctx), value=current_base(ctx), label="Base model",
                               allow_custom_value=True, elem_id="fuse-base")
            files = gr.Dropdown(edlora_files(ctx), multiselect=True, label="EDLoRA concepts", elem_id="fuse-files")
            refresh = gr.Button("Refresh", elem_id="fuse-refresh", scale=0)
        with gr.Row():
            name = gr.Textbox("fused", label="Output name", elem_id="fuse-name")
            te_iters = gr.Number(500, label="Text-encoder / k-v iterations", precision=0, minimum=1,
                                 elem_id="fuse-te-iters")
            unet_iters = gr.Number(50, label="Spatial-layer iterations", precision=0, minimum=1,
                                   elem_id="fuse-unet-iters")
        with gr.Row():
            go = gr.Button("Fuse", variant="primary", elem_id="fuse-start")
            stop = gr.Button("Stop", variant="stop", elem_id="fuse-stop")
        status = gr.Markdown("", elem_id="fuse-status")
        bar = gr.Slider(0, 1, value=0, label="Progress", interactive=False, elem_id="fuse-progress")
        timer = gr.Timer(0.5, active=False)

    refresh.click(lambda: gr.update(choices=edlora_files(ctx)), None, files)

    def on_go(b, f, n, ti, ui):
        try:
            job = start_fuse(ctx, b, f, n, ti, ui)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.Timer(active=False), f"**Not started:** {exc}"
        return gr.Timer(active=True), f"**{job.name}**: starting"

    go.click(on_go, [base, files, name, te_iters, unet_iters], [timer, status])

    def on_stop():
        job = ctx.jobs.latest(JOB_KIND)
        if job is None or not job.running:
            gr.Warning("No fusion is running.")
            return
        job.commands.stop()
        gr.Info("Stopping after this layer.")

    stop.click(on_stop, None, None)

    def on_tick():
        job = ctx.jobs.latest(JOB_KIND)
        if job is None:
            return gr.Timer(active=False), gr.skip(), gr.skip()
        text, frac = view(job)
        return gr.Timer(active=job.running), text, frac

    timer.tick(on_tick, None, [timer, status, bar], show_progress="hidden")
