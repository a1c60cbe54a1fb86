"""Open SD Studio in the browser: parse --host/--port/--auth/--home, build the UI, launch. Nothing else."""
from __future__ import annotations

import argparse
import os
import sys

# Before gradio is imported: no analytics, no telemetry, no outside requests.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SD Studio: fine-tune and mix Stable Diffusion in your browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; binding all interfaces exposes it to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--home", default=None, help="workspace folder (default ./workspace or $SDSTUDIO_HOME)")
    p.add_argument("--models-from", action="append", default=[], metavar="DIR",
                   help="also list the models of an A1111, Forge or ComfyUI folder in the pickers (read-only; "
                        "repeatable)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sdstudio.errors import UserError
    from sdstudio.workspace import Workspace

    try:
        ws = Workspace.open(args.home)
        os.environ["SDSTUDIO_HOME"] = str(ws.root)  # what the core's default workspace is in this process
        if args.models_from:
            from sdstudio.models.refs import set_models_from

            set_models_from(args.models_from)
        auth = None
        if args.auth:
            user, sep, password = args.auth.partition(":")
            if not sep or not user or not password:
                raise UserError("--auth must look like user:password.")
            auth = (user, password)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from sdstudio.ui.app import build_ui, css, theme
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.server import launch

    demo = build_ui(AppContext(workspace=ws))
    demo.queue(default_concurrency_limit=4)
    print(f"SD Studio: workspace {ws.root}", flush=True)
    launch(demo, host=args.host, port=args.port, auth=auth, workspace_root=str(ws.root),
           inbrowser=not args.no_browser and not os.environ.get("CI"), theme=theme(), css=css(), footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
