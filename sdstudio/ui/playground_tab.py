"""The Playground tab: a base model, a prompt, and a stack of LoRAs / LyCORIS / embeddings / ControlNets /
T2I-Adapters with a weight each; generate as a Job with a live step preview; X/Y grids; recipe save/load;
drop a PNG to get its recipe back.

The stack is a fixed pool of MAX_ITEMS cards (no dynamic widget creation). Every handler reads the whole pool
(`_read_items`), changes the item list, and redraws the pool (`_draw`), so edits are never lost on add /
remove / reorder. The work runs through sdstudio.playground (the same code as `sdstudio generate`).
"""
from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..events import Failed
from ..formats.kinds import detect_kind
from ..library import list_models
from ..playground.grid import parse_axis
from ..playground.outputs import read_recipe
from ..playground.pipeline import SAMPLERS
from ..playground.preprocess import PREPROCESSORS
from ..playground.recipe import ControlNetItem, EmbeddingItem, LoraItem, Recipe, T2IAdapterItem, parse_blocks
from ..playground.session import Playground, generation_work
from . import grounding_panel
from .context import AppContext
from .library_tab import base_model_choices, current_base, current_base_family

MAX_ITEMS = 8
ICONS = Path(__file__).resolve().parent / "icons"
KINDS = {"LoRA / LyCORIS": "lora", "Embedding": "embedding", "ControlNet": "controlnet", "T2I-Adapter": "t2i_adapter"}
KIND_LABEL = {v: k for k, v in KINDS.items()}
DETECTED = {"lora": "lora", "lycoris": "lora", "embedding": "embedding", "controlnet": "controlnet",
            "t2i_adapter": "t2i_adapter", "edlora": "lora"}  # an EDLoRA file is a LoRA item; its tokens come along
# Per card, the values read back from the page, in this order.
CARD_FIELDS = ("enabled", "weight", "te_weight", "start", "end", "blocks", "token", "preprocessor")
FORM_FIELDS = ("base_model", "prompt", "negative_prompt", "sampler", "steps", "cfg", "seed", "width", "height",
               "batch", "clip_skip", "vae", "init_image", "mask_image", "strength")
OWN_VAE = "Automatic (the base model's own)"
# The image editor stands for init_image + mask_image on the page: its background is the img2img image and what
# is painted on it is the inpaint mask (white = repaint). FORM_FIELDS keeps the recipe's names.
EDITOR_FIELDS = ("init_image", "mask_image")
_SESSIONS: dict[int, Playground] = {}
_SAVE_LOCK = threading.Lock()  # a read-modify-write of the tab's settings: two edits at once keep both


def session_for(ctx: AppContext) -> Playground:
    """One Playground per app: the base, stack and control models stay loaded between generations. Paths and
    the base follow the one rule (models/refs.py), confined to the workspace and the --models-from folders."""
    if id(ctx) not in _SESSIONS:
        ws = ctx.workspace
        _SESSIONS[id(ctx)] = Playground(places=_places(ctx), cache=ctx.cache, lora_dir=ws.models("lora"),
                                        annotators_dir=ws.root / "models" / "annotators")
    return _SESSIONS[id(ctx)]


def _places(ctx: AppContext):
    from ..models.refs import Places

    return Places.app(ctx.workspace)


# -- items <-> recipe (plain python) --------------------------------------------------------------------

def new_item(kind: str, path: str) -> dict:
    w = 0.8 if kind != "controlnet" else 1.0
    return {"kind": kind, "path": path, "enabled": True, "weight": w, "te_weight": w, "start": 0.0, "end": 1.0, "blocks": "", "token": "", "preprocessor": "none", "image": ""}


def items_to_recipe(form: dict, items: list[dict]) -> Recipe:
    r = Recipe(**form)
    for it in items:
        k = it["kind"]
        if k == "lora":
            te = float(it.get("te_weight", it["weight"]))
            r.lora.append(LoraItem(it["path"], float(it["weight"]),
                                   text_encoder_weight=None if te == float(it["weight"]) else te,
                                   blocks=parse_blocks(it.get("blocks", "")),
                                   start=float(it["start"]), end=float(it["end"]), enabled=bool(it["enabled"])))
        elif k == "embedding":
            r.embedding.append(EmbeddingItem(it["path"], it.get("token") or "", enabled=bool(it["enabled"])))
        else:
            cls = ControlNetItem if k == "controlnet" else T2IAdapterItem
            getattr(r, k).append(cls(it["path"], image=it.get("image", ""), preprocessor=it.get("preprocessor") or "none",
                                     weight=float(it["weight"]), start=float(it["start"]), end=float(it["end"]),
                                     enabled=bool(it["enabled"])))
    r.validate()
    return r


def recipe_to_items(recipe: Recipe, ws) -> list[dict]:
    items = []
    for it in recipe.lora:
        te = it.weight if it.text_encoder_weight is None else it.text_encoder_weight
        items.append(dict(new_item("lora", ws.relative(it.path)), enabled=it.enabled, weight=it.weight, te_weight=te,
                          start=it.start,
                          end=it.end, blocks=",".join(f"{b:g}" for b in it.blocks)))
    for it in recipe.embedding:
        items.append(dict(new_item("embedding", ws.relative(it.path)), enabled=it.enabled, token=it.token))
    for kind in ("controlnet", "t2i_adapter"):
        for it in getattr(recipe, kind):
            items.append(dict(new_item(kind, ws.relative(it.path)), enabled=it.enabled, weight=it.weight,
                              start=it.start, end=it.end, preprocessor=it.preprocessor,
                              image=ws.relative(it.image) if it.image else ""))
    return items[:MAX_ITEMS]


FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def model_choices(ctx: AppContext, kind: str) -> list[tuple[str, str]]:
    """(label, path) for the stack's file picker: the workspace's models of `kind`, then the --models-from
    folders' (library.list_models). A file made for another family than the base is labelled, not hidden."""
    base = current_base_family(ctx)
    out = []
    for m in list_models(ctx.workspace, kind):
        label = m.path if m.source == "workspace" else f"{Path(m.path).name} ({Path(m.source).name}, read-only)"
        if base and m.family and m.family != base:
            label += f" - {FAMILY_LABELS.get(m.family, m.family)}, not for this base"
        out.append((label, m.path))
    return out


def vae_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """The VAE picker: the base's own, then models/vae (A1111's "SD VAE" setting, per recipe here)."""
    return [(OWN_VAE, "")] + model_choices(ctx, "vae")


# -- the tab ----------------------------------------------------------------------------------------------

def build(ctx: AppContext) -> None:
    ws = ctx.workspace
    saved = ctx.settings.load("playground")
    d = Recipe(base_model=current_base(ctx), prompt="a photo of a cat, (masterpiece:1.2)", steps=20,
               width=512, height=512)
    if saved.get("form"):
        try:
            d = Recipe.from_dict({k: v for k, v in saved["form"].items() if k in FORM_FIELDS})
        except UserError:
            pass
    items_state = gr.State([])

    with gr.Row():
        # 1. Left: prompt and sampler settings
        with gr.Column(scale=4, min_width=380):
            base = gr.Dropdown(base_model_choices(ctx), value=d.base_model, label="Base model", allow_custom_value=True,
                               elem_id="playground-base")
            prompt = gr.Textbox(d.prompt, label="Prompt", lines=3, elem_id="playground-prompt",
                                info="(word:1.2) to emphasise, <lora:name:0.8> to add a LoRA from models/lora")
            negative = gr.Textbox(d.negative_prompt, label="Negative prompt", lines=2, elem_id="playground-negative")
            sampler = gr.Dropdown(list(SAMPLERS), value=d.sampler, label="Sampler", elem_id="playground-sampler")
            with gr.Row():
                steps = gr.Slider(1, 150, value=d.steps, step=1, label="Steps", elem_id="playground-steps")
                cfg = gr.Slider(0, 30, value=d.cfg, step=0.5, label="CFG", elem_id="playground-cfg")
            with gr.Row(equal_height=True, elem_id="playground-seed-row"):
                seed = gr.Number(d.seed, precision=0, label="Seed (-1: random)", elem_id="playground-seed",
                                 minimum=-1, scale=4, min_width=120)
                dice = gr.Button("", icon=str(ICONS / "dice.svg"), elem_id="playground-seed-random", scale=0,
                                 min_width=44, elem_classes=["seed-button"])
                recycle = gr.Button("", icon=str(ICONS / "recycle.svg"), elem_id="playground-seed-reuse", scale=0,
                                    min_width=44, elem_classes=["seed-button"])
            with gr.Row():
                width = gr.Slider(64, 2048, value=d.width, step=8, label="Width", elem_id="playground-width")
                height = gr.Slider(64, 2048, value=d.height, step=8, label="Height", elem_id="playground-height")
            with gr.Accordion("img2img / inpaint", open=bool(d.init_image), elem_id="playground-img2img"):
                editor = gr.ImageEditor(
                    value=_editor_value(ws, d.init_image, d.mask_image), type="pil", image_mode="RGBA",
                    sources=["upload", "clipboard"], format="png", layers=False, transforms=(),
                    brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed", default_size=24),
                    label="Init image: drop one for img2img, then paint where to repaint (inpaint)", height=300,
                    elem_id="playground-editor")
                strength = gr.Slider(0.05, 1.0, value=d.strength, step=0.05, label="Denoising strength",
                                     elem_id="playground-strength")
            with gr.Accordion("Advanced", open=False):
                batch = gr.Slider(1, 16, value=d.batch, step=1, label="Batch (image i uses seed + i)",
                                  elem_id="playground-batch")
                clip_skip = gr.Slider(1, 4, value=d.clip_skip, step=1, label="CLIP skip", elem_id="playground-clip-skip")
                vae = gr.Dropdown(vae_choices(ctx), value=d.vae, label="VAE", allow_custom_value=True,
                                  elem_id="playground-vae",
                                  info="Decodes the image: a file from models/vae (vae-ft-mse-840000, sdxl_vae, ...)")
                fuse = gr.Checkbox(bool(saved.get("fuse", True)), label="Fuse the LoRA stack for speed (not with step ranges)",
                                   elem_id="playground-fuse")

        # 2. Middle: the stack
        with gr.Column(scale=4, min_width=360):
            gr.Markdown("#### Stack")
            with gr.Row():
                add_kind = gr.Dropdown(list(KINDS), value="LoRA / LyCORIS", label="Kind", scale=1, min_width=200,
                                       elem_id="playground-add-kind")
                add_file = gr.Dropdown(model_choices(ctx, "lora"), label="File", allow_custom_value=True, scale=2,
                                       elem_id="playground-add-file")
            with gr.Row():
                add_btn = gr.Button("Add to stack", variant="secondary", elem_id="playground-add")
                refresh = gr.Button("Refresh files", size="sm", elem_id="playground-refresh")
            empty = gr.Markdown("The stack is empty: pick a file above and add it.", elem_id="playground-empty")
            cards = []
            for i in range(MAX_ITEMS):
                with gr.Group(visible=False, elem_id=f"pg-card-{i}") as group:
                    title = gr.Markdown(elem_id=f"pg-title-{i}")
                    with gr.Row():
                        enabled = gr.Checkbox(True, label="On", scale=0, min_width=60, elem_id=f"pg-enabled-{i}")
                        weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=4,
                                           elem_id=f"pg-weight-{i}")
                        up = gr.Button("↑", size="sm", scale=0, min_width=36, elem_id=f"pg-up-{i}")
                        down = gr.Button("↓", size="sm", scale=0, min_width=36, elem_id=f"pg-down-{i}")
                        remove = gr.Button("✕", size="sm", scale=0, min_width=36, elem_id=f"pg-remove-{i}")
                    with gr.Row():
                        te_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Text encoder",
                                              elem_id=f"pg-te-{i}")
                        start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start", elem_id=f"pg-start-{i}")
                        end = gr.Slider(0, 1, value=1.0, step=0.05, label="End", elem_id=f"pg-end-{i}")
                    blocks = gr.Textbox(label="Block weights (17 or 26 values, BASE,IN01,...)", placeholder="empty = all 1",
                                        elem_id=f"pg-blocks-{i}")
                    token = gr.Textbox(label="Token in the prompt", placeholder="<name>", elem_id=f"pg-token-{i}")
                    with gr.Row() as control_row:
                        image = gr.Image(type="filepath", label="Control image", sources=["upload", "clipboard"],
                                         height=160, elem_id=f"pg-image-{i}")
                        with gr.Column():
                            pre = gr.Dropdown(list(PREPROCESSORS), value="none", label="Preprocessor",
                                              elem_id=f"pg-pre-{i}")
                            preview = gr.Image(label="Preprocessed", interactive=False, height=120,
                                               elem_id=f"pg-preview-{i}")
                cards.append(dict(group=group, title=title, enabled=enabled, weight=weight, te_weight=te_weight,
                                  start=start, end=end,
                                  blocks=blocks, token=token, control_row=control_row, image=image, preprocessor=pre,
                                  preview=preview, up=up, down=down, remove=remove))
            boxes = grounding_panel.build(ctx, width, height, lambda: session_for(ctx).live_preview)

        # 3. Right: run, preview, gallery, grid, recipes
        with gr.Column(scale=3, min_width=320):
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="playground-generate")
                stop = gr.Button("Stop", elem_id="playground-stop")
            status = gr.Markdown("", elem_id="playground-status", elem_classes=["status-line"])
            live = gr.Image(label="Live preview", interactive=False, height=200, elem_id="playground-live")
            gallery = gr.Gallery(label="Outputs", columns=3, height=320, elem_id="playground-gallery")
            with gr.Accordion("X/Y grid", open=False):
                grid_x = gr.Textbox(label="X axis", placeholder="lora_weight[0]=0,0.5,1", elem_id="playground-grid-x")
                grid_y = gr.Textbox(label="Y axis (optional)", placeholder="cfg=5,7,9", elem_id="playground-grid-y")
                grid_btn = gr.Button("Run grid", elem_id="playground-grid-run")
            with gr.Accordion("Recipe", open=False):
                with gr.Row():
                    recipe_name = gr.Textbox("my-recipe", label="Name", elem_id="playground-recipe-name")
                    save_btn = gr.Button("Save", elem_id="playground-recipe-save")
                with gr.Row():
                    recipe_pick = gr.Dropdown(_recipe_files(ctx), label="Saved recipes", elem_id="playground-recipe-pick")
                    load_btn = gr.Button("Load", elem_id="playground-recipe-load")
                png_drop = gr.File(label="Drop a PNG to restore its recipe", file_types=[".png"],
                                   elem_id="playground-png-drop")
                recipe_text = gr.Code(label="Recipe TOML", language=None, elem_id="playground-recipe-toml")
    inbox = gr.Textbox(visible=False, elem_id="playground-inbox")
    ctx.components["playground.inbox"] = inbox
    timer = gr.Timer(0.5, active=False)

    form = [base, prompt, negative, sampler, steps, cfg, seed, width, height, batch, clip_skip, vae, editor, strength]
    form_in = form + boxes.inputs  # the recipe's fields: the form, then the Boxes panel (grounding_panel.py)
    card_inputs = [cards[i][f] for i in range(MAX_ITEMS) for f in CARD_FIELDS]
    card_outputs = [cards[i][f] for i in range(MAX_ITEMS) for f in
                    ("group", "title", "enabled", "weight", "te_weight", "start", "end", "blocks", "token",
                     "control_row", "image", "preprocessor", "preview")]
    redraw = [items_state, empty] + card_outputs

    def read_items(items, values) -> list[dict]:
        out = []
        for i, it in enumerate(items[:MAX_ITEMS]):
            vals = dict(zip(CARD_FIELDS, values[i * len(CARD_FIELDS):(i + 1) * len(CARD_FIELDS)]))
            out.append({**it, **{k: v for k, v in vals.items() if v is not None}})
        return out

    def draw(items) -> list:
        ups = [items, gr.update(visible=not items)]
        for i in range(MAX_ITEMS):
            if i < len(items):
                it = items[i]
                k = it["kind"]
                control = k in ("controlnet", "t2i_adapter")
                img = str(ws.root / it["image"]) if it.get("image") else None
                ups += [gr.update(visible=True), f"**{KIND_LABEL[k]}** · `{it['path']}`",
                        gr.update(value=it["enabled"]), gr.update(value=it["weight"], visible=k != "embedding",
                                                                    label="UNet weight" if k == "lora" else "Weight"),
                        gr.update(value=it.get("te_weight", it["weight"]), visible=k == "lora"),
                        gr.update(value=it["start"], visible=k != "embedding"),
                        gr.update(value=it["end"], visible=k != "embedding"),
                        gr.update(value=it.get("blocks", ""), visible=k == "lora"),
                        gr.update(value=it.get("token", ""), visible=k == "embedding"),
                        gr.update(visible=control), gr.update(value=img), gr.update(value=it.get("preprocessor", "none")),
                        gr.update(value=_preview(ctx, it) if control and img else None)]
            else:
                ups += [gr.update(visible=False)] + [gr.update()] * 12
        return ups

    def form_values(*vals) -> dict:
        f = _typed_form(dict(zip(PAGE_FIELDS, vals)))
        f["init_image"], f["mask_image"] = editor_files(ws, f.pop("editor"), f["width"], f["height"])
        return f

    def page_values(recipe: Recipe) -> list:
        """The recipe's settings in the order of `form` (the editor shows its init image and mask)."""
        out = []
        for name in PAGE_FIELDS:
            if name == "base_model":
                out.append(recipe.base_model if recipe.base_model in ("tiny", "tiny-sdxl") else ws.relative(recipe.base_model))
            elif name == "editor":
                out.append(_editor_value(ws, recipe.init_image, recipe.mask_image))
            elif name == "vae":
                out.append(ws.relative(recipe.vae) if recipe.vae else "")
            else:
                out.append(getattr(recipe, name))
        return out

    # -- stack editing ----------------------------------------------------------------------------------
    def on_kind(kind_label):
        return gr.update(choices=model_choices(ctx, KINDS[kind_label]), value=None)

    add_kind.change(on_kind, [add_kind], [add_file])
    def redraw_lists(kind_label):
        return (gr.update(choices=model_choices(ctx, KINDS[kind_label])), gr.update(choices=base_model_choices(ctx)),
                gr.update(choices=vae_choices(ctx)))

    refresh.click(redraw_lists, [add_kind], [add_file, base, vae])

    def add(items, kind_label, path, *values):
        items = read_items(items, values)
        if not path:
            gr.Warning("Pick a file to add first.")
            return draw(items)
        try:
            p = _places(ctx).path(path)
        except UserError as exc:
            gr.Warning(str(exc))
            return draw(items)
        if len(items) >= MAX_ITEMS:
            gr.Warning(f"The stack holds {MAX_ITEMS} items: remove one first.")
            return draw(items)
        kind = KINDS[kind_label]
        found = DETECTED.get(detect_kind(p))
        if found and found != kind:
            gr.Info(f"{p.name} is a {KIND_LABEL[found]}: added as that.")
            kind = found
        items.append(new_item(kind, ws.relative(p)))
        return draw(items)

    add_btn.click(add, [items_state, add_kind, add_file] + card_inputs, redraw)

    def from_inbox(items, path, *values):
        """Another tab (Train: "Open in Playground") sent a model path: add it with its detected kind."""
        items = read_items(items, values)
        if not path:
            return draw(items)
        try:
            p = _places(ctx).path(path)
            kind = DETECTED.get(detect_kind(p))
            if kind is None:
                raise UserError(f"{p.name} is not a LoRA, embedding, ControlNet or T2I-Adapter the Playground can use.")
        except UserError as exc:
            gr.Warning(str(exc))
            return draw(items)
        if not any(it["path"] == ws.relative(p) for it in items) and len(items) < MAX_ITEMS:
            items.append(new_item(kind, ws.relative(p)))
            gr.Info(f"Added {p.name} to the Playground stack.")
        return draw(items)

    inbox.change(from_inbox, [items_state, inbox] + card_inputs, redraw)

    for i in range(MAX_ITEMS):
        def move(items, *values, i=i, delta=0):
            items = read_items(items, values)
            if delta == 0:
                items.pop(i)
            else:
                j = i + delta
                if 0 <= j < len(items):
                    items[i], items[j] = items[j], items[i]
            return draw(items)

        cards[i]["remove"].click(lambda items, *v, i=i: move(items, *v, i=i, delta=0), [items_state] + card_inputs, redraw)
        cards[i]["up"].click(lambda items, *v, i=i: move(items, *v, i=i, delta=-1), [items_state] + card_inputs, redraw)
        cards[i]["down"].click(lambda items, *v, i=i: move(items, *v, i=i, delta=1), [items_state] + card_inputs, redraw)

        def upload(items, file, pre_name, i=i):
            """Copy the control image into workspace/inputs (the recipe refers to it there) and preview it."""
            if not file or i >= len(items):
                return items, gr.update()
            src = Path(file)
            suffix = src.suffix.lower() if src.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp") else ".png"
            dest = ws.named_file("inputs", f"{src.stem[:40]}-{uuid.uuid4().hex[:6]}", suffix)  # confined
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            items = [dict(it) for it in items]
            items[i]["image"] = ws.relative(dest)
            items[i]["preprocessor"] = pre_name or "none"
            return items, _preview(ctx, items[i])

        cards[i]["image"].upload(upload, [items_state, cards[i]["image"], cards[i]["preprocessor"]],
                                 [items_state, cards[i]["preview"]])

        def on_pre(items, pre_name, i=i):
            if i >= len(items) or not items[i].get("image"):
                return items, gr.update()
            items = [dict(it) for it in items]
            items[i]["preprocessor"] = pre_name
            return items, _preview(ctx, items[i])

        def on_weight(items, w, te, i=i):
            """The text-encoder weight follows the UNet weight while the two are equal (A1111's one multiplier);
            once set apart, each keeps its own value (ComfyUI's strength_model / strength_clip)."""
            if i >= len(items) or w is None:
                return items, gr.update()
            items = [dict(it) for it in items]
            old = float(items[i]["weight"])
            linked = te is not None and float(te) == old
            items[i]["weight"] = float(w)
            if linked:
                items[i]["te_weight"] = float(w)
                return items, float(w)
            return items, gr.update()

        cards[i]["weight"].input(on_weight, [items_state, cards[i]["weight"], cards[i]["te_weight"]],
                                 [items_state, cards[i]["te_weight"]])
        cards[i]["preprocessor"].input(on_pre, [items_state, cards[i]["preprocessor"]], [items_state, cards[i]["preview"]])

    # -- generate / grid as Jobs -------------------------------------------------------------------------
    def start(items, fuse_on, gx, gy, grid_mode, *vals):
        n, m = len(form), len(boxes.inputs)
        form_vals, box_vals, card_vals = vals[:n], vals[n:n + m], vals[n + m:]
        items = read_items(items, card_vals)
        try:
            recipe = boxes.apply(items_to_recipe(form_values(*form_vals), items), *box_vals)
            x = parse_axis(gx) if grid_mode else None
            y = parse_axis(gy) if grid_mode and (gy or "").strip() else None
            if grid_mode and not (gx or "").strip():
                raise UserError("Set the X axis of the grid first, e.g. cfg=5,7,9.")
            session = session_for(ctx)
            work = generation_work(session, recipe, ws.root / "outputs", fuse=fuse_on, x=x, y=y)
            # Queued, not refused, while the GPU is busy (a training, another tab's generation): served in order.
            job = ctx.jobs.start("playground", "generate", work, queue=True)
        except UserError as exc:
            gr.Warning(str(exc))
            return items, gr.update(), gr.update(active=False), gr.update(), gr.update()
        # What a reload restores: the form as it ran (seed -1 stays -1 in the form; the drawn seed is in the PNG)
        # and the stack, grid axes and the fuse switch.
        ctx.settings.save("playground", {"form": recipe.to_dict(), "items": items, "grid_x": gx or "",
                                         "grid_y": gy or "", "fuse": bool(fuse_on), "last_seed": work.recipe.seed})
        return items, f"started: {job.name}", gr.update(active=True), recipe.to_toml(), job.id

    # Every edit is kept as it is made (as the Dataset and Train tabs do), so a reload before Generate loses
    # nothing either: the form (the image editor is kept when Generate writes its files), the grid, the fuse switch
    # and the stack with each card's values. A value mid-edit that is not a valid recipe yet is not kept.
    kept_names = [n for n in PAGE_FIELDS if n != "editor"]
    kept_form = [c for c, n in zip(form, PAGE_FIELDS) if n != "editor"]

    def remember(items, fuse_on, gx, gy, *vals):
        form_vals, card_vals = vals[:len(kept_form)], vals[len(kept_form):]
        try:
            f = _typed_form(dict(zip(kept_names, form_vals)))
            items = read_items(items, card_vals)
            with _SAVE_LOCK:
                saved = ctx.settings.load("playground")
                form_d = {**saved.get("form", {}), **f}
                Recipe.from_dict({k: v for k, v in form_d.items() if k in FORM_FIELDS})  # a valid recipe, or not kept
                ctx.settings.save("playground", {**saved, "form": form_d, "items": items, "grid_x": gx or "",
                                                 "grid_y": gy or "", "fuse": bool(fuse_on)})
        except (UserError, TypeError, ValueError):
            return

    gr.on([c.input for c in kept_form + [fuse, grid_x, grid_y] + card_inputs] + [items_state.change], remember,
          [items_state, fuse, grid_x, grid_y] + kept_form + card_inputs, None, show_progress="hidden",
          trigger_mode="always_last", queue=False)

    run_inputs = [items_state, fuse, grid_x, grid_y]
    job_id = gr.State("")  # this browser tab's generation (other tabs queue their own)
    go.click(lambda it, f, gx, gy, *v: start(it, f, gx, gy, False, *v), run_inputs + form_in + card_inputs,
             [items_state, status, timer, recipe_text, job_id], api_name="generate")
    grid_btn.click(lambda it, f, gx, gy, *v: start(it, f, gx, gy, True, *v), run_inputs + form_in + card_inputs,
                   [items_state, status, timer, recipe_text, job_id], api_name="generate_grid")

    def tick(shown, mine):
        job = (ctx.jobs.get(mine) if mine else None) or ctx.jobs.latest("generate")
        if job is None:
            return gr.update(active=False), gr.update(), gr.update(), gr.update(), shown
        snap = job.log.snapshot()
        session = session_for(ctx)
        prog = snap["progress"]
        text = snap["status"]
        if prog:
            text = prog[3] if prog[2] == "download" else f"{prog[3] or prog[2]} ({prog[0]}/{prog[1]})"
        end = snap["end"]
        paths = [p for ev in snap["previews"] for p in ev.paths]
        gallery_update = gr.update()
        if paths and paths != shown.get("last"):
            shown = {"last": paths, "all": (paths + shown.get("all", []))[:48]}
            gallery_update = gr.update(value=shown["all"])
        if end is not None:
            if isinstance(end, Failed):
                gr.Warning(end.message)
                text = f"failed: {end.message}"
            else:
                text = "stopped" if getattr(end, "stopped", False) else end.message
                ws.note_change()  # new outputs: the Library's gallery redraws
            return gr.update(active=False), text, session.live_preview, gallery_update, shown
        return gr.update(active=True), text, session.live_preview, gallery_update, shown

    shown_state = gr.State({})
    timer.tick(tick, [shown_state, job_id], [timer, status, live, gallery, shown_state], show_progress="hidden")

    def on_stop(mine):
        job = (ctx.jobs.get(mine) if mine else None) or ctx.jobs.latest("generate")
        if job is not None and job.running:
            job.stop()
            gr.Info("Stopping after this denoising step.")
            return "stopping..."
        gr.Info("Nothing is generating: nothing to stop.")
        return gr.update()

    stop.click(on_stop, [job_id], [status], show_progress="hidden")

    # -- seed: A1111's dice (random, -1) and recycle (the seed of the last image) ---------------------------
    dice.click(lambda: -1, None, [seed], show_progress="hidden")

    def on_reuse():
        job = ctx.jobs.latest("generate")
        last = getattr(job.work, "recipe", None) if job is not None else None
        if last is None:
            last_seed = ctx.settings.load("playground").get("last_seed")
            if last_seed is None:
                gr.Info("Generate an image first: ♻️ reuses the seed of the last one.")
                return gr.skip()
            return int(last_seed)
        return int(last.seed)

    recycle.click(on_reuse, None, [seed], show_progress="hidden")

    # -- img2img: an uploaded image sets the output's shape (same long side) ------------------------------
    def on_editor_upload(value, w, h):
        bg = (value or {}).get("background") if isinstance(value, dict) else None
        if bg is None:
            return gr.skip(), gr.skip()
        iw, ih = bg.size
        long = max(int(w or 512), int(h or 512))
        return _round8(long * iw / max(iw, ih)), _round8(long * ih / max(iw, ih))

    editor.upload(on_editor_upload, [editor, width, height], [width, height], show_progress="hidden")

    # -- the lists follow the workspace: a LoRA published anywhere shows here without "Refresh files" --------
    ctx.components["workspace.token"].change(redraw_lists, [add_kind], [add_file, base, vae], show_progress="hidden")
    if "tab.tab-playground" in ctx.components:
        ctx.components["tab.tab-playground"].select(redraw_lists, [add_kind], [add_file, base, vae],
                                                     show_progress="hidden")

    # -- recipes and PNGs ---------------------------------------------------------------------------------
    def show_recipe(recipe: Recipe) -> list:
        return page_values(recipe) + boxes.show(recipe, ws) + [recipe.to_toml()] + draw(recipe_to_items(recipe, ws))

    def save_recipe(name, items, *vals):
        n, m = len(form), len(boxes.inputs)
        try:
            recipe = boxes.apply(items_to_recipe(form_values(*vals[:n]), read_items(items, vals[n + m:])),
                                 *vals[n:n + m])
            path = recipe.save(ws.named_file("recipes", name, ".toml"))
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.update()
        gr.Info(f"Saved {ws.relative(path)}")
        return gr.update(choices=_recipe_files(ctx), value=ws.relative(path)), recipe.to_toml()

    save_btn.click(save_recipe, [recipe_name, items_state] + form_in + card_inputs, [recipe_pick, recipe_text])

    def load_recipe(path):
        try:
            recipe = Recipe.load(_places(ctx).path(path, what="recipe"))
        except UserError as exc:
            gr.Warning(str(exc))
            return [gr.update()] * (len(form_in) + 1 + len(redraw))
        return show_recipe(recipe)

    load_btn.click(load_recipe, [recipe_pick], form_in + [recipe_text] + redraw)

    def drop_png(file):
        if not file:
            return [gr.update()] * (len(form_in) + 1 + len(redraw))
        try:
            recipe = read_recipe(file)
        except UserError as exc:
            gr.Warning(str(exc))
            return [gr.update()] * (len(form_in) + 1 + len(redraw))
        gr.Info("Recipe restored from the PNG.")
        return show_recipe(recipe)

    png_drop.upload(drop_png, [png_drop], form_in + [recipe_text] + redraw)

    # On page load, the last-used form, grid axes and stack (a reload loses nothing; component defaults were fixed
    # when the app started). A generation still running reconnects through the timer.
    def on_load():
        saved = ctx.settings.load("playground")
        items = saved.get("items", [])[:MAX_ITEMS]
        try:
            recipe = Recipe.from_dict({k: v for k, v in saved.get("form", {}).items() if k in FORM_FIELDS})
            page = page_values(recipe)
        except (UserError, TypeError, ValueError):
            page = [gr.skip()] * len(form)
        job = ctx.jobs.latest("generate")
        return (page + [saved.get("grid_x", gr.skip()), saved.get("grid_y", gr.skip()),
                        bool(saved.get("fuse", True)), gr.update(active=bool(job and job.running))]
                + draw([it for it in items if isinstance(it, dict) and it.get("kind") in KIND_LABEL]))

    gr.on(None, on_load, None, form + [grid_x, grid_y, fuse, timer] + redraw, show_progress="hidden")


# The form's components in order: FORM_FIELDS with the editor in place of init_image and mask_image.
PAGE_FIELDS = tuple("editor" if f == EDITOR_FIELDS[0] else f for f in FORM_FIELDS if f != EDITOR_FIELDS[1])


def _typed_form(f: dict) -> dict:
    """The page's form values as the recipe's types (the editor, when present, is left to editor_files)."""
    f["base_model"] = (f["base_model"] or "tiny").strip()
    f["vae"] = (f["vae"] or "").strip()
    for k in ("steps", "seed", "width", "height", "batch", "clip_skip"):
        f[k] = int(f[k] or 0)
    for k in ("cfg", "strength"):
        f[k] = float(f[k])
    return f


def _round8(v: float) -> int:
    return int(min(2048, max(64, round(v / 8) * 8)))


def _editor_value(ws, init_image: str, mask_image: str):
    """The editor's value for a recipe's init image and mask: the image as background, the mask as a painted
    layer (white where it repaints, transparent elsewhere)."""
    if not init_image:
        return None
    try:
        init = ws.resolve(init_image, must_exist=True)
    except UserError:
        return None
    layers = []
    if mask_image:
        try:
            from PIL import Image

            mask = ws.resolve(mask_image, must_exist=True)
            layer = mask.with_name(mask.stem + "-layer.png")
            if not layer.is_file():
                m = Image.open(mask).convert("L")
                rgba = Image.new("RGBA", m.size, (255, 255, 255, 0))
                rgba.putalpha(m)
                rgba.save(layer)
            layers.append(str(layer))
        except (UserError, OSError):
            pass
    return {"background": str(init), "layers": layers, "composite": None}


def editor_files(ws, value, width: int, height: int) -> tuple[str, str]:
    """(init_image, mask_image) as workspace paths from the editor: the background cropped to the output's shape
    and resized (A1111's "crop and resize"), and the painted strokes as a white-on-black mask (empty: no mask,
    plain img2img). Files are named by content, so generating again writes nothing new."""
    import hashlib
    import io

    import numpy as np
    from PIL import Image, ImageOps

    if not isinstance(value, dict) or value.get("background") is None:
        return "", ""
    bg = value["background"]
    bg = bg if isinstance(bg, Image.Image) else Image.open(bg)
    size = (int(width), int(height))
    init = ImageOps.fit(bg.convert("RGB"), size, Image.Resampling.LANCZOS)
    alpha = None
    for layer in value.get("layers") or []:
        layer = layer if isinstance(layer, Image.Image) else Image.open(layer)
        a = layer.convert("RGBA").getchannel("A")
        alpha = a if alpha is None else Image.fromarray(np.maximum(np.asarray(alpha), np.asarray(a)))
    folder = ws.root / "inputs" / "playground"
    folder.mkdir(parents=True, exist_ok=True)

    def save(img, kind: str) -> str:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        path = folder / f"{kind}-{hashlib.sha1(buf.getvalue()).hexdigest()[:12]}.png"
        if not path.is_file():
            from ..formats.safe_io import atomic_write_bytes

            atomic_write_bytes(path, buf.getvalue())
        return ws.relative(path)

    mask = ""
    if alpha is not None and alpha.getextrema()[1] > 0:
        m = ImageOps.fit(alpha.resize(bg.size, Image.Resampling.NEAREST), size, Image.Resampling.NEAREST)
        mask = save(m.point(lambda v: 255 if v > 127 else 0).convert("RGB"), "mask")
    return save(init, "init"), mask


def _recipe_files(ctx: AppContext) -> list[str]:
    folder = ctx.workspace.root / "recipes"
    return [ctx.workspace.relative(p) for p in sorted(folder.glob("*.toml"))] if folder.is_dir() else []


def _preview(ctx: AppContext, item: dict):
    """The control image after its preprocessor, for the card (errors become a toast, not a crash)."""
    from ..data.images import open_rgb
    from ..playground.preprocess import preprocess

    try:
        img = open_rgb(ctx.workspace.resolve(item["image"], must_exist=True))
        img.thumbnail((256, 256))
        return preprocess(img, item.get("preprocessor") or "none", ctx.workspace.root / "models" / "annotators")
    except UserError as exc:
        gr.Warning(str(exc))
        return None
