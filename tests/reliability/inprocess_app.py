"""The real app served in this process, as app.py serves it (sdstudio.ui.server.launch), so that a test can reach
both its HTTP routes and its insides (the AppContext's jobs, the route table)."""
from __future__ import annotations

from dataclasses import dataclass

from conftest import _free_port


@dataclass
class ServedApp:
    ctx: object  # the AppContext behind the UI
    url: str
    app: object  # Gradio's FastAPI app
    demo: object

    def close(self) -> None:
        self.demo.close()


def serve(workspace, auth: tuple[str, str] | None = None) -> ServedApp:
    from sdstudio.ui.app import build_ui
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.server import launch

    ctx = AppContext(workspace=workspace)
    demo = build_ui(ctx)
    demo.queue(default_concurrency_limit=4)  # as app.py
    port = _free_port()
    app, _url, _ = launch(demo, host="127.0.0.1", port=port, auth=auth, workspace_root=str(workspace.root),
                          inbrowser=False, prevent_thread_lock=True, quiet=True)
    return ServedApp(ctx, f"http://127.0.0.1:{port}", app, demo)
