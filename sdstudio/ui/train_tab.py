"""The Train tab: method + preset, a form drawn from the config dataclasses, and a live view of the run.

The form is generated from TrainConfig's and each method's Config field metadata (label, help, bounds,
choices, basic/advanced), so a new setting or a new method appears here without UI code. Start runs
`train.loop.train` as a Job; a `gr.Timer` polls `job.log.snapshot()` for the loss plot, progress, stats and
previews. State lives in the Job, so a page reload reconnects to a running run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..events import Failed, Finished
from ..methods.registry import all_methods
from ..train.config import TrainConfig, list_presets, load_config, preset_header, read_toml, user_fields
from .context import AppContext
from .widgets import fmt_eta as _fmt_eta
from .widgets import PageMemory, only_changed, progress_html
from .widgets import loss_frame as _loss_frame

TAB = "train"
JOB_KIND = "train"
TOP = ("method", "base_model", "dataset", "output_name")  # drawn in the top row, not in the form
HIDDEN = ("output_dir", "schema_version", "device")  # the tab decides these (run folder in the workspace)
NO_PRESET = "(defaults)"


# -- the form, from dataclass metadata ------------------------------------------------------------------

def _label(f: dataclasses.Field) -> str:
    return f.metadata.get("label") or f.name.replace("_", " ").capitalize()


def _widget(f: dataclasses.Field, value, elem_id: str):
    m = f.metadata
    kw = dict(label=_label(f), info=m.get("help"), elem_id=elem_id)
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    if m.get("choices"):
        return gr.Dropdown(choices=list(m["choices"]), value=value, **kw)
    if t == "bool":
        return gr.Checkbox(value=bool(value), **kw)
    if t in ("int", "float"):
        return gr.Number(value=value, minimum=m.get("min"), maximum=m.get("max"), precision=0 if t == "int" else None,
                         **kw)
    if t == "list":
        return gr.Textbox(value="\n".join(value or []), lines=2, **kw)
    return gr.Textbox(value=value, **kw)


def _grid(items, vals: dict, widgets: dict, per_row: int = 3) -> None:
    """Widgets in rows of `per_row`; lists (prompts) take a row of their own."""
    row: list = []

    def flush():
        if row:
            with gr.Row(equal_height=True):
                for key, f in row:
                    widgets[key] = _widget(f, vals.get(key), "train-" + key.replace(".", "-").replace("_", "-"))
            row.clear()

    for key, f in items:
        if f.type == "list" or f.name == "instance_prompt":
            flush()
            widgets[key] = _widget(f, vals.get(key), "train-" + key.replace(".", "-").replace("_", "-"))
            continue
        row.append((key, f))
        if len(row) == per_row:
            flush()
    flush()


def _from_widget(f: dataclasses.Field, value):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    if t == "list":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if t == "int" and value is not None:
        return int(value)
    return value


def _to_widget(f: dataclasses.Field, value):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    return "\n".join(value or []) if t == "list" else value


def _form_fields() -> list[tuple[str, dataclasses.Field, str]]:
    """(key, field, group) for every field the form shows: group "basic", "advanced" or "method:<name>"."""
    out = []
    for f in user_fields(TrainConfig):
        if f.name not in TOP and f.name not in HIDDEN:
            out.append((f.name, f, "advanced" if f.metadata.get("advanced") else "basic"))
    for name, cls in sorted(all_methods().items()):
        for f in user_fields(cls.Config):
            out.append((f"{name}.{f.name}", f, f"method:{name}"))
    return out


def _defaults() -> dict:
    cfg = TrainConfig()
    vals = {f.name: getattr(cfg, f.name) for f in user_fields(TrainConfig)}
    for name, cls in all_methods().items():
        inst = cls.Config()
        vals.update({f"{name}.{f.name}": getattr(inst, f.name) for f in user_fields(cls.Config)})
    return vals


def _flatten(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _preset_values(preset: str | None) -> dict:
    """Defaults with the preset merged over them, flat ("lora.rank")."""
    vals = _defaults()
    if preset and preset != NO_PRESET:
        vals.update(_flatten(read_toml(Path(preset))))
    return vals


# -- job view -------------------------------------------------------------------------------------------

def job_view(job) -> dict:
    """Plain data the tick draws: plot frame, progress, stats, gallery, status, whether it ended."""
    snap = job.log.snapshot()
    last = snap["last_step"]
    end = snap["end"]
    if last is not None:
        progress = _progress(last.step, last.total, f"step {last.step}/{last.total} · ETA {_fmt_eta(last.eta_s)}")
        stats = f"loss <b>{last.loss:.4f}</b> · lr <b>{last.lr:.2e}</b> · <b>{last.it_per_s:.2f}</b> it/s"
    elif snap["progress"]:
        done, total, stage, msg = snap["progress"]
        progress, stats = _progress(done, total, msg if stage == "download" else f"{msg} {done}/{total}"), ""
    else:
        progress, stats = _progress(0, 1, snap["status"] or "starting"), ""
    if isinstance(end, Failed):  # the bar must not stay on "loading tiny" after a failure
        done = last.step if last is not None else 0
        progress = _progress(done, last.total if last is not None else 1, f"failed at step {done}")
    elif isinstance(end, Finished) and end.stopped:
        done = last.step if last is not None else 0
        progress = _progress(done, last.total if last is not None else 1,
                             f"stopped at step {done}/{last.total}" if last is not None else "stopped before step 1")
    gallery = []
    for ev in reversed(snap["previews"]):
        conds = ev.conditions or ("",) * len(ev.paths)
        for p, cap, cond in zip(ev.paths, ev.captions or [""] * len(ev.paths), conds):
            if cond:  # a ControlNet / T2I-Adapter preview: its control image comes first, beside it
                gallery.append((cond, f"control image · {cap}"))
            gallery.append((p, f"step {ev.step}: {cap}"))
    if isinstance(end, Failed):
        status = f"**Failed:** {end.message}"
    elif isinstance(end, Finished):
        status = ("**Stopped.** Resume continues from the last checkpoint." if end.stopped
                  else f"**Finished.** {', '.join(Path(p).name for p in end.outputs)}")
    else:
        status = f"**{job.name}**: {snap['status'] or 'starting'}"
    progress += f'<div id="train-stats" class="train-stats">{stats}</div>'
    ranks, budget = adalora_frames(last.extra if last is not None else {}, last.step if last is not None else 0)
    return {"frame": _loss_frame(snap["steps"]), "progress": progress, "stats": stats, "gallery": gallery,
            "status": status, "ended": end is not None, "failed": isinstance(end, Failed),
            "total": last.total if last is not None else None, "ranks": ranks, "budget": budget}


def short_layer(path: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` -> `d1.a0.t0.attn2.k`: a bar label."""
    for long, short in (("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"),
                        ("transformer_blocks.", "t"), ("to_out.0", "out"), ("to_", ""), ("ff.net.0.proj", "ff1"),
                        ("ff.net.2", "ff2")):
        path = path.replace(long, short)
    return path


def adalora_frames(extra: dict, step: int) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(rank per layer, budget schedule with the run's total rank now) from an AdaLoRA Step's `extra`; (None, None)
    for other methods."""
    if "ranks" not in extra:
        return None, None
    from ..methods.adalora import budget_schedule

    ranks = pd.DataFrame([(short_layer(k), v) for k, v in extra["ranks"].items()], columns=["layer", "rank"])
    sch = extra.get("schedule")
    rows = [(st, b, "budget schedule") for st, b in budget_schedule(**sch)] if sch else []
    rows.append((step, extra.get("total_rank", 0), "total rank now"))
    return ranks, pd.DataFrame(rows, columns=["step", "total rank", "series"])


def _runs_frame(ctx: AppContext) -> str:
    from .library_tab import runs_html

    return runs_html(ctx, loss_digits=4)


def _run_names(ctx: AppContext) -> list[str]:
    root = ctx.workspace.root / "runs"
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "config.toml").is_file()) if root.is_dir() else []


# -- starting a run -------------------------------------------------------------------------------------

def _publisher(ctx: AppContext):
    """Publish finished artefacts into the workspace's model folders, so the Library and the Playground list
    them at once."""
    from ..publish import publish

    return lambda paths: publish(ctx.workspace, paths)


def config_from_form(ctx: AppContext, values: dict, preset: str | None, *, check_paths: bool = True):
    """The TrainConfig the form describes (the preset under it). Paths and the base model follow the one rule
    (models/refs.py), confined to the workspace. `check_paths=False` (the machine note before Start) leaves the
    dataset and base model as typed. Raises UserError."""
    from ..models.refs import Places
    from ..train.config import apply_places

    ws = ctx.workspace
    values = dict(values)
    if check_paths and not str(values.get("dataset") or "").strip():
        raise UserError("Choose a dataset folder first (make one in the Dataset tab, or put images in "
                        "workspace/datasets/).")
    values["base_model"] = str(values.get("base_model") or "tiny").strip()
    values["dataset"] = str(values.get("dataset") or "")
    values["output_dir"] = str(ws.run_dir(values.get("output_name") or "run"))
    if check_paths and values.get("sample_conditions"):  # preview control images: files in the workspace
        values["sample_conditions"] = [str(ws.resolve(p, must_exist=True)) for p in values["sample_conditions"]]
    if check_paths and str(values.get("class_data") or "").strip():  # the form's other folder: confined too
        values["class_data"] = str(ws.resolve(values["class_data"], must_exist=True))
    tables: dict = {}
    flat = {}
    for k, v in values.items():
        if "." in k:
            table, _, sub = k.partition(".")
            if table == values.get("method"):
                tables.setdefault(table, {})[sub] = v
        else:
            flat[k] = v
    preset_path = Path(preset) if preset and preset != NO_PRESET else None
    base_vals = read_toml(preset_path) if preset_path else {}
    # The form shows every field, so only the chosen method's table and the top-level keys go in.
    base_vals = {k: v for k, v in base_vals.items() if not isinstance(v, dict) or k == flat.get("method")}
    cfg = load_config(None, extra={**base_vals, **flat, **tables})
    return apply_places(cfg, Places.app(ws)) if check_paths else cfg


def machine_note(ctx: AppContext, values: dict, preset: str | None) -> str:
    """What this machine changes in the form's settings (8-bit Adam without CUDA, ...) and how long the run should
    take here: shown before Start, and applied by Start."""
    from ..train.estimate import cpu_estimate, estimate, gpu_class
    from ..train.machine import describe_changes, detect, fit_to_machine

    try:
        cfg = config_from_form(ctx, values, preset, check_paths=False)
        machine = detect(cfg.device)
        fitted, changes = fit_to_machine(cfg, machine)
        est = (estimate(fitted, gpu=gpu_class(machine.gpu_name, machine.memory_gb)) if machine.cuda
               else cpu_estimate(fitted))
    except UserError as exc:
        return f"⚠ {exc}"
    except Exception as exc:  # an estimate must never break the form
        return f"⚠ no estimate ({type(exc).__name__})"
    text = f"**On this machine:** {est.summary()}."
    if changes:
        text += "\n\n" + describe_changes(changes, machine).replace("On ", "Changed for ", 1)
    return text


def start_run(ctx: AppContext, values: dict, preset: str | None, resume: bool = False):
    """Validate (in a second, before any model loads) and start the run as a Job. Raises UserError."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.loop import preflight, train
    from ..train.machine import fit_to_machine

    ws = ctx.workspace
    cfg = config_from_form(ctx, values, preset)
    cfg, _changes = fit_to_machine(cfg)  # the same changes the note above the form showed
    if resume and latest_checkpoint(cfg.run_dir(ws.root)) is None:
        raise UserError(f"'{cfg.output_name}' stopped before it saved a checkpoint, so there is nothing to resume: "
                        f"press Start to train it again from the beginning.")
    pre = preflight(cfg, resume=resume, home=ws.root)
    return ctx.jobs.start(cfg.output_name, JOB_KIND, lambda jc: train(cfg, jc.emit, jc.commands, resume=resume,
                                                                      checked=pre, home=ws.root,
                                                                      publish=_publisher(ctx)))


def form_from_run(ctx: AppContext, name: str) -> tuple[dict, str | None]:
    """(flat form values, preset path or None) of a run, from its own config.toml: what "Open in Train tab" and
    "Load its settings" fill in. Paths inside the workspace are shown workspace-relative."""
    import json

    from ..train.config import PRESETS_DIR

    run = ctx.workspace.run_dir(name)
    if not (run / "config.toml").is_file():
        raise UserError(f"'{name}' has no config.toml yet: it has not started training.")
    values = {**_defaults(), **_flatten(read_toml(run / "config.toml"))}
    for key in ("dataset", "base_model", "class_data"):
        if values.get(key) and Path(str(values[key])).is_absolute():
            values[key] = ctx.workspace.relative(values[key])
    preset = None
    try:
        quick = json.loads((run / "quick.json").read_text(encoding="utf-8"))
        if quick.get("preset") and (PRESETS_DIR / f"{quick['preset']}.toml").is_file():
            preset = str(PRESETS_DIR / f"{quick['preset']}.toml")
    except (OSError, ValueError):
        pass
    return values, preset


def base_resolution(ctx: AppContext, ref: str) -> int | None:
    """The native training resolution of a base model (the built-in tiny ones: 64), or None when it cannot be
    told without loading it."""
    from ..models.loading import family_of_ref
    from ..models.refs import TINY_REFS, Places

    ref = str(ref or "").strip()
    if ref in TINY_REFS:
        return 64
    try:
        return family_of_ref(Places.app(ctx.workspace).model(ref).ref).resolution
    except Exception:  # a half-typed name: the picker is for the user to fix, the form keeps its value
        return None


DEFAULT_PRESET = "character-lora-sd15-8gb"


# -- the tab --------------------------------------------------------------------------------------------

# A run's page polls once a second: every update walks Gradio's whole component tree in the browser, and on
# a busy 2-core machine a faster poll left the page (and its Stop button) seconds behind.
POLL_SECONDS = 1.0
PLOT_SECONDS = 2.0  # the loss plot redraws at most this often while a run trains

MACHINE_KEYS = ("optimizer", "precision", "attention", "batch_size", "gradient_accumulation", "resolution",
                "max_steps", "gradient_checkpointing", "sample_every", "sample_steps")  # what the note depends on


def _preset_header(preset: str | None) -> str:
    return preset_header(Path(preset).stem) if preset and preset != NO_PRESET else ""


def build(ctx: AppContext) -> None:
    from .library_tab import base_model_choices, current_base

    from ..train.config import PRESETS_DIR

    saved = ctx.settings.load(TAB)
    presets = [(NO_PRESET, NO_PRESET)] + [(p, str(PRESETS_DIR / f"{p}.toml")) for p in list_presets()]
    # A first visit opens on the everyday preset (a character LoRA for an 8 GB card), not on whichever preset
    # sorts first (that became AdaLoRA's).
    default = next((path for name, path in presets if name == DEFAULT_PRESET), presets[1][1] if len(presets) > 1
                   else NO_PRESET)
    preset_value = saved.get("_preset") or default
    vals = {**_preset_values(preset_value), **{k: v for k, v in saved.items() if not k.startswith("_")}}
    ui: dict = {}

    with gr.Row():
        ui["method"] = gr.Dropdown(sorted(all_methods()), value=vals["method"], label="Method", elem_id="train-method",
                                   scale=1)
        ui["preset"] = gr.Dropdown(presets, value=preset_value, label="Preset", elem_id="train-preset", scale=2)
        choices = base_model_choices(ctx)
        ui["base_model"] = gr.Dropdown(choices, value=saved.get("base_model") or current_base(ctx), label="Base model",
                                       allow_custom_value=True, elem_id="train-base", scale=2)
        ui["dataset"] = gr.Textbox(value=vals.get("dataset", ""), label="Dataset folder",
                                   placeholder="datasets/my-dataset", elem_id="train-dataset", scale=3,
                                   info="A folder in the workspace: a kohya dataset (img/) or images with captions.")
        ui["output_name"] = gr.Textbox(value=vals.get("output_name", "my-lora"), label="Run name",
                                       elem_id="train-output-name", scale=2)
    preset_info = gr.Markdown(_preset_header(preset_value), elem_id="train-preset-info")
    machine = gr.Markdown("", elem_id="train-machine")
    ctx.components["train.dataset"] = ui["dataset"]

    fields = _form_fields()
    widgets: dict = {}
    groups: dict = {}
    with gr.Row():
        with gr.Column(scale=3):
            _grid([(k, f) for k, f, g in fields if g == "basic"], vals, widgets)
            for name in sorted(all_methods()):
                mine = [(k, f) for k, f, g in fields if g == f"method:{name}"]
                with gr.Group(visible=name == vals["method"]) as box:
                    gr.Markdown(f"**{name} settings**")
                    _grid([(k, f) for k, f in mine if not f.metadata.get("advanced")], vals, widgets)
                    with gr.Accordion(f"Advanced {name} settings", open=False):
                        _grid([(k, f) for k, f in mine if f.metadata.get("advanced")], vals, widgets)
                groups[name] = box
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                _grid([(k, f) for k, f, g in fields if g == "advanced"], vals, widgets)
        with gr.Column(scale=4):
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                pause = gr.Button("Pause", elem_id="train-pause")
                cont = gr.Button("Continue", elem_id="train-continue")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                sample = gr.Button("Sample now", elem_id="train-sample")
                save = gr.Button("Save now", elem_id="train-save")
            status = gr.Markdown("No run yet.", elem_id="train-status")
            progress = gr.HTML(_progress(0, 1, ""), elem_id="train-progress")
            plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=260,
                               color_map={"raw": "#a5b4fc", "smoothed": "#4338ca"}, x_axis_format="d",
                               elem_id="train-loss")
            with gr.Group(visible=vals["method"] == "adalora", elem_id="train-adalora") as ada_box:
                gr.Markdown("**AdaLoRA**: each layer's rank now, and the total-rank budget over the run")
                with gr.Row():
                    ranks_plot = gr.BarPlot(None, x="layer", y="rank", title="Rank per layer", height=240,
                                            x_label_angle=-60, elem_id="train-adalora-ranks")
                    budget_plot = gr.LinePlot(None, x="step", y="total rank", color="series", title="Budget",
                                              height=240, elem_id="train-adalora-budget",
                                              color_map={"budget schedule": "#a5b4fc", "total rank now": "#b91c1c"})
            gallery = gr.Gallery([], label="Previews", columns=4, height=280, elem_id="train-previews")
    gr.Markdown("### Runs")
    with gr.Row():
        runs_table = gr.HTML(_runs_frame(ctx), elem_id="train-runs", scale=4)
        with gr.Column(scale=1):
            run_pick = gr.Dropdown(_run_names(ctx), label="Run", elem_id="train-run-pick", allow_custom_value=True)
            resume_to = gr.Number(None, precision=0, minimum=0, label="Resume up to step", elem_id="train-resume-steps",
                                  info="Empty or 0: the run's own total. Higher: train longer.")
            resume_btn = gr.Button("Resume", elem_id="train-resume")
            load_btn = gr.Button("Load its settings", elem_id="train-run-load")
            open_pg = gr.Button("Open in Playground", elem_id="train-open-playground")
            refresh = gr.Button("Refresh", elem_id="train-runs-refresh")
    timer = gr.Timer(POLL_SECONDS, active=False)

    keys = list(widgets)
    form = [widgets[k] for k in keys]
    top_keys = ["method", "base_model", "dataset", "output_name"]
    top = [ui[k] for k in top_keys]
    field_of = {k: f for k, f, _g in fields}
    all_inputs = [ui["preset"], *top, *form]

    def collect(args) -> tuple[dict, str]:
        preset, *rest = args
        values = dict(zip(top_keys, rest[:len(top_keys)]))
        for k, v in zip(keys, rest[len(top_keys):]):
            values[k] = _from_widget(field_of[k], v)
        return values, preset

    def save_settings(values: dict, preset: str) -> None:
        ctx.settings.save(TAB, {**values, "_preset": preset})

    def on_start(*args):
        values, preset = collect(args)
        save_settings(values, preset)
        try:
            job = start_run(ctx, values, preset)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.Timer(active=False), f"**Not started:** {exc}"
        return gr.Timer(active=True), f"**{job.name}**: starting"

    start.click(on_start, all_inputs, [timer, status])

    def on_resume(name, up_to):
        """Continue a run with its own settings (config.toml), up to `up_to` steps when given (train longer, as
        the Quick tab's "Train again with more steps" does)."""
        if not name:
            gr.Warning("Pick a run to resume.")
            return gr.Timer(active=False), gr.update()
        try:
            values, _preset = form_from_run(ctx, name)
            values["output_name"] = name
            if up_to:
                from ..train.status import last_log_line

                done = int(last_log_line(ctx.workspace.run_dir(name) / "log.jsonl").get("step", 0))
                if int(up_to) <= done:
                    raise UserError(f"'{name}' is already at step {done}: resume up to a higher step.")
                values["max_steps"] = int(up_to)
            job = start_run(ctx, values, None, resume=True)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.Timer(active=False), f"**Not resumed:** {exc}"
        return gr.Timer(active=True), f"**{job.name}**: resuming"

    resume_btn.click(on_resume, [run_pick, resume_to], [timer, status])

    def command(what):
        def fn():
            job = ctx.jobs.latest(JOB_KIND)
            if job is None or not job.running:
                gr.Info("No run is in progress: nothing to " + {"stop": "stop", "pause": "pause", "continue": "continue",
                                                               "sample": "sample", "save": "save"}[what] + ".")
                return
            {"stop": job.commands.stop, "pause": job.commands.pause, "continue": job.commands.resume,
             "sample": lambda: job.commands.request("sample"), "save": lambda: job.commands.request("save")}[what]()
            gr.Info({"stop": "Stopping after this step (a checkpoint is kept).", "pause": "Pausing.",
                     "continue": "Continuing.", "sample": "Previews at the next step.",
                     "save": "A checkpoint at the next step."}[what])
        return fn

    for btn, what in ((stop, "stop"), (pause, "pause"), (cont, "continue"), (sample, "sample"), (save, "save")):
        btn.click(command(what), None, None, show_progress="hidden")

    # What the page already shows (a digest per output, the job it belongs to, when the plot was drawn): a tick
    # sends only what changed, and the plot at most every PLOT_SECONDS, so a browser on a busy machine stays
    # responsive (Stop must always answer) while the step counter still moves every tick.
    memory = PageMemory()

    def on_page_load(request: gr.Request):
        return on_tick(request, fresh_page=True)

    def on_tick(request: gr.Request, fresh_page: bool = False):
        import time

        if fresh_page:
            memory.forget(request)
        seen = memory.of(request)
        job = ctx.jobs.latest(JOB_KIND)
        if job is None:
            return gr.Timer(active=False), *[gr.skip()] * 9
        v = job_view(job)
        fresh = seen.get("job") != job.id
        if fresh:
            seen.clear()
            seen["job"] = job.id
        draw = v["frame"] is not None and (fresh or v["ended"] or time.time() - seen.get("plot_t", 0) >= PLOT_SECONDS)
        plot_update = gr.update(value=v["frame"], x_lim=[0, max(10, v["total"] or 0)]) if draw else gr.skip()
        if draw:
            seen["plot_t"] = time.time()
        changed, seen["d"] = only_changed(seen.get("d"), {"status": v["status"], "progress": v["progress"],
                                                          "gallery": v["gallery"]})
        timer_update = gr.Timer(active=not v["ended"]) if fresh or v["ended"] else gr.skip()
        # AdaLoRA's rank per layer and budget (shown only for an AdaLoRA run).
        ada = (gr.update(visible=True), v["ranks"], v["budget"]) if v["ranks"] is not None else (gr.skip(),) * 3
        if v["ended"]:
            return (timer_update, *changed, plot_update, _runs_frame(ctx),
                    gr.update(choices=_run_names(ctx), value=job.name), *ada)
        return (timer_update, *changed, plot_update, gr.skip(), gr.skip(), *ada)

    tick_outputs = [timer, status, progress, gallery, plot, runs_table, run_pick, ada_box, ranks_plot,
                    budget_plot]
    timer.tick(on_tick, None, tick_outputs, show_progress="hidden")

    def redraw_runs():
        return _runs_frame(ctx), gr.update(choices=_run_names(ctx))

    refresh.click(redraw_runs, None, [runs_table, run_pick])
    # Live: a run written, published or finished anywhere (the Quick tab, the CLI) shows without a click.
    ctx.components["workspace.token"].change(
        lambda: (*redraw_runs(), gr.update(choices=base_model_choices(ctx))), None,
        [runs_table, run_pick, ui["base_model"]], show_progress="hidden")
    ctx.components["runs.token"].change(lambda: _runs_frame(ctx), None, [runs_table], show_progress="hidden")
    if "tab.tab-train" in ctx.components:
        ctx.components["tab.tab-train"].select(redraw_runs, None, [runs_table, run_pick], show_progress="hidden")

    def on_method(method):
        return [gr.update(visible=name == method) for name in sorted(groups)] + [gr.update(visible=method == "adalora")]

    method_views = [groups[n] for n in sorted(groups)] + [ada_box]  # what on_method shows or hides
    ui["method"].change(on_method, [ui["method"]], method_views)

    def note(*args):
        values, preset = collect(args)
        return machine_note(ctx, values, preset)

    def on_preset(*args):
        preset = args[0]
        v = _preset_values(preset)
        values, _ = collect(args)
        values.update({k: v.get(k) for k in keys}, method=v["method"], output_name=v["output_name"])
        return [_preset_header(preset), machine_note(ctx, values, preset), v["method"], v["output_name"],
                *[_to_widget(field_of[k], v.get(k)) for k in keys]]

    ui["preset"].input(on_preset, all_inputs, [preset_info, machine, ui["method"], ui["output_name"], *form])
    for k in MACHINE_KEYS:
        if k in widgets:
            widgets[k].input(note, all_inputs, [machine], show_progress="hidden", trigger_mode="always_last")
    ui["base_model"].input(note, all_inputs, [machine], show_progress="hidden", trigger_mode="always_last")

    restore_outputs = [ui["preset"], preset_info, machine, *top, *form]

    def fill(values: dict, preset: str | None) -> list:
        """Updates that put `values` (flat) and `preset` into the form, the preset's description and the machine
        note included."""
        preset = preset or NO_PRESET
        return [preset, _preset_header(preset), machine_note(ctx, values, preset),
                *[values[k] if k in values else gr.skip() for k in top_keys],
                *[_to_widget(field_of[k], values[k]) if k in values else gr.skip() for k in keys]]

    def on_base(ref):
        """Picking a base sets the resolution to its native one (1024 for SDXL, 512 for SD 1.5)."""
        size = base_resolution(ctx, ref)
        return gr.update(value=size) if size else gr.skip()

    if "resolution" in widgets:
        ui["base_model"].input(on_base, [ui["base_model"]], [widgets["resolution"]])

    def on_load_settings():
        """A reload shows the last-used settings (component defaults were fixed when the app started)."""
        saved = ctx.settings.load(TAB)
        preset = saved.get("_preset") or preset_value
        v = {**_preset_values(preset), **{k: x for k, x in saved.items() if not k.startswith("_")}}
        return fill(v, preset)

    def load_run(name):
        """A run's own settings, from its config.toml, into the form ("Load its settings", "Open in Train tab")."""
        if not name:
            gr.Warning("Pick a run first.")
            return [gr.skip()] * len(restore_outputs)
        try:
            values, preset = form_from_run(ctx, name)
        except UserError as exc:
            gr.Warning(str(exc))
            return [gr.skip()] * len(restore_outputs)
        return fill(values, preset)

    load_btn.click(load_run, [run_pick], restore_outputs).then(on_method, [ui["method"]], method_views)

    ctx.components["train._ui"] = {"open_pg": open_pg, "run_pick": run_pick, "timer": timer,
                                   "tick": (on_page_load, tick_outputs),
                                   "method": ui["method"],
                                   "groups": method_views, "on_method": on_method,
                                   "restore": (on_load_settings, restore_outputs),
                                   "load_run": (load_run, restore_outputs)}


def _run_artefact(ctx: AppContext, name: str) -> str | None:
    """The workspace path of a run's model (the published copy when there is one): its file (a LoRA, an
    embedding, a ControlNet's single file), else its ControlNet or T2I-Adapter folder."""
    from ..formats.kinds import detect_kind
    from ..workspace import MODEL_DIRS

    if not name:
        return None
    run = ctx.workspace.run_dir(name)
    every = sorted(run.glob("*.safetensors")) if run.is_dir() else []
    files = [f for f in every if not _is_numbered(f)] or every  # the final file, not a numbered save
    found = files + (sorted(d for d in run.iterdir() if d.is_dir() and not _is_numbered(d)) if run.is_dir() else [])
    for p in found:
        kind = detect_kind(p)
        if p.is_dir() and kind not in ("controlnet", "t2i_adapter"):
            continue  # checkpoints/, samples/, a full fine-tune's pipeline folder
        published = ctx.workspace.models(kind) / p.name if kind in MODEL_DIRS else None
        return ctx.workspace.relative(published if published is not None and published.exists() else p)
    return None


def wire(ctx: AppContext) -> None:
    ui = ctx.components.get("train._ui")
    if not ui:
        return
    tabs = ctx.components.get("tabs")
    inbox = ctx.components.get("playground.inbox")

    def on_open(name):
        path = _run_artefact(ctx, name)
        if path is None:
            gr.Warning("This run has no model file yet: let it finish (or Save now), then try again.")
            return gr.update(), gr.update()
        if inbox is None:
            gr.Info(f"Model file: {path}")
            return gr.update(), gr.update()
        return gr.update(value=path), gr.Tabs(selected="tab-playground")

    outputs = [inbox if inbox is not None else ui["run_pick"], tabs if tabs is not None else ui["run_pick"]]
    ui["open_pg"].click(on_open, [ui["run_pick"]], outputs)

    # A page reload reconnects to a running job: poll again, and draw what it has done so far.
    root = gr.context.Context.root_block
    if root is not None:
        fn, outs = ui["restore"]
        root.load(fn, None, outs, show_progress="hidden").then(ui["on_method"], [ui["method"]], ui["groups"],
                                                               show_progress="hidden")
        fn, outs = ui["tick"]
        root.load(fn, None, outs, show_progress="hidden")  # a fresh page: everything is drawn


def _is_numbered(path: Path) -> bool:
    import re

    return re.search(r"-\d{6}$", path.name.split(".")[0]) is not None


def _progress(done: float, total: float, text: str) -> str:
    return progress_html(done, total, text, "train-progress-text")
