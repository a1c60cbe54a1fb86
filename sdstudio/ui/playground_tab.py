"""The Playground tab. (Placeholder until its issue lands: the owner replaces this module.)"""
from __future__ import annotations

import gradio as gr

from .context import AppContext


def build(ctx: AppContext) -> None:
    gr.Markdown("The Playground tab is being built.", elem_id="playground-placeholder")
