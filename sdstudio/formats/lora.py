"""LoRA files: peft/diffusers <-> kohya (lora_unet_*, lora_te_*, .alpha) <-> LyCORIS (hada_*, lokr_*).

Module names come from formats/kinds.py (kohya_unet_name, kohya_te_name, kohya_names_for, group_kohya).
"""
from __future__ import annotations


# ======================================================================================================
# Writing (owned by the training-engine issue): trained adapters -> kohya / diffusers files.
# ======================================================================================================

# Kohya is the default because A1111, ComfyUI, Forge and diffusers all load it. Each module keeps its own
# `.alpha` (the scale is alpha/rank per module): without it the output drifts when alpha != rank.

def peft_to_kohya(model, kind: str, index: int = 0, xl: bool = False, adapter: str = "default",
                  dtype=None) -> dict:
    """{kohya key: tensor} for every peft LoRA layer in `model` (kind "unet" or "te")."""
    import torch
    from peft.tuners.lora import LoraLayer

    from .kinds import kohya_te_name, kohya_unet_name

    out = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or adapter not in mod.lora_A:
            continue
        if getattr(mod, "use_dora", {}).get(adapter):
            raise ValueError("DoRA layers have no kohya form; save in the diffusers format")
        name = kohya_unet_name(path) if kind == "unet" else kohya_te_name(path, index, xl)
        down, up = mod.lora_A[adapter].weight.detach(), mod.lora_B[adapter].weight.detach()
        # peft's scale is lora_alpha / r (rsLoRA: / sqrt(r)); kohya's is alpha / rank: store the alpha that
        # gives the same scale, so every loader computes what training computed.
        scale = float(mod.scaling[adapter])
        alpha = scale * down.shape[0]
        out[f"{name}.lora_down.weight"] = down if dtype is None else down.to(dtype)
        out[f"{name}.lora_up.weight"] = up if dtype is None else up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_kohya_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None, xl: bool = False):
    """Write a kohya-format LoRA (lora_unet_* / lora_te_*) atomically; returns the path."""
    from .safe_io import save_safetensors

    sd = peft_to_kohya(unet, "unet", dtype=dtype)
    for i, te in enumerate(text_encoders):
        sd.update(peft_to_kohya(te, "te", index=i, xl=xl, dtype=dtype))
    if not sd:
        raise ValueError("no LoRA layers to save")
    return save_safetensors(sd, path, metadata)


def save_diffusers_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None):
    """Write a diffusers/peft-format LoRA ("unet.*.lora_A.weight", with the LoraConfig as
    `lora_adapter_metadata` so rank and alpha survive) atomically; returns the path."""
    import json
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict

    from .safe_io import save_safetensors

    def cfg_dict(model):
        d = model.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}

    sd, adapter_meta = {}, {}
    for prefix, model in [("unet", unet)] + [("text_encoder" if i == 0 else f"text_encoder_{i + 1}", te)
                                             for i, te in enumerate(text_encoders)]:
        layers = get_peft_model_state_dict(model)
        sd.update({f"{prefix}.{k}": (v if dtype is None else v.to(dtype)) for k, v in layers.items()})
        adapter_meta.update({f"{prefix}.{k}": v for k, v in cfg_dict(model).items()})
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True, default=str)}
    meta.update(metadata or {})
    return save_safetensors(sd, Path(path), meta)



# ======================================================================================================
# Reading (owned by the Playground issue): kohya / diffusers / peft / LyCORIS files -> modules, with each
# module's alpha/rank applied per module (diffusers mis-scales files whose modules differ in rank or alpha).
# ======================================================================================================

import json as _json
import re as _re
from dataclasses import dataclass as _dataclass
from dataclasses import field as _field

from ..errors import UserError as _UserError


@_dataclass
class ModuleDelta:
    """One module's adapter tensors, named as peft names its parameters, with alpha/rank already folded in."""

    kind: str  # "lora" | "loha" | "lokr"
    tensors: dict  # lora: lora_A, lora_B; loha: hada_w1_a...; lokr: lokr_w1 / lokr_w1_a ..., lokr_w2 ...
    rank: int


@_dataclass
class AdapterWeights:
    """A whole adapter file, ready to inject: {model key: {module path: ModuleDelta}}.

    Model keys are "unet", "te0" (the first text encoder) and "te1" (SDXL's second)."""

    targets: dict = _field(default_factory=dict)

    def add(self, model: str, path: str, delta: ModuleDelta) -> None:
        self.targets.setdefault(model, {})[path] = delta

    @property
    def kinds(self) -> set[str]:
        return {d.kind for mods in self.targets.values() for d in mods.values()}

    def count(self) -> int:
        return sum(len(m) for m in self.targets.values())


def model_table(models: dict) -> dict[str, tuple[str, str]]:
    """{kohya module name: (model key, module path)} for every Linear/Conv2d of the base.

    Modules already wrapped by peft (`x.base_layer`) count as `x`; the adapters' own layers are skipped."""
    import torch

    from .kinds import kohya_te_name, kohya_unet_name

    xl = "te1" in models
    table = {}
    for key, model in models.items():
        for path, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if _re.search(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+)(\.|$)", path):
                continue
            clean = path.replace(".base_layer", "")
            if key == "unet":
                table[kohya_unet_name(clean)] = ("unet", clean)
            else:
                table[kohya_te_name(clean, int(key[2:]), xl)] = (key, clean)
    return table


def _family_hint(sd_keys, model_keys) -> str:
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


def mismatch(path_name: str, what: str, family_label: str, hint: str) -> _UserError:
    return _UserError(f"{path_name} does not fit this {family_label} base ({what}); it looks made for {hint}: "
                      f"pick a matching base model or another file.")


def _rank_of(down) -> int:
    return int(down.shape[0])


def _fold_lora(down, up, alpha, mid=None) -> ModuleDelta:
    """kohya lora_down/lora_up(/lora_mid)/alpha -> peft lora_A/lora_B with the scale alpha/rank folded into B.

    Folding per module is what keeps files with mixed ranks or alphas right: diffusers applies one scale per
    file and mis-scales the others."""
    import torch

    rank = _rank_of(down)
    scale = 1.0 if alpha is None else float(alpha) / rank
    down = down.float()
    if mid is not None:
        # Tucker LoCon: down (1x1), mid (kxk, r x r), up (1x1). A 1x1 conv followed by a kxk conv is one kxk conv.
        down = torch.einsum("ojhw,ji->oihw", mid.float(), down.flatten(1))
    return ModuleDelta("lora", {"lora_A": down, "lora_B": up.float() * scale}, rank)


# Suffixes of the LoRA tensor pairs we read: (down, up) in each naming scheme.
_PAIR_STYLES = (
    (".lora_down.weight", ".lora_up.weight"),  # kohya / diffusers-converted kohya
    (".lora_A.weight", ".lora_B.weight"),  # peft / new diffusers
    (".lora.down.weight", ".lora.up.weight"),  # old diffusers attn processors
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


def _diffusers_peft_alpha(metadata: dict) -> dict:
    """diffusers >= 0.34 stores each model's LoraConfig in the header: {"unet": {...}, "text_encoder": {...}}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = _json.loads(raw)
    except _json.JSONDecodeError:
        return {}
    out: dict = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        out.setdefault(prefix, {})[rest] = value
    return out


def _pattern_value(cfg: dict, name: str, path: str, default):
    for pat, value in (cfg.get(name) or {}).items():
        if _re.match(rf"(.*\.)?({pat})$", path):
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
        if ".lora_" in path:  # the adapters' own layers, where a stack has already wrapped this UNet
            continue
        path = path.replace(".base_layer", "")  # a wrapped module answers to its plain path
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


def read_lora(sd: dict, models: dict, *, metadata: dict | None = None, file_name: str = "the file",
              family_label: str = "base") -> AdapterWeights:
    """Any LoRA/LoCon file (kohya, diffusers or peft keys) -> AdapterWeights for `models`.

    Every module must exist in the base with matching shapes, else one UserError naming the likely family."""
    out = AdapterWeights()
    if "te1" in models and any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k or
                                                               "middle_block" in k) for k in sd):
        # On a two-encoder (SDXL) base only: elsewhere LDM names mean an SDXL file, and the error says so.
        sd = sgm_to_diffusers_names(sd, models["unet"])
    table = model_table(models)
    te_paths = {}
    for mk, p in table.values():
        if mk != "unet":
            te_paths[p] = mk
    peft_cfg = _diffusers_peft_alpha(metadata or {})

    groups: dict[str, dict] = {}
    for key, value in sd.items():
        for down_s, up_s in _PAIR_STYLES:
            for role, suffix in (("down", down_s), ("up", up_s)):
                if key.endswith(suffix):
                    groups.setdefault(key[: -len(suffix)], {})[role] = value
        if key.endswith(".alpha"):
            groups.setdefault(key[: -len(".alpha")], {})["alpha"] = value
        elif key.endswith(".lora_mid.weight"):
            groups.setdefault(key[: -len(".lora_mid.weight")], {})["mid"] = value
    unknown = []
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            if set(g) != {"alpha"}:
                unknown.append(name)
            continue
        where = _locate(name, table, models, te_paths)
        if where is None:
            unknown.append(name)
            continue
        mk, path = where
        alpha = g.get("alpha")
        if alpha is None and peft_cfg:
            cfg = peft_cfg.get("unet" if mk == "unet" else ("text_encoder" if mk == "te0" else "text_encoder_2"), {})
            if cfg:
                r = _pattern_value(cfg, "rank_pattern", path, cfg.get("r", _rank_of(g["down"])))
                a = _pattern_value(cfg, "alpha_pattern", path, cfg.get("lora_alpha", r))
                scale = float(a) / (float(r) ** 0.5 if cfg.get("use_rslora") else float(r))
                alpha = scale * _rank_of(g["down"])
        delta = _fold_lora(g["down"], g["up"], None if alpha is None else float(alpha), g.get("mid"))
        _match_conv_linear(delta, models[mk].get_submodule(path))
        _check_shape(delta, models[mk].get_submodule(path), f"{file_name}", path, family_label)
        out.add(mk, path, delta)
    if unknown:
        raise mismatch(file_name, f"{len(unknown)} of its modules, e.g. {unknown[0]}, are not in this model",
                       family_label, _family_hint(sd.keys(), None))
    if not out.count():
        raise _UserError(f"{file_name} has no LoRA tensors this app can read: is it a LoRA file?")
    return out


def _locate(name: str, table: dict, models: dict, te_paths: dict):
    """A module's (model key, path) from a kohya name or a dotted diffusers/peft prefix."""
    if name in table:
        return table[name]
    dotted = name
    for prefix in ("base_model.model.",):
        dotted = dotted.removeprefix(prefix)
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
        import torch

        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or hasattr(mod, "base_layer"):
            return model_key, cand
    return None


def base_weight_shape(module) -> tuple:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return tuple(module.weight.shape)


def _check_shape(delta: ModuleDelta, module, file_name: str, path: str, family_label: str) -> None:
    shape = base_weight_shape(module)
    if delta.kind != "lora":
        return
    a, b = delta.tensors["lora_A"], delta.tensors["lora_B"]
    out_dim, in_dim = shape[0], shape[1]
    ok = b.shape[0] == out_dim and a.shape[1] == in_dim and a.ndim == len(shape)
    if a.ndim == 4 and ok:
        ok = b.shape[2:] == (1, 1)
        if tuple(a.shape[2:]) != tuple(shape[2:]):
            ok = False
    if not ok:
        raise mismatch(file_name, f"module {path}: file {tuple(b.shape[:1]) + tuple(a.shape[1:])}, model {shape}",
                       family_label, _guess_from_shape((b.shape[0], a.shape[1]), shape))


def _match_conv_linear(delta: ModuleDelta, module) -> None:
    """SD1's proj_in/proj_out are 1x1 convs, SD2's are Linear: files made on one load on the other."""
    shape = base_weight_shape(module)
    a, b = delta.tensors["lora_A"], delta.tensors["lora_B"]
    if len(shape) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
        delta.tensors.update(lora_A=a.flatten(1), lora_B=b.flatten(1))
    elif len(shape) == 4 and shape[2:] == (1, 1) and a.ndim == 2:
        delta.tensors.update(lora_A=a[:, :, None, None], lora_B=b[:, :, None, None])


def inject(model, adapter_name: str, deltas: dict) -> list:
    """Add `deltas` ({module path: ModuleDelta}) to `model` as peft adapter `adapter_name`; returns
    [(module path, peft layer)] for the layers that hold it. Scales are folded into the tensors, so each layer's scaling is set to 1 (the stack
    sets it to the item's weight later).

    The tensors are copied straight into each layer's parameters rather than through
    set_peft_model_state_dict: once two adapter types wrap one module (a LoRA inside a LoHa), peft's state-dict
    keys grow `base_layer.` segments that depend on the load order."""
    import warnings

    import torch
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    layers = []
    for kind in ("lora", "loha", "lokr"):
        group = {p: d for p, d in deltas.items() if d.kind == kind}
        if not group:
            continue
        ranks = _rank_patterns(group)
        targets = sorted(group)
        if kind == "lora":
            cfg = LoraConfig(r=1, lora_alpha=1, target_modules=targets, rank_pattern=ranks, alpha_pattern=ranks,
                             init_lora_weights=False)
        elif kind == "loha":
            cfg = LoHaConfig(r=1, alpha=1, target_modules=targets, rank_pattern=ranks, alpha_pattern=ranks,
                             init_weights=False)
        else:
            both = any("lokr_w1_a" in d.tensors for d in group.values())
            cfg = LoKrConfig(r=1, alpha=1, target_modules=targets, rank_pattern=ranks, alpha_pattern=ranks,
                             decompose_both=both, init_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject_adapter_in_model(cfg, model, adapter_name)
        for path, delta in group.items():
            layer = owner_layer(model.get_submodule(path), adapter_name)
            if layer is None:
                raise _UserError(f"Could not attach the adapter to {path}: this module type is not supported.")
            for pname, value in delta.tensors.items():
                param = getattr(layer, pname)[adapter_name]
                param = param.weight if hasattr(param, "weight") else param
                if param.numel() != value.numel():
                    raise _UserError(f"The {kind} tensor {path}.{pname} has shape {tuple(value.shape)} but this model "
                                     f"needs {tuple(param.shape)}: the file's layout is not supported.")
                with torch.no_grad():
                    param.copy_(value.reshape(param.shape).to(param.dtype))
                param.requires_grad_(False)
            layer.scaling[adapter_name] = 1.0
            layers.append((path, layer))
    return layers


def _rank_patterns(group: dict) -> dict:
    """peft's rank_pattern for `group` ({module path: delta}): one alternation of paths per distinct rank. One
    pattern per module made peft compile about N x N regexes once N outgrew `re`'s cache of 512 (an SDXL LoRA's
    700+ modules took minutes to attach); a file has a handful of ranks."""
    by_rank: dict[int, list[str]] = {}
    for path, delta in group.items():
        by_rank.setdefault(delta.rank, []).append(_re.escape(path))
    return {"|".join(sorted(paths)): rank for rank, paths in by_rank.items()}


def owner_layer(module, adapter_name: str):
    """The peft layer in a chain of wrappers (module.base_layer.base_layer...) that holds `adapter_name`."""
    while module is not None:
        for attr in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a"):
            holder = getattr(module, attr, None)
            if holder is not None and adapter_name in holder:
                return module
        module = getattr(module, "base_layer", None)
    return None
