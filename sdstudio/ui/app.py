"""The Gradio app: four tabs over one AppContext. Gradio lives in sdstudio/ui/ and nowhere else."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import (dataset_boxes_panel, dataset_tab, fusion_panel, library_models, library_tab, playground_tab, quick_tab,
               train_tab)
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
    ("Library", "tab-library", (library_tab, library_models)),
]


WATCH_SECONDS = 1.0  # how often each open page asks whether the workspace changed (one stat per ask)
RUNS_SECONDS = 5  # while a run trains, runs tables redraw this often (steps done, last loss)


def build_ui(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="SD Studio", analytics_enabled=False) as demo:
        # One source of truth for what is on disk: the workspace's change counter, watched here once for every
        # tab. Pickers, tables and galleries redraw on `workspace.token` changes (something was published,
        # imported, trained, generated); runs tables also on `runs.token`, which ticks while a run trains.
        # Two hidden textboxes, first on the page: the browser finds a poll's outputs by walking the component
        # tree, and a gr.State (not in the tree) costs a walk of all of it on every poll.
        with gr.Row(elem_classes=["sd-hidden"]):
            ctx.components["workspace.token"] = gr.Textbox(str(ctx.workspace.change_token()), container=False,
                                                           elem_id="workspace-token", elem_classes=["sd-hidden"])
            ctx.components["runs.token"] = gr.Textbox("0", container=False, elem_id="runs-token",
                                                      elem_classes=["sd-hidden"])
        with gr.Row(elem_id="header"):
            gr.Markdown("## SD Studio", elem_id="title")
            gr.Markdown(f"workspace: `{ctx.workspace.root}`", elem_id="workspace-path")
        with gr.Tabs(elem_id="tabs") as tabs:
            ctx.components["tabs"] = tabs
            for label, elem_id, modules in TABS:
                with gr.Tab(label, id=elem_id, elem_id=elem_id) as tab:
                    # A tab's content mounts when it is first shown, and a hidden, never-shown tab misses the
                    # redraws above: each tab also redraws its lists when selected (ctx.components["tab.<id>"]).
                    ctx.components[f"tab.{elem_id}"] = tab
                    for module in _as_tuple(modules):
                        module.build(ctx)
        for _label, _id, modules in TABS:
            for module in _as_tuple(modules):
                if hasattr(module, "wire"):
                    module.wire(ctx)
        _watch(ctx)
    return demo


def _watch(ctx: AppContext) -> None:
    """The page's one always-on timer: it reads the change counter (one stat) and, while a run trains, a clock;
    the states change only when they do, and each tab's refresh hangs off their .change."""
    import time

    token, runs = ctx.components["workspace.token"], ctx.components["runs.token"]
    timer = gr.Timer(WATCH_SECONDS, active=True)

    def poll(old_token, old_runs):
        new_token = str(ctx.workspace.change_token())
        training = any(j.kind in ("train", "quick") for j in ctx.jobs.running())
        new_runs = str(int(time.time() // RUNS_SECONDS)) if training else old_runs
        return (new_token if new_token != old_token else gr.skip(),
                new_runs if new_runs != old_runs else gr.skip())

    # Outside the queue: a plain request per tick, no queue bookkeeping streamed to the page.
    timer.tick(poll, [token, runs], [token, runs], show_progress="hidden", queue=False)


def _as_tuple(modules) -> tuple:
    return modules if isinstance(modules, tuple) else (modules,)


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", radius_size="sm")


def css() -> str:
    return CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.is_file() else ""
