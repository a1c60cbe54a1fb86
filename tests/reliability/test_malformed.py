"""Malformed inputs, one table: images, zips, config TOML, recipes, prompts, LoRA / embedding / ControlNet
files, and the values a UI form sends. Each row is one kind of bad input and what must happen to it:

- "error":    one UserError sentence (one line, no traceback), and no file written anywhere;
- "reported": the input is refused piece by piece with a reason (a zip's bad entries), and nothing lands
              outside the folder it was extracted into;
- "ok":       it is not really an error (a 10,000-token prompt): it works.

For every row, nothing may be written outside the workspace. The table is the count: `len(CASES)` kinds.
Playground rows run through a real session on the tiny model whose paths are confined to the workspace, as the
UI's are; the session must keep working after each bad file.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from sdstudio.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MARKER = "PAYLOAD-RAN"


# -- building blocks ----------------------------------------------------------------------------------------------

@dataclass
class Env:
    """What a row's builder gets: the workspace, a folder for inputs outside it, and a Playground session."""

    ws: object
    inputs: Path
    session: object

    @property
    def marker(self) -> Path:
        return self.inputs.parent / MARKER


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def png_bytes(size=(64, 64), mode="RGB", **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "I;16") else (120, 90, 60)[: len(mode)] if mode != "CMYK" else (1, 2, 3, 4)
              ).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def huge_png_header() -> bytes:
    """A well-formed 300-byte PNG that declares 100,000 x 100,000 pixels (a decompression bomb)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def image(data: bytes, name: str = "x.png"):
    """Both readers of user images: the dataset's inspector records a reason; open_rgb raises the sentence."""
    def build(env: Env):
        p = env.inputs / name
        p.write_bytes(data)

        def act():
            from sdstudio.data.images import inspect_image, open_rgb

            info = inspect_image(p)
            assert info.error and "\n" not in info.error, info
            open_rgb(p)
        return act
    return build


def image_ok(data: bytes, name: str = "x.png"):
    def build(env: Env):
        p = env.inputs / name
        p.write_bytes(data)

        def act():
            from sdstudio.data.images import inspect_image, open_rgb

            info = inspect_image(p)
            assert not info.error and info.notes, info  # kept, with a note saying what was converted
            assert open_rgb(p).mode == "RGB"
        return act
    return build


def zip_of(entries: list, declared: dict | None = None, links: tuple = ()):
    """A zip with (name, bytes) entries; `links` are symlink entries; `declared` fakes entry sizes."""
    def build(env: Env):
        p = env.inputs / "photos.zip"
        with zipfile.ZipFile(p, "w") as z:
            for name, data in entries:
                z.writestr(name, data)
            for name in links:
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                z.writestr(info, "/etc/passwd")
        if declared:
            raw = bytearray(p.read_bytes())
            for name, size in declared.items():  # patch the central directory's uncompressed size
                at = raw.rfind(name.encode()) - 46 + 24
                raw[at:at + 4] = struct.pack("<I", size)
            p.write_bytes(bytes(raw))

        def act():
            from sdstudio.data.images import safe_extract_zip

            dest = env.ws.root / "inputs" / "from-zip"
            _written, skipped = safe_extract_zip(p, dest)
            assert skipped, "a dangerous entry was not reported"
        return act
    return build


def raw_file(data: bytes, name: str):
    def build(env: Env):
        p = env.inputs / name
        p.write_bytes(data)

        def act():
            from sdstudio.data.images import safe_extract_zip

            safe_extract_zip(p, env.ws.root / "inputs" / "from-zip")
        return act
    return build


def config(text: str | bytes):
    def build(env: Env):
        p = env.inputs / "train.toml"
        p.write_bytes(text.encode() if isinstance(text, str) else text)

        def act():
            from sdstudio.train.config import load_config

            load_config(p)
        return act
    return build


def recipe(text: str):
    def build(env: Env):
        p = env.inputs / "recipe.toml"
        p.write_text(text)

        def act():
            from sdstudio.playground.recipe import Recipe

            Recipe.load(p)
        return act
    return build


BASE = dict(steps=1, width=64, height=64, sampler="euler", seed=1)


def prompt(text: str, negative: str = ""):
    def build(env: Env):
        def act():
            from sdstudio.playground.recipe import Recipe

            images = env.session.run(Recipe(prompt=text, negative_prompt=negative, **BASE))
            assert np.asarray(images[0]).std() > 0, "a blank image (NaN in the conditioning?)"
        return act
    return build


def _kohya_lora(comps, scale=0.1) -> dict:
    from sdstudio.formats.kinds import kohya_names_for

    sd, g = {}, torch.Generator().manual_seed(0)
    for name, path in list(kohya_names_for(comps.unet, "unet").items())[:8]:
        mod = comps.unet.get_submodule(path)
        if isinstance(mod, torch.nn.Linear):
            sd[f"{name}.lora_down.weight"] = torch.randn(4, mod.in_features, generator=g) * scale
            sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, 4, generator=g) * scale
            sd[f"{name}.alpha"] = torch.tensor(4.0)
    return sd


def _first(sd: dict, suffix: str) -> str:
    return next(k for k in sd if k.endswith(suffix))


def lora_file(make: Callable[[dict, Env], object], suffix: str = ".safetensors"):
    """A file in models/lora made by `make(good_state_dict, env)` (a dict to save, or bytes to write)."""
    def build(env: Env):
        from sdstudio.formats.safe_io import save_safetensors

        name = env.inputs.name + suffix  # one file per row: the session keeps what it loaded by path
        p = env.ws.root / "models" / "lora" / name
        content = make(_kohya_lora(_plain()), env)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".pt"):
            torch.save(content, p)
        else:
            save_safetensors(content, p)

        def act():
            from sdstudio.playground.recipe import LoraItem, Recipe

            env.session.run(Recipe(prompt="a cat", lora=[LoraItem(f"models/lora/{name}", 0.8)], **BASE))
        return act
    return build


_PLAIN = {}


def _plain():
    if "c" not in _PLAIN:
        from sdstudio.models.loading import load_base

        _PLAIN["c"] = load_base("tiny")
    return _PLAIN["c"]


def _good_bytes(sd) -> bytes:
    from safetensors.torch import save

    return save(sd)


def embedding_file(make: Callable[[Env], object], suffix: str = ".safetensors", token: str = "<bad>"):
    def build(env: Env):
        from sdstudio.formats.safe_io import save_safetensors

        name = env.inputs.name + suffix
        p = env.ws.root / "models" / "embeddings" / name
        content = make(env)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".pt"):
            torch.save(content, p)
        else:
            save_safetensors(content, p)

        def act():
            from sdstudio.playground.recipe import EmbeddingItem, Recipe

            env.session.run(Recipe(prompt=f"a photo of {token}", embedding=[EmbeddingItem(f"models/embeddings/{name}",
                                                                                        token)], **BASE))
        return act
    return build


def controlnet_folder(damage: Callable[[Path], None] | None = None, single_file: bool = False):
    """A real ControlNet for the tiny base (ControlNetModel.from_unet), damaged by `damage(folder)`."""
    def build(env: Env):
        import shutil

        from PIL import Image

        pristine = env.inputs.parent / "controlnet-pristine"
        if not pristine.exists():
            from diffusers import ControlNetModel

            ControlNetModel.from_unet(_plain().unet).save_pretrained(pristine)
        folder = env.ws.root / "models" / "controlnet" / env.inputs.name
        shutil.copytree(pristine, folder)
        if damage:
            damage(folder)
        Image.new("RGB", (64, 64), (255, 255, 255)).save(env.ws.root / "inputs" / "control.png")
        target = f"models/controlnet/{env.inputs.name}" + ("/diffusion_pytorch_model.safetensors" if single_file else "")

        def act():
            from sdstudio.playground.recipe import ControlNetItem, Recipe

            env.session.run(Recipe(prompt="a cat", controlnet=[ControlNetItem(target, image="inputs/control.png")],
                                   **BASE))
        return act
    return build


def _cn_config(change: dict):
    def damage(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(change)
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


def _cn_truncate(folder: Path):
    p = folder / "diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _cn_nan(folder: Path):
    from safetensors.torch import load_file, save_file

    p = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(p)
    k = next(k for k in sd if k.endswith("weight"))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, p)


def _cn_pickle(env_marker: Path):
    def damage(folder: Path):
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        torch.save({"x": Payload(env_marker)}, folder / "diffusion_pytorch_model.bin")
    return damage


def ui(action: Callable[[Env], None], setup: Callable[[Env], None] | None = None):
    def build(env: Env):
        if setup:
            setup(env)
        return lambda: action(env)
    return build


def _start_run(env: Env, **values):
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.train_tab import start_run

    ctx = AppContext(env.ws)
    base = {"method": "lora", "base_model": "tiny", "dataset": "datasets/ds", "output_name": "run", "resolution": 64,
            "max_steps": 1, "device": "cpu"}
    try:
        start_run(ctx, {**base, **values}, None)
    finally:
        for job in ctx.jobs.running():
            job.stop()
            job.join(120)
        assert not ctx.jobs.running()
    raise AssertionError("the run started")


def _outside_folder(env: Env) -> Path:
    d = env.inputs / "outside-folder"
    d.mkdir(exist_ok=True)
    return d


# -- the corpus ---------------------------------------------------------------------------------------------------

TOML_OK = 'method = "lora"\nbase_model = "tiny"\n'
RECIPE_OK = 'prompt = "a cat"\n'
LONG_PROMPT = " ".join(f"word{i % 500}" for i in range(10_000))

CASES: list[tuple[str, str, str, Callable]] = [
    # id                          area         expect      builder
    ("png-empty",                 "image",     "error",    image(b"")),
    ("png-truncated",             "image",     "error",    image(png_bytes((256, 256))[:300])),
    ("jpg-that-is-text",          "image",     "error",    image(b"just some text, not a picture\n" * 10, "x.jpg")),
    ("png-that-is-html",          "image",     "error",    image(b"<html><body>404 Not Found</body></html>")),
    ("png-decompression-bomb",    "image",     "error",    image(huge_png_header())),
    ("jpeg-corrupt-body",         "image",     "error",    image(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "x.jpg")),
    ("webp-truncated",            "image",     "error",    image(png_bytes(format="WEBP")[:40], "x.webp")),
    ("gif-header-only",           "image",     "error",    image(b"GIF89a\x40\x00\x40\x00", "x.gif")),
    ("svg-as-image",              "image",     "error",    image(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "x.png")),
    ("png-16-bit",                "image",     "ok",       image_ok(png_bytes(mode="I;16"))),
    ("jpeg-cmyk",                 "image",     "ok",       image_ok(png_bytes(mode="CMYK", format="JPEG"), "x.jpg")),
    ("zip-not-a-zip",             "zip",       "error",    raw_file(b"PK\x03\x04 not really", "photos.zip")),
    ("zip-truncated",             "zip",       "error",    raw_file(b"PK\x05\x06" + b"\0" * 5, "photos.zip")),
    ("zip-dotdot-entry",          "zip",       "reported", zip_of([("../../../../escaped.png", png_bytes())])),
    ("zip-absolute-entry",        "zip",       "reported", zip_of([("/tmp/abs-escaped.png", png_bytes())])),
    ("zip-backslash-dotdot",      "zip",       "reported", zip_of([("..\\..\\..\\escaped.png", png_bytes())])),
    ("zip-drive-letter",          "zip",       "reported", zip_of([("C:/escaped.png", png_bytes())])),
    ("zip-symlink-entry",         "zip",       "reported", zip_of([("ok.png", png_bytes())], links=("link.png",))),
    ("zip-bomb-declared-size",    "zip",       "error",    zip_of([("a.png", b"x" * 100), ("b.png", b"y" * 100)],
                                                                  declared={"a.png": 0xFFFFFFF0, "b.png": 0xFFFFFFF0})),
    ("zip-too-many-entries",      "zip",       "error",    zip_of([(f"{i}.txt", b"") for i in range(10_001)])),
    ("config-not-toml",           "config",    "error",    config("this is = = not toml [")),
    ("config-binary-garbage",     "config",    "error",    config(bytes(range(256)) * 2)),
    ("config-unknown-key",        "config",    "error",    config(TOML_OK + "learning_rat = 1e-4\n")),
    ("config-wrong-type",         "config",    "error",    config(TOML_OK + 'max_steps = "lots"\n')),
    ("config-lr-nan",             "config",    "error",    config(TOML_OK + "learning_rate = nan\n")),
    ("config-lr-inf",             "config",    "error",    config(TOML_OK + "learning_rate = inf\n")),
    ("config-ema-decay-nan",      "config",    "error",    config(TOML_OK + "ema = true\nema_decay = nan\n")),
    ("config-negative-steps",     "config",    "error",    config(TOML_OK + "max_steps = -5\n")),
    ("config-resolution-65",      "config",    "error",    config(TOML_OK + "resolution = 65\n")),
    ("config-name-traversal",     "config",    "error",    config(TOML_OK + 'output_name = "../../x"\n')),
    ("config-future-schema",      "config",    "error",    config(TOML_OK + "schema_version = 99\n")),
    ("config-unknown-method",     "config",    "error",    config('method = "nope"\n')),
    ("config-unknown-table",      "config",    "error",    config(TOML_OK + "[lorra]\nrank = 4\n")),
    ("config-huge-number",        "config",    "error",    config(TOML_OK + 'max_steps = "1e400"\n')),
    ("config-fraction-batch",     "config",    "error",    config(TOML_OK + "batch_size = 1.5\n")),
    ("config-prompts-not-list",   "config",    "error",    config(TOML_OK + "sample_prompts = 5\n")),
    ("config-method-nan",         "config",    "error",    config(TOML_OK + "[lora]\nalpha = nan\n")),
    ("recipe-not-toml",           "recipe",    "error",    recipe("prompt = 'unclosed")),
    ("recipe-unknown-key",        "recipe",    "error",    recipe(RECIPE_OK + "cgf = 7\n")),
    ("recipe-cfg-nan",            "recipe",    "error",    recipe(RECIPE_OK + "cfg = nan\n")),
    ("recipe-steps-zero",         "recipe",    "error",    recipe(RECIPE_OK + "steps = 0\n")),
    ("recipe-width-65",           "recipe",    "error",    recipe(RECIPE_OK + "width = 65\n")),
    ("recipe-lora-no-path",       "recipe",    "error",    recipe(RECIPE_OK + "[[lora]]\nweight = 1.0\n")),
    ("recipe-weight-inf",         "recipe",    "error",    recipe(RECIPE_OK + '[[lora]]\npath = "a"\nweight = inf\n')),
    ("recipe-start-after-end",    "recipe",    "error",    recipe(RECIPE_OK + '[[lora]]\npath = "a"\nstart = 0.8\nend = 0.2\n')),
    ("recipe-box-outside",        "recipe",    "error",    recipe(RECIPE_OK + '[[region]]\nprompt = "r"\nbox = [0.5, 0, 1.5, 1]\n')),
    ("recipe-blocks-words",       "recipe",    "error",    recipe(RECIPE_OK + '[[lora]]\npath = "a"\nblocks = "one,two"\n')),
    ("recipe-items-not-tables",   "recipe",    "error",    recipe(RECIPE_OK + "lora = 5\n")),
    ("recipe-mask-no-init",       "recipe",    "error",    recipe(RECIPE_OK + 'mask_image = "m.png"\n')),
    ("recipe-seed-text",          "recipe",    "error",    recipe(RECIPE_OK + 'seed = "x"\n')),
    ("recipe-batch-1000",         "recipe",    "error",    recipe(RECIPE_OK + "batch = 1000\n")),
    ("recipe-t2i-weight-nan",     "recipe",    "error",    recipe(RECIPE_OK + '[[region]]\nprompt = "r"\nt2i_weight = nan\n')),
    ("prompt-10000-tokens",       "prompt",    "ok",       prompt(LONG_PROMPT, negative="blurry")),
    ("prompt-control-chars",      "prompt",    "ok",       prompt("a\x00 cat\x1b[31m red\x07\r\n\ttail\x7f")),
    ("prompt-unbalanced",         "prompt",    "ok",       prompt("((((a cat [[[ ]]]]] ) (dog:")),
    ("prompt-weight-dots",        "prompt",    "ok",       prompt("a (cat:...) and (dog:1.2.3)")),
    ("prompt-weight-overflow",    "prompt",    "ok",       prompt("a (cat:" + "9" * 400 + ")")),
    ("prompt-unicode-emoji",      "prompt",    "ok",       prompt("猫 🐱 \u202e\ufeff zalgo c\u0336a\u0336t")),
    ("prompt-missing-lora-tag",   "prompt",    "error",    prompt("a cat <lora:not-there:0.8>")),
    ("lora-truncated",            "lora",      "error",    lora_file(lambda sd, e: _good_bytes(sd)[:len(_good_bytes(sd)) // 2])),
    ("lora-header-too-short",     "lora",      "error",    lora_file(lambda sd, e: b"\x10\x00")),
    ("lora-header-length-huge",   "lora",      "error",    lora_file(lambda sd, e: struct.pack("<Q", 10**15) + b"{}")),
    ("lora-header-not-json",      "lora",      "error",    lora_file(lambda sd, e: struct.pack("<Q", 9) + b"not json!")),
    ("lora-empty-file",           "lora",      "error",    lora_file(lambda sd, e: b"")),
    ("lora-wrong-shapes",         "lora",      "error",    lora_file(lambda sd, e: {**sd, _first(sd, "lora_down.weight"): torch.randn(4, 7)})),
    ("lora-another-family",       "lora",      "error",    lora_file(lambda sd, e: {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 4)})),
    ("lora-nan-tensor",           "lora",      "error",    lora_file(lambda sd, e: {**sd, _first(sd, "lora_up.weight"): torch.full_like(sd[_first(sd, "lora_up.weight")], float("nan"))})),
    ("lora-inf-alpha",            "lora",      "error",    lora_file(lambda sd, e: {**sd, _first(sd, "alpha"): torch.tensor(float("inf"))})),
    ("lora-rank-zero",            "lora",      "error",    lora_file(lambda sd, e: {**sd, _first(sd, "lora_down.weight"): torch.zeros(0, sd[_first(sd, "lora_down.weight")].shape[1]), _first(sd, "lora_up.weight"): torch.zeros(sd[_first(sd, "lora_up.weight")].shape[0], 0)})),
    ("lora-no-known-keys",        "lora",      "error",    lora_file(lambda sd, e: {"model.something.weight": torch.randn(3, 3)})),
    ("lora-pickle-payload",       "lora",      "error",    lora_file(lambda sd, e: {"x": Payload(e.marker)}, ".pt")),
    ("embedding-truncated",       "embedding", "error",    embedding_file(lambda e: _good_bytes({"emb_params": torch.randn(2, 32)})[:60])),
    ("embedding-another-family",  "embedding", "error",    embedding_file(lambda e: {"emb_params": torch.randn(2, 768)})),
    ("embedding-sdxl-on-sd1",     "embedding", "error",    embedding_file(lambda e: {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)})),
    ("embedding-nan-vectors",     "embedding", "error",    embedding_file(lambda e: {"emb_params": torch.full((2, 32), float("nan"))})),
    ("embedding-no-vectors",      "embedding", "error",    embedding_file(lambda e: {"emb_params": torch.zeros(0, 32)})),
    ("embedding-unknown-layout",  "embedding", "error",    embedding_file(lambda e: {"a": torch.randn(2, 32), "b": torch.randn(2, 32)})),
    ("embedding-pt-empty-param",  "embedding", "error",    embedding_file(lambda e: {"string_to_param": {}}, ".pt")),
    ("embedding-pickle-payload",  "embedding", "error",    embedding_file(lambda e: {"string_to_param": {"*": torch.randn(1, 32)}, "x": Payload(e.marker)}, ".pt")),
    ("controlnet-no-config",      "controlnet", "error",   controlnet_folder(lambda f: (f / "config.json").unlink())),
    ("controlnet-not-a-controlnet", "controlnet", "error", controlnet_folder(_cn_config({"_class_name": "UNet2DConditionModel"}))),
    ("controlnet-truncated-weights", "controlnet", "error", controlnet_folder(_cn_truncate)),
    ("controlnet-another-family", "controlnet", "error",   controlnet_folder(_cn_config({"cross_attention_dim": 768}))),
    ("controlnet-nan-weights",    "controlnet", "error",   controlnet_folder(_cn_nan)),
    ("controlnet-single-file",    "controlnet", "error",   controlnet_folder(single_file=True)),
    ("controlnet-pickle-payload", "controlnet", "error",   lambda env: controlnet_folder(_cn_pickle(env.marker))(env)),
    ("ui-dataset-empty",          "ui",        "error",    ui(lambda e: _start_run(e, dataset=""))),
    ("ui-dataset-outside",        "ui",        "error",    ui(lambda e: _start_run(e, dataset=str(_outside_folder(e))))),
    ("ui-run-name-traversal",     "ui",        "error",    ui(lambda e: _start_run(e, output_name="../../../../x"))),
    ("ui-base-model-outside",     "ui",        "error",    ui(lambda e: _start_run(e, base_model=str(_outside_folder(e))))),
    ("ui-number-nan",             "ui",        "error",    ui(lambda e: _start_run(e, learning_rate=float("nan")))),
    ("ui-grid-axis-garbage",      "ui",        "error",    ui(lambda e: __import__("sdstudio.playground.grid", fromlist=["x"]).parse_axis("foo=1,2"))),
    ("ui-grid-axis-nan",          "ui",        "error",    ui(lambda e: __import__("sdstudio.playground.grid", fromlist=["x"]).parse_axis("cfg=5,nan"))),
    ("ui-recipe-name-dots",       "ui",        "error",    ui(lambda e: e.ws.named_file("recipes", "..", ".toml"))),
    ("ui-path-with-nul",          "ui",        "error",    ui(lambda e: e.ws.resolve("models/lora/a\x00.safetensors"))),
    ("ui-symlink-out",            "ui",        "error",    ui(lambda e: e.ws.resolve("inputs/link/x.png"),
                                                              setup=lambda e: (e.ws.root / "inputs" / "link").symlink_to(_outside_folder(e)))),
    ("ui-region-box-text",        "ui",        "error",    ui(lambda e: __import__("sdstudio.playground.recipe", fromlist=["x"]).parse_box("1,2,3"))),
]


# -- the runner ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from sdstudio.playground.session import Playground
    from sdstudio.workspace import Workspace

    from train_helpers import make_kohya_dataset

    root = tmp_path_factory.mktemp("malformed")
    ws = Workspace.open(root / "ws")
    make_kohya_dataset(ws.root / "datasets" / "ds", n=2)  # for the Train tab rows
    session = Playground(lambda p: ws.resolve(p, must_exist=True), device="cpu", lora_dir=ws.models("lora"))
    session.base("tiny")
    return root, ws, session


def _snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 60, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)
    areas = {c[1] for c in CASES}
    assert areas == {"image", "zip", "config", "recipe", "prompt", "lora", "embedding", "controlnet", "ui"}


@pytest.mark.parametrize("case_id,area,expect,build", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(shared, case_id, area, expect, build):
    root, ws, session = shared
    inputs = root / "inputs" / case_id
    inputs.mkdir(parents=True)
    env = Env(ws=ws, inputs=inputs, session=session)
    act = build(env)
    before = _snapshot(root)
    if expect == "error":
        with pytest.raises(UserError) as info:
            act()
        message = str(info.value)
        assert message and "\n" not in message and "Traceback" not in message, message
    else:
        act()
    new = _snapshot(root) - before
    outside = [p for p in new if ws.root not in p.parents]
    assert not outside, f"written outside the workspace: {outside}"
    if expect == "error":
        leftovers = [p for p in new if "tmp" not in p.parts]  # a real model's load may fill its own caches
        assert not leftovers, f"a refused input left files behind: {leftovers}"
    assert not (root / MARKER).exists() and not (inputs.parent / MARKER).exists(), "a pickle's payload ran"
    if area in ("prompt", "lora", "embedding", "controlnet"):
        from sdstudio.playground.recipe import Recipe

        img = session.run(Recipe(prompt="a cat", **BASE))[0]  # the session still works after the bad input
        assert np.asarray(img).std() > 0
