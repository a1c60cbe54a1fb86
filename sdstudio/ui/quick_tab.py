"""The Quick tab: drop photos, name, class, base, memory, one button; then every stage as it runs, the loss,
the previews, the final grid, and what to do with the LoRA. The work runs as a Job (sdstudio/wizard.py);
a timer polls it, so a page reload reconnects and a closed tab does not stop training."""
from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import gradio as gr

from .. import wizard
from ..errors import UserError
from ..events import Failed, Finished, Progress, Saved, Status
from .context import AppContext
from .widgets import fmt_eta as _eta
from .widgets import PageMemory, only_changed, progress_html
from .widgets import loss_frame as _loss_frame
from .library_tab import base_model_choices, current_base

JOB_KIND = "quick"
# A run's page polls once a second: every update walks Gradio's whole component tree in the browser, and on
# a busy 2-core machine a faster poll left the page (and its Stop button) seconds behind.
POLL_SECONDS = 1.0
PLOT_SECONDS = 2.0  # the loss plot redraws at most this often while training
ICONS = {"pending": "○", "running": "◐", "done": "✓", "skipped": "–", "failed": "✗", "stopped": "■"}
COLOURS = {"pending": "#9ca3af", "running": "#6366f1", "done": "#16a34a", "skipped": "#9ca3af", "failed": "#dc2626",
           "stopped": "#d97706"}


MEMORY_RADIO = [(f"{m}", m) for m in wizard.MEMORY_CHOICES] + [("CPU", wizard.CPU_MEMORY)]


def _memory_default() -> int:
    from ..devices import gpu_summary

    try:
        total = gpu_summary().get("total_gb", 0)
    except Exception:
        total = 0
    if not total:
        return wizard.CPU_MEMORY  # no GPU: the CPU choice, which the plan then times from a measured step
    return max([m for m in wizard.MEMORY_CHOICES if m <= total + 0.5] or [6])


def _stages_html(rows: list[dict]) -> str:
    items = []
    for r in rows:
        colour = COLOURS.get(r["state"], "#9ca3af")
        weight = "700" if r["state"] == "running" else "400"
        items.append(f'<li class="qs-{r["state"]}" data-stage="{r["id"]}" data-state="{r["state"]}" '
                     f'style="list-style:none;margin:2px 0;font-weight:{weight}">'
                     f'<span style="color:{colour};display:inline-block;width:1.4em">{ICONS.get(r["state"], "○")}'
                     f'</span><b>{html.escape(r["label"])}</b> <span style="opacity:.75">{html.escape(r["note"])}'
                     f'</span></li>')
    return f'<ol class="quick-stages" style="padding-left:0;margin:0">{"".join(items)}</ol>'


def result_markdown(ctx: AppContext, summary: dict) -> str:
    """The run page: files written, and where they go for A1111 and ComfyUI."""
    if not summary:
        return ""
    files = "\n".join(f"- `{f}`" for f in summary.get("files", []))
    lora = summary.get("lora", "")
    name = Path(lora).name
    return (f"### {html.escape(summary.get('run', ''))} is ready\n"
            f"**LoRA:** `{lora}` (already in the Playground's list) · **preset:** {summary.get('preset', '')} · "
            f"**steps:** {summary.get('steps', '')}\n\n"
            f"**Try:** `{summary.get('prompt', '')}`\n\n"
            f"**Files written** (in `{ctx.workspace.root}`):\n{files}\n\n"
            f"**Use it elsewhere:** copy `{name}` into `stable-diffusion-webui/models/Lora/` (A1111/Forge; then "
            f"`<lora:{Path(lora).stem}:0.8>` in the prompt) or `ComfyUI/models/loras/` (a LoraLoader node).")


def job_view(ctx: AppContext, job) -> dict:
    snap = job.log.snapshot()
    events = job.log.events()
    end = snap["end"]
    rows = wizard.stage_states(events, end)
    last = snap["last_step"]
    running = next((r for r in rows if r["state"] == "running"), None)
    if running and running["id"] == "train" and last is not None:
        progress = _progress(last.step, last.total, f"Train: step {last.step}/{last.total} · loss "
                                                         f"{last.loss:.4f} · ETA {_eta(last.eta_s)}")
    elif running:
        # Only progress reported since this stage began (the previous stage's last count would mislead).
        began = max((ev.t for ev in events if isinstance(ev, Status) and ev.stage == f"quick.{running['id']}"),
                    default=0.0)
        prog = next((ev for ev in reversed(events) if isinstance(ev, Progress) and ev.t >= began), None)
        if prog is not None and prog.total:
            progress = _progress(prog.done, prog.total, f"{running['label']}: {prog.done}/{prog.total} "
                                                             f"{prog.message}")
        else:
            note = snap["status"] if running["id"] == "train" and snap["status"] else running["note"]
            progress = _progress(0, 1, f"{running['label']}: {note}")
    elif isinstance(end, Failed):
        progress = _progress(last.step if last else 0, last.total if last else 1, f"failed: {end.message}")
    elif isinstance(end, Finished) and end.stopped:
        progress = _progress(last.step if last else 0, last.total if last else 1,
                             f"stopped at step {last.step}/{last.total}: the checkpoint is kept" if last
                             else "stopped before training started")
    else:
        progress = _progress(1 if end is not None else 0, 1, "done" if end is not None else "starting")
    grid = next((s.path for s in reversed(snap["saved"]) if isinstance(s, Saved) and s.kind == "grid"), None)
    previews = [(p, f"step {ev.step}: {c}") for ev in reversed(snap["previews"]) if "final grid" not in ev.captions
                for p, c in zip(ev.paths, ev.captions or [""] * len(ev.paths))]
    warnings = wizard.warnings_of(events)
    if isinstance(end, Failed):
        status = f"**Stopped by a problem:** {end.message}"
    elif isinstance(end, Finished):
        status = ("**Stopped.** The last checkpoint is kept: 'Train again with more steps' continues it."
                  if end.stopped else f"**Done.** {html.escape(end.message)}")
    else:
        status = f"**{job.name}**: {running['label'] + ' - ' + running['note'] if running else 'starting'}"
    if warnings:
        status += "\n\n" + "\n".join(f"- ⚠ {html.escape(w)}" for w in warnings[-6:])
    # A stopped "Train again" has no new summary: the run's last finished result stays on the page.
    summary = job.result if isinstance(job.result, dict) else _finished_summary(ctx, job.name)
    return {"stages": _stages_html(rows), "progress": progress, "status": status, "frame": _loss_frame(snap["steps"]),
            "previews": previews, "grid": grid, "result": result_markdown(ctx, summary), "ended": end is not None,
            "lora": summary.get("lora", ""), "run": summary.get("run", job.name)}


def _finished_summary(ctx: AppContext, run: str) -> dict:
    summary = wizard._read_summary(ctx.workspace.root / "runs" / run) if run else {}
    return summary if summary.get("lora") else {}


def _copy_uploads(ctx: AppContext, files) -> list[Path]:
    """Uploaded files into workspace/inputs/quick-<time>/ (the wizard reads only inside the workspace)."""
    if not files:
        return []
    dest = ctx.workspace.root / "inputs" / f"quick-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        src = Path(f if isinstance(f, str) else getattr(f, "name", f))
        from ..workspace import safe_name

        name = Path(safe_name(src.name))  # the browser's file name: a name, never a path
        target = dest / name
        k = 1
        while target.exists():
            k += 1
            target = dest / f"{name.stem}-{k}{name.suffix}"
        shutil.copyfile(src, target)
        out.append(target)
    return [dest]


def _config(ctx, files, name, cls, base, memory, reg, steps, res, sample_steps, captioner, preset):
    return wizard.QuickConfig(photos=files or [], name=name or "", class_word=cls or "", base_model=base or "tiny",
                              memory_gb=memory if memory is not None else 8, regularization=bool(reg),
                              max_steps=int(steps or 0), resolution=int(res or 0), sample_steps=int(sample_steps or 0),
                              captioner=captioner or "auto", preset=preset or "")


def build(ctx: AppContext) -> None:
    s = ctx.settings.load("quick")
    gr.Markdown("### Train your first character LoRA\nDrop 5-50 photos of one subject, give it a name, press the "
                "button. Each step below shows what it does; a control freak can open any step in its own tab.",
                elem_id="quick-intro")
    with gr.Row():
        with gr.Column(scale=2):
            photos = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos (5-50)",
                             elem_id="quick-photos", height=180)
            with gr.Row():
                name = gr.Textbox(s.get("name", ""), label="Name (the trigger word)", placeholder="e.g. mira",
                                  elem_id="quick-name")
                cls = gr.Dropdown(list(wizard.CLASSES), value=s.get("class", "person"), label="Class",
                                  allow_custom_value=True, elem_id="quick-class")
            with gr.Row():
                base = gr.Dropdown(base_model_choices(ctx), value=current_base(ctx), label="Base model",
                                   allow_custom_value=True, elem_id="quick-base")
                memory = gr.Radio(MEMORY_RADIO, value=s.get("memory", _memory_default()),
                                  label="GPU memory (GB)", elem_id="quick-memory")
            reg = gr.Checkbox(bool(s.get("reg", False)), label="Class images (prior preservation: slower, keeps the "
                              "class looking normal)", elem_id="quick-reg")
            with gr.Accordion("Advanced (overrides; 0 = the wizard's choice)", open=False, elem_id="quick-advanced"):
                with gr.Row():
                    steps = gr.Number(0, precision=0, minimum=0, label="Steps", elem_id="quick-steps")
                    res = gr.Number(0, precision=0, minimum=0, step=64, label="Resolution", elem_id="quick-res")
                    sample_steps = gr.Number(0, precision=0, minimum=0, label="Sampling steps (previews, grid)",
                                             elem_id="quick-sample-steps")
                with gr.Row():
                    captioner = gr.Dropdown(["auto", "blip", "wd14", "none"], value="auto", label="Captioner",
                                            elem_id="quick-captioner")
                    preset = gr.Dropdown([""] + [n for _, n in wizard.PRESET_FOR_MEMORY + wizard.PRESET_FOR_MEMORY_XL], value="", label="Preset "
                                         "(empty: picked for the memory)", elem_id="quick-preset")
            estimate = gr.Markdown("", elem_id="quick-estimate")
            with gr.Row():
                start = gr.Button("Train my LoRA", variant="primary", elem_id="quick-start", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id="quick-stop", scale=1)
        with gr.Column(scale=3):
            stages = gr.HTML(_stages_html(wizard.stage_states([])), elem_id="quick-stages")
            progress = gr.HTML(_progress(0, 1, ""), elem_id="quick-progress")
            status = gr.Markdown("", elem_id="quick-status")
            loss = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=220,
                               color_map={"raw": "#a5b4fc", "smoothed": "#4338ca"},
                               elem_id="quick-loss")
            previews = gr.Gallery([], label="Previews while training", columns=4, height=200,
                                  elem_id="quick-previews")
    grid = gr.Image(None, label="Final grid: prompts (with and without the name) x LoRA weight", interactive=False,
                    elem_id="quick-grid", height=420)
    result = gr.Markdown("", elem_id="quick-result")
    with gr.Row():
        open_pg = gr.Button("Open in Playground", variant="primary", elem_id="quick-open-playground")
        more = gr.Number(500, precision=0, minimum=1, label="More steps", elem_id="quick-more-steps", scale=0,
                         min_width=120)
        again = gr.Button("Train again with more steps", elem_id="quick-more")
        open_dataset = gr.Button("Open in Dataset tab", elem_id="quick-open-dataset")
        open_train = gr.Button("Open in Train tab", elem_id="quick-open-train")
    lora_path = gr.State("")
    run_name = gr.State("")
    timer = gr.Timer(POLL_SECONDS, active=False)
    inputs = [photos, name, cls, base, memory, reg, steps, res, sample_steps, captioner, preset]

    def on_estimate(*args):
        files = [f for f in (args[0] or [])]
        qc = _config(ctx, files, *args[1:])
        if not files or not (qc.name or "").strip():
            return "Drop photos and type a name to see the estimate."
        try:
            p = wizard.plan(qc, ctx.workspace)
        except UserError as exc:
            return f"⚠ {exc}"
        warn = "".join(f"\n- ⚠ {w}" for w in p.warnings)
        notes = "".join(f"\n- {n}" for n in p.notes)
        return f"**Plan:** {p.summary()}{notes}{warn}"

    # The plan redraws quietly (no loading overlay over the form: the first one on a CPU measures a step).
    for comp in (photos, memory, cls, base, preset, reg, steps, res, sample_steps, captioner):
        comp.change(on_estimate, inputs, [estimate], show_progress="hidden", trigger_mode="always_last")
    name.blur(on_estimate, inputs, [estimate], show_progress="hidden", trigger_mode="always_last")

    def on_start(*args):
        qc = _config(ctx, None, *args[1:])
        try:
            wizard.check_name(qc.name)
            wizard.check_class(qc.class_word)
            if not args[0]:
                raise UserError(f"No photos: drop {wizard.MIN_PHOTOS} to {wizard.MAX_PHOTOS} photos of your subject.")
            if len(args[0]) < wizard.MIN_PHOTOS:
                raise UserError(f"Only {len(args[0])} photo(s): add at least {wizard.MIN_PHOTOS} ({wizard.GOOD_PHOTOS}"
                                f"-30 of different angles and light work best).")
            from ..models.refs import Places

            qc.base_model = Places.app(ctx.workspace).model(qc.base_model or "tiny").ref  # the one rule
            qc.photos = list(args[0])
            wizard.plan(qc, ctx.workspace)  # every check first, so a refused start leaves no copies behind
            qc.photos = _copy_uploads(ctx, args[0])
            p = wizard.plan(qc, ctx.workspace)
            job = ctx.jobs.start(p.run_name, JOB_KIND, wizard.quick_work(p, ctx.workspace, cache=ctx.cache))
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.Timer(active=False), gr.skip(), gr.skip()
        # Everything the form shows, for a reload (the photos as the workspace copies the run reads).
        ctx.settings.save("quick", {"name": qc.name, "class": qc.class_word, "memory": qc.memory_gb,
                                    "reg": qc.regularization, "base": args[3] or "tiny", "steps": qc.max_steps,
                                    "res": qc.resolution, "sample_steps": qc.sample_steps,
                                    "captioner": qc.captioner, "preset": qc.preset,
                                    "photos": [ctx.workspace.relative(f) for f in wizard._image_files(qc.photos)]})
        return gr.Timer(active=True), f"**{job.name}**: starting - {p.summary()}", _stages_html(wizard.stage_states([]))

    start.click(on_start, inputs, [timer, status, stages])

    def on_stop():
        job = ctx.jobs.latest(JOB_KIND)
        if job is not None and job.running:
            job.stop()
            gr.Info("Stopping after the current step (a checkpoint is kept).")
            return "**Stopping** after the current step…"
        gr.Info("Nothing is running: nothing to stop.")
        return gr.skip()

    stop.click(on_stop, None, [status], show_progress="hidden")

    tick_outputs = [timer, stages, progress, status, loss, previews, grid, result, lora_path, run_name]
    page_memory = PageMemory()

    def on_page_load(request: gr.Request):
        return on_tick(request, fresh_page=True)

    def on_tick(request: gr.Request, fresh_page: bool = False):
        """Only what changed goes to the page (and the loss plot at most every PLOT_SECONDS): every update walks
        the page's whole component tree, and a busy machine's browser must stay responsive."""
        if fresh_page:
            page_memory.forget(request)
        seen = page_memory.of(request)
        job = ctx.jobs.latest(JOB_KIND)
        if job is None:
            return gr.Timer(active=False), *[gr.skip()] * (len(tick_outputs) - 1)
        v = job_view(ctx, job)
        ended = v["ended"] and not job.running
        fresh = seen.get("job") != job.id
        if fresh:
            seen.clear()
            seen["job"] = job.id
        draw = v["frame"] is not None and (fresh or ended or time.time() - seen.get("plot_t", 0) >= PLOT_SECONDS)
        if draw:
            seen["plot_t"] = time.time()
        changed, seen["d"] = only_changed(seen.get("d"), {
            "stages": v["stages"], "progress": v["progress"], "status": v["status"], "previews": v["previews"],
            "grid": v["grid"], "result": v["result"], "lora": v["lora"], "run": v["run"]})
        timer_update = gr.Timer(active=not ended) if fresh or ended else gr.skip()
        return (timer_update, *changed[:3], v["frame"] if draw else gr.skip(), *changed[3:])

    timer.tick(on_tick, None, tick_outputs, show_progress="hidden")
    ctx.components["workspace.token"].change(lambda: gr.update(choices=base_model_choices(ctx)), None, [base],
                                             show_progress="hidden")

    def on_load():
        """A reload shows the form as it was started (component defaults were fixed when the app started), the
        plan for it, and reconnects to the running (or last) job through the tick registered in wire()."""
        s = ctx.settings.load("quick")
        if not s:
            return [gr.skip()] * (len(inputs) + 1)
        photos_on_disk = [str(ctx.workspace.root / f) for f in s.get("photos", [])
                          if (ctx.workspace.root / f).is_file()]
        values = [photos_on_disk or None, s.get("name", ""), s.get("class", "person"), s.get("base", current_base(ctx)),
                  s.get("memory", _memory_default()), bool(s.get("reg", False)), s.get("steps", 0), s.get("res", 0),
                  s.get("sample_steps", 0), s.get("captioner", "auto"), s.get("preset", "")]
        return values + [on_estimate(*values)]

    ui_load = (on_load, inputs + [estimate])

    def on_more(run, n):
        if not run:
            gr.Warning("Train a LoRA first: 'Train again' continues a finished Quick run.")
            return gr.Timer(active=False)
        try:
            work = wizard.more_steps_work(ctx.workspace, run, int(n or 0))
            ctx.jobs.start(run, JOB_KIND, work)
        except (UserError, ValueError) as exc:
            gr.Warning(str(exc))
            return gr.Timer(active=False)
        return gr.Timer(active=True)

    again.click(on_more, [run_name, more], [timer])
    ctx.components["quick._ui"] = {"open_pg": open_pg, "open_train": open_train, "open_dataset": open_dataset,
                                   "lora": lora_path, "run": run_name,
                                   "tick": (on_page_load, tick_outputs),
                                   "load": ui_load}


def wire(ctx: AppContext) -> None:
    ui = ctx.components.get("quick._ui")
    if not ui:
        return
    tabs = ctx.components.get("tabs")
    inbox = ctx.components.get("playground.inbox")
    train_dataset = ctx.components.get("train.dataset")

    def on_open(lora):
        if not lora:
            gr.Warning("There is no LoRA yet: press 'Train my LoRA' and let it finish.")
            return gr.skip(), gr.skip()
        if inbox is None:
            gr.Info(f"The LoRA is {lora}: add it in the Playground's stack.")
            return gr.skip(), gr.Tabs(selected="tab-playground")
        return gr.update(value=lora), gr.Tabs(selected="tab-playground")

    ui["open_pg"].click(on_open, [ui["lora"]], [inbox if inbox is not None else ui["lora"],
                                                tabs if tabs is not None else ui["lora"]])

    train_ui = ctx.components.get("train._ui")
    if train_ui is not None and tabs is not None:
        load_run, load_outputs = train_ui["load_run"]

        def on_train(run):
            """The Train tab with every field of the run's own config.toml (what really trained), not defaults."""
            if not run:
                gr.Warning("Start a Quick run first: its settings then open in the Train tab.")
                return [gr.skip()] * (len(load_outputs) + 1)
            if not (ctx.workspace.root / "runs" / run / "config.toml").is_file():
                gr.Warning("This run has not reached training yet: open it in the Train tab once it trains.")
                return [gr.skip()] * (len(load_outputs) + 1)
            return [*load_run(run), gr.Tabs(selected="tab-train")]

        ui["open_train"].click(on_train, [ui["run"]], [*load_outputs, tabs]).then(
            train_ui["on_method"], [train_ui["method"]], train_ui["groups"])
    elif train_dataset is not None:
        ui["open_train"].click(lambda run: ctx.workspace.relative(ctx.workspace.root / "datasets" / run) if run
                               else gr.skip(), [ui["run"]], [train_dataset])
    else:
        ui["open_train"].click(lambda: gr.Info("The Train tab is not available in this build."), None, None)

    ds_ui = ctx.components.get("dataset._ui") or {}
    if "open_run" in ds_ui and tabs is not None:
        open_run, ds_outputs = ds_ui["open_run"]

        def on_dataset(run):
            """The Dataset tab as the wizard left it: the run's dataset and sources, its crop, size, repeats,
            captioner, trigger and class (from its dataset.toml and quick.json), with the gallery, captions and
            summary drawn at once."""
            if not run:
                gr.Warning("Start a Quick run first: its dataset then opens in the Dataset tab.")
                return [gr.skip()] * (len(ds_outputs) + 1)
            return [*open_run(run), gr.Tabs(selected="tab-dataset")]

        ui["open_dataset"].click(on_dataset, [ui["run"]], [*ds_outputs, tabs])

    # A page reload restores the form and reconnects to the running (or last) Quick job.
    root = gr.context.Context.root_block
    if root is not None:
        fn, outs = ui["load"]
        root.load(fn, None, outs, show_progress="hidden")
        fn, outs = ui["tick"]
        root.load(fn, None, outs, show_progress="hidden")


def _progress(done: float, total: float, text: str) -> str:
    return progress_html(done, total, text, "quick-progress-text")
