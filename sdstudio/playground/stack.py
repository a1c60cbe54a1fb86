"""The adapter stack on a loaded base: LoRA/LoCon/LoHa/LoKr and embeddings, with per-item weights.

`Stack.apply(recipe)` compares the recipe with what is loaded and does the least work:
- each adapter file is read once (through `read_adapter_file`, the one door every adapter read goes through)
  and stays loaded, inactive, after it leaves the recipe, so adding it back costs nothing;
- a weight, block-weight or enable change goes through `set_adapters`: it only sets each peft layer's
  scaling and active list, reading no file;
- unfused, each layer applies its LoRAs the cheaper exact way per call, or, within a memory budget, keeps
  W + sum s B@A from its first call after a change (`MergedWeights`), so a stack that stays put costs
  what the base costs;
- `fuse=True` merges the always-on adapters into the base weights (the fast path for a stack that does not
  change); the touched base weights are backed up first, so unfusing restores the base bit for bit;
- step ranges switch LoRAs on and off per denoising step (`on_step`).
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..formats.kinds import detect_kind_from_keys
from .recipe import EmbeddingItem, LoraItem, Recipe

log = logging.getLogger("sdstudio.playground")

# Every adapter file read increments this (tests and `sdstudio bench generate` count reads with it).
FILE_READS = {"count": 0}
_READ_LOCK = threading.Lock()


def read_adapter_file(path: Path, allow_pickle: bool = False, embedding: bool = False) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of an adapter or embedding file: the one function that reads them.
    An embedding's .pt is read with weights_only=True by default (formats.embeddings.read_embedding_state)."""
    from ..formats.embeddings import read_embedding_state
    from ..formats.safe_io import check_tensors, load_state_dict, read_safetensors_metadata

    with _READ_LOCK:
        FILE_READS["count"] += 1
    sd = read_embedding_state(path, allow_pickle) if embedding else load_state_dict(path, allow_pickle=allow_pickle)
    check_tensors(sd, path.name)
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return sd, meta


# -- LoRA-Block-Weight ---------------------------------------------------------------------------------

def block_ids(unet) -> list[str]:
    """A1111 LoRA-Block-Weight ids in full form: BASE, IN00.., M00, OUT00.. (26 for SD1.x, 20 for SDXL)."""
    per_block = unet.config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    n_down = len(unet.config.down_block_types)
    n_in = n_down * (per_block + 1)
    n_out = len(unet.config.up_block_types) * (per_block + 1)
    return ["BASE"] + [f"IN{i:02d}" for i in range(n_in)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


# The short forms list only the blocks that hold attention (what most LoRAs train).
SHORT_FORMS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
         "OUT08", "OUT09", "OUT10", "OUT11"],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
}


def block_of(model_key: str, path: str, unet) -> str:
    """The LoRA-Block-Weight block a module belongs to; resnets, convs, samplers included (not only attention)."""
    if model_key != "unet":
        return "BASE"
    per_block = unet.config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    n_up = len(unet.config.up_block_types) * (per_block + 1)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)", path)
    if m:
        b, part, j = int(m[1]), m[2], int(m[3])
        idx = b * (per_block + 1) + (per_block + 1 if part == "downsamplers" else j + 1)
        return f"IN{idx:02d}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)", path)
    if m:
        b, part, j = int(m[1]), m[2], int(m[3])
        idx = b * (per_block + 1) + (per_block if part == "upsamplers" else j)
        return f"OUT{idx:02d}"
    if path.startswith("mid_block"):
        return "M00"
    if path.startswith(("conv_out", "conv_norm_out")):
        return f"OUT{n_up - 1:02d}"
    return "IN00"  # conv_in, time_embedding, add_embedding: the entry of the network


def block_table(blocks: list[float], unet, where: str = "blocks") -> dict[str, float]:
    """Block weights by id. Accepts the full form (26 SD1.x / 20 SDXL) or the short form (17 / 12); blocks a
    short form leaves out keep weight 1."""
    ids = block_ids(unet)
    if not blocks:
        return {}
    if len(blocks) == len(ids):
        return dict(zip(ids, blocks))
    short = SHORT_FORMS.get(len(blocks))
    if short and all(b in ids for b in short):
        table = {i: 1.0 for i in ids}
        table.update(zip(short, blocks))
        return table
    forms = [str(len(ids))] + [str(n) for n, s in SHORT_FORMS.items() if all(b in ids for b in s)]
    raise UserError(f"{where} has {len(blocks)} block weights; this base takes {' or '.join(forms)} "
                    f"(LoRA-Block-Weight order: {', '.join(ids[:4])}, ...).")


# -- A1111 <lora:name:weight> in the prompt -------------------------------------------------------------

_PROMPT_LORA = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)


def extract_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """Remove A1111 `<lora:name>`, `<lora:name:w>`, `<lora:name:te_w:unet_w>` tags from a prompt.

    Returns the clean prompt and [(name, unet weight, text-encoder weight)]."""
    found = []

    def take(m: re.Match) -> str:
        args = [a for a in m[3].split(":")[1:] if a.strip()]
        try:
            nums = [float(a) for a in args]
        except ValueError:
            raise UserError(f"The prompt tag {m[0]} has a weight that is not a number: write <lora:name:0.8>.") from None
        te = nums[0] if nums else 1.0
        unet = nums[1] if len(nums) > 1 else te
        found.append((m[2].strip(), unet, te))
        return ""

    clean = _PROMPT_LORA.sub(take, prompt)
    clean = re.sub(r"\s*,\s*(,\s*)+", ", ", clean).strip().strip(",").strip()
    return clean, found


def resolve_prompt_loras(recipe: Recipe, lora_dir: Path | None) -> Recipe:
    """The recipe with its prompt's <lora:...> tags turned into [[lora]] items found in `lora_dir`."""
    clean, tags = extract_prompt_loras(recipe.prompt)
    if not tags:
        return recipe
    items = list(recipe.lora)
    for name, unet_w, te_w in tags:
        path = None
        if lora_dir is not None:
            for cand in sorted(lora_dir.rglob("*")):
                if cand.is_file() and cand.suffix in (".safetensors", ".pt") and cand.stem == name:
                    path = cand
                    break
        if path is None:
            raise UserError(f"<lora:{name}> in the prompt names no file in {lora_dir or 'models/lora'}: "
                            f"put {name}.safetensors there or fix the name.")
        items.append(LoraItem(path=str(path), weight=unet_w, text_encoder_weight=te_w))
    return recipe.replace(prompt=clean, lora=items)


# -- the stack ------------------------------------------------------------------------------------------

@dataclass
class _Adapter:
    name: str  # the peft adapter name
    path: Path
    kind: str  # "lora" | "lycoris"
    layers: list = field(default_factory=list)  # [(model key, module path, peft layer)]
    bundle: list = field(default_factory=list)  # _LoadedEmbedding for each bundle_emb.* in the file


@dataclass
class _LoadedEmbedding:
    path: Path
    token: str
    internal: list[list[str]]  # per text encoder: the internal tokens that carry its vectors


class Stack:
    """Adapters and embeddings on one loaded base (Components). Not thread-safe: one generation at a time."""

    def __init__(self, comps, resolve: Callable[[str], Path] | None = None, allow_pickle: bool = False,
                 max_unused: int = 8, merge_cache_bytes: int | None = None):
        self.comps = comps
        self.resolve = resolve or (lambda p: Path(p))
        self.allow_pickle = allow_pickle
        self.max_unused = max_unused  # loaded-but-unused adapters kept in memory before the oldest is dropped
        self.models = {"unet": comps.unet, **{f"te{i}": te for i, te in enumerate(comps.text_encoders)}}
        self.adapters: dict[Path, _Adapter] = {}
        self.embeddings: dict[Path, _LoadedEmbedding] = {}
        self._counter = 0
        self._items: list[tuple[_Adapter, LoraItem]] = []  # what the current recipe asks for, in order
        self._blocks: dict[str, dict[str, float]] = {}  # adapter name -> block table
        self._block_of: dict[int, str] = {}  # id(layer) -> block id
        self._range_on: dict[str, bool] = {}  # adapter name -> inside its step range now
        self._fused: set[str] = set()
        self._fused_sig = None
        self._backup: dict[int, tuple] = {}  # id(base module) -> (module, original weight on CPU)
        self._active_embeddings: list[_LoadedEmbedding] = []
        self._wanted: dict[int, tuple] = {}  # id(layer) -> (layer, adapter names wanted there, in order)
        # W + sum s B@A kept per layer between generations, within a memory budget (None: from free memory)
        self.merged = MergedWeights(merge_cache_bytes)

    # 1. Apply a recipe with the least work ------------------------------------------------------------
    def apply(self, recipe: Recipe, fuse: bool = False) -> None:
        wanted: list[tuple[Path, LoraItem]] = []
        seen = set()
        for item in recipe.lora:
            path = self.resolve(item.path)
            if path in seen and item.enabled:
                raise UserError(f"{Path(item.path).name} is in the stack twice: remove one and set its weight.")
            seen.add(path)
            wanted.append((path, item))
        for path, item in wanted:
            if item.enabled and path not in self.adapters:
                self._load_adapter(path)
        self._items = [(self.adapters[p], it) for p, it in wanted if it.enabled]
        self._blocks = {a.name: block_table(it.blocks, self.comps.unet, f"{a.path.name}'s blocks")
                        for a, it in self._items}
        self._range_on = {a.name: True for a, _ in self._items}
        self._drop_unused({p for p, it in wanted})
        self._apply_embeddings(recipe.embedding)
        self._active_embeddings += [e for a, _ in self._items for e in a.bundle]

        signature = tuple((a.name, it.weight, it.text_encoder_weight, tuple(it.blocks))
                          for a, it in self._items if self._full_range(it))
        if self._fused and (not fuse or signature != self._fused_sig):
            self.unfuse()
        self._refresh()
        if fuse and not self._fused and signature:
            self.fuse({name for name, *_ in signature})
            self._fused_sig = signature

    def set_adapters(self, weights: dict[str, float], text_encoder_weights: dict[str, float] | None = None) -> None:
        """Change weights of loaded adapters by file path (or name) without reading anything."""
        te = text_encoder_weights or {}
        new = []
        for a, it in self._items:
            key = str(a.path) if str(a.path) in weights else a.path.name if a.path.name in weights else a.name
            w = weights.get(key, it.weight)
            tw = te.get(key, it.text_encoder_weight)
            new.append((a, LoraItem(path=it.path, weight=w, text_encoder_weight=tw, blocks=it.blocks, start=it.start,
                                    end=it.end)))
        self._items = new
        if self._fused:
            self.unfuse()
        self._refresh()

    @staticmethod
    def _full_range(item: LoraItem) -> bool:
        return item.start <= 0.0 and item.end >= 1.0

    @property
    def has_step_ranges(self) -> bool:
        return any(not self._full_range(it) for _, it in self._items)

    @property
    def fused(self) -> bool:
        return bool(self._fused)

    # 2. Load a file once ---------------------------------------------------------------------------------
    def _load_adapter(self, path: Path) -> _Adapter:
        from ..formats.lora import inject, read_lora
        from ..formats.lycoris import read_lycoris

        if not path.exists():
            raise UserError(f"{path.name} does not exist: check the path of the LoRA.")
        if path.is_dir():
            cands = sorted(path.glob("*.safetensors"))
            if len(cands) != 1:
                raise UserError(f"{path.name} is a folder: point at the LoRA .safetensors file inside it.")
            path = cands[0]
        sd, meta = read_adapter_file(path, self.allow_pickle)
        kind = detect_kind_from_keys(sd.keys())
        family = self.comps.family.label
        if kind == "edlora":  # a Mix-of-Show concept: its layer-wise tokens go in, its LoRA part loads as a LoRA
            from ..methods.edlora import load_concept_tokens

            sd, kind = load_concept_tokens(self.comps, sd, meta, path), "lora"
        bundle = {}
        if kind == "lora":  # embeddings bundled in the LoRA (kohya/A1111 bundle_emb.*) come along with it
            from ..methods.pivotal import bundled_embeddings

            bundle = bundled_embeddings(sd)
            sd = {k: v for k, v in sd.items() if not k.startswith("bundle_emb.")}
        if kind == "lora":
            weights = read_lora(sd, self.models, metadata=meta, file_name=path.name, family_label=family)
        elif kind == "lycoris":
            weights = read_lycoris(sd, self.models, metadata=meta, file_name=path.name, family_label=family)
        elif kind == "unknown":
            raise UserError(f"{path.name} is not a LoRA or LyCORIS file (none of its tensor names is one a LoRA has): "
                            f"check that you picked the right file.")
        else:
            raise UserError(f"{path.name} is a {kind} file, not a LoRA or LyCORIS file: add it as a {kind} item.")
        self._counter += 1
        adapter = _Adapter(name=f"sds{self._counter}", path=path, kind=kind)
        from ..formats.embeddings import Embedding

        adapter.bundle = [self._install_embedding(path, Embedding([v], t), f"b{self._counter}-{i}")
                          for i, (t, v) in enumerate(bundle.items())]
        if self._fused:
            self.unfuse()  # injecting wraps modules; keep the base weights plain while we do it
        for mk, deltas in weights.targets.items():
            model = self.models[mk]
            for path_of, layer in inject(model, adapter.name, deltas):
                adapter.layers.append((mk, path_of, layer))
                self._block_of[id(layer)] = block_of(mk, path_of, self.comps.unet)
                install_merged_forward(layer)
        for model in self.models.values():
            model.requires_grad_(False)
        self.adapters[path] = adapter
        log.info("loaded %s (%s, %d modules)", path.name, kind, len(adapter.layers))
        return adapter

    def _drop_unused(self, keep: set[Path]) -> None:
        unused = [p for p in self.adapters if p not in keep]
        for path in unused[: max(0, len(unused) - self.max_unused)]:
            adapter = self.adapters.pop(path)
            for _mk, _path, layer in adapter.layers:
                layer.delete_adapter(adapter.name)
                # peft makes another adapter active when the active one goes (our MIX, say). Nothing is active
                # until the next refresh, which visits every layer a remaining adapter uses.
                layer.__dict__["_active_adapter"] = []
                if "_sds_plan" in layer.__dict__:
                    layer.__dict__["_sds_plan"] = None
                    layer.__dict__["_sds_plan_key"] = None
                    self.merged.release(layer)
                lora_a = getattr(layer, "lora_A", None)
                if lora_a is not None and MIX in lora_a and len(lora_a) == 1:  # a mix of nothing: free it
                    layer.delete_adapter(MIX)
                    for key in ("_sds_mix_key", "_sds_mix_slices", "_sds_mix_scales"):
                        layer.__dict__.pop(key, None)

    # 3. Weights -> each peft layer's scaling and active list -------------------------------------------
    def _layers(self):
        seen = {}
        for a in self.adapters.values():
            for mk, path, layer in a.layers:
                seen[id(layer)] = (mk, layer)
        return seen.values()

    def _refresh(self) -> None:
        """Set every layer's scaling and active list from the items. Where two or more plain LoRAs are active on
        one layer, they run as one concatenated low-rank pair (`MIX`): one A and one B matmul instead of two
        per LoRA, which is most of the unfused per-step cost."""
        self._wanted = {}
        self.merged.new_budget()
        for mk, layer in self._layers():
            wanted = []
            for a, it in self._items:
                if a.name not in layer.scaling or not self._range_on.get(a.name, True):
                    continue
                scale = self._scale(a.name, it, mk, layer)
                if scale == 0:
                    continue  # skipped, not multiplied by 0: weight 0 costs nothing and equals absence exactly
                layer.scaling[a.name] = scale
                wanted.append(a.name)
            self._wanted[id(layer)] = (layer, wanted)
            names = [n for n in wanted if n not in self._fused]
            plain = [n for n in names if _is_plain_lora(layer, n)]
            if len(plain) >= 2:
                _set_mix(layer, plain)
                names = [n for n in names if n not in plain] + [MIX]
            layer.__dict__["_active_adapter"] = names  # a plain attribute: skip nn.Module.__setattr__'s checks
            plan_merged_forward(layer, names, self.merged)

    def _scale(self, name: str, item: LoraItem, model_key: str, layer) -> float:
        w = item.weight if model_key == "unet" else (
            item.weight if item.text_encoder_weight is None else item.text_encoder_weight)
        table = self._blocks.get(name)
        if table:
            w *= table.get(self._block_of.get(id(layer), "IN00"), 1.0)
        return float(w)

    # 4. Step ranges -------------------------------------------------------------------------------------
    def on_step(self, step: int, total: int) -> None:
        """Turn ranged LoRAs on/off for denoising step `step` of `total` (the UNet only: the prompt is encoded
        before the loop). Active while start <= step/total and (step+1)/total <= end, like ControlNet's
        guidance start/end."""
        changed = False
        for a, it in self._items:
            if self._full_range(it):
                continue
            on = step / total >= it.start and (step + 1) / total <= it.end + 1e-9
            if self._range_on.get(a.name) != on:
                self._range_on[a.name] = on
                changed = True
        if changed:
            self._refresh()

    def reset_steps(self) -> None:
        if any(not v for v in self._range_on.values()):
            self._range_on = {k: True for k in self._range_on}
            self._refresh()

    # 5. Fused fast path ---------------------------------------------------------------------------------
    def fuse(self, names: set[str]) -> None:
        """Merge the named adapters into the base weights (skipping any that would make a weight non-finite,
        like peft's safe_merge), after backing the touched weights up to CPU for an exact unfuse."""
        import torch

        with torch.no_grad():
            for layer, wanted in self._wanted.values():
                for name in [n for n in wanted if n in names]:
                    base = layer.get_base_layer()
                    delta = layer.get_delta_weight(name)
                    merged = base.weight.data.float() + delta.float().reshape(base.weight.shape)
                    if not torch.isfinite(merged).all():
                        raise UserError(f"Fusing the LoRA stack made {type(base).__name__} weights overflow: lower "
                                        f"the weights, or turn fusing off.")
                    if id(base) not in self._backup:
                        self._backup[id(base)] = (base, base.weight.data.to("cpu", copy=True))
                    # On the parameter, not .data: its version counter moves, so nothing kept from it goes stale.
                    base.weight.copy_(merged.to(base.weight.dtype))
        self._fused = set(names)
        self._refresh()

    def unfuse(self) -> None:
        """Put the exact original base weights back."""
        import torch

        with torch.no_grad():
            for base, original in self._backup.values():
                base.weight.copy_(original.to(base.weight.device))
        self._backup.clear()
        self._fused = set()
        self._fused_sig = None
        self._refresh()

    # 6. Embeddings ---------------------------------------------------------------------------------------
    def _apply_embeddings(self, items: list[EmbeddingItem]) -> None:
        active = []
        tokens = set()
        for item in items:
            if not item.enabled:
                continue
            path = self.resolve(item.path)
            loaded = self.embeddings.get(path)
            if loaded is None:
                loaded = self._load_embedding(path, item.token)
            if item.token:
                loaded.token = item.token
            if loaded.token in tokens:
                raise UserError(f"Two embeddings use the token {loaded.token}: give one another token.")
            tokens.add(loaded.token)
            active.append(loaded)
        self._active_embeddings = active

    def _load_embedding(self, path: Path, token: str) -> _LoadedEmbedding:
        import torch

        from ..formats.embeddings import embedding_from_state

        if not path.is_file():
            raise UserError(f"{path.name} does not exist: check the path of the embedding.")
        sd, _meta = read_adapter_file(path, self.allow_pickle, embedding=True)
        emb = embedding_from_state(sd, path.name, token)
        emb.token = token or emb.token or f"<{path.stem}>"
        loaded = self._install_embedding(path, emb, str(len(self.embeddings) + 1))
        self.embeddings[path] = loaded
        return loaded

    def _install_embedding(self, path: Path, emb, k: str) -> _LoadedEmbedding:
        """Add an embedding's vectors to the tokenizers/text encoders under internal tokens <sdstudio-emb{k}-j>."""
        import torch

        tes, toks = self.comps.text_encoders, self.comps.tokenizers
        if len(emb.vectors) != len(tes):
            need = "clip_l and clip_g" if len(tes) == 2 else "one vector set"
            raise UserError(f"{path.name} is an embedding for another model family (this base needs {need}): "
                            f"pick a matching embedding.")
        internal = []
        for i, (te, tok, vec) in enumerate(zip(tes, toks, emb.vectors)):
            table = te.get_input_embeddings()
            if vec.shape[1] != table.weight.shape[1]:
                raise UserError(f"{path.name} has {vec.shape[1]}-wide vectors but this {self.comps.family.label} "
                                f"text encoder uses {table.weight.shape[1]}: it is for another model family.")
            names = [f"<sdstudio-emb{k}-{j}>" for j in range(vec.shape[0])]
            tok.add_tokens(names)
            te.resize_token_embeddings(len(tok))
            table = te.get_input_embeddings()
            ids = tok.convert_tokens_to_ids(names)
            with torch.no_grad():
                table.weight[ids] = vec.to(table.weight.dtype).to(table.weight.device)
            table.weight.requires_grad_(False)
            internal.append(names)
        return _LoadedEmbedding(path=path, token=emb.token, internal=internal)

    def expand_prompt(self, text: str, encoder: int = 0) -> str:
        """Replace each active embedding's token with the internal tokens that carry its vectors. Disabled or
        removed embeddings are not replaced, so their token reads as plain text, as if never loaded."""
        for emb in self._active_embeddings:
            pattern = rf"(?<![\w<]){re.escape(emb.token)}(?![\w>])"
            text = re.sub(pattern, " ".join(emb.internal[encoder]), text)
        return text

    def describe(self) -> list[str]:
        return [f"{a.path.name} ({a.kind}) weight {it.weight:g}" for a, it in self._items]


MIX = "sdsmix"  # the concatenated LoRA a layer runs when several plain LoRAs are active on it


def _is_plain_lora(layer, name: str) -> bool:
    lora_a = getattr(layer, "lora_A", None)
    return lora_a is not None and name in lora_a and name not in getattr(layer, "lora_variant", {}) and \
        not getattr(layer, "use_dora", {}).get(name, False)


def _set_mix(layer, names: list[str]) -> None:
    """Write `names` into the layer's MIX adapter: A = [A_1; A_2; ...], B = [s_1 B_1, s_2 B_2, ...], so
    B A x = sum_i s_i B_i A_i x. A is rebuilt only when the set of LoRAs changes; B on every weight change."""
    import torch

    key = tuple(names)
    if layer.__dict__.get("_sds_mix_key") != key:
        a_list = [layer.lora_A[n].weight for n in names]
        a0 = layer.lora_A[names[0]]
        rank = sum(w.shape[0] for w in a_list)
        b0 = layer.lora_B[names[0]].weight
        # Built on the meta device (no random init), then given real weights.
        if isinstance(a0, torch.nn.Conv2d):
            mix_a = torch.nn.Conv2d(a0.in_channels, rank, a0.kernel_size, a0.stride, a0.padding, a0.dilation,
                                    a0.groups, bias=False, device="meta")
            mix_b = torch.nn.Conv2d(rank, b0.shape[0], 1, bias=False, device="meta")
        else:
            mix_a = torch.nn.Linear(a0.in_features, rank, bias=False, device="meta")
            mix_b = torch.nn.Linear(rank, b0.shape[0], bias=False, device="meta")
        mix_a.weight = torch.nn.Parameter(torch.cat(a_list, 0).detach(), requires_grad=False)
        mix_b.weight = torch.nn.Parameter(torch.empty((b0.shape[0], rank, *b0.shape[2:]), dtype=b0.dtype,
                                                      device=b0.device), requires_grad=False)
        layer.lora_A[MIX], layer.lora_B[MIX] = mix_a, mix_b
        layer.lora_dropout[MIX] = torch.nn.Identity()
        layer.r[MIX], layer.lora_alpha[MIX] = rank, rank
        layer.scaling[MIX] = 1.0
        layer.__dict__["_sds_mix_key"] = key
        layer.__dict__.pop("_sds_mix_scales", None)  # a new B is empty: it must be written below
        # (output slice of the mix's B, that LoRA's own B) pairs: a weight change rescales slices in place.
        out, start = [], 0
        for n in names:
            b = layer.lora_B[n].weight
            out.append((layer.lora_B[MIX].weight[:, start:start + b.shape[1]], b))
            start += b.shape[1]
        layer.__dict__["_sds_mix_slices"] = out
    scales = tuple(float(layer.scaling[n]) for n in names)
    if layer.__dict__.get("_sds_mix_scales") == scales:
        return  # unchanged: leave B alone, so this layer's plan (and its cached merged weight) stays valid
    with torch.no_grad():
        for (dst, src), scale in zip(layer.__dict__["_sds_mix_slices"], scales):
            torch.mul(src, scale, out=dst)
    layer.__dict__["_sds_mix_scales"] = scales


def install_merged_forward(layer) -> None:
    """Give a peft LoRA Linear/Conv2d layer a forward that applies its active plain LoRAs (weights already
    scaled, or the concatenated MIX) the cheaper of two exact ways, call by call:

    - branch (peft's way): base(x) + s B(A(x)), costing tokens x rank x (in + out) multiply-adds;
    - merged on the fly (LyCORIS's way for LoHa/LoKr): the base op with W + s B@A, costing out x in x rank
      once per call, whatever the number of tokens.

    On the UNet's spatial layers (thousands of tokens at 512 px) merging is several times cheaper; on the
    text encoder (77 tokens, wide layers) the branch is. When the Stack's `MergedWeights` budget has room,
    the merged weight is instead kept from the first call until the plan changes, and every later call is the
    base op alone. The base weights are never written, so weight changes, step ranges and unfusing stay
    instant and exact. The work is planned once per weight change
    (`plan_merged_forward`, from Stack._refresh), so a call does no lookups. Without a plan (LoHa/LoKr/DoRA
    active, nested adapters, disabled adapters, extra arguments) it runs peft's own forward."""
    import types

    import torch
    from peft.tuners.lora.layer import Conv2d as PeftConv2d
    from peft.tuners.lora.layer import Linear as PeftLinear

    if "forward" in vars(layer):
        return
    is_linear = type(layer) is PeftLinear and type(layer.base_layer) is torch.nn.Linear and not layer.fan_in_fan_out
    is_conv = type(layer) is PeftConv2d and type(layer.base_layer) is torch.nn.Conv2d and layer.base_layer.groups == 1
    if not (is_linear or is_conv):
        return
    peft_forward = type(layer).forward
    layer.__dict__["_sds_plan"] = None

    def forward(self, x, *args, **kwargs):
        plan = self.__dict__["_sds_plan"]
        if plan is None or args or kwargs or self._disable_adapters:
            return peft_forward(self, x, *args, **kwargs)
        return plan(x)

    layer.forward = types.MethodType(forward, layer)


def plan_merged_forward(layer, names: list[str], cache: "MergedWeights | None" = None) -> None:
    """(Re)plan the merged forward of `layer` for the active adapters `names` at their current scalings.

    With a `cache` that has room, W + sum s B@A is computed at the first call without autograd and kept until
    the plan changes (a weight change, a step range switching, fusing), so later calls cost the base op alone.
    A layer whose adapters, scalings and weights are unchanged keeps its plan and cached weight."""
    import torch
    import torch.nn.functional as F

    if "_sds_plan" not in layer.__dict__:
        return
    base = layer.base_layer
    # Adapter names are never reused and a loaded adapter's A and B never change; the MIX's content is fixed
    # by its member names and scales. So these say everything the plan depends on.
    scaling, d = layer.scaling, layer.__dict__
    key = (tuple(names), tuple(scaling.get(n) for n in names), d.get("_sds_mix_key"), d.get("_sds_mix_scales"),
           id(base.weight), base.weight._version)
    if layer.__dict__.get("_sds_plan_key") == key and layer.__dict__["_sds_plan"] is not None:
        return
    layer.__dict__["_sds_plan"] = None
    layer.__dict__["_sds_plan_key"] = key
    if cache is not None:
        cache.release(layer)
    if not names:  # nothing active here (fused, or every weight 0): the base op alone, as peft computes it
        layer.__dict__["_sds_plan"] = base
        return
    conv = isinstance(base, torch.nn.Conv2d)
    if not all(n in layer.lora_A and _mergeable(layer, n, base, conv) for n in names):
        return
    w = base.weight
    out_f, in_f = w.shape[0], w.shape[1]
    k = w[0, 0].numel()  # kernel area (1 for a Linear)
    # Modules, not tensors: weights are read at call time, so moving the model (.to) never leaves us stale.
    pairs = [(layer.lora_A[n], layer.lora_B[n], float(layer.scaling[n])) for n in names]
    rank = sum(a.weight.shape[0] for a, _, _ in pairs)
    # Merge when tokens x rank x (in k + out) > out x in k x (rank + 1): the branch's cost against B@A and the add.
    min_tokens = out_f * in_f * k * (rank + 1) / (rank * (in_f * k + out_f))

    def merged_weight():
        w = base.weight
        merged = w.view(out_f, -1)
        for a, b, s in pairs:
            aw = a.weight
            merged = torch.addmm(merged, b.weight.view(out_f, -1), aw.view(aw.shape[0], -1), alpha=s)
        return merged.view(w.shape)

    held = cache.slot(layer, base) if cache is not None else None

    def kept():
        """The cached merged weight, made at the first call with room in the budget; None to merge per call."""
        if held is None or torch.is_grad_enabled():  # training or autograd tests: never hand out a kept tensor
            return None
        got = held.get()
        if got is None and held.reserve():
            with torch.no_grad():
                got = held.keep(merged_weight())
        return got

    if conv:
        stride, padding = base.stride, base.padding

        def op(x, w):
            return base._conv_forward(x, w, base.bias)

        def low_rank(x, a, b):
            return F.conv2d(F.conv2d(x, a.weight, None, stride, padding), b.weight)
    else:
        def op(x, w):
            return F.linear(x, w, base.bias)

        def low_rank(x, a, b):
            return F.linear(F.linear(x, a.weight), b.weight)

    def run(x):
        m = kept()
        if m is None and x.numel() // in_f > min_tokens:
            m = merged_weight()
        if m is not None:
            return op(x, m)
        y = op(x, base.weight)
        for a, b, s in pairs:
            y = torch.add(y, low_rank(x, a, b), alpha=s)
        return y

    layer.__dict__["_sds_plan"] = run


class MergedWeights:
    """The Playground's kept merged weights: per layer, W + sum s B@A for the active LoRAs, computed at the
    layer's first call after a change and reused by every later call and generation until the plan changes.

    Without it an unfused stack pays a merge or a low-rank branch on every call. With it, once the first
    generation after a weight change has run, an unfused stack costs what the base costs, and a weight
    change stays a plan change that reads nothing and computes nothing up front.

    The price is memory: one extra copy of each covered weight. So it stays within a budget, worked out at
    each weight change from what is free (on CUDA, half of what is free beyond 3 GiB left for activations and
    the VAE; on the CPU and MPS, a quarter of available RAM beyond 2 GiB). Layers past the budget merge per
    call as before. `limit_bytes` fixes the budget instead (0 turns keeping off)."""

    CUDA_HEADROOM = 3 << 30
    CPU_HEADROOM = 2 << 30

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.used = 0
        self._held: dict[int, "_Slot"] = {}
        self._budget: dict[str, int] = {}  # device -> bytes this refresh may hold there

    def new_budget(self) -> None:
        """Forget the budgets: the next reservation on each device reads its free memory again."""
        self._budget = {}

    def budget(self, device) -> int:
        key = str(device)
        if key not in self._budget:
            self._budget[key] = self.limit_bytes if self.limit_bytes is not None else self._free_budget(device)
        return self._budget[key]

    def _free_budget(self, device) -> int:
        held_here = sum(s.nbytes for s in self._held.values() if str(s.device) == str(device))
        try:
            if device.type == "cuda":
                import torch

                free, _total = torch.cuda.mem_get_info(device)
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                return held_here + max(0, free - self.CUDA_HEADROOM) // 2
            if device.type in ("cpu", "mps"):  # MPS shares the machine's RAM
                import psutil

                return held_here + max(0, psutil.virtual_memory().available - self.CPU_HEADROOM) // 4
        except Exception:  # no reading (a driver quirk, no psutil): keep nothing rather than guess
            log.debug("no free-memory reading for %s; merged weights are not kept", device, exc_info=True)
        return 0

    def slot(self, layer, base) -> "_Slot":
        self.release(layer)
        w = base.weight
        slot = _Slot(self, id(layer), base, w.device, w.numel() * w.element_size())
        self._held[id(layer)] = slot
        return slot

    def release(self, layer) -> None:
        slot = self._held.pop(id(layer), None)
        if slot is not None:
            slot.drop()


class _Slot:
    """One layer's place in MergedWeights: empty, refused (no room), or holding the merged weight."""

    __slots__ = ("owner", "layer_id", "base", "device", "nbytes", "tensor", "stamp", "refused", "counted")

    def __init__(self, owner: MergedWeights, layer_id: int, base, device, nbytes: int) -> None:
        self.owner, self.layer_id, self.base, self.device, self.nbytes = owner, layer_id, base, device, nbytes
        self.tensor, self.stamp, self.refused, self.counted = None, None, False, False

    def _stamp(self) -> tuple:
        # The base weight the merged one was made from. A move (.to) or an in-place write (fusing, a user's
        # edit) changes its data pointer or version counter, and the kept tensor is then stale. The LoRA
        # weights only change through Stack._refresh, which replans (and so releases) the layer.
        w = self.base.weight
        return w.data_ptr(), w._version

    def get(self):
        t = self.tensor
        if t is None:
            return None
        if self._stamp() != self.stamp:
            self.tensor = None
            return None
        return t

    def reserve(self) -> bool:
        if self.refused or self.owner._held.get(self.layer_id) is not self:
            return False
        if not self.counted:
            if self.owner.used + self.nbytes > self.owner.budget(self.device):
                self.refused = True
                return False
            self.owner.used += self.nbytes
            self.counted = True
        return True

    def keep(self, tensor):
        self.tensor, self.stamp = tensor, self._stamp()
        return tensor

    def drop(self) -> None:
        if self.counted:
            self.owner.used -= self.nbytes
            self.counted = False
        self.tensor, self.stamp, self.refused = None, None, True


def _mergeable(layer, name: str, base, conv: bool) -> bool:
    """Whether adapter `name` of a peft LoRA layer is a plain low-rank pair that W + B@A reproduces exactly."""
    import torch

    a, b = layer.lora_A[name], layer.lora_B[name]
    if name in layer.lora_variant or b.bias is not None or type(layer.lora_dropout[name]) is not torch.nn.Identity:
        return False
    if a.weight.dtype != base.weight.dtype or not base.weight.is_contiguous():
        return False
    if conv:
        return (a.kernel_size == base.kernel_size and a.stride == base.stride and a.padding == base.padding
                and a.dilation == base.dilation == (1, 1) and b.kernel_size == (1, 1) and a.groups == 1
                and base.padding_mode == "zeros")
    return True
