"""Putting adapters on a model's layers and finding them again: each target Linear/Conv2d is wrapped once in an
AdapterLayer (in place, under the same name), which then holds any number of named adapters."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .layer import AdapterLayer
from .modules import Adapter


def wrap(model: nn.Module, path: str) -> AdapterLayer:
    """The AdapterLayer at `path`, wrapping the plain layer there first if needed."""
    mod = model.get_submodule(path)
    if isinstance(mod, AdapterLayer):
        return mod
    parent, _, child = path.rpartition(".")
    layer = AdapterLayer(mod)
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return layer


def add_adapter(model: nn.Module, name: str, adapters: dict[str, Adapter], *, scale: float = 1.0,
                active: bool = True) -> dict[str, AdapterLayer]:
    """Put `adapters` ({module path: adapter}) on `model` under `name`; returns {module path: layer}. Each
    adapter moves to its layer's device; its dtype is the caller's choice (fp32 to train, the base's to infer)."""
    out = {}
    for path, adapter in adapters.items():
        layer = wrap(model, path)
        adapter.to(device=layer.base_layer.weight.device)
        layer.add(name, adapter, scale, active)
        out[path] = layer
    return out


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for path, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            yield path, mod


def adapters_named(model: nn.Module, name: str) -> dict[str, Adapter]:
    """{module path: adapter} for every layer of `model` that holds adapter `name`."""
    return {path: layer.adapters[name] for path, layer in adapter_layers(model) if name in layer.adapters}


def unwrap(model: nn.Module) -> None:
    """Put the plain layers back, dropping every adapter (the base weights are the layers' own, untouched)."""
    for path, layer in list(adapter_layers(model)):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
