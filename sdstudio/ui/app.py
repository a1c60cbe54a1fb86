"""The Gradio app: four tabs over one AppContext. Gradio lives in sdstudio/ui/ and nowhere else."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import dataset_boxes_panel, dataset_tab, fusion_panel, library_tab, playground_tab, quick_tab, train_tab
from .context import AppContext

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
CSS_FILE = Path(__file__).resolve().parent / "style.css"

# (tab label, elem_id, modules). Each module has build(ctx) and may have wire(ctx), which runs after every tab
# is built so that a tab can drive another tab's components. A tab may stack several modules (sections).
TABS = [
    ("Quick", "tab-quick", quick_tab),
    ("Dataset", "tab-dataset", (dataset_tab, dataset_boxes_panel)),
    ("Train", "tab-train", (train_tab, fusion_panel)),
    ("Playground", "tab-playground", playground_tab),
    ("Library", "tab-library", library_tab),
]


def build_ui(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="SD Studio", analytics_enabled=False) as demo:
        with gr.Row(elem_id="header"):
            gr.Markdown("## SD Studio", elem_id="title")
            gr.Markdown(f"workspace: `{ctx.workspace.root}`", elem_id="workspace-path")
        with gr.Tabs(elem_id="tabs") as tabs:
            ctx.components["tabs"] = tabs
            for label, elem_id, modules in TABS:
                with gr.Tab(label, id=elem_id, elem_id=elem_id):
                    for module in _as_tuple(modules):
                        module.build(ctx)
        for _label, _id, modules in TABS:
            for module in _as_tuple(modules):
                if hasattr(module, "wire"):
                    module.wire(ctx)
    return demo


def _as_tuple(modules) -> tuple:
    return modules if isinstance(modules, tuple) else (modules,)


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", radius_size="sm")


def css() -> str:
    return CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.is_file() else ""
