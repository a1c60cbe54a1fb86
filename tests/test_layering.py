"""The core never imports gradio: nothing outside sdstudio/ui/ may, so everything runs headless."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_gradio_outside_ui():
    offenders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "sdstudio").rglob("*.py")
                 if "ui" not in p.relative_to(ROOT / "sdstudio").parts[:1] and "gradio" in _imports(p)]
    assert offenders == []


def test_core_imports_without_gradio():
    """Import every core module in a fresh interpreter that cannot import gradio at all."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "sdstudio").rglob("*.py")
        if p.relative_to(ROOT / "sdstudio").parts[0] != "ui" and p.name != "__main__.py")
    code = ("import sys, importlib\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'gradio' or name.startswith('gradio.'): raise ImportError('gradio is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('ok', len(%r))\n" % (modules,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_eval_or_unsafe_torch_load():
    for p in (ROOT / "sdstudio").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                    raise AssertionError(f"{p}: {f.id}() call")
                if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                        f"{p}:{node.lineno} torch.load without weights_only=True"
