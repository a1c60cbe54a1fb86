"""The one adapter runtime: every algorithm's weight change (LoRA, LoCon, LoHa, LoKr, DoRA, AdaLoRA's SVD form)
and the layer that applies adapters, for training, EDLoRA, fusion and the Playground alike.

- maths.py    the deltas, as pure functions of a module's tensors (the only copy of this maths);
- modules.py  one nn.Module per algorithm, its tensors named like the file keys; new ones for training,
              or built from a file's tensors;
- layer.py    AdapterLayer: a Linear/Conv2d plus named adapters, and the forward that applies them;
- attach.py   wrap a model's layers, add / find / remove adapters;
- merged.py   the budget of merged weights kept between calls (the Playground's).
It depends on torch only: formats/ reads files into it, methods/ train it, playground/ stacks it.
"""
from .attach import adapter_layers, adapters_named, add_adapter, unwrap, wrap
from .layer import AdapterLayer
from .merged import MergedWeights
from .modules import ALGORITHMS, Adapter, LoHa, LoKr, LoRA, from_state, new_loha, new_lokr, new_lora

__all__ = ["ALGORITHMS", "Adapter", "AdapterLayer", "LoHa", "LoKr", "LoRA", "MergedWeights", "adapter_layers",
           "adapters_named", "add_adapter", "from_state", "new_loha", "new_lokr", "new_lora", "unwrap", "wrap"]
