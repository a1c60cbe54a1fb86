"""A Playground session: the base model, its adapter stack, the loaded ControlNets/T2I-Adapters and the
prepared control images, kept between generations. The UI and `sdstudio generate` both run through it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .files import count_read
from .gligen import ModuleSlot, base_module
from .pipeline import generate
from .recipe import Recipe
from .prompt_tags import resolve_prompt_loras
from .stack import Stack

log = logging.getLogger("sdstudio.playground")


def load_control_model(path: Path, kind: str, dtype=None, device: str = "cpu", unet=None):
    """A ControlNet or T2I-Adapter from a diffusers folder, or a ControlNet from a single file in the original
    (lllyasviel, A1111, civitai) layout, shaped after the base `unet` (counted as an adapter file read)."""
    import json

    from diffusers import ControlNetModel, T2IAdapter

    count_read()
    label = "ControlNet" if kind == "controlnet" else "T2I-Adapter"
    if not path.exists():
        raise UserError(f"{path.name} does not exist: check the path of the {label}.")
    if path.is_file() and kind == "controlnet" and unet is not None and path.suffix == ".safetensors":
        from ..formats.controlnet import load_original_controlnet

        model = load_original_controlnet(path, unet)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if path.is_file():
        raise UserError(f"{path.name} is a single file; the Playground loads a {label} as a diffusers folder (with "
                        f"config.json), and a ControlNet also as an original-layout .safetensors: convert it or "
                        f"point at the folder.")
    try:
        name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        raise UserError(f"{path.name} has no readable config.json: it is not a diffusers {label} folder.") from None
    if kind == "controlnet" and "ControlNet" not in name or kind == "t2i_adapter" and "Adapter" not in name:
        raise UserError(f"{path.name} is a {name or 'unknown model'}, not a {label}: add it as the right kind.")
    return _load_control_weights(path, kind, label, dtype, device)


def _load_control_weights(path: Path, kind: str, label: str, dtype, device):
    """from_pretrained, safetensors only, with every way a damaged folder fails turned into one sentence."""
    from diffusers import ControlNetModel, T2IAdapter

    from ..formats.safe_io import check_tensors

    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.ckpt")]
        raise UserError(f"{path.name} has no .safetensors weights" + (f" (only {pickled[0]}, a pickle, which is not "
                        f"loaded)" if pickled else "") + f": get the .safetensors version of this {label}.")
    cls = ControlNetModel if kind == "controlnet" else T2IAdapter
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # truncated file, shapes != config.json, ...
        text = str(exc)
        if "shape" in text:
            raise UserError(f"{path.name}'s weights do not fit its config.json (the config of another model family, or "
                            f"a mixed-up download): re-download the {label}.") from None
        first = (text.splitlines()[0] if text else type(exc).__name__).replace(str(path) + "/", "")[:160]
        raise UserError(f"{path.name} could not be loaded as a {label} ({first}): re-download it.") from None
    check_tensors(dict(model.state_dict()), path.name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Playground:
    """Keeps everything loaded across generations; `run(recipe)` does only the work the change needs."""

    def __init__(self, resolve: Callable[[str], Path] | None = None, *, cache=None, lora_dir: Path | None = None,
                 annotators_dir: Path | None = None, device: str | None = None, dtype=None, allow_pickle=False,
                 places=None):
        # `places` (models/refs.Places): the one rule for the base model and the recipe's paths; `resolve`
        # alone (older callers) maps a recipe path to a file.
        self.places = places
        self.resolve = resolve or (places.path if places is not None else (lambda p: Path(p).expanduser()))
        self.cache = cache
        self.lora_dir = lora_dir
        self.annotators_dir = annotators_dir
        self.device = device
        self.dtype = dtype
        self.allow_pickle = allow_pickle
        self.comps = None
        self.stack: Stack | None = None
        self._ref = None
        self._controls: dict[tuple, object] = {}
        self._images: dict[tuple, object] = {}
        self.gligen = ModuleSlot()  # a GLIGEN module file attached to the base (playground/gligen.py)
        self._vae: tuple | None = None  # (file key, the file's VAE): read once per file version
        self.vae_reads = 0  # VAE file reads, for tests
        self.live_preview = None  # the latest step's cheap preview (PIL), for the UI to poll
        self.live_step = (0, 0)
        self.job_io = (None, None)  # (emit, check) of the job running now: a hub download reports through it

    # 1. The base -----------------------------------------------------------------------------------------
    def base(self, ref: str):
        from ..devices import pick_device, pick_dtype
        from ..models.refs import Places, parse_hub_id

        from ..models.refs import TINY_REFS

        ref = (ref or "tiny").strip()
        device = self.device or pick_device()
        dtype = self.dtype or pick_dtype(device)
        half = str(dtype) in ("torch.float16", "torch.bfloat16")
        emit, check = self.job_io
        if self.places is not None:  # the one rule; a hub id is downloaded into the workspace, with progress
            ref_path = self.places.local_model(ref, half=half, emit=emit, check=check)
        elif ref in TINY_REFS:
            ref_path = ref
        else:
            try:
                ref_path = str(self.resolve(ref))
            except UserError:
                if parse_hub_id(ref) is None:
                    raise
                ref_path = Places.cli().local_model(ref, half=half, emit=emit, check=check)
        if self.comps is None or self._ref != ref_path:
            self.comps, self.stack = None, None
            self._controls.clear()
            if self.cache is not None:
                # take, not get: the stack adds adapters to these modules, which a trainer must never inherit
                comps = self.cache.take(ref_path, device=device, dtype=dtype)
            else:
                from ..models.loading import load_base

                comps = load_base(ref_path, device=device, dtype=dtype)
            self.comps, self._ref = comps, ref_path
            self.stack = Stack(comps, resolve=self.resolve, allow_pickle=self.allow_pickle)
        return self.comps

    # 2. Everything a recipe needs, loaded once -------------------------------------------------------------
    def prepare(self, recipe: Recipe, fuse: bool = False) -> dict:
        recipe.validate()
        comps = self.base(recipe.base_model)
        recipe = resolve_prompt_loras(recipe, self.lora_dir)
        self.stack.apply(recipe, fuse=fuse and not any(not (i.start <= 0 and i.end >= 1) for i in recipe.lora))
        self.gligen.apply(comps.unet, self.resolve(recipe.gligen) if recipe.gligen.strip() else base_module(comps),
                          self.allow_pickle)
        self._apply_vae(comps, recipe.vae.strip())
        out = {"recipe": recipe, "controlnets": [], "control_images": [], "control_weights": [], "control_ranges": [],
               "adapters": [], "adapter_images": [], "adapter_weights": [], "adapter_ranges": []}
        for kind, items, prefix in (("controlnet", recipe.controlnet, "control"),
                                    ("t2i_adapter", recipe.t2i_adapter, "adapter")):
            for item in items:
                if not item.enabled:
                    continue
                model = self._control(kind, item.path, comps)
                img = self.control_image(item.image, item.preprocessor, recipe.width, recipe.height,
                                         gray=kind == "t2i_adapter" and model.config.in_channels == 1)
                out["controlnets" if kind == "controlnet" else "adapters"].append(model)
                out[f"{prefix}_images"].append(img)
                out[f"{prefix}_weights"].append(item.weight)
                out[f"{prefix}_ranges"].append((item.start, item.end))
        out["init_image"] = self._plain_image(recipe.init_image, recipe.width, recipe.height) if recipe.init_image else None
        out["mask"] = self._plain_image(recipe.mask_image, recipe.width, recipe.height) if recipe.mask_image else None
        return out

    def _apply_vae(self, comps, path_text: str) -> None:
        """Decode (and encode img2img sources) with the recipe's VAE file, or the base's own when it names none."""
        own = comps.extra.setdefault("own_vae", comps.vae)
        if not path_text:
            comps.vae = own
            return
        path = self.resolve(path_text)
        if not path.is_file():
            raise UserError(f"The VAE {path.name} does not exist: pick one from models/vae, or Automatic.")
        key = (str(path), path.stat().st_mtime_ns, id(own))
        if self._vae is None or self._vae[0] != key:
            from ..formats.vae import read_vae

            self._vae = None  # a failed read keeps nothing half-loaded, and the base's own VAE decodes
            comps.vae = own
            self._vae = (key, read_vae(path, own, allow_pickle=self.allow_pickle))
            self.vae_reads += 1
        comps.vae = self._vae[1]

    def _control(self, kind: str, path_text: str, comps):
        path = self.resolve(path_text)
        key = (kind, path)
        if key not in self._controls:
            model = load_control_model(path, kind, dtype=comps.unet.dtype, device=comps.unet.device, unet=comps.unet)
            self._check_fits(kind, model, comps, path.name)
            self._controls[key] = model
        return self._controls[key]

    @staticmethod
    def _check_fits(kind: str, model, comps, name: str) -> None:
        ucfg = comps.unet.config
        if kind == "controlnet":
            if model.config.cross_attention_dim != ucfg.cross_attention_dim or \
                    list(model.config.block_out_channels) != list(ucfg.block_out_channels):
                raise UserError(f"{name} is a ControlNet for another model family (its width does not match this "
                                f"{comps.family.label} base): pick a matching ControlNet.")
        else:
            chans = list(getattr(model.config, "channels", []))
            if chans and chans != list(ucfg.block_out_channels)[: len(chans)]:
                raise UserError(f"{name} is a T2I-Adapter for another model family (channels {chans} vs this "
                                f"base's {list(ucfg.block_out_channels)}): pick a matching adapter.")

    def control_image(self, path_text: str, preprocessor: str, width: int, height: int, gray: bool = False):
        """The control image at the output size, after its preprocessor (cached by file, mtime and settings)."""
        from .preprocess import preprocess

        if not path_text:
            raise UserError("A ControlNet/T2I-Adapter item has no control image: choose one.")
        path = self.resolve(path_text)
        if not path.is_file():
            raise UserError(f"The control image {path.name} does not exist: check the path.")
        key = (path, path.stat().st_mtime_ns, preprocessor, width, height, gray)
        if key not in self._images:
            img = fit_image(path, width, height)
            img = preprocess(img, preprocessor, self.annotators_dir)
            if gray:
                img = img.convert("L").convert("RGB")
            self._images = {k: v for k, v in list(self._images.items())[-16:]}
            self._images[key] = img
        return self._images[key]

    def _plain_image(self, path_text: str, width: int, height: int):
        path = self.resolve(path_text)
        if not path.is_file():
            raise UserError(f"The image {path.name} does not exist: check the path.")
        return fit_image(path, width, height)

    # 3. Generate ------------------------------------------------------------------------------------------
    def run(self, recipe: Recipe, *, fuse: bool = False, on_step=None, check=None):
        p = self.prepare(recipe.with_seed(), fuse=fuse)
        return generate(self.comps, p["recipe"], stack=self.stack,
                        controlnets=p["controlnets"], control_images=p["control_images"],
                        control_weights=p["control_weights"], control_ranges=p["control_ranges"],
                        adapters=p["adapters"], adapter_images=p["adapter_images"],
                        adapter_weights=p["adapter_weights"], adapter_ranges=p["adapter_ranges"],
                        init_image=p["init_image"], mask=p["mask"], on_step=on_step, check=check)


def fit_image(path: Path, width: int, height: int):
    """Open an image and bring it to width x height. A different aspect ratio is refused rather than
    stretched: a squashed control image makes a squashed picture."""
    from ..data.images import open_rgb

    img = open_rgb(path)
    w, h = img.size
    if abs(w / h - width / height) > 0.02 * (width / height):
        raise UserError(f"{path.name} is {w}x{h}, another shape than the {width}x{height} output: crop it to the "
                        f"same aspect ratio or change width/height.")
    if (w, h) != (width, height):
        from PIL import Image

        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return img


def generation_work(session: Playground, recipe: Recipe, out_dir: Path, *, fuse: bool = False, x=None, y=None,
                    preview_every: int = 1):
    """The Job work that the UI and `sdstudio generate` both run: generate (or a grid), save atomically, and
    report progress, a live preview and the saved files as events. The work's `recipe` attribute is the recipe
    that runs (a drawn seed filled in), for the UI's "reuse the last seed" button."""
    from ..events import Finished, Preview, Progress, Status
    from .grid import run_grid
    from .outputs import png_bytes, save_images
    from .pipeline import latents_to_rgb

    # Seed -1 draws one seed for the whole job (a grid's cells share it, as in A1111), recorded in every PNG.
    recipe = recipe.with_seed()

    def work(ctx):
        ctx.emit(Status("loading the base model and the stack", stage="load"))
        check = ctx.commands.check
        session.job_io = (ctx.emit, check)

        def on_step(i, total, latents):
            session.live_step = (i + 1, total)
            if preview_every and (i % preview_every == 0 or i + 1 == total):
                session.live_preview = latents_to_rgb(latents[:1])[0]
            ctx.emit(Progress(i + 1, total, stage="generate", message=f"step {i + 1}/{total}"))

        if x is not None:
            def on_cell(done, total, img):
                session.live_preview = img
                ctx.emit(Progress(done, total, stage="grid", message=f"cell {done}/{total}"))

            grid, _ = run_grid(session, recipe, x, y, on_cell=on_cell, check=check, fuse=fuse)
            from ..formats.safe_io import atomic_write_bytes
            import time as _t

            path = Path(out_dir) / f"grid-{_t.strftime('%Y%m%d-%H%M%S')}.png"
            atomic_write_bytes(path, png_bytes(grid, recipe))
            paths = [path]
        else:
            ctx.emit(Status("generating", stage="generate"))
            images = session.run(recipe, fuse=fuse, on_step=on_step, check=check)
            session.live_preview = images[0] if images else session.live_preview
            paths = save_images(images, recipe, out_dir)
        ctx.emit(Preview(step=0, paths=tuple(str(p) for p in paths), captions=tuple(p.name for p in paths)))
        ctx.emit(Finished(message=f"saved {len(paths)} image(s) · seed {recipe.seed}",
                          outputs=tuple(str(p) for p in paths)))
        return paths

    work.recipe = recipe
    return work
