"""The Dataset tab: drop photos (or pick a workspace folder), see what is usable, crop, caption, make class images,
and hand the dataset to the Train tab.

Every slow thing (checking images, preparing, captioning, class images) runs as a Job; one `gr.Timer` polls the
tab's current job. What the tab shows is read back from disk (DS/scan.json, DS/report.json, the .txt captions),
so a page reload loses nothing.
"""
from __future__ import annotations

import hashlib
import html
import shutil
import threading
from pathlib import Path

import gradio as gr

from ..data import prepare as prep
from ..data.background import DEFAULT_MODEL as DEFAULT_REMBG
from ..data.background import available_models
from ..data.caption import TaggerConfig, add_tags, find_replace, make_captioner, remove_tags
from ..data.crop import CROP_MODES, Box, crop_image
from ..data.detectors import NEEDS_WEIGHTS, OFFLINE
from ..data.folder import read_caption
from ..data.images import IMAGE_EXTS, open_rgb, safe_extract_zip
from ..errors import UserError
from ..events import Failed
from ..workspace import safe_name
from .context import AppContext

TAB = "dataset"
JOB_KIND = "dataset"
PAGE = 6  # caption editor rows per page
BADGE = {"kept": "✓ kept", "warning": "⚠", "skipped": "✗ skipped"}
DEFAULTS = {"name": "my-dataset", "source": "", "size": "512", "crop": "centre", "caption": "filename",
            "caption_model": "", "trigger": "sks", "class_word": "", "repeats": 10, "remove_background": False,
            "background_model": DEFAULT_REMBG, "min_side": 64, "skip_near_duplicates": False,
            "general_threshold": 0.35, "character_threshold": 0.85, "exclude_tags": "", "keep_underscores": False,
            "reg_count": 100, "reg_steps": 25, "manual_crops": {}, "condition": "none"}
# The settings the Prepare/Caption buttons read, in this order (the inputs list below follows it).
FORM = ["name", "source", "size", "crop", "caption", "caption_model", "trigger", "class_word", "repeats",
        "remove_background", "background_model", "min_side", "skip_near_duplicates", "general_threshold",
        "character_threshold", "exclude_tags", "keep_underscores", "condition"]
# Control images for ControlNet / T2I-Adapter datasets: (label, detector).
CONDITIONS = [("none", "none"), ("canny", "canny"), ("lineart_standard", "lineart"), ("content shuffle", "shuffle"),
              ("invert", "invert")] + [(f"{k} (models/annotators)", k) for k in NEEDS_WEIGHTS]
assert {v for _, v in CONDITIONS} == set(OFFLINE) | set(NEEDS_WEIGHTS)


# -- plain helpers (no gradio state) ---------------------------------------------------------------------------------
def _settings(ctx: AppContext) -> dict:
    return {**DEFAULTS, **ctx.settings.load(TAB)}


_SAVE_LOCK = threading.Lock()  # a read-modify-write: two fields edited at once must not drop one another


def _save_settings(ctx: AppContext, values: dict, crop_view: dict | None = None) -> None:
    """Merge `values` (and `crop_view`, the selected image's manual box) into the tab's saved settings."""
    with _SAVE_LOCK:
        cur = _settings(ctx)
        if crop_view is not None:
            values = {**values, "crop_view": {**(cur.get("crop_view") or {}), **crop_view}}
        ctx.settings.save(TAB, {**cur, **values})


def dataset_dir(ctx: AppContext, name: str) -> Path:
    return ctx.workspace.resolve(Path("datasets") / safe_name(name or "my-dataset"))


def _config(ctx: AppContext, form: dict) -> prep.PrepareConfig:
    try:
        size = int(str(form["size"]).strip())
    except ValueError:
        raise UserError(f"Size {form['size']!r} is not a number: pick 512, 768 or 1024, or type one.") from None
    manual = _settings(ctx)["manual_crops"].get(safe_name(form["name"] or "my-dataset"), {})
    cfg = prep.PrepareConfig(
        size=size, crop=form["crop"], caption=form["caption"], caption_model=(form["caption_model"] or "").strip(),
        trigger=form["trigger"] or "", class_word=form["class_word"] or "", repeats=int(form["repeats"] or 1),
        remove_background=bool(form["remove_background"]), background_model=form["background_model"] or DEFAULT_REMBG,
        min_side=int(form["min_side"] or 1), skip_near_duplicates=bool(form["skip_near_duplicates"]),
        manual_crops={k: tuple(v) for k, v in manual.items()},
        tagger=TaggerConfig(general_threshold=float(form["general_threshold"]),
                            character_threshold=float(form["character_threshold"]),
                            exclude=[t for t in (form["exclude_tags"] or "").split(",") if t.strip()],
                            keep_underscores=bool(form["keep_underscores"])),
        condition="" if form.get("condition") in (None, "", "none") else form["condition"])
    return cfg


def _source(ctx: AppContext, form: dict) -> Path:
    text = (form["source"] or "").strip()
    if not text:
        raise UserError("No images yet: drop photos above, or type a folder inside the workspace.")
    return ctx.workspace.resolve(text, must_exist=True)


def import_uploads(ctx: AppContext, name: str, files: list[str]) -> tuple[Path, list[str]]:
    """Copy uploaded files (zips unpacked safely) into workspace/inputs/<name>/; returns that folder and the
    zip entries that were refused."""
    folder = ctx.workspace.resolve(Path("inputs") / safe_name(name or "my-dataset"))
    folder.mkdir(parents=True, exist_ok=True)
    refused = []
    for f in files or []:
        src = Path(f)
        if src.suffix.lower() == ".zip":
            _written, bad = safe_extract_zip(src, folder / safe_name(src.stem))
            refused += [f"{src.name}:{entry} ({why})" for entry, why in bad]
        else:
            shutil.copyfile(src, folder / safe_name(src.name))  # the browser's file name: a name, never a path
    return folder, refused


def gallery_items(ctx: AppContext, name: str) -> list[tuple[str, str]]:
    rows = prep.read_scan(dataset_dir(ctx, name))
    if not rows:  # a dataset made elsewhere (the CLI, kohya): show its images as they are
        return [(str(p), f"✓ {p.parent.name}/{p.name}") for p in prep.dataset_images(dataset_dir(ctx, name))]
    out = []
    for r in rows:
        if not r.get("thumb"):
            continue
        why = "; ".join(r["reasons"])
        label = BADGE.get(r["status"], r["status"])
        out.append((r["thumb"], f"{label} {r['source']}" + (f" — {why}" if why else "")))
    return out


def _selected_row(ctx: AppContext, name: str, index: int | None) -> dict | None:
    rows = [r for r in prep.read_scan(dataset_dir(ctx, name)) if r.get("thumb")]
    if index is None or not 0 <= index < len(rows):
        return None
    return rows[index]


def pair_items(ctx: AppContext, name: str, height: int = 160) -> list[tuple[str, str]]:
    """Each prepared image beside its control image (one picture per pair, cached in DS/.thumbs/pairs), with
    ✓, or ✗ and what is wrong; [] for a dataset without control images."""
    from PIL import Image, ImageDraw

    from ..data.conditioning import check_pairs
    from ..data.folder import read_dataset

    out = dataset_dir(ctx, name)
    if not (out / "conditioning").is_dir():
        return []
    try:
        pairs = check_pairs(read_dataset(out))
    except UserError:
        return []
    thumbs = out / ".thumbs" / "pairs"
    thumbs.mkdir(parents=True, exist_ok=True)
    items = []
    for k, pair in enumerate(pairs):
        stamp = "|".join(f"{p}|{p.stat().st_mtime_ns}" for p in (pair.image, pair.condition) if p and p.exists())
        thumb = thumbs / f"{k:05d}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}.jpg"
        if not thumb.is_file():
            left = open_rgb(pair.image)
            left.thumbnail((height * 2, height))
            right = Image.new("RGB", left.size, (70, 70, 78))
            if not pair.problem:
                right = open_rgb(pair.condition).resize(left.size)
            else:  # a red cross where the control image should be
                d = ImageDraw.Draw(right)
                d.line((8, 8, right.width - 8, right.height - 8), fill=(220, 90, 90), width=5)
                d.line((8, right.height - 8, right.width - 8, 8), fill=(220, 90, 90), width=5)
            both = Image.new("RGB", (left.width * 2 + 4, left.height), (255, 255, 255))
            both.paste(left, (0, 0))
            both.paste(right, (left.width + 4, 0))
            both.save(thumb, quality=85)
        label = f"✗ {pair.image.name} {pair.problem}" if pair.problem else f"✓ {pair.image.name}"
        items.append((str(thumb), label))
    return items


def condition_preview(ctx: AppContext, result, condition: str):
    """The control image the chosen detector makes of a crop result (None when there is none to show)."""
    if result is None or not condition or condition == "none":
        return None
    from ..data.detectors import preprocess

    return preprocess(result, condition, ctx.workspace / "models" / "annotators")


def summary_markdown(ctx: AppContext, name: str) -> str:
    out = dataset_dir(ctx, name)
    if not out.exists():
        return "No dataset yet: drop photos above, then **Prepare dataset**."
    s = prep.summarize(out)
    rows = prep.read_scan(out)
    skipped = [r for r in rows if r["status"] == "skipped"]
    warned = [r for r in rows if r["status"] == "warning"]
    lines = [f"**{s['count']} training images** in `{ctx.workspace.relative(out)}`"
             + (f", {s['reg_count']} class images" if s["reg_count"] else ""),
             f"- resolutions: {_fmt(s['resolutions'])}",
             f"- buckets: {_fmt(s['buckets'])}",
             f"- caption words: min {s['caption_words']['min']}, mean {s['caption_words']['mean']}, "
             f"max {s['caption_words']['max']} ({s['caption_words']['uncaptioned']} without a caption)",
             f"- top tags: {_fmt(s['tags'], 12)}"]
    if rows:
        lines.append(f"- checked {len(rows)} files: {len(skipped)} skipped, {len(warned)} with warnings")
    for r in skipped[:20]:
        lines.append(f"  - ✗ `{r['source']}`: {'; '.join(r['reasons'])}")
    return "\n".join(lines)


def _fmt(counts: dict, n: int = 6) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in list(counts.items())[:n]) or "—"


def caption_page(ctx: AppContext, name: str, page: int) -> tuple[list[str], int, int]:
    """(image paths on this page, page number clamped, page count)."""
    images = prep.dataset_images(dataset_dir(ctx, name))
    pages = max(1, -(-len(images) // PAGE))
    page = min(max(0, int(page or 0)), pages - 1)
    return [str(p) for p in images[page * PAGE:(page + 1) * PAGE]], page, pages


def manual_box(size: tuple[int, int], x: float, y: float, side: float) -> Box:
    """Sliders (fractions) -> a square box in pixels: `side` of the short edge, its centre at (x, y)."""
    w, h = size
    s = max(8, int(min(w, h) * side))
    left = int(min(max(x * w - s / 2, 0), w - s))
    top = int(min(max(y * h - s / 2, 0), h - s))
    return Box(left, top, left + s, top + s)


def preview(ctx: AppContext, name: str, index, crop: str, size: str, use_manual: bool, x: float, y: float,
            side: float):
    """(original with the crop box drawn, cropped result, note) for the selected image."""
    from PIL import ImageDraw

    row = _selected_row(ctx, name, index)
    if row is None:
        return None, None, "Select an image in the gallery to preview its crop."
    if row["status"] == "skipped" or not row.get("path"):
        return None, None, f"✗ `{row['source']}` is skipped: {'; '.join(row['reasons'])}"
    img = open_rgb(row["path"])
    try:
        target = int(size)
    except ValueError:
        target = 512
    box = manual_box(img.size, x, y, side) if use_manual else None
    if box is None and crop in ("centre", "face"):
        from ..data.crop import centre_box, face_box

        box_shown, note = face_box(img) if crop == "face" else (centre_box(*img.size), "")
    else:
        box_shown, note = box, ""
    result, notes = crop_image(img, crop, target, box=box)
    shown = img.copy()
    shown.thumbnail((512, 512))
    if box_shown is not None:
        k = shown.width / img.width
        d = ImageDraw.Draw(shown)
        d.rectangle([box_shown.left * k, box_shown.top * k, box_shown.right * k - 1, box_shown.bottom * k - 1],
                    outline=(255, 80, 80), width=3)
    result.thumbnail((384, 384))
    text = "; ".join([n for n in [note, *notes] if n]) or f"{crop} crop to {target} px"
    warn = f" · ⚠ {'; '.join(row['reasons'])}" if row["reasons"] else ""
    return shown, result, f"`{row['source']}`: {text}{warn}"


def progress_html(done: int, total: int, label: str) -> str:
    pct = 0 if not total else int(100 * done / total)
    return (f'<div id="ds-bar" style="position:relative;height:22px;border-radius:4px;background:#8882;'
            f'overflow:hidden"><div style="width:{pct}%;height:100%;background:#6366f1;transition:width .3s">'
            f'</div><span style="position:absolute;left:8px;top:2px;font-size:.85em">{html.escape(label)} '
            f'{done}/{total}</span></div>')


# -- the tab -------------------------------------------------------------------------------------------------------
def build(ctx: AppContext) -> None:
    s = _settings(ctx)
    ui: dict = {}
    with gr.Row(equal_height=False):
        upload = gr.File(file_count="multiple", label="Drop photos or a .zip here", elem_id="ds-upload",
                         file_types=[*IMAGE_EXTS, ".zip", ".txt"], height=140, scale=3)
        with gr.Column(scale=2):
            ui["name"] = gr.Textbox(s["name"], label="Dataset name", elem_id="ds-name",
                                    info="Written to datasets/<name> in the workspace.")
            ui["source"] = gr.Textbox(s["source"], label="…or a folder in the workspace", elem_id="ds-source",
                                      placeholder="inputs/my-photos", info="Uploads land in inputs/<name>.")
            scan_btn = gr.Button("Check images", elem_id="ds-scan", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gallery = gr.Gallery(gallery_items(ctx, s["name"]), label="Images (✓ kept · ⚠ warning · ✗ skipped)",
                                 columns=5, height=330, allow_preview=False, elem_id="ds-gallery",
                                 object_fit="cover")
            selected = gr.Number(value=None, visible=False, elem_id="ds-selected")
            with gr.Row():
                crop_before = gr.Image(label="Crop on the original", interactive=False, height=260,
                                       elem_id="ds-crop-original")
                crop_after = gr.Image(label="Result", interactive=False, height=260, elem_id="ds-crop-preview")
                cond_after = gr.Image(label="Its control image", interactive=False, height=260,
                                      elem_id="ds-condition-preview", visible=s["condition"] != "none")
            crop_note = gr.Markdown("Select an image to preview its crop.", elem_id="ds-crop-note")
        with gr.Column(scale=2):
            with gr.Group():
                with gr.Row():
                    ui["crop"] = gr.Radio(list(CROP_MODES), value=s["crop"], label="Crop", elem_id="ds-crop",
                                          info="centre square · square around the face · aspect bucket · none")
                    ui["size"] = gr.Dropdown(["512", "768", "1024"], value=str(s["size"]), label="Size",
                                             allow_custom_value=True, elem_id="ds-size", scale=0, min_width=110)
                with gr.Accordion("Manual crop for the selected image", open=False):
                    use_manual = gr.Checkbox(False, label="Use a manual box", elem_id="ds-manual")
                    man_x = gr.Slider(0, 1, 0.5, step=0.01, label="Centre x", elem_id="ds-man-x")
                    man_y = gr.Slider(0, 1, 0.5, step=0.01, label="Centre y", elem_id="ds-man-y")
                    man_side = gr.Slider(0.1, 1, 1, step=0.01, label="Size (of the short side)",
                                         elem_id="ds-man-side")
                    with gr.Row():
                        keep_manual = gr.Button("Keep this crop", size="sm", elem_id="ds-man-keep")
                        clear_manual = gr.Button("Clear", size="sm", elem_id="ds-man-clear")
            with gr.Group():
                with gr.Row():
                    ui["trigger"] = gr.Textbox(s["trigger"], label="Trigger word", elem_id="ds-trigger")
                    ui["class_word"] = gr.Textbox(s["class_word"], label="Class word", elem_id="ds-class",
                                                  placeholder="dog, woman, style")
                    ui["repeats"] = gr.Number(s["repeats"], label="Repeats", precision=0, minimum=1,
                                              elem_id="ds-repeats", min_width=80)
                ui["caption"] = gr.Radio(["none", "filename", "blip", "wd14"], value=s["caption"],
                                         label="Captions", elem_id="ds-captioner",
                                         info="Existing .txt captions are kept; 'Caption again' overwrites.")
                ui["remove_background"] = gr.Checkbox(s["remove_background"], label="Remove backgrounds (rembg)",
                                                      elem_id="ds-rembg")
                ui["condition"] = gr.Dropdown(CONDITIONS, value=s["condition"], label="Control images",
                                              elem_id="ds-condition",
                                              info="For ControlNet / T2I-Adapter training: a detector makes one per "
                                                   "image in conditioning/. Your own pairs (x.cond.png) are kept.")
            with gr.Accordion("Advanced", open=False):
                ui["caption_model"] = gr.Textbox(s["caption_model"], label="Captioning model",
                                                 elem_id="ds-caption-model",
                                                 info="Hub id or a folder name in models/captioners (empty = default)")
                ui["general_threshold"] = gr.Slider(0, 1, s["general_threshold"], step=0.01,
                                                    label="WD14 general threshold", elem_id="ds-gen-th")
                ui["character_threshold"] = gr.Slider(0, 1, s["character_threshold"], step=0.01,
                                                      label="WD14 character threshold", elem_id="ds-char-th")
                ui["exclude_tags"] = gr.Textbox(s["exclude_tags"], label="Tags never written (comma-separated)",
                                                elem_id="ds-exclude")
                ui["keep_underscores"] = gr.Checkbox(s["keep_underscores"], label="Keep underscores in tags",
                                                     elem_id="ds-underscores")
                ui["background_model"] = gr.Dropdown(available_models(ctx.workspace / "models/rembg"),
                                                     value=s["background_model"], label="Background model",
                                                     info="File in models/rembg", elem_id="ds-rembg-model",
                                                     allow_custom_value=True)
                ui["min_side"] = gr.Number(s["min_side"], label="Skip images smaller than (px)", precision=0,
                                           elem_id="ds-min-side")
                ui["skip_near_duplicates"] = gr.Checkbox(s["skip_near_duplicates"], label="Drop near duplicates",
                                                         elem_id="ds-skip-dupes")
            with gr.Row():
                prepare_btn = gr.Button("Prepare dataset", variant="primary", elem_id="ds-prepare")
                caption_btn = gr.Button("Caption again", elem_id="ds-caption")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="ds-stop", min_width=60)
            progress = gr.HTML(progress_html(0, 0, "idle"), elem_id="ds-progress")
            status = gr.Markdown("", elem_id="ds-status", elem_classes=["status-line"])
            with gr.Accordion("Class images (prior preservation)", open=False):
                with gr.Row():
                    reg_count = gr.Number(s["reg_count"], label="How many", precision=0, minimum=1,
                                          elem_id="ds-reg-count")
                    reg_steps = gr.Number(s["reg_steps"], label="Steps", precision=0, minimum=1,
                                          elem_id="ds-reg-steps")
                reg_btn = gr.Button("Generate class images", elem_id="ds-reg")
                reg_import = gr.Textbox(label="…or import a class folder from the workspace", elem_id="ds-reg-src")
                reg_import_btn = gr.Button("Import class folder", size="sm", elem_id="ds-reg-import")
    with gr.Group(visible=bool(pair_items(ctx, s["name"]))) as pairs_box:
        gr.Markdown("### Pairs: each image beside its control image")
        pairs = gr.Gallery(pair_items(ctx, s["name"]), label="Image | control image (✓ ready · ✗ what is wrong)",
                           columns=4, height=260, allow_preview=False, elem_id="ds-pairs", object_fit="contain")
    gr.Markdown("### Captions")
    with gr.Row():
        find = gr.Textbox(label="Find", elem_id="ds-find", scale=2)
        replace = gr.Textbox(label="Replace with", elem_id="ds-replace", scale=2)
        add = gr.Textbox(label="Add tags", elem_id="ds-add-tags", scale=2)
        remove = gr.Textbox(label="Remove tags", elem_id="ds-remove-tags", scale=2)
        apply_edits = gr.Button("Apply to all", elem_id="ds-apply-edits", scale=1)
    page = gr.State(0)
    paths = gr.State([])
    cap_imgs, cap_txts = [], []
    for row in range(PAGE // 2):
        with gr.Row(equal_height=True):
            for col in range(2):
                i = row * 2 + col
                cap_imgs.append(gr.Image(None, interactive=False, show_label=False, height=150, scale=1,
                                         elem_id=f"ds-cap-img-{i}", min_width=120, container=False,
                                         buttons=["fullscreen"]))
                cap_txts.append(gr.Textbox("", lines=3, max_lines=6, show_label=False, scale=3,
                                           elem_id=f"ds-cap-{i}", placeholder="caption (saved when you leave the box)"))
    with gr.Row():
        prev_btn = gr.Button("◀ Previous", size="sm", elem_id="ds-cap-prev")
        page_label = gr.Markdown("", elem_id="ds-cap-page")
        next_btn = gr.Button("Next ▶", size="sm", elem_id="ds-cap-next")
    gr.Markdown("### Summary")
    summary = gr.Markdown(summary_markdown(ctx, s["name"]), elem_id="ds-summary")
    use_btn = gr.Button("Use this dataset ▶ Train", variant="primary", elem_id="ds-use")
    timer = gr.Timer(0.5, active=False)
    ui.update(gallery=gallery, summary=summary, page=page, paths=paths, page_label=page_label, timer=timer,
              progress=progress, status=status, use_btn=use_btn)
    ctx.components["dataset._ui"] = ui

    form_inputs = [ui[k] for k in FORM]

    def form_of(values) -> dict:
        return dict(zip(FORM, values))

    # 1. Caption editor: a page of image + text pairs read from disk; a caption saves when its box loses focus.
    def show_page(name, pg):
        files, pg, pages = caption_page(ctx, name, pg)
        imgs = [gr.update(value=files[i] if i < len(files) else None, visible=i < len(files)) for i in range(PAGE)]
        txts = [gr.update(value=(read_caption(Path(files[i])) or "") if i < len(files) else "",
                          visible=i < len(files), label=Path(files[i]).name if i < len(files) else "")
                for i in range(PAGE)]
        label = f"page {pg + 1} of {pages}" if files else "No prepared images yet."
        return [pg, files, label, *imgs, *txts]

    page_outputs = [page, paths, page_label, *cap_imgs, *cap_txts]

    def make_saver(i: int):
        def save(name, files, text):
            if i >= len(files):
                return
            try:
                prep.save_caption(dataset_dir(ctx, name), Path(files[i]), text or "")
            except UserError as exc:
                gr.Warning(str(exc))
        return save

    for i, box in enumerate(cap_txts):
        box.blur(make_saver(i), [ui["name"], paths, box], None, queue=False)
    prev_btn.click(lambda n, p: show_page(n, p - 1), [ui["name"], page], page_outputs)
    next_btn.click(lambda n, p: show_page(n, p + 1), [ui["name"], page], page_outputs)

    # 2. Sources: uploads are copied into the workspace, then checked (a job).
    def start_job(label: str, work, exclusive: bool):
        try:
            job = ctx.jobs.start(label, JOB_KIND, work, exclusive=exclusive)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"⚠ {exc}"
        return gr.Timer(active=True), f"{label}: started"

    def scan_work(src: Path, out: Path, cfg):
        return lambda jc: prep.scan(src, out, cfg, emit=jc.emit, check=jc.commands.check)

    def on_upload(files, *values):
        form = form_of(values)
        if not files:
            return gr.update(), gr.update(), ""
        try:
            folder, refused = import_uploads(ctx, form["name"], files)
            if refused:
                gr.Warning(f"{len(refused)} zip entries were refused: {'; '.join(refused[:3])}")
            form["source"] = ctx.workspace.relative(folder)
            cfg = _config(ctx, form)
            _save_settings(ctx, {k: form[k] for k in FORM})
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update(), f"⚠ {exc}"
        timer_update, msg = start_job("check images", scan_work(folder, dataset_dir(ctx, form["name"]), cfg), False)
        return form["source"], timer_update, msg

    upload.upload(on_upload, [upload, *form_inputs], [ui["source"], timer, status])

    def on_scan(*values):
        form = form_of(values)
        try:
            src, cfg = _source(ctx, form), _config(ctx, form)
            _save_settings(ctx, {k: form[k] for k in FORM})
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"⚠ {exc}"
        return start_job("check images", scan_work(src, dataset_dir(ctx, form["name"]), cfg), False)

    scan_btn.click(on_scan, form_inputs, [timer, status])

    # 3. Prepare and caption passes (jobs).
    def on_prepare(*values):
        form = form_of(values)
        try:
            src, cfg = _source(ctx, form), _config(ctx, form)
            cfg.validate()
            _save_settings(ctx, {k: form[k] for k in FORM})
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"⚠ {exc}"
        out = dataset_dir(ctx, form["name"])

        def work(jc):
            prep.scan(src, out, cfg, emit=jc.emit, check=jc.commands.check)
            from ..devices import pick_device

            device = pick_device("auto") if cfg.caption == "blip" else "cpu"
            return prep.prepare(src, out, cfg, models_dir=ctx.workspace / "models", emit=jc.emit,
                                check=jc.commands.check, device=device)

        heavy = cfg.caption in ("blip", "wd14") or cfg.remove_background
        return start_job("prepare dataset", work, heavy)

    prepare_btn.click(on_prepare, form_inputs, [timer, status])

    def on_caption(*values):
        form = form_of(values)
        out = dataset_dir(ctx, form["name"])
        if form["caption"] == "none":
            gr.Warning("Pick a captioner (filename, BLIP or WD14) first.")
            return gr.update(), ""
        try:
            cfg = _config(ctx, form)
            _save_settings(ctx, {k: form[k] for k in FORM})
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"⚠ {exc}"

        def work(jc):
            from ..devices import pick_device

            device = pick_device("auto") if cfg.caption == "blip" else "cpu"
            captioner = make_captioner(cfg.caption, model=cfg.caption_model, device=device, tagger=cfg.tagger,
                                       search_dir=ctx.workspace / "models" / "captioners")
            return prep.caption_dataset(out, captioner, cfg.trigger, cfg.class_word, overwrite=True, emit=jc.emit,
                                        check=jc.commands.check)

        return start_job("caption", work, cfg.caption in ("blip", "wd14"))

    caption_btn.click(on_caption, form_inputs, [timer, status])

    def on_stop():
        job = ctx.jobs.latest(JOB_KIND)
        if job is not None and job.running:
            job.stop()
            return "Stopping…"
        return "Nothing is running."

    stop_btn.click(on_stop, None, [status], queue=False)

    # 4. Class images: generated with the base model the Library chose, or imported.
    def on_reg(name, class_word, count, steps):
        from .library_tab import current_base

        if not (class_word or "").strip():
            gr.Warning("Fill in the class word (e.g. dog) first: class images are 'photo of a <class>'.")
            return gr.update(), ""
        out = dataset_dir(ctx, name)
        from ..data.regularization import RegularizationConfig, generate_class_images, reg_dir

        cfg = RegularizationConfig(class_word=class_word, count=int(count or 1), steps=int(steps or 25))
        base = current_base(ctx)
        _save_settings(ctx, {"reg_count": cfg.count, "reg_steps": cfg.steps})

        def work(jc):
            from ..devices import pick_device, pick_dtype

            device = pick_device("auto")
            comps = ctx.cache.get(base, device=device, dtype=pick_dtype(device))
            return generate_class_images(comps, cfg, reg_dir(out, class_word), jc.emit, jc.commands.check)

        return start_job("class images", work, True)

    reg_btn.click(on_reg, [ui["name"], ui["class_word"], reg_count, reg_steps], [timer, status])

    def on_reg_import(name, class_word, src_text):
        from ..data.regularization import import_class_folder, reg_dir

        try:
            if not (class_word or "").strip():
                raise UserError("Fill in the class word (e.g. dog) first: it names the reg/1_<class> folder.")
            src = ctx.workspace.resolve(src_text, must_exist=True)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"⚠ {exc}"
        out = reg_dir(dataset_dir(ctx, name), class_word)
        return start_job("import class images",
                         lambda jc: import_class_folder(src, out, jc.emit, jc.commands.check), False)

    reg_import_btn.click(on_reg_import, [ui["name"], ui["class_word"], reg_import], [timer, status])

    # 5. The poll: progress while the job runs; when it ends, refresh what it changed.
    def on_tick(name):
        job = ctx.jobs.latest(JOB_KIND)
        if job is None:
            return [gr.Timer(active=False), *[gr.update()] * (4 + len(page_outputs))]
        snap = job.log.snapshot()
        prog = snap["progress"]
        bar = progress_html(prog[0], prog[1], prog[2] or job.name) if prog else progress_html(0, 0, snap["status"])
        end = snap["end"]
        if end is None:
            return [gr.update(), bar, f"{job.name}: {snap['status'] or 'running'}", gr.update(), gr.update(),
                    *[gr.update()] * len(page_outputs)]
        if isinstance(end, Failed):
            msg = f"⚠ {job.name} failed: {end.message}"
            gr.Warning(end.message)
        else:
            msg = f"{job.name}: {end.message}"
            result = job.result
            if isinstance(result, prep.Report):
                msg = f"{job.name}: " + result.lines()[0]
        return [gr.Timer(active=False), bar, msg, gallery_items(ctx, name), summary_markdown(ctx, name),
                *show_page(name, 0)]

    def show_pairs(name):
        items = pair_items(ctx, name)
        return gr.update(visible=bool(items)), items

    tick_outputs = [timer, progress, status, gallery, summary, *page_outputs]
    timer.tick(on_tick, [ui["name"]], tick_outputs, show_progress="hidden").then(
        show_pairs, [ui["name"]], [pairs_box, pairs], show_progress="hidden")

    # 6. Crop preview on the selected image (one image: fast enough to do in the handler).
    def on_select(name, evt: gr.SelectData):
        row = _selected_row(ctx, name, evt.index)
        _save_settings(ctx, {}, crop_view={"dataset": safe_name(name or ""), "source": row["source"] if row else ""})
        return evt.index

    crop_inputs = [ui["name"], selected, ui["crop"], ui["size"], use_manual, man_x, man_y, man_side]

    def on_preview(*args):
        *args, condition = args
        try:
            before, after, note = preview(ctx, *args)
        except UserError as exc:
            return None, None, f"⚠ {exc}", gr.update(visible=condition != "none", value=None)
        try:  # the control image beside the result, with the chosen detector
            cond = condition_preview(ctx, after, condition)
        except UserError as exc:
            cond, note = None, f"{note} · ⚠ {exc}"
        return before, after, note, gr.update(visible=condition != "none", value=cond)

    crop_inputs.append(ui["condition"])
    preview_outputs = [crop_before, crop_after, crop_note, cond_after]
    gallery.select(on_select, [ui["name"]], [selected]).then(on_preview, crop_inputs, preview_outputs)
    for comp in (ui["crop"], ui["size"], use_manual, ui["condition"]):
        comp.change(on_preview, crop_inputs, preview_outputs)
    # Every value a slider takes (dragged or typed) redraws the preview, so the box shown is the box kept.
    for comp in (man_x, man_y, man_side):
        comp.change(on_preview, crop_inputs, preview_outputs, trigger_mode="always_last", show_progress="hidden")

    # The manual box as the user leaves it, for a reload (with the image it was set on).
    # One listener for the four (queued, so one at a time: a late call never writes older values over newer).
    def keep_view(use, x, y, side):
        _save_settings(ctx, {}, crop_view={"use": bool(use), "x": x, "y": y, "side": side})

    gr.on([c.change for c in (use_manual, man_x, man_y, man_side)], keep_view, [use_manual, man_x, man_y, man_side],
          None, show_progress="hidden", trigger_mode="always_last")

    def on_keep_manual(name, index, x, y, side, keep: bool):
        row = _selected_row(ctx, name, index)
        if row is None or not row.get("path"):
            gr.Warning("Select an image in the gallery first.")
            return gr.update()
        key = safe_name(name or "my-dataset")
        crops = _settings(ctx)["manual_crops"]
        mine = dict(crops.get(key, {}))
        if keep:
            with open_rgb(row["path"]) as img:
                box = manual_box(img.size, x, y, side)
            mine[row["source"]] = list(box.tuple())
        else:
            mine.pop(row["source"], None)
        _save_settings(ctx, {"manual_crops": {**crops, key: mine}})
        gr.Info((f"Manual crop {box.width}x{box.height} at ({box.left}, {box.top}) kept for " if keep
                 else "Manual crop cleared for ") + row["source"] + ": it applies at the next Prepare.")
        return gr.update(value=keep)

    keep_manual.click(lambda *a: on_keep_manual(*a, True), [ui["name"], selected, man_x, man_y, man_side],
                      [use_manual])
    clear_manual.click(lambda *a: on_keep_manual(*a, False), [ui["name"], selected, man_x, man_y, man_side],
                       [use_manual])

    # 7. Batch caption edits (plain text work on a few hundred files: fast).
    def on_apply(name, f, r, a, rm):
        out = dataset_dir(ctx, name)
        adds = [t for t in (a or "").split(",") if t.strip()]
        rms = [t for t in (rm or "").split(",") if t.strip()]

        def edit(text: str) -> str:
            text = find_replace(text, f, r or "") if f else text
            return remove_tags(add_tags(text, adds), rms)

        n = prep.edit_captions(out, edit)
        gr.Info(f"{n} captions changed.")
        return show_page(name, 0)

    apply_edits.click(on_apply, [ui["name"], find, replace, add, remove], page_outputs).then(
        lambda n: summary_markdown(ctx, n), [ui["name"]], [summary])

    def on_name(name):
        return [gallery_items(ctx, name), summary_markdown(ctx, name), *show_page(name, 0), *show_pairs(name)]

    # Each field is kept as the user sets it (not only when a job starts), so a reload restores what the tab showed.
    for key, comp in [*((k, ui[k]) for k in FORM), ("reg_count", reg_count), ("reg_steps", reg_steps)]:
        comp.input(lambda v, key=key: _save_settings(ctx, {key: str(v) if key == "size" else v}), [comp], None,
                   queue=False, show_progress="hidden")

    ui["name"].submit(on_name, [ui["name"]], [gallery, summary, *page_outputs, pairs_box, pairs])
    ui["name"].blur(on_name, [ui["name"]], [gallery, summary, *page_outputs, pairs_box, pairs])

    # A reload reconnects: the last-used settings (component defaults were fixed when the app started), the
    # gallery, editor and summary from disk, and polling again if a dataset job is still running.
    def on_load():
        cur = _settings(ctx)
        job = ctx.jobs.latest(JOB_KIND)
        values = [str(cur[k]) if k == "size" else cur[k] for k in FORM]
        return [*values, cur["reg_count"], cur["reg_steps"], gr.Timer(active=bool(job and job.running)),
                gallery_items(ctx, cur["name"]), summary_markdown(ctx, cur["name"]), *show_page(cur["name"], 0),
                *show_pairs(cur["name"]), *crop_view(cur)]

    def crop_view(cur: dict) -> list:
        """The selected image, its manual box and its crop preview as the user left them."""
        view = cur.get("crop_view") or {}
        use, x, y, side = bool(view.get("use")), view.get("x", 0.5), view.get("y", 0.5), view.get("side", 1.0)
        rows = [r for r in prep.read_scan(dataset_dir(ctx, cur["name"])) if r.get("thumb")]
        index = next((k for k, r in enumerate(rows) if r["source"] == view.get("source")), None)
        if view.get("dataset") != safe_name(cur["name"] or "") or index is None:
            return [gr.skip()] * (5 + len(preview_outputs))
        shown = on_preview(cur["name"], index, cur["crop"], str(cur["size"]), use, x, y, side, cur["condition"])
        return [index, use, x, y, side, *shown]

    ui["_load"] = (on_load, None, [*form_inputs, reg_count, reg_steps, timer, gallery, summary, *page_outputs,
                                   pairs_box, pairs, selected, use_manual, man_x, man_y, man_side,
                                   *preview_outputs])

    def open_run(run: str) -> list:
        """The dataset a Quick run made, with the settings that made it (dataset.toml), the captioner that really
        ran and the photos it read (the run's quick.json): what "Open in Dataset tab" shows."""
        import json
        import tomllib

        out = ctx.workspace.root / "datasets" / run
        try:
            settings = tomllib.loads((out / "dataset.toml").read_text("utf-8")).get("settings", {})
        except (OSError, ValueError):
            settings = {}
        try:
            quick = json.loads((ctx.workspace.root / "runs" / run / "quick.json").read_text("utf-8"))
        except (OSError, ValueError):
            quick = {}
        values = {k: settings[k] for k in FORM if k in settings and k not in ("name", "source")}
        values["name"] = run
        if quick.get("captioner"):
            values["caption"] = quick["captioner"]
        photos = quick.get("photos") or []
        if photos:
            values["source"] = photos[0]
        if "size" in values:
            values["size"] = str(values["size"])
        tagger = settings.get("tagger") or {}
        for key in ("general_threshold", "character_threshold", "keep_underscores"):
            if key in tagger:
                values[key] = tagger[key]
        if isinstance(tagger.get("exclude"), list):
            values["exclude_tags"] = ", ".join(tagger["exclude"])
        _save_settings(ctx, values)  # a reload now shows this dataset too
        return [values[k] if k in values else gr.skip() for k in FORM] + [
            gallery_items(ctx, run), summary_markdown(ctx, run), *show_page(run, 0), *show_pairs(run)]

    ui["open_run"] = (open_run, [*form_inputs, gallery, summary, *page_outputs, pairs_box, pairs])


def wire(ctx: AppContext) -> None:
    ui = ctx.components.get("dataset._ui")
    if not ui:
        return
    tabs = ctx.components.get("tabs")
    target = ctx.components.get("train.dataset")

    def on_use(name):
        out = dataset_dir(ctx, name)
        if not prep.dataset_images(out):
            gr.Warning("This dataset has no prepared images yet: run Prepare dataset first.")
            return gr.update(), gr.update()
        rel = ctx.workspace.relative(out)
        if target is None:
            gr.Info(f"Dataset ready: {rel}")
        return (gr.update(value=rel) if target is not None else gr.update()), gr.Tabs(selected="tab-train")

    outputs = [target if target is not None else ui["status"], tabs]
    ui["use_btn"].click(on_use, [ui["name"]], outputs)
    # Register the reconnect-on-load handler on the enclosing Blocks (wire runs inside it).
    fn, inputs, outs = ui["_load"]
    root = gr.context.Context.root_block
    if root is not None:
        root.load(fn, inputs, outs, show_progress="hidden")
