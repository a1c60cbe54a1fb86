"""LyCORIS LoHa / LoKr files (hada_*, lokr_* keys) -> per-module deltas that peft's LoHa/LoKr layers hold.

diffusers' load_lora_weights rejects these keys; peft has the layers. We map each module's tensors onto peft's
parameter names with alpha/rank folded in per module (lora.inject then adds them through LoHaConfig /
LoKrConfig). LoCon modules (lora_down/lora_up) in the same file go through the LoRA reader.
"""
from __future__ import annotations

from ..errors import UserError
from .lora import AdapterWeights, ModuleDelta, _family_hint, base_weight_shape, mismatch, model_table, read_lora

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2", "dora_scale")


def read_lycoris(sd: dict, models: dict, *, file_name: str = "the file", family_label: str = "base",
                 metadata: dict | None = None) -> AdapterWeights:
    table = model_table(models)
    groups: dict[str, dict] = {}
    lora_part = {}
    for key, value in sd.items():
        module, _, rest = key.partition(".")
        if rest.startswith(("lora_down", "lora_up", "lora_mid")):
            lora_part[key] = value
            continue
        groups.setdefault(module, {})[rest.removesuffix(".weight")] = value
    out = read_lora(lora_part | {k: v for k, v in sd.items() if k.endswith(".alpha") and
                                 k[:-6] + ".lora_down.weight" in lora_part},
                    models, file_name=file_name, family_label=family_label) if lora_part else AdapterWeights()
    unknown = []
    for name, g in groups.items():
        if not any(k in g for k in LOHA_KEYS + LOKR_KEYS):
            continue  # an alpha belonging to a LoCon module, read above
        bad = [k for k in UNSUPPORTED if k in g]
        if bad:
            raise UserError(f"{file_name} uses {bad[0]} (a Tucker/DoRA LyCORIS variant) on {name}, which the "
                            f"Playground cannot load yet: re-save it without use_tucker/DoRA.")
        if name not in table:
            unknown.append(name)
            continue
        mk, path = table[name]
        shape = base_weight_shape(models[mk].get_submodule(path))
        delta = _loha(g) if "hada_w1_a" in g else _lokr(g, shape)
        out_dim = shape[0]
        numel = 1
        for s in shape:
            numel *= s
        if _delta_numel(delta) != numel or _out_dim(delta) != out_dim:
            raise mismatch(file_name, f"module {path} has a different size", family_label, "another model family")
        out.add(mk, path, delta)
    if unknown:
        raise mismatch(file_name, f"{len(unknown)} of its modules, e.g. {unknown[0]}, are not in this model",
                       family_label, _family_hint(sd.keys(), None))
    if not out.count():
        raise UserError(f"{file_name} has no LyCORIS tensors this app can read: is it a LoHa/LoKr file?")
    return out


def _loha(g: dict) -> ModuleDelta:
    rank = int(g["hada_w1_b"].shape[0])
    alpha = float(g["alpha"]) if "alpha" in g else float(rank)
    scale = alpha / rank
    t = {k: g[k].float() for k in LOHA_KEYS}
    t["hada_w1_a"] = t["hada_w1_a"] * scale  # (w1a w1b) * (w2a w2b) is linear in w1a: fold the scale there
    return ModuleDelta("loha", t, rank)


def _lokr(g: dict, shape: tuple) -> ModuleDelta:
    """LyCORIS applies alpha/rank only when a factor is decomposed; with both factors full the scale is 1."""
    t = {k: g[k].float() for k in LOKR_KEYS if k in g}
    if "lokr_w2_a" in t:
        rank = int(t["lokr_w2_a"].shape[1])
    elif "lokr_w1_a" in t:
        rank = int(t["lokr_w1_a"].shape[1])
    else:
        rank = None
    if rank is None:
        scale = 1.0
        # peft keeps w2 whole when r >= max(w2 dims) / 2: ask for a rank that large.
        w2 = t["lokr_w2"]
        rank = int(max(w2.shape[0], w2.flatten(1).shape[1]))
    else:
        scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
    first = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
    t[first] = t[first] * scale  # kron(w1, w2) is linear in w1
    return ModuleDelta("lokr", t, rank)


def _out_dim(delta: ModuleDelta) -> int:
    t = delta.tensors
    if delta.kind == "loha":
        return int(t["hada_w1_a"].shape[0])
    a = t["lokr_w1"].shape[0] if "lokr_w1" in t else t["lokr_w1_a"].shape[0]
    b = t["lokr_w2"].shape[0] if "lokr_w2" in t else t["lokr_w2_a"].shape[0]
    return int(a * b)


def _delta_numel(delta: ModuleDelta) -> int:
    t = delta.tensors
    if delta.kind == "loha":
        return int(t["hada_w1_a"].shape[0] * t["hada_w1_b"].shape[1])
    w1 = t["lokr_w1"].numel() if "lokr_w1" in t else t["lokr_w1_a"].shape[0] * t["lokr_w1_b"].shape[1]
    w2 = t["lokr_w2"].numel() if "lokr_w2" in t else t["lokr_w2_a"].shape[0] * t["lokr_w2_b"][0].numel()
    return int(w1 * w2)
