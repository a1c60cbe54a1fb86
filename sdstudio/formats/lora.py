"""LoRA and LyCORIS files <-> the adapter runtime (sdstudio/adapters).

Writing: the adapters on a model's layers -> kohya / LyCORIS keys (`lora_unet_*`, `lora_te_*`, each module's
tensors under the names LyCORIS writes, with `.alpha`), or diffusers / peft keys (`unet.<path>.lora_A.weight`)
for plain LoRAs.

Reading: any LoRA, LoCon, LoHa, LoKr or DoRA file, named the kohya, LyCORIS, diffusers or peft way, -> one
runtime adapter per module, each keeping its own alpha/rank (diffusers applies one scale per file and
mis-scales files whose modules differ in rank or alpha). Module names come from formats/kinds.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import UserError

# ======================================================================================================
# Writing: trained adapters -> kohya / LyCORIS / diffusers files.
# ======================================================================================================

# Kohya is the default because A1111, ComfyUI, Forge and diffusers all load it. Each module keeps its own
# `.alpha` (the scale is alpha/rank per module): without it the output drifts when alpha != rank.

def kohya_tensors(adapters: dict, kind: str, index: int = 0, xl: bool = False, dtype=None) -> dict:
    """{kohya key: tensor} for runtime adapters ({module path: adapter}) of a model of `kind` ("unet" or "te"):
    LoRA/LoCon as lora_down/lora_up(/lora_mid).weight, LoHa as hada_*, LoKr as lokr_*, DoRA's dora_scale, and
    each module's .alpha."""
    from .kinds import kohya_te_name, kohya_unet_name

    out = {}
    for path, a in adapters.items():
        name = kohya_unet_name(path) if kind == "unet" else kohya_te_name(path, index, xl)
        for key, value in a.state().items():
            value = value.detach().cpu()
            if key == "alpha":
                out[f"{name}.alpha"] = value.float()
            else:
                out[f"{name}.{key}"] = value if dtype is None else value.to(dtype)
    return out


def kohya_state_dict(model, kind: str, index: int = 0, xl: bool = False, adapter: str = "default",
                     dtype=None) -> dict:
    """`kohya_tensors` for adapter `adapter` on every layer of `model`."""
    from ..adapters import adapters_named

    return kohya_tensors(adapters_named(model, adapter), kind, index, xl, dtype)


def save_kohya_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None, xl: bool = False,
                    adapter: str = "default"):
    """Write a kohya / LyCORIS file (lora_unet_* / lora_te_*) atomically; returns the path."""
    from .safe_io import save_safetensors

    sd = kohya_state_dict(unet, "unet", adapter=adapter, dtype=dtype)
    for i, te in enumerate(text_encoders):
        sd.update(kohya_state_dict(te, "te", index=i, xl=xl, adapter=adapter, dtype=dtype))
    if not sd:
        raise ValueError("no adapter layers to save")
    return save_safetensors(sd, path, metadata)


def save_diffusers_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None,
                        adapter: str = "default"):
    """Write a diffusers/peft-format LoRA ("unet.<path>.lora_A.weight"), with a peft LoraConfig per model as
    `lora_adapter_metadata` so each module's rank and alpha survive; returns the path. Plain LoRAs only."""
    from pathlib import Path

    from peft import LoraConfig

    from ..adapters import LoRA, adapters_named
    from .safe_io import save_safetensors

    sd, adapter_meta = {}, {}
    for prefix, model in [("unet", unet)] + [("text_encoder" if i == 0 else f"text_encoder_{i + 1}", te)
                                             for i, te in enumerate(text_encoders)]:
        found = adapters_named(model, adapter)
        if not found:
            continue
        if not all(isinstance(a, LoRA) and a.plain for a in found.values()):
            raise ValueError("only plain LoRAs have a diffusers form; save LyCORIS/DoRA adapters in kohya format")
        for p, a in found.items():
            for key, value in (("lora_A", a.lora_down), ("lora_B", a.lora_up)):
                value = value.detach().cpu()
                sd[f"{prefix}.{p}.{key}.weight"] = value if dtype is None else value.to(dtype)
        first = next(iter(found.values()))
        cfg = LoraConfig(r=first.rank, lora_alpha=first.alpha, target_modules=sorted(found),
                         rank_pattern={re.escape(p): a.rank for p, a in found.items() if a.rank != first.rank},
                         alpha_pattern={re.escape(p): a.alpha for p, a in found.items() if a.alpha != first.alpha})
        d = cfg.to_dict()
        adapter_meta.update({f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in d.items()})
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True, default=str)}
    meta.update(metadata or {})
    return save_safetensors(sd, Path(path), meta)


# ======================================================================================================
# Reading: kohya / LyCORIS / diffusers / peft files -> runtime adapters, one per module.
# ======================================================================================================

# The tensor each key suffix holds, by the runtime's names (longest suffixes are tried first).
SUFFIXES = {
    ".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up", ".lora_mid.weight": "lora_mid",  # kohya
    ".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up",  # peft / new diffusers
    ".lora.down.weight": "lora_down", ".lora.up.weight": "lora_up",  # old diffusers attention processors
    ".lora_linear_layer.down.weight": "lora_down", ".lora_linear_layer.up.weight": "lora_up",
    ".alpha": "alpha", ".dora_scale": "dora_scale",  # kohya / LyCORIS
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",  # peft DoRA
    **{f".{k}": k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                            "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
# LyCORIS algorithms the runtime has no maths for: say so rather than load a file half.
UNSUPPORTED = {".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R": "BOFT", ".a1.weight": "GLoRA",
               ".a2.weight": "GLoRA", ".diff": "a full-weight difference", ".diff_b": "a full-weight difference",
               ".w_norm": "a norm layer", ".b_norm": "a norm layer", ".on_input": "IA3"}


@dataclass
class AdapterWeights:
    """A whole adapter file, ready to attach: {model key: {module path: runtime Adapter}}.

    Model keys are "unet", "te0" (the first text encoder) and "te1" (SDXL's second)."""

    targets: dict = field(default_factory=dict)

    def add(self, model: str, path: str, adapter) -> None:
        self.targets.setdefault(model, {})[path] = adapter

    @property
    def algorithms(self) -> set[str]:
        return {a.algorithm + ("+dora" if a.dora_scale is not None else "")
                for mods in self.targets.values() for a in mods.values()}

    def count(self) -> int:
        return sum(len(m) for m in self.targets.values())


def model_table(models: dict) -> dict[str, tuple[str, str]]:
    """{kohya module name: (model key, module path)} for every Linear/Conv2d of the base.

    Layers already wrapped by the runtime (`x.base_layer`) count as `x`."""
    import torch

    from .kinds import kohya_te_name, kohya_unet_name

    xl = "te1" in models
    table = {}
    for key, model in models.items():
        for path, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            clean = path.replace(".base_layer", "")
            if key == "unet":
                table[kohya_unet_name(clean)] = ("unet", clean)
            else:
                table[kohya_te_name(clean, int(key[2:]), xl)] = (key, clean)
    return table


def _family_hint(sd_keys) -> str:
    keys = list(sd_keys)
    if any(k.startswith(("lora_te2_", "lora_te1_")) or "input_blocks" in k or "text_encoder_2." in k for k in keys):
        return "SDXL"
    return "another model family"


def _guess_from_shape(shape_file, shape_model) -> str:
    dims = set(shape_file) - set(shape_model)
    if 2048 in dims or 1280 in dims and 1024 not in dims:
        return "SDXL"
    if 1024 in dims:
        return "SD 2.x"
    if 768 in dims:
        return "SD 1.x"
    return "another model family"


def mismatch(path_name: str, what: str, family_label: str, hint: str) -> UserError:
    return UserError(f"{path_name} does not fit this {family_label} base ({what}); it looks made for {hint}: "
                     f"pick a matching base model or another file.")


def _peft_configs(metadata: dict) -> dict:
    """diffusers >= 0.34 (and our writer) keep each model's peft config in the header:
    {"unet": {"r": ..., "lora_alpha": ...}, "text_encoder": {...}}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        out.setdefault(prefix, {})[rest] = value
    return out


def _pattern_value(cfg: dict, name: str, path: str, default):
    for pat, value in (cfg.get(name) or {}).items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return default


def sgm_to_diffusers_names(sd: dict, unet) -> dict:
    """kohya's SDXL LoRAs name UNet modules the LDM (sgm) way, `lora_unet_input_blocks_4_1_transformer_...`;
    rename them to the diffusers-path names every other reader here understands. The map comes from our own
    diffusers -> LDM key table (formats/ldm.py, what the single-file export writes) run over this UNet's
    modules, so it follows the UNet's config (block counts, where attention is) rather than SDXL's fixed
    numbers. Names it does not know pass through, and the caller reports them as not in this base."""
    from .kinds import kohya_names_for, kohya_unet_name
    from .ldm import unet_to_ldm

    table = {}
    for path in kohya_names_for(unet, "unet").values():
        path = path.replace(".base_layer", "")  # a wrapped layer answers to its plain path
        diffusers_name = kohya_unet_name(path)
        try:
            ldm_key = next(iter(unet_to_ldm({f"{path}.weight": None}, unet.config)))
        except ValueError:  # a module the LDM layout has no place for (never in a kohya file)
            continue
        table["lora_unet_" + ldm_key[: -len(".weight")].replace(".", "_")] = diffusers_name
    out = {}
    for key, value in sd.items():
        module, dot, rest = key.partition(".")
        out[table.get(module, module) + dot + rest] = value
    return out


def group_modules(sd: dict) -> tuple[dict[str, dict], list[str]]:
    """({module name: {tensor role: tensor}}, keys no role fits). Module names are the keys' prefixes: kohya
    names or dotted diffusers/peft paths."""
    groups: dict[str, dict] = {}
    stray = []
    for key, value in sd.items():
        for suffix in _BY_LENGTH:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = value
                break
        else:
            stray.append(key)
    return groups, stray


def read_adapters(sd: dict, models: dict, *, metadata: dict | None = None, file_name: str = "the file",
                  family_label: str = "base") -> AdapterWeights:
    """Any LoRA / LoCon / LoHa / LoKr / DoRA file (kohya, LyCORIS, diffusers or peft keys) -> AdapterWeights for
    `models`. Every module must exist in the base with a matching size, else one UserError naming the likely
    family; a LyCORIS algorithm the runtime cannot apply is one UserError too."""
    from . import lycoris

    for key in sd:
        for suffix, what in UNSUPPORTED.items():
            if key.endswith(suffix):
                raise UserError(f"{file_name} uses {what} ({key.rsplit('.', 1)[-1]} tensors), a LyCORIS algorithm the "
                                f"Playground cannot apply yet: use a LoRA, LoCon, LoHa, LoKr or DoRA file.")
    if "te1" in models and any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k or
                                                               "middle_block" in k) for k in sd):
        # On a two-encoder (SDXL) base only: elsewhere LDM names mean an SDXL file, and the error says so.
        sd = sgm_to_diffusers_names(sd, models["unet"])
    table = model_table(models)
    te_paths = {p: mk for mk, p in table.values() if mk != "unet"}
    peft_cfg = _peft_configs(metadata or {})
    groups, _stray = group_modules(sd)

    out = AdapterWeights()
    unknown = []
    for name, g in groups.items():
        algorithm = lycoris.algorithm_of(g)
        if algorithm is None:
            if set(g) - {"alpha"}:  # an alpha on its own belongs to nothing: ignore it, as kohya's loaders do
                unknown.append(name)
            continue
        where = _locate(name, table, models, te_paths)
        if where is None:
            unknown.append(name)
            continue
        mk, path = where
        module = models[mk].get_submodule(path)
        shape = base_weight_shape(module)
        alpha = float(g["alpha"]) if "alpha" in g else None
        rank = None
        cfg = peft_cfg.get({"unet": "unet", "te0": "text_encoder", "te1": "text_encoder_2"}[mk], {})
        if alpha is None and cfg:  # peft keys: the config in the header says r and alpha, per module
            r = _pattern_value(cfg, "rank_pattern", path, cfg.get("r"))
            a = _pattern_value(cfg, "alpha_pattern", path, cfg.get("lora_alpha", cfg.get("alpha", r)))
            if r and a is not None:
                scale = float(a) / (float(r) ** 0.5 if cfg.get("use_rslora") else float(r))
                rank, alpha = int(r), scale * int(r)
        if algorithm == "lora":
            _check_lora_shape(g, shape, file_name, path, family_label)
        elif not lycoris.fits(algorithm, g, shape):
            raise mismatch(file_name, f"module {path} has a different size", family_label, "another model family")
        adapter = lycoris.build(algorithm, g, shape, alpha)
        if rank is not None and algorithm != "lora":  # peft scales LoHa/LoKr by alpha / r whatever the layout
            adapter.rank, adapter.alpha = rank, alpha
        out.add(mk, path, adapter)
    if unknown:
        raise mismatch(file_name, f"{len(unknown)} of its modules, e.g. {unknown[0]}, are not in this model",
                       family_label, _family_hint(sd.keys()))
    if not out.count():
        raise UserError(f"{file_name} has no LoRA or LyCORIS tensors this app can read: is it a LoRA file?")
    return out


def _locate(name: str, table: dict, models: dict, te_paths: dict):
    """A module's (model key, path) from a kohya name or a dotted diffusers/peft prefix."""
    import torch

    if name in table:
        return table[name]
    dotted = name.removeprefix("base_model.model.")
    model_key = None
    for pfx, mk in (("unet.", "unet"), ("text_encoder_2.", "te1"), ("text_encoder.", "te0")):
        if dotted.startswith(pfx):
            dotted, model_key = dotted[len(pfx):], mk
            break
    if model_key is None:
        model_key = "unet"
        stripped = dotted.removeprefix("text_model.")
        if stripped in te_paths or dotted in te_paths:
            model_key = te_paths.get(stripped) or te_paths.get(dotted)
    if model_key not in models:
        return None
    model = models[model_key]
    for cand in (dotted, dotted.removeprefix("text_model."), "text_model." + dotted,
                 dotted.replace(".processor", "").replace("to_out_lora", "to_out.0").replace("_lora", "")):
        try:
            mod = model.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or hasattr(mod, "base_layer"):
            return model_key, cand
    return None


def base_weight_shape(module) -> tuple:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return tuple(module.weight.shape)


def _check_lora_shape(g: dict, shape: tuple, file_name: str, path: str, family_label: str) -> None:
    down, up = g["lora_down"], g["lora_up"]
    out_dim, in_dim = shape[0], shape[1]
    ok = up.shape[0] == out_dim and down.shape[1] == in_dim and up.shape[1] == down.shape[0]
    if ok and len(shape) == 4 and shape[2:] != (1, 1):  # a kxk conv: the kernel is in down (or a Tucker mid)
        kernel = g["lora_mid"].shape[2:] if "lora_mid" in g else down.shape[2:]
        ok = tuple(kernel) == tuple(shape[2:]) and up.shape[2:] == (1, 1)
    if not ok:
        raise mismatch(file_name, f"module {path}: file {tuple(up.shape[:1]) + tuple(down.shape[1:])}, model {shape}",
                       family_label, _guess_from_shape((up.shape[0], down.shape[1]), shape))


def load_into(models: dict, path, *, scale: float = 1.0, name: str = "file", allow_pickle: bool = False
              ) -> AdapterWeights:
    """Read an adapter file and put it on `models` ({"unet": ..., "te0": ...}) at `scale`, through the adapter
    runtime: how a method's `load_output` shows its file in a plain diffusers pipeline, and how tests load one
    without the Playground."""
    from pathlib import Path

    from ..adapters import add_adapter
    from .embeddings import without_bundle
    from .safe_io import load_state_dict, read_safetensors_metadata

    path = Path(path)
    sd = without_bundle(load_state_dict(path, allow_pickle=allow_pickle))
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    weights = read_adapters(sd, models, metadata=meta, file_name=path.name)
    for mk, adapters in weights.targets.items():
        dtype = next(models[mk].parameters()).dtype
        for a in adapters.values():
            a.to(dtype=dtype).requires_grad_(False)
        add_adapter(models[mk], name, adapters, scale=scale)
    return weights
