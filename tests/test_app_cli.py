"""app.py's arguments: loopback by default, auth parsing, and a bad home is one line, not a traceback."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def _load_app_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdstudio_app", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_loopback():
    args = _load_app_module().parse_args([])
    assert (args.host, args.port, args.auth) == ("127.0.0.1", 7860, None)


def test_bad_auth_and_home_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--home", str(f / "ws"), "--no-browser"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: Cannot create the workspace")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--home", str(tmp_path / "ws"), "--auth", "nopass",
                        "--no-browser"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "user:password" in r.stderr


def test_cli_user_error_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdstudio", "tiny-model"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # argparse: missing OUT


def test_building_the_ui_loads_no_model(tmp_path, monkeypatch):
    """Start-up must not load (or even build) any model: the first click answers within a second."""
    monkeypatch.setenv("SDSTUDIO_CACHE", str(tmp_path / "cache"))
    from sdstudio.models.cache import ModelCache
    from sdstudio.ui.app import build_ui
    from sdstudio.ui.context import AppContext
    from sdstudio.workspace import Workspace

    ctx = AppContext(workspace=Workspace.open(tmp_path / "ws"), cache=ModelCache())
    demo = build_ui(ctx)
    assert demo is not None
    assert ctx.cache.loads == 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
