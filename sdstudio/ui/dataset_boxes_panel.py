"""The Dataset tab's Boxes section: draw each image's objects (a phrase and a box) for GLIGEN grounding training,
on the image itself, with the same box editor as the Playground. Faces can be pre-filled by the face detector:
for the shown image at once, for every image without boxes as a Job. Saved in the dataset's boxes.jsonl
(data/boxes.py), which training reads.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..data.boxes import FILE, GroundedObject, faces_as_objects, read_boxes, write_boxes
from ..data.folder import list_images
from ..data.images import open_rgb
from ..errors import UserError
from ..events import Failed, Finished, Progress, Status
from .box_editor import box_editor, editor_value, image_data_url
from .box_editor import read_boxes as editor_boxes
from .context import AppContext

KINDS = [("object", "Object")]
JOB_KIND = "dataset-boxes"


def dataset_choices(ctx: AppContext) -> list[str]:
    root = ctx.workspace.root / "datasets"
    return [ctx.workspace.relative(p) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []


def dataset_images(folder: Path) -> list[Path]:
    """Every training image of a dataset folder (kohya concept folders or a plain folder), not class images."""
    img = folder / "img" if (folder / "img").is_dir() else folder
    out = list_images(img) if img.is_dir() else []
    for d in sorted(p for p in img.iterdir() if p.is_dir()) if img.is_dir() else []:
        out += list_images(d)
    return out


def _table(folder: Path) -> dict:
    path = folder / FILE
    return read_boxes(path) if path.is_file() else {}


def editor_for(folder: Path, rel: str) -> dict:
    """The editor value for one image of the dataset: the picture behind its boxes."""
    image = open_rgb(folder / rel)
    boxes = [{"kind": "object", "label": o.phrase, "box": list(o.box), "enabled": True, "extra": {}}
             for o in _table(folder).get(rel, [])]
    return editor_value(boxes, width=image.width, height=image.height, image=image_data_url(image), kinds=KINDS)


def save_image_boxes(folder: Path, rel: str, value) -> int:
    """Write one image's boxes into the dataset's boxes.jsonl (the other images' lines stay). Returns the count."""
    objects = []
    for i, b in enumerate(editor_boxes(value, {"object"}), 1):
        if not b["enabled"]:
            continue
        if not b["label"]:
            raise UserError(f"Box {i} has no phrase: click it and type what it shows.")
        objects.append(GroundedObject(b["label"], b["box"]))
    table = _table(folder)
    table[rel] = objects
    write_boxes(folder / FILE, table)
    return len(objects)


def fill_faces(folder: Path, phrase: str, on_image=None) -> int:
    """Face boxes for every image that has none yet; returns how many images got faces."""
    table = _table(folder)
    images = dataset_images(folder)
    found = 0
    for k, path in enumerate(images):
        rel = path.relative_to(folder).as_posix()
        if not table.get(rel):
            faces = faces_as_objects(open_rgb(path), phrase)
            if faces:
                table[rel] = faces
                found += 1
        if on_image:
            on_image(k + 1, len(images))
    write_boxes(folder / FILE, table)
    return found


def build(ctx: AppContext) -> None:
    ws = ctx.workspace
    with gr.Accordion("Boxes for grounding (GLIGEN training)", open=False, elem_id="dataset-boxes") as accordion:
        gr.Markdown(f"Draw what each picture shows where: a phrase per box, saved in the dataset's `{FILE}`.",
                    elem_classes=["hint"])
        with gr.Row():
            dataset = gr.Dropdown(dataset_choices(ctx), label="Dataset", allow_custom_value=True,
                                  elem_id="dataset-boxes-dataset", scale=2)
            image = gr.Dropdown([], label="Image", elem_id="dataset-boxes-image", scale=3)
            prev_btn = gr.Button("◀", size="sm", scale=0, min_width=40, elem_id="dataset-boxes-prev")
            next_btn = gr.Button("▶", size="sm", scale=0, min_width=40, elem_id="dataset-boxes-next")
        editor = box_editor(editor_value([], kinds=KINDS), elem_id="dataset-box-editor")
        with gr.Row():
            save = gr.Button("Save boxes", variant="primary", elem_id="dataset-boxes-save")
            phrase = gr.Textbox("a face", label="Phrase for found faces", elem_id="dataset-boxes-face-phrase")
            faces = gr.Button("Find faces in this image", elem_id="dataset-boxes-faces")
            faces_all = gr.Button("Find faces in every image without boxes", elem_id="dataset-boxes-faces-all")
        status = gr.Markdown("", elem_id="dataset-boxes-status")
    timer = gr.Timer(0.5, active=False)

    def folder_of(name) -> Path:
        if not name:
            raise UserError("Pick a dataset first.")
        folder = ws.resolve(name, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"{name} is not a dataset folder.")
        return folder

    def on_dataset(name):
        try:
            folder = folder_of(name)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(choices=[], value=None), gr.update()
        rels = [p.relative_to(folder).as_posix() for p in dataset_images(folder)]
        if not rels:
            gr.Warning(f"{name} has no images.")
        return gr.update(choices=rels, value=rels[0] if rels else None), gr.update()

    def on_image(name, rel):
        if not name or not rel:
            return editor_value([], kinds=KINDS), ""
        try:
            folder = folder_of(name)
            value = editor_for(folder, rel)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), ""
        n = len(value["boxes"])
        return value, f"{rel}: {n} box(es)"

    def step(name, rel, delta):
        try:
            folder = folder_of(name)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update()
        rels = [p.relative_to(folder).as_posix() for p in dataset_images(folder)]
        if not rels:
            return gr.update()
        k = rels.index(rel) if rel in rels else -delta
        return gr.update(value=rels[(k + delta) % len(rels)])

    def on_save(name, rel, value):
        try:
            if not rel:
                raise UserError("Pick an image first.")
            n = save_image_boxes(folder_of(name), rel, value)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update()
        return f"Saved {n} box(es) for {rel} in {FILE}."

    def on_faces(name, rel, value, text):
        try:
            if not rel:
                raise UserError("Pick an image first.")
            folder = folder_of(name)
            found = faces_as_objects(open_rgb(folder / rel), (text or "a face").strip() or "a face")
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update()
        if not found:
            gr.Info("No face found in this image.")
            return gr.update(), "No face found."
        value = dict(value or editor_value([], kinds=KINDS))
        value["boxes"] = list(value.get("boxes", [])) + [
            {"kind": "object", "label": o.phrase, "box": list(o.box), "enabled": True, "extra": {}} for o in found]
        value["selected"] = len(value["boxes"]) - 1
        return value, f"Found {len(found)} face(s): check them and press Save boxes."

    def on_faces_all(name, text):
        try:
            folder = folder_of(name)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update(active=False)

        def work(jc):
            jc.emit(Status("looking for faces", stage="faces"))
            n = fill_faces(folder, (text or "a face").strip() or "a face",
                           lambda k, total: jc.emit(Progress(k, total, stage="faces", message=f"image {k}/{total}")))
            jc.emit(Finished(message=f"faces found in {n} image(s); saved in {FILE}"))

        try:
            ctx.jobs.start("boxes", JOB_KIND, work, exclusive=False)
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update(active=False)
        return "Looking for faces...", gr.update(active=True)

    def on_tick(name, rel):
        job = ctx.jobs.latest(JOB_KIND)
        if job is None:
            return gr.update(), gr.update(active=False), gr.update()
        snap = job.log.snapshot()
        end = snap["end"]
        if end is None:
            prog = snap["progress"]
            text = f"{prog[3] or 'working'} ({prog[0]}/{prog[1]})" if prog else snap["status"]
            return text, gr.update(active=True), gr.update()
        if isinstance(end, Failed):
            gr.Warning(end.message)
            return f"failed: {end.message}", gr.update(active=False), gr.update()
        return end.message, gr.update(active=False), (on_image(name, rel)[0] if name and rel else gr.update())

    dataset.change(on_dataset, [dataset], [image, status])
    image.change(on_image, [dataset, image], [editor, status])
    prev_btn.click(lambda n, r: step(n, r, -1), [dataset, image], [image])
    next_btn.click(lambda n, r: step(n, r, 1), [dataset, image], [image])
    save.click(on_save, [dataset, image, editor], [status])
    faces.click(on_faces, [dataset, image, editor, phrase], [editor, status])
    faces_all.click(on_faces_all, [dataset, phrase], [status, timer])
    timer.tick(on_tick, [dataset, image], [status, timer, editor])
    accordion.expand(lambda: gr.update(choices=dataset_choices(ctx)), None, [dataset], show_progress="hidden")
