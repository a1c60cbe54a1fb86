"""Every user-given path is confined to the workspace."""
from __future__ import annotations

import os

import pytest

from sdstudio.errors import UserError
from sdstudio.workspace import SUBDIRS, Workspace, safe_name


def test_standard_subfolders(workspace):
    for sub in SUBDIRS:
        assert (workspace.root / sub).is_dir()


def test_default_home_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "home"))
    ws = Workspace.open()
    assert ws.root == (tmp_path / "home").resolve()


def test_relative_and_absolute_inside(workspace):
    (workspace.root / "models" / "lora" / "a.safetensors").write_bytes(b"x")
    assert workspace.resolve("models/lora/a.safetensors", must_exist=True).name == "a.safetensors"
    inside_abs = str(workspace.root / "models" / "lora" / "a.safetensors")
    assert workspace.resolve(inside_abs) == workspace.root / "models" / "lora" / "a.safetensors"


@pytest.mark.parametrize("bad", ["../secret", "models/../../secret", "/etc/passwd", "~/x", "models/lora/../../.."])
def test_escapes_refused(workspace, bad):
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.resolve(bad)


def test_symlink_out_refused(workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    os.symlink(outside, workspace.root / "inputs" / "link")
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.resolve("inputs/link/secret.txt")


def test_symlink_inside_allowed(workspace):
    os.symlink(workspace.root / "models", workspace.root / "inputs" / "m")
    assert workspace.resolve("inputs/m/lora") == workspace.root / "models" / "lora"


def test_missing_and_empty(workspace):
    with pytest.raises(UserError, match="does not exist"):
        workspace.resolve("models/nope.safetensors", must_exist=True)
    with pytest.raises(UserError, match="empty"):
        workspace.resolve("  ")


def test_safe_name():
    assert safe_name("my run/../x") == "my run_.._x"
    assert "/" not in safe_name("../../etc")
    with pytest.raises(UserError):
        safe_name("...")


def test_unwritable_home_is_one_sentence(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="Cannot create the workspace"):
        Workspace.open(f / "ws")
