"""The adapter stack on a loaded base: LoRA/LoCon/LoHa/LoKr and embeddings, with per-item weights.

`Stack.apply(recipe)` compares the recipe with what is loaded and does the least work:
- each adapter file is read once (through `read_adapter_file`, the one door every adapter read goes through)
  and stays loaded, inactive, after it leaves the recipe, so adding it back costs nothing;
- a weight, block-weight or enable change goes through `set_adapters`: it only sets each adapter layer's
  scales and active list (sdstudio/adapters), reading no file;
- unfused, each layer applies its adapters the cheaper exact way per call, or, within a memory budget, keeps
  W + its adapters' deltas from its first call after a change (`MergedWeights`), so a stack that stays put
  costs what the base costs (adapters/layer.py plans this);
- `fuse=True` merges the always-on adapters into the base weights (the fast path for a stack that does not
  change); the touched base weights are backed up first, so unfusing restores the base bit for bit;
- step ranges switch LoRAs on and off per denoising step (`on_step`).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..adapters import MergedWeights, add_adapter
from ..errors import UserError
from ..formats.kinds import detect_kind_from_keys
from .blocks import block_of, block_table
from .embeddings import PromptEmbeddings
from .files import read_adapter_file
from .recipe import LoraItem, Recipe

log = logging.getLogger("sdstudio.playground")
_ADAPTER_NUMBERS = itertools.count(1)


# -- the stack ------------------------------------------------------------------------------------------

@dataclass
class _Adapter:
    name: str  # the adapter's name on the layers
    path: Path
    kind: str  # "lora" | "lycoris"
    layers: list = field(default_factory=list)  # [(model key, module path, AdapterLayer)]
    bundle: list = field(default_factory=list)  # LoadedEmbedding for each bundle_emb.* in the file


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
        self.words = PromptEmbeddings(comps, self.resolve, allow_pickle)  # embeddings and bundled words
        self._counter = 0
        self._items: list[tuple[_Adapter, LoraItem]] = []  # what the current recipe asks for, in order
        self._blocks: dict[str, dict[str, float]] = {}  # adapter name -> block table
        self._block_of: dict[int, str] = {}  # id(layer) -> block id
        self._range_on: dict[str, bool] = {}  # adapter name -> inside its step range now
        self._fused: set[str] = set()
        self._fused_sig = None
        self._backup: dict[int, tuple] = {}  # id(base module) -> (module, original weight on CPU)
        self._wanted: dict[int, tuple] = {}  # id(layer) -> (layer, adapter names wanted there, in order)
        # W + its adapters' deltas kept per layer between generations, within a memory budget (None: from free
        # memory)
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
        self.words.apply(recipe.embedding, bundled=[e for a, _ in self._items for e in a.bundle])

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
        from ..formats.lora import read_adapters

        if not path.exists():
            raise UserError(f"{path.name} does not exist: check the path of the LoRA.")
        if path.is_dir():
            cands = sorted(path.glob("*.safetensors"))
            if len(cands) != 1:
                raise UserError(f"{path.name} is a folder: point at the LoRA .safetensors file inside it.")
            path = cands[0]
        sd, meta = read_adapter_file(path, self.allow_pickle)
        kind = detect_kind_from_keys(sd.keys())
        if kind == "edlora":  # a Mix-of-Show concept: its layer-wise tokens go in, its LoRA part loads as a LoRA
            from ..concepts.layerwise import load_concept_tokens

            sd, kind = load_concept_tokens(self.comps, sd, meta, path), "lora"
        if kind == "unknown":
            raise UserError(f"{path.name} is not a LoRA or LyCORIS file (its tensors match no format this app reads): "
                            f"check that it is the file you meant.")
        if kind not in ("lora", "lycoris"):
            raise UserError(f"{path.name} is a {kind} file, not a LoRA or LyCORIS file: add it as a {kind} item.")
        # Embeddings bundled in the file (kohya/A1111 bundle_emb.*) come along with it.
        from ..formats.embeddings import Embedding, bundled_embeddings, without_bundle

        bundle = bundled_embeddings(sd)
        weights = read_adapters(without_bundle(sd), self.models, metadata=meta, file_name=path.name,
                                family_label=self.comps.family.label)
        self._counter = next(_ADAPTER_NUMBERS)  # unique per process: two stacks may share one base's layers
        adapter = _Adapter(name=f"sds{self._counter}", path=path, kind=kind)
        adapter.bundle = [self.words.install(path, Embedding([v], t), f"b{self._counter}-{i}")
                          for i, (t, v) in enumerate(bundle.items())]
        if self._fused:
            self.unfuse()  # wrapping layers while fused would leave their backups pointing at the old modules
        for mk, modules in weights.targets.items():
            model = self.models[mk]
            dtype = next(model.parameters()).dtype
            for a in modules.values():
                a.to(dtype=dtype).requires_grad_(False)  # the Playground infers in the base's precision
            for path_of, layer in add_adapter(model, adapter.name, modules, active=False).items():
                adapter.layers.append((mk, path_of, layer))
                self._block_of[id(layer)] = block_of(mk, path_of, self.comps.unet)
        self.adapters[path] = adapter
        log.info("loaded %s (%s, %d modules)", path.name, ", ".join(sorted(weights.algorithms)), len(adapter.layers))
        return adapter

    def _drop_unused(self, keep: set[Path]) -> None:
        unused = [p for p in self.adapters if p not in keep]
        for path in unused[: max(0, len(unused) - self.max_unused)]:
            adapter = self.adapters.pop(path)
            for _mk, _path, layer in adapter.layers:
                layer.remove(adapter.name)  # a layer left with nothing active runs the base op alone
                self.merged.release(layer)

    # 3. Weights -> each adapter layer's scales and active list -------------------------------------------
    def _layers(self):
        seen = {}
        for a in self.adapters.values():
            for mk, path, layer in a.layers:
                seen[id(layer)] = (mk, layer)
        return seen.values()

    def _refresh(self) -> None:
        """Set every layer's scales and active list from the items, then let it plan its forward."""
        self._wanted = {}
        self.merged.new_budget()
        for mk, layer in self._layers():
            wanted = []
            for a, it in self._items:
                if a.name not in layer.adapters or not self._range_on.get(a.name, True):
                    continue
                scale = self._scale(a.name, it, mk, layer)
                if scale == 0:
                    continue  # skipped, not multiplied by 0: weight 0 costs nothing and equals absence exactly
                layer.scales[a.name] = scale
                wanted.append(a.name)
            self._wanted[id(layer)] = (layer, wanted)
            layer.active = [n for n in wanted if n not in self._fused]
            layer.plan(self.merged)

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
        """Merge the named adapters into the base weights (refusing any that would make a weight non-finite,
        like peft's safe_merge), after backing the touched weights up to CPU for an exact unfuse."""
        import torch

        with torch.no_grad():
            for layer, wanted in self._wanted.values():
                todo = [n for n in wanted if n in names]
                if not todo:
                    continue
                base = layer.base_layer
                # Every delta from the original weight first: DoRA's depends on the weight it renormalises.
                delta = sum(layer.delta_weight(n).float() for n in todo)
                merged = base.weight.data.float() + delta.reshape(base.weight.shape)
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

    # 6. Embeddings (playground/embeddings.py) -------------------------------------------------------------
    @property
    def embeddings(self) -> dict:
        return self.words.loaded

    def expand_prompt(self, text: str, encoder: int = 0) -> str:
        """The prompt with each active embedding's token replaced by the internal tokens carrying its vectors."""
        return self.words.expand_prompt(text, encoder)

    def describe(self) -> list[str]:
        return [f"{a.path.name} ({a.kind}) weight {it.weight:g}" for a, it in self._items]
