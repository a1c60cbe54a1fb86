"""`sdstudio bench adapters`: the engines that could train LoRA, LoHa, LoKr and DoRA, side by side on SD-1.5-sized
layers: our runtime (sdstudio/adapters), peft (LoHaConfig / LoKrConfig / LoraConfig(use_dora)) and LyCORIS
itself (the `lycoris-lora` package, when installed: the test extra has it).

For each engine and algorithm it reports
- the time of a training step (forward and backward through the layers, best of --repeats), as a ratio to ours;
- whether the file it writes gives back what it trained: its tensors under LyCORIS' key names go through
  LyCORIS' own loader (`make_module_from_state_dict`, what kohya's tools use) and the output is compared with the
  engine's own (max abs error). peft's tensors are renamed to LyCORIS keys with its alpha, as a converter would.
"""
from __future__ import annotations

import copy
import time

# SD 1.5's attention projections and a resnet conv, at 512 px (tokens) and batch 1.
LAYERS = [("linear", 320, 320, 4096), ("linear", 640, 640, 1024), ("linear", 1280, 1280, 256),
          ("linear", 768, 320, 77), ("conv", 320, 320, 64)]
ALGORITHMS = ("lora", "loha", "lokr", "lokr-whole", "dora")  # lokr-whole: both factors whole (full_matrix)


def register_bench(sub) -> None:
    p = sub.add_parser("adapters", help="LoRA / LoHa / LoKr / DoRA training step and file check: ours, peft, LyCORIS")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per engine (the best counts)")
    p.add_argument("--scale", type=float, default=0.25, help="tokens and spatial size x this (1: real 512 px)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_bench)


def _layers(scale: float, device: str):
    import torch

    torch.manual_seed(0)
    out = []
    for kind, cin, cout, n in LAYERS:
        if kind == "conv":
            side = max(4, int(n * scale ** 0.5))
            out.append((torch.nn.Conv2d(cin, cout, 3, padding=1).to(device), torch.randn(1, cin, side, side, device=device)))
        else:
            out.append((torch.nn.Linear(cin, cout).to(device), torch.randn(1, max(8, int(n * scale)), cin, device=device)))
    return out


def _ours(algorithm: str, base, rank: int):
    from ..adapters import AdapterLayer, new_loha, new_lokr, new_lora

    make = {"lora": lambda: new_lora(base, rank, rank / 2), "loha": lambda: new_loha(base, rank, rank / 2),
            "lokr": lambda: new_lokr(base, rank, rank / 2, factor=8),
            "lokr-whole": lambda: new_lokr(base, rank, rank / 2, factor=8, full_matrix=True),
            "dora": lambda: new_lora(base, rank, rank / 2, dora=True)}[algorithm]
    layer = AdapterLayer(base)
    layer.add("x", make().to(base.weight.device))
    return layer


def _peft(algorithm: str, base, rank: int):
    import torch
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    holder = torch.nn.ModuleDict({"m": base})
    cfg = {"lora": LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=["m"], init_lora_weights=False),
           "loha": LoHaConfig(r=rank, alpha=rank / 2, target_modules=["m"], init_weights=False),
           "lokr": LoKrConfig(r=rank, alpha=rank / 2, target_modules=["m"], init_weights=False, decompose_factor=8),
           # peft has no full_matrix: a rank past half of w2's sides keeps w2 whole
           "lokr-whole": LoKrConfig(r=4096, alpha=rank / 2, target_modules=["m"], init_weights=False,
                                    decompose_factor=8),
           "dora": LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=["m"], use_dora=True,
                              init_lora_weights=False)}[algorithm]
    inject_adapter_in_model(cfg, holder)
    return holder["m"]


def _lycoris(algorithm: str, base, rank: int):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls, kw = {"lora": (LoConModule, {}), "loha": (LohaModule, {}), "lokr": (LokrModule, {"factor": 8}),
               "lokr-whole": (LokrModule, {"factor": 8, "full_matrix": True}),
               "dora": (LoConModule, {"weight_decompose": True})}[algorithm]
    m = cls("x", base, 1.0, lora_dim=rank, alpha=rank / 2, **kw)
    m.apply_to()
    return m


def _randomise(module) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and p.ndim > 0:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p))


def _step_time(module, x, repeats: int) -> float:
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    times = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        module(x).square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _lycoris_keys(engine: str, algorithm: str, module) -> tuple[dict, float]:
    """The engine's tensors under LyCORIS' key names, and its alpha (peft: renamed as a converter would)."""
    if engine == "lycoris":
        sd = {k: v.detach() for k, v in module.custom_state_dict().items()}
        return sd, float(sd.pop("alpha"))
    if engine == "ours":
        sd = module.adapters["x"].state()
        return {k: v for k, v in sd.items() if k != "alpha"}, float(sd["alpha"])
    sd = {}
    for name, p in module.named_parameters():
        if "base_layer" in name or not p.requires_grad:
            continue
        key = name.split(".")[0]
        sd[{"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}.get(key, key)] = \
            p.detach()
    if "dora_scale" in sd:
        sd["dora_scale"] = sd["dora_scale"].reshape(-1, *([1] * (module.get_base_layer().weight.ndim - 1)))
    return sd, float(module.scaling["default"]) * next(iter(module.r.values()))


def _file_error(engine: str, algorithm: str, module, base, x) -> float | None:
    """Max |engine output - LyCORIS' loader on the engine's file|; None when lycoris is not installed."""
    import torch

    try:
        import lycoris.modules  # noqa: F401
    except ImportError:
        return None
    sd, alpha = _lycoris_keys(engine, algorithm, module)
    clean = copy.deepcopy(base)
    g = lambda k: sd.get(k)  # noqa: E731
    with torch.no_grad():  # (LyCORIS' loaders call it so)
        loaded = _lycoris_load(algorithm, clean, g, alpha)
    loaded.apply_to()
    with torch.no_grad():
        return float((loaded(x) - module(x)).abs().max())


def _lycoris_load(algorithm: str, clean, g, alpha: float):
    import torch
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    if algorithm == "loha":
        loaded = LohaModule.make_module_from_state_dict("x", clean, g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"),
                                                        g("hada_w2_b"), g("hada_t1"), g("hada_t2"),
                                                        torch.tensor(alpha), g("dora_scale"))
    elif algorithm.startswith("lokr"):
        loaded = LokrModule.make_module_from_state_dict("x", clean, g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"),
                                                        g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), None,
                                                        g("lokr_t2"), torch.tensor(alpha), g("dora_scale"))
    else:  # lora, dora
        loaded = LoConModule.make_module_from_state_dict("x", clean, g("lora_up.weight"), g("lora_down.weight"),
                                                         None, torch.tensor(alpha), g("dora_scale"))
    return loaded


def run_bench(args) -> int:
    engines = {"ours": _ours, "peft": _peft}
    try:
        import lycoris.modules  # noqa: F401

        engines["lycoris"] = _lycoris
    except ImportError:
        print("lycoris-lora is not installed (pip install lycoris-lora): LyCORIS' own column is left out")
    print(f"device {args.device}, rank {args.rank}, SD 1.5 layer shapes x{args.scale} tokens; "
          f"time = forward + backward of one step, best of {args.repeats}")
    for algorithm in ALGORITHMS:
        times = {e: [] for e in engines}
        errors = {e: [] for e in engines}
        for base, x in _layers(args.scale, args.device):
            for engine, make in engines.items():
                b = copy.deepcopy(base).requires_grad_(False)
                module = make(algorithm, b, args.rank)
                _randomise(module)
                times[engine].append(_step_time(module, x, args.repeats))
                err = _file_error(engine, algorithm, module, base, x)
                if err is not None:
                    errors[engine].append(err)
        ours = sum(times["ours"])
        parts = []
        for e in engines:
            t = sum(times[e])
            err = f", file error {max(errors[e]):.1e}" if errors[e] else ""
            parts.append(f"{e} {t * 1000:.1f} ms ({t / ours:.2f}x{err})")
        print(f"{algorithm}: " + " | ".join(parts))
    return 0
