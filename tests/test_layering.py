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


def _module_graph() -> dict[str, set[str]]:
    """{module: the sdstudio modules it imports}, every import counted (also those inside functions)."""
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts[:-1] if p.name == "__init__.py"
                     else p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "sdstudio").rglob("*.py")}

    def known(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                names = [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = known(name) if name.startswith("sdstudio") else ""
                if target and target != mod and not mod.startswith(target + "."):  # a package's own face
                    graph[mod].add(target)
    return graph


def test_playground_never_imports_methods():
    """playground/ stacks what methods/ make through formats/ and concepts/, never through methods/."""
    graph = _module_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("sdstudio.methods"))
                 for m, ts in graph.items() if m.startswith("sdstudio.playground")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_module_imports_in_a_circle():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
