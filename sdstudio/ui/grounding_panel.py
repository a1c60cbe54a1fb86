"""The Playground's Boxes panel: GLIGEN phrases and Mix-of-Show regions, drawn on one canvas.

A "GLIGEN phrase" box becomes a `[[grounding]]` item (the phrase is drawn there by the gated layers of a GLIGEN
model: the base's own, or a module file from models/gligen applied to the base); a "Region prompt" box becomes a
`[[region]]` item (its prompt rules the cross-attention inside the box). The tab calls `apply` when it builds a
recipe and `show` when it loads one; everything else (the GLIGEN model list, the backdrop, the last boxes kept in
the workspace settings) stays here.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..errors import UserError
from ..library import scan_models
from ..playground.recipe import GroundingItem, Recipe, RegionItem
from .box_editor import box_editor, editor_value, image_data_url, read_boxes
from .context import AppContext

KINDS = [("grounding", "GLIGEN phrase"), ("region", "Region prompt")]
OWN = "(the base's own GLIGEN layers)"
SETTINGS = "playground-boxes"


def gligen_choices(ctx: AppContext) -> list[tuple[str, str]]:
    return [(OWN, "")] + [(m.path, m.path) for m in scan_models(ctx.workspace) if m.kind == "gligen"]


def recipe_boxes(recipe: Recipe, ws=None) -> list[dict]:
    """A recipe's grounding and region items as editor boxes (a region's other settings ride in `extra`)."""
    boxes = [{"kind": "grounding", "label": g.phrase, "box": list(g.box), "enabled": g.enabled, "extra": {}}
             for g in recipe.grounding]
    for r in recipe.region:
        extra = {"negative_prompt": r.negative_prompt}
        if r.t2i_weight is not None:
            extra["t2i_weight"] = r.t2i_weight
        box = list(r.fractions(recipe.width, recipe.height))  # a Mix-of-Show pixel box, as fractions
        boxes.append({"kind": "region", "label": r.prompt, "box": box, "enabled": r.enabled, "extra": extra})
    return boxes


def apply_boxes(recipe: Recipe, value, gligen: str | None, fraction) -> Recipe:
    """The recipe with the editor's boxes as its [[grounding]] and [[region]] items, and the GLIGEN settings."""
    grounding, regions = [], []
    for i, b in enumerate(read_boxes(value, {k for k, _ in KINDS}), 1):
        if not b["label"]:
            what = "phrase" if b["kind"] == "grounding" else "prompt"
            raise UserError(f"Box {i} has no label: click it and type its {what}.")
        if b["kind"] == "grounding":
            grounding.append(GroundingItem(b["label"], b["box"], enabled=b["enabled"]))
        else:
            extra = b["extra"]
            t2i = extra.get("t2i_weight")
            regions.append(RegionItem(b["label"], negative_prompt=str(extra.get("negative_prompt") or ""),
                                      box=b["box"], box_format="fractions",
                                      t2i_weight=float(t2i) if isinstance(t2i, (int, float)) else None,
                                      enabled=b["enabled"]))
    out = recipe.replace(grounding=grounding, region=regions, gligen=(gligen or "").strip(),
                         grounding_fraction=float(fraction if fraction is not None else 0.3))
    out.validate()
    return out


@dataclass
class BoxesPanel:
    editor: gr.HTML
    gligen: gr.Dropdown
    fraction: gr.Slider

    @property
    def inputs(self) -> list:
        return [self.editor, self.gligen, self.fraction]

    outputs = inputs

    def apply(self, recipe: Recipe, value, gligen, fraction) -> Recipe:
        return apply_boxes(recipe, value, gligen, fraction)

    def show(self, recipe: Recipe, ws) -> list:
        value = editor_value(recipe_boxes(recipe), width=recipe.width, height=recipe.height, kinds=KINDS)
        gligen = recipe.gligen if recipe.gligen in ("", None) else ws.relative(recipe.gligen)
        return [value, gr.update(value=gligen or ""), recipe.grounding_fraction]


def build(ctx: AppContext, width: gr.Slider, height: gr.Slider, last_image) -> BoxesPanel:
    """The panel, inside the current layout. `last_image()` gives the latest generated image (PIL) or None."""
    saved = ctx.settings.load(SETTINGS)
    with gr.Accordion("Boxes: GLIGEN phrases and regions", open=bool(saved.get("boxes")),
                      elem_id="playground-boxes") as accordion:
        gr.Markdown("Draw boxes on the picture. A **GLIGEN phrase** is drawn in its box by a GLIGEN model; a "
                    "**region prompt** rules its box (Mix-of-Show regions).", elem_classes=["hint"])
        with gr.Row():
            gligen = gr.Dropdown(gligen_choices(ctx), value=saved.get("gligen", ""), label="GLIGEN model",
                                 allow_custom_value=True, elem_id="playground-gligen", scale=3)
            fraction = gr.Slider(0, 1, value=float(saved.get("fraction", 0.3)), step=0.05,
                                 label="Boxes steer the first part of the steps", elem_id="playground-grounding-steps",
                                 scale=2)
        editor = box_editor(editor_value(saved.get("boxes", []), width=int(saved.get("width", 512)),
                                         height=int(saved.get("height", 512)), kinds=KINDS),
                            elem_id="playground-box-editor")
        with gr.Row():
            backdrop = gr.Button("Show the last image behind the boxes", size="sm", elem_id="playground-boxes-backdrop")
            clear = gr.Button("Remove all boxes", size="sm", elem_id="playground-boxes-clear")
    panel = BoxesPanel(editor, gligen, fraction)

    def remember(value, gl, frac):
        boxes = read_boxes(value)
        ctx.settings.save(SETTINGS, {"boxes": [dict(b, box=list(b["box"])) for b in boxes], "gligen": gl or "",
                                     "fraction": frac, "width": (value or {}).get("width", 512),
                                     "height": (value or {}).get("height", 512)})

    for comp in panel.inputs:
        comp.change(remember, panel.inputs, None, show_progress="hidden", queue=False)

    def resize(value, w, h):
        value = dict(value or editor_value([], kinds=KINDS))
        value.update(width=int(w or 512), height=int(h or 512))
        return value

    width.change(resize, [editor, width, height], [editor], show_progress="hidden")
    height.change(resize, [editor, width, height], [editor], show_progress="hidden")

    def show_backdrop(value):
        img = last_image()
        if img is None:
            gr.Info("Generate an image first: it then shows behind the boxes.")
            return gr.update()
        return dict(value or editor_value([], kinds=KINDS), image=image_data_url(img))

    backdrop.click(show_backdrop, [editor], [editor])
    clear.click(lambda v: dict(v or editor_value([], kinds=KINDS), boxes=[], selected=-1), [editor], [editor])
    accordion.expand(lambda: gr.update(choices=gligen_choices(ctx)), None, [gligen], show_progress="hidden")
    return panel
