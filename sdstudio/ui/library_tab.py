"""The Library tab: the models in the workspace by kind, the runs, the outputs; choose the base model."""
from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..library import scan_models, scan_outputs, scan_runs
from ..library import model_choices
from ..models.loading import TINY, TINY_REFS
from .context import AppContext

KIND_LABELS = {"lora": "LoRA", "lycoris": "LyCORIS", "embedding": "Embedding", "edlora": "EDLoRA",
               "gligen": "GLIGEN", "controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "checkpoint": "Checkpoint",
               "vae": "VAE",
               "unknown": "Unknown"}
MODEL_COLUMNS = ["name", "type", "family", "size (MB)", "A1111 hash", "path"]


def base_model_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """The base-model picker's choices: tiny first, then the checkpoints in the workspace and the --models-from
    folders (library.list_models, through library.model_choices)."""
    return [(label, ref if ref in TINY_REFS else ctx.workspace.relative(ref)) for label, ref in model_choices(ctx.workspace)]


def current_base(ctx: AppContext) -> str:
    return ctx.settings.load("app").get("base_model", TINY)


def current_base_family(ctx: AppContext) -> str:
    """The family ('sd1', 'sd2', 'sdxl') of the Library's base model; '' when it cannot be told without
    loading it (a hub id not yet downloaded, a mistyped name)."""
    from ..models.loading import family_of_ref
    from ..models.refs import Places

    try:
        return family_of_ref(Places.app(ctx.workspace).model(current_base(ctx)).ref).name
    except Exception:  # the base is for the user to fix in its own picker; a label is not worth an error here
        return ""


def _models_frame(ctx: AppContext, kind_filter: str) -> pd.DataFrame:
    from ..models.importer import hashes_known, short_hash

    hashes = hashes_known(ctx.workspace)  # recorded at import and download; a hash is never computed here
    rows = [[m.name, KIND_LABELS.get(m.kind, m.kind), m.family, m.size_mb, short_hash(hashes.get(m.path, "")),
             m.path] for m in scan_models(ctx.workspace) if kind_filter in ("All", KIND_LABELS.get(m.kind))]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


RUN_COLUMNS = ["run", "method", "status", "steps", "last loss", "checkpoints", "files"]
STATE_COLOURS = {"running": "#4f46e5", "paused": "#d97706", "stopped": "#6b7280", "failed": "#dc2626",
                 "finished": "#16a34a"}


def runs_html(ctx: AppContext, loss_digits: int = 5) -> str:
    """Every run with its state (running, paused, stopped, failed: why, finished), steps done of total and last
    loss, as a plain HTML table: read-only, cheap for a browser to redraw while a run trains, and one row per run
    (`data-run`, `data-state`) for tests and screen readers. The Train tab and the Library draw the same table."""
    import html
    from pathlib import Path

    rows = []
    for r in scan_runs(ctx.workspace):
        state = r.state or "not started"
        colour = STATE_COLOURS.get(r.state, "#9ca3af")
        why = f'<div class="run-reason">{html.escape(r.reason)}</div>' if r.reason else ""
        steps = f"{r.steps}/{r.total}" if r.total else str(r.steps)
        loss = "" if r.last_loss is None else f"{r.last_loss:.{loss_digits}f}"
        files = ", ".join(Path(a).name for a in r.artefacts)
        rows.append(f'<tr data-run="{html.escape(r.name)}" data-state="{html.escape(state)}">'
                    f"<td>{html.escape(r.name)}</td><td>{html.escape(r.method)}</td>"
                    f'<td><b style="color:{colour}">{html.escape(state)}</b>{why}</td><td>{steps}</td>'
                    f"<td>{loss}</td><td>{r.checkpoints}</td><td>{html.escape(files)}</td></tr>")
    head = "".join(f"<th>{c}</th>" for c in RUN_COLUMNS)
    body = "".join(rows) or f'<tr><td colspan="{len(RUN_COLUMNS)}">No runs yet.</td></tr>'
    return f'<table class="runs-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _runs_frame(ctx: AppContext) -> str:
    return runs_html(ctx)


def build(ctx: AppContext) -> None:
    with gr.Row():
        base = gr.Dropdown(choices=base_model_choices(ctx), value=current_base(ctx), label="Base model",
                           info="Used by Train and Playground unless they choose another. 'tiny' works offline.",
                           allow_custom_value=True, elem_id="library-base-model", scale=3)
        refresh = gr.Button("Refresh", elem_id="library-refresh", scale=0)
    with gr.Row():
        with gr.Column(scale=3):
            kind = gr.Radio(["All"] + list(KIND_LABELS.values())[:-1], value="All", label="Type",
                            elem_id="library-kind")
            models = gr.Dataframe(_models_frame(ctx, "All"), interactive=False, label="Models",
                                  elem_id="library-models", wrap=True)
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Selected", interactive=False, elem_id="library-selected")
            meta = gr.JSON(label="Metadata (ss_* and modelspec keys)", elem_id="library-meta")
            use_base = gr.Button("Use as base", elem_id="library-use-base")
    gr.Markdown("### Runs")
    runs = gr.HTML(_runs_frame(ctx), elem_id="library-runs")
    gr.Markdown("### Outputs")
    outputs = gr.Gallery([str(p) for p in scan_outputs(ctx.workspace, 48)], columns=8, height=240,
                         elem_id="library-outputs", label="Recent outputs")
    ctx.components["library.base_model"] = base

    def on_refresh(kind_filter):
        return (gr.update(choices=base_model_choices(ctx)), _models_frame(ctx, kind_filter), _runs_frame(ctx),
                [str(p) for p in scan_outputs(ctx.workspace, 48)])

    refresh.click(on_refresh, [kind], [base, models, runs, outputs])
    # Live: whatever is published, imported, trained or generated shows without a click (Refresh stays for files
    # copied in by hand, which do not bump the change counter).
    ctx.components["workspace.token"].change(on_refresh, [kind], [base, models, runs, outputs],
                                             show_progress="hidden")
    ctx.components["runs.token"].change(lambda: _runs_frame(ctx), None, [runs], show_progress="hidden")
    if "tab.tab-library" in ctx.components:
        ctx.components["tab.tab-library"].select(on_refresh, [kind], [base, models, runs, outputs],
                                                  show_progress="hidden")
    kind.change(lambda k: _models_frame(ctx, k), [kind], [models])

    def on_select(frame: pd.DataFrame, evt: gr.SelectData):
        row = frame.iloc[evt.index[0]]
        entry = next((m for m in scan_models(ctx.workspace) if m.path == row["path"]), None)
        meta = dict(entry.metadata) if entry else {}
        for k, v in list(meta.items()):  # kohya stores nested JSON as strings (tag frequency, dataset dirs)
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    meta[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
        return row["path"], meta

    models.select(on_select, [models], [selected, meta])

    def on_base(ref):
        from ..models.refs import Places

        ref = (ref or "").strip() or TINY
        try:  # the one model-reference rule: a path, a model by name or a hub id (downloaded when first used)
            Places.app(ctx.workspace).model(ref)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(value=current_base(ctx))
        ctx.settings.save("app", {**ctx.settings.load("app"), "base_model": ref})
        gr.Info(f"Base model: {ref}")
        return gr.update(value=ref)

    base.change(on_base, [base], [base])

    def on_use_base(path):
        if not path:
            gr.Warning("Select a checkpoint in the table first.")
            return gr.update()
        entry = next((m for m in scan_models(ctx.workspace) if m.path == path), None)
        if entry is None or entry.kind != "checkpoint":
            gr.Warning("Only a checkpoint can be a base model: select a row of type Checkpoint.")
            return gr.update()
        return gr.update(choices=base_model_choices(ctx), value=path)

    use_base.click(on_use_base, [selected], [base])
