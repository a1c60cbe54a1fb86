"""Getting models (a section of the Library tab): one-click downloads from a curated list or any hub id, the
import of a single model file, and the read-only folders of other apps given with --models-from.

Downloads and imports run as Jobs (models/catalog.py, models/importer.py, the same work as `sdstudio download`
and `sdstudio import`); a timer polls them for bytes, rate and ETA. Stop keeps what arrived: Download again
continues where it stopped. Both publish into the workspace's models/ and bump its change counter, so the
pickers of the other tabs list the new model.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..events import Failed, Finished
from ..models.catalog import CATALOG, download_work, installed
from ..models.importer import import_work
from ..models.refs import Places, models_from_roots
from .context import AppContext
from .widgets import progress_html

KINDS = {"told from its files": "auto", "base model": "checkpoint", "ControlNet": "controlnet",
         "T2I-Adapter": "t2i_adapter", "captioner": "captioner"}
KIND_WORDS = {"checkpoint": "base model", "controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter",
              "annotators": "annotators", "captioner": "captioner", "rembg": "background removal"}


def catalog_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """(label, key) for the curated list, each marked when it is already in the workspace."""
    return [(f"{e.label} ({KIND_WORDS[e.kind]}){' - installed' if installed(e, ctx.workspace.root) else ''}", e.key)
            for e in CATALOG]


def start_download(ctx: AppContext, key: str, hub_id: str, kind_label: str, fp16: bool):
    """Start a download Job (one at a time). A typed hub id wins over the list."""
    source = (hub_id or "").strip() or (key or "")
    if not source:
        raise UserError("Pick a model from the list, or type a hub id such as lllyasviel/control_v11p_sd15_canny.")
    running = ctx.jobs.latest("download")
    if running is not None and running.running:
        raise UserError(f"{running.name} is still downloading: stop it or wait for it first.")
    work = download_work(source, ctx.workspace.root, kind=KINDS.get(kind_label, "auto"), half=bool(fp16))
    return ctx.jobs.start(source, "download", work, exclusive=False)


def start_import(ctx: AppContext, uploaded, ws_path: str, link: bool):
    """Start an import Job for a dropped file or a file in the workspace (or a --models-from folder)."""
    from .library_tab import current_base_family

    if uploaded:
        src = Path(uploaded if isinstance(uploaded, str) else getattr(uploaded, "name", uploaded))
        name = src.name
    elif (ws_path or "").strip():
        src = Places.app(ctx.workspace).path(ws_path, what="model file")
        name = src.name
    else:
        raise UserError("Drop a .safetensors file, or type the path of one in the workspace.")
    work = import_work(ctx.workspace, src, link=bool(link) and not uploaded, base_family=current_base_family(ctx),
                       name=name)
    return ctx.jobs.start(name, "import", work, exclusive=False)


def job_line(job) -> tuple[float, float, str, bool]:
    """(done, total, one line, ended) for a download or import Job."""
    snap = job.log.snapshot()
    end = snap["end"]
    done, total = (snap["progress"][0], snap["progress"][1]) if snap["progress"] else (0, 1)
    if isinstance(end, Failed):
        return done, total, f"Failed: {end.message}", True
    if isinstance(end, Finished):
        if end.stopped:
            return done, total, "Stopped: what arrived is kept; press Download again to continue.", True
        return total, total, f"Done: {end.message if end.message != 'done' else job.result}", True
    text = snap["progress"][3] if snap["progress"] else (snap["status"] or "starting")
    return done, total, text, False


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def roots_markdown() -> str:
    roots = models_from_roots()
    if not roots:
        return ("No other apps' folders. Start SD Studio with `--models-from DIR` (an A1111, Forge or ComfyUI "
                "folder) to list their checkpoints, LoRAs, embeddings and ControlNets here and in the pickers, "
                "read-only.")
    return "Read-only, listed in the pickers beside the workspace's own:\n" + "\n".join(f"- `{r}`" for r in roots)


def build(ctx: AppContext) -> None:
    gr.Markdown("### Get models")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("**Download** (only the files loading needs; Stop keeps what arrived)")
            catalog = gr.Dropdown(catalog_choices(ctx), value=CATALOG[0].key, label="Curated models",
                                  elem_id="library-catalog")
            hub_id = gr.Textbox(label="...or any hub id", placeholder="org/name or org/name@revision",
                                elem_id="library-hub-id")
            with gr.Row():
                kind = gr.Dropdown(list(KINDS), value="told from its files", label="A hub id is a",
                                   elem_id="library-hub-kind")
                fp16 = gr.Checkbox(_has_gpu(), label="fp16 weights (half the download; for GPU use)",
                                   elem_id="library-fp16")
            with gr.Row():
                download = gr.Button("Download", variant="primary", elem_id="library-download")
                stop = gr.Button("Stop", elem_id="library-download-stop")
            dl_progress = gr.HTML(progress_html(0, 1, "", "library-download-text"), elem_id="library-download-progress")
        with gr.Column(scale=2):
            gr.Markdown("**Import a model file** (checkpoint, LoRA, LyCORIS, embedding, ControlNet, VAE)")
            upload = gr.File(label="Drop a .safetensors file", file_types=[".safetensors"], type="filepath",
                             elem_id="library-import-file")
            ws_path = gr.Textbox(label="...or a file in the workspace", placeholder="inputs/my-lora.safetensors",
                                 elem_id="library-import-path")
            link = gr.Checkbox(False, label="Hard-link instead of copying (same disk, no second copy)",
                               elem_id="library-import-link")
            do_import = gr.Button("Import", elem_id="library-import")
            imp_result = gr.Markdown("", elem_id="library-import-result")
    with gr.Accordion("Other apps' models (--models-from)", open=bool(models_from_roots())):
        gr.Markdown(roots_markdown(), elem_id="library-models-from")
    timer = gr.Timer(1.0, active=True)  # on page load: reconnect to a running download or import

    def on_download(key, hid, kind_label, half):
        try:
            job = start_download(ctx, key, hid, kind_label, half)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update()
        return progress_html(0, 1, f"{job.name}: starting", "library-download-text"), gr.Timer(active=True)

    download.click(on_download, [catalog, hub_id, kind, fp16], [dl_progress, timer])

    def on_stop():
        job = ctx.jobs.latest("download")
        if job is None or not job.running:
            gr.Warning("No download is running.")
            return
        job.stop()
        gr.Info("Stopping: what arrived is kept.")

    stop.click(on_stop, None, None)

    def on_import(file, path, linked):
        try:
            job = start_import(ctx, file, path, linked)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update()
        return f"Importing {job.name}...", gr.Timer(active=True)

    do_import.click(on_import, [upload, ws_path, link], [imp_result, timer])

    def on_tick():
        out, busy = [], False
        dl = ctx.jobs.latest("download")
        if dl is not None:
            done, total, text, ended = job_line(dl)
            busy |= not ended
            if ended and isinstance(dl.log.snapshot()["end"], Failed) and not getattr(dl, "_told", False):
                gr.Warning(text.removeprefix("Failed: "))
                dl._told = True  # type: ignore[attr-defined]
            out += [progress_html(done, total, text, "library-download-text"),
                    gr.update(choices=catalog_choices(ctx)) if ended else gr.skip()]
        else:
            out += [gr.skip(), gr.skip()]
        imp = ctx.jobs.latest("import")
        if imp is not None:
            _d, _t, text, ended = job_line(imp)
            busy |= not ended
            out.append(text)
        else:
            out.append(gr.skip())
        return [gr.Timer(active=busy)] + out

    timer.tick(on_tick, None, [timer, dl_progress, catalog, imp_result])
