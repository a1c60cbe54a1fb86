"""Gradient fusion (Mix-of-Show): merge N EDLoRA concepts into one model that still answers each concept.

For every layer W any concept's LoRA touches, concept i's model maps that layer's inputs X_i to V_i = W_i X_i
(W_i = W0 + its LoRA). Fusion finds one W for all of them:  min_W  sum_i ||W X_i - V_i||^2,  solved with L-BFGS
from the base weights W0, in this order (each stage records its inputs through the already-fused earlier
stages, as Mix-of-Show does):
  1. text-encoder layers   (inputs: the concept prompts through each concept's own text encoder),
  2. cross-attention k/v   (inputs: the fused text encoder's features of the concept tokens and EOS, as
                            Mix-of-Show; `kv_inputs = "prompt"` takes every position up to EOS instead),
  3. spatial layers        (inputs: recorded while sampling each concept's prompt with its own UNet LoRA).
Only the Gram matrices G_i = X_i^T X_i are kept, since ||W X_i - W_i X_i||^2 = tr((W - W_i) G_i (W - W_i)^T):
the same objective as Mix-of-Show's, in memory that does not grow with image size or step count.

Outputs: a diffusers folder (with new_concept_cfg.json, the concept table), a single-file .safetensors (base
vocabulary only, so other tools load it) and `<name>.concepts.safetensors` (the layer-wise token embeddings).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..formats.metadata import shareable
from ..events import Progress, Saved, Status
from ..fields import build_dataclass, setting
from ..concepts import tokens as tk
from ..concepts.layerwise import (check_base, concept_table, cross_attention_layers, encode_layerwise,
                                  install_processors, layer_prompts, layer_token_names)
from ..formats.edlora import EMB_PREFIX, EDLoRAFile, read_edlora

TEMPLATE = "photo of a {}"


@dataclass
class FuseConcept:
    path: str = setting("", "An EDLoRA .safetensors file.")
    unet_weight: float = setting(1.0, "Strength of this concept's UNet LoRA in its targets.", min=0.0, max=4.0)
    text_encoder_weight: float = setting(1.0, "Strength of its text-encoder LoRA in its targets.", min=0.0, max=4.0)


@dataclass
class FuseConfig:
    base_model: str = setting("tiny", "The base model every concept was trained on.")
    output_name: str = setting("fused", "Name of the fused model (folder and files).")
    output_dir: str = setting("", "Where to write it (empty: models/checkpoints in the workspace).")
    text_encoder_iters: int = setting(500, "L-BFGS iterations per text-encoder and cross-attention k/v layer.",
                                      min=1, max=100_000)
    unet_iters: int = setting(50, "L-BFGS iterations per spatial UNet layer.", min=1, max=100_000)
    prompt_template: str = setting(TEMPLATE, "Prompt the concepts are recorded with ({} = the concept's tokens).")
    kv_inputs: str = setting("concept_tokens", "What the cross-attention k/v fusion must reproduce: the concept "
                             "tokens and the end token (Mix-of-Show's choice: the other words keep the base model's "
                             "k/v), or every prompt position up to the end token (also the template words and the "
                             "start token, as each concept's own model maps them).",
                             choices=("concept_tokens", "prompt"), advanced=True)
    sample_steps: int = setting(20, "Denoising steps recorded for the spatial layers.", min=1, max=200,
                                advanced=True)
    resolution: int = setting(0, "Image size for recording the spatial layers (0: the base's native size).",
                              min=0, max=2048, advanced=True)
    seed: int = setting(0, "Seed of the recording runs.", min=0, max=2**31 - 1, advanced=True)
    device: str = setting("auto", "auto, cuda, mps or cpu.", choices=("auto", "cuda", "mps", "cpu"), advanced=True)
    concepts: list = field(default_factory=list, metadata={"internal": True})


def load_fuse_config(path: Path | str, sets: list[str] | None = None, home: Path | None = None) -> FuseConfig:
    """A FuseConfig from TOML: top-level settings and one `[[concept]]` table per EDLoRA file."""
    import tomllib

    from ..fields import merge, parse_sets

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path} does not exist: give a fuse config .toml with [[concept]] tables.")
    try:
        values = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p.name} is not valid TOML ({exc}): fix that line.") from None
    except UnicodeDecodeError:
        raise UserError(f"{p.name} is not a text file (it is not UTF-8): give a fuse config .toml.") from None
    values = merge(values, parse_sets(sets))
    items = values.pop("concept", [])
    if not isinstance(items, list) or len(items) < 2:
        raise UserError(f"{p.name} needs at least two [[concept]] tables (each with path = \"...edlora file\").")
    cfg = build_dataclass(FuseConfig, values)
    for i, it in enumerate(items):
        c = build_dataclass(FuseConcept, it, where=f" in [[concept]] #{i + 1}")
        c.path = str(_find(c.path, home))
        cfg.concepts.append(c)
    return cfg


def _find(path: str, home: Path | None) -> Path:
    """A concept file by the one rule for user paths (models/refs.py): the workspace, then the current folder."""
    from ..models.refs import Places

    if not path:
        raise UserError("A [[concept]] has no path: set path = \"models/edlora/<name>.safetensors\".")
    return Places(Path(home).resolve() if home else None, Path.cwd()).path(path, what="concept file")


# -- the solver ----------------------------------------------------------------------------------------

class LayerStats:
    """Per concept: the Gram matrix of a layer's inputs and the number of input rows behind it."""

    def __init__(self):
        self.gram: list[torch.Tensor] = []
        self.count: list[int] = []
        self.target: list[torch.Tensor] = []  # W_i (2-D)

    def add(self, x: torch.Tensor, w_target: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.append(x.T @ x)
        self.count.append(x.shape[0])
        self.target.append(w_target.float())


def objective(w: torch.Tensor, st: LayerStats) -> torch.Tensor:
    """(1/N) sum_i ||W X_i - W_i X_i||^2, from Gram matrices (N: all input rows of all concepts)."""
    n = max(sum(st.count), 1)
    total = w.new_zeros(())
    for g, wt in zip(st.gram, st.target):
        d = w - wt.to(w)
        total = total + ((d @ g.to(w)) * d).sum()
    return total / n


def solve_lbfgs(w0: torch.Tensor, st: LayerStats, iters: int) -> torch.Tensor:
    """L-BFGS from the base weight, as Mix-of-Show (strong Wolfe line search, history 25)."""
    w = w0.detach().float().clone().requires_grad_(True)
    st.gram = [g.to(w) for g in st.gram]  # once, not at every evaluation
    st.target = [t.to(w) for t in st.target]
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, history_size=25, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = objective(w, st)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _w2d(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach().float().flatten(1)


def _set_w(mod: nn.Module, w2d: torch.Tensor) -> None:
    with torch.no_grad():
        mod.weight.copy_(w2d.reshape(mod.weight.shape).to(mod.weight))


class _Recorder:
    """Forward pre-hooks that hand each module's input (rows x features) to `fn(path, x)`."""

    def __init__(self, model: nn.Module, paths: list[str], fn: Callable):
        self.handles = []
        for p in paths:
            mod = model.get_submodule(p)
            conv = isinstance(mod, nn.Conv2d)

            def hook(m, args, p=p, conv=conv):
                x = args[0].detach()
                fn(p, x.movedim(1, -1) if conv else x)

            self.handles.append(mod.register_forward_pre_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


class _Applied:
    """Concept i's own layers (W0 + its delta) on `paths` of `model`, as forward hooks, for recording."""

    def __init__(self, model, deltas: dict[str, torch.Tensor], paths: list[str]):
        self.handles = []
        for p in paths:
            if p not in deltas:
                continue
            mod = model.get_submodule(p)
            d = deltas[p].to(mod.weight.device, mod.weight.dtype)
            conv = isinstance(mod, nn.Conv2d)

            def hook(m, args, out, d=d, conv=conv):
                return out + (torch.nn.functional.conv2d(args[0], d) if conv else args[0] @ d.T)

            self.handles.append(mod.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass
class FusionReport:
    """Objective of the fused weights vs. naive averaging (W0 + mean of the LoRA deltas), per stage."""

    fused: dict = field(default_factory=dict)
    average: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)

    def add(self, stage: str, w_fused, w_avg, st: LayerStats) -> None:
        with torch.no_grad():
            self.fused[stage] = self.fused.get(stage, 0.0) + float(objective(w_fused, st))
            self.average[stage] = self.average.get(stage, 0.0) + float(objective(w_avg, st))
        self.layers[stage] = self.layers.get(stage, 0) + 1

    @property
    def total_fused(self) -> float:
        return sum(self.fused.values())

    @property
    def total_average(self) -> float:
        return sum(self.average.values())

    def summary(self) -> str:
        parts = [f"{s}: fused {self.fused[s]:.4g} vs average {self.average[s]:.4g} ({self.layers[s]} layers)"
                 for s in self.fused]
        return "; ".join(parts) + f"; total fused {self.total_fused:.4g} vs average {self.total_average:.4g}"


# -- the fusion ------------------------------------------------------------------------------------------

def check_concepts(files: list[EDLoRAFile]) -> None:
    seen: dict[str, str] = {}
    for f in files:
        for t in f.tokens:
            if t in seen:
                raise UserError(f"{f.path.name} and {seen[t]} both use the token {t}: concept names must not "
                                "overlap, retrain one with other tokens.")
            seen[t] = f.path.name


def add_concept_tokens(c, files: list[EDLoRAFile]) -> dict[str, list[str]]:
    table = concept_table(c)
    names, rows = [], []
    for f in files:
        for t in f.tokens:
            table[t] = layer_token_names(t, f.layers)
            names += table[t]
            rows.append(f.embeddings[t])
    tk.add_new_tokens(c.tokenizer, c.text_encoder, names, torch.cat(rows, 0))
    return table


def _concept_prompts(f: EDLoRAFile, template: str) -> list[str]:
    name = " ".join(f.tokens)
    return [template.format(name), name]


def kv_positions(tokenizer, prompt: str, table: dict[str, list[str]], layers: int, kv_inputs: str) -> list[int]:
    """The positions of `prompt` (its layer-0 form) whose features the k/v fusion records: the concept tokens
    and the first end-of-text token ("concept_tokens"), or everything up to that token ("prompt")."""
    ids = tk.tokenize(tokenizer, [layer_prompts(prompt, table, layers)[0]], "cpu")[0].tolist()
    end = ids.index(tokenizer.eos_token_id)  # the padding repeats EOS: only the first one is the prompt's
    if kv_inputs == "prompt":
        return list(range(end + 1))
    concept = set(tk.token_ids(tokenizer, [names[0] for names in table.values()]))
    return [i for i in range(end) if ids[i] in concept] + [end]


def fuse(c, files: list[EDLoRAFile], cfg: FuseConfig, emit=lambda ev: None, check=lambda: None,
         weights: list[tuple[float, float]] | None = None) -> FusionReport:
    """Fuse `files` into `c` in place (tokens added, weights replaced). Returns the objective report."""
    check_concepts(files)
    for f in files:
        check_base(c, f)
    weights = weights or [(1.0, 1.0)] * len(files)  # (text_encoder_weight, unet_weight)
    device = c.unet.device
    table = add_concept_tokens(c, files)
    layers = len(cross_attention_layers(c.unet))
    install_processors(c.unet)
    te, unet = c.text_encoder, c.unet
    te_deltas = [f.deltas(te, "te", w[0]) for f, w in zip(files, weights)]
    unet_deltas = [f.deltas(unet, "unet", w[1]) for f, w in zip(files, weights)]
    kv = [p for name in cross_attention_layers(unet) for p in (f"{name}.to_k", f"{name}.to_v")]
    te_paths = sorted(set().union(*[d.keys() for d in te_deltas]))
    kv_paths = [p for p in kv if any(p in d for d in unet_deltas)]
    sp_paths = sorted(set().union(*[d.keys() for d in unet_deltas]) - set(kv_paths))
    total = len(te_paths) + len(kv_paths) + len(sp_paths)
    report = FusionReport()
    done = 0

    def solve_stage(stage: str, model, paths, stats: dict[str, LayerStats], deltas, iters):
        nonlocal done
        for p in paths:
            check()
            mod = model.get_submodule(p)
            w0 = _w2d(mod)
            w_avg = w0 + torch.stack([d.get(p, torch.zeros_like(mod.weight)).float().flatten(1).to(w0)
                                      for d in deltas]).mean(0)
            w = solve_lbfgs(w0, stats[p], iters)
            report.add(stage, w, w_avg, stats[p])
            _set_w(mod, w)
            done += 1
            emit(Progress(done=done, total=total, stage="fuse", message=f"{stage}: {p}"))

    def target(mod, delta):
        return _w2d(mod) + (delta.float().flatten(1).to(mod.weight.device) if delta is not None else 0)

    # 1. Text encoder: record each concept's prompts through its own text encoder (base + its LoRA).
    emit(Status("fusing the text encoder", stage="fuse"))
    stats = {p: LayerStats() for p in te_paths}
    for f, deltas in zip(files, te_deltas):
        check()
        applied = _Applied(te, deltas, te_paths)
        buf: dict[str, list] = {p: [] for p in te_paths}
        rec = _Recorder(te, te_paths, lambda p, x: buf[p].append(x.reshape(-1, x.shape[-1]).float().cpu()))
        try:
            with torch.no_grad():
                for prompt in dict.fromkeys(x for q in _concept_prompts(f, cfg.prompt_template)
                                            for x in layer_prompts(q, table, layers)):
                    ids = c.tokenizer(prompt, truncation=True, max_length=c.tokenizer.model_max_length,
                                      return_tensors="pt").input_ids.to(device)  # unpadded: no pad rows
                    te(ids)
        finally:
            rec.close()
            applied.close()
        for p in te_paths:
            stats[p].add(torch.cat(buf[p]), target(te.get_submodule(p), deltas.get(p)))
    solve_stage("text_encoder", te, te_paths, stats, te_deltas, cfg.text_encoder_iters)

    # 2. Cross-attention k/v: the fused text encoder's features of each concept's prompts, per layer. By default
    #    only the concept tokens and the first EOS count, as Mix-of-Show's get_text_feature('category_embedding')
    #    records them (ids >= EOS in an unpadded prompt); kv_inputs = "prompt" takes every position up to EOS.
    emit(Status("fusing cross-attention k/v", stage="fuse"))
    stats = {p: LayerStats() for p in kv_paths}
    cross = cross_attention_layers(unet)
    for f, deltas in zip(files, unet_deltas):
        check()
        prompts = _concept_prompts(f, cfg.prompt_template)
        with torch.no_grad():
            states = encode_layerwise(c, prompts, table, layers)  # (P, layers, 77, C)
        rows = [kv_positions(c.tokenizer, q, table, layers, cfg.kv_inputs) for q in prompts]
        for li, name in enumerate(cross):
            x = torch.cat([states[pi, li, pos].float().cpu() for pi, pos in enumerate(rows)])
            for p in (f"{name}.to_k", f"{name}.to_v"):
                if p in stats:
                    stats[p].add(x, target(unet.get_submodule(p), deltas.get(p)))
    solve_stage("cross_attention_kv", unet, kv_paths, stats, unet_deltas, cfg.text_encoder_iters)

    # 3. Spatial layers: sample each concept's prompt with its own UNet LoRA and record the layer inputs.
    emit(Status("fusing spatial layers", stage="fuse"))
    stats = {p: LayerStats() for p in sp_paths}
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(c.scheduler.config)
    size = cfg.resolution // 8 if cfg.resolution else int(unet.config.sample_size)
    for ci, (f, deltas) in enumerate(zip(files, unet_deltas)):
        check()
        # Gram matrices accumulate on the model's device (fp32): a few MB per layer, whatever the image size.
        grams = {p: torch.zeros(unet.get_submodule(p).weight.flatten(1).shape[1],
                                unet.get_submodule(p).weight.flatten(1).shape[1], device=device)
                 for p in sp_paths}
        counts = {p: 0 for p in sp_paths}

        def acc(p, x):
            x = x.reshape(-1, x.shape[-1]).float()
            grams[p] += x.T @ x
            counts[p] += x.shape[0]

        applied = _Applied(unet, deltas, sp_paths)
        rec = _Recorder(unet, sp_paths, acc)
        try:
            with torch.no_grad():
                cond = encode_layerwise(c, [cfg.prompt_template.format(" ".join(f.tokens))], table, layers)
                g = torch.Generator().manual_seed(cfg.seed + ci)
                lat = torch.randn(1, unet.config.in_channels, size, size, generator=g).to(device, unet.dtype)
                sched.set_timesteps(cfg.sample_steps)
                lat = lat * sched.init_noise_sigma
                for t in sched.timesteps:
                    check()
                    eps = unet(sched.scale_model_input(lat, t), t, cond.to(unet.dtype)).sample
                    lat = sched.step(eps, t, lat).prev_sample
        finally:
            rec.close()
            applied.close()
        for p in sp_paths:
            st = stats[p]
            st.gram.append(grams[p])
            st.count.append(counts[p])
            st.target.append(target(unet.get_submodule(p), deltas.get(p)))
    solve_stage("spatial", unet, sp_paths, stats, unet_deltas, cfg.unet_iters)
    return report


def average_into(c, files: list[EDLoRAFile], weights: list[tuple[float, float]] | None = None) -> None:
    """The naive baseline: the concepts' tokens plus W0 + mean of the LoRA deltas, in place."""
    check_concepts(files)
    weights = weights or [(1.0, 1.0)] * len(files)
    add_concept_tokens(c, files)
    install_processors(c.unet)
    for model, kind, wi in ((c.text_encoder, "te", 0), (c.unet, "unet", 1)):
        deltas = [f.deltas(model, kind, w[wi]) for f, w in zip(files, weights)]
        for p in set().union(*[d.keys() for d in deltas]):
            mod = model.get_submodule(p)
            mean = torch.stack([d.get(p, torch.zeros_like(mod.weight)).float() for d in deltas]).mean(0)
            with torch.no_grad():
                mod.weight.add_(mean.reshape(mod.weight.shape).to(mod.weight))


def save_fused(c, out_dir: Path, name: str, report: FusionReport | None = None) -> list[Path]:
    """<out_dir>/<name>/ (diffusers + new_concept_cfg.json), <name>.safetensors, <name>.concepts.safetensors."""
    from ..formats.ldm import pipeline_to_ldm
    from ..formats.safe_io import atomic_dir, atomic_write_text, save_safetensors

    table = concept_table(c)
    emb = c.text_encoder.get_input_embeddings()
    rows = emb.weight.detach().float().cpu()
    ids = {t: tk.token_ids(c.tokenizer, names) for t, names in table.items()}
    concept_cfg = {t: {"concept_token_ids": ids[t], "concept_token_names": table[t]} for t in table}
    concepts = {EMB_PREFIX + t: rows[ids[t]].clone() for t in table}
    meta = {"sdstudio.method": "edlora-fused", "sdstudio.base_model": shareable(str(c.ref)), "sdstudio.family": c.family.name,
            "sdstudio.layers": str(len(cross_attention_layers(c.unet))), "sdstudio.concept_tokens": " ".join(table)}
    if report is not None:
        meta["sdstudio.fusion_report"] = json.dumps({"fused": report.fused, "average": report.average})
    out_dir = Path(out_dir)
    folder = out_dir / name
    # 1. The diffusers folder: the vocabulary with the concept tokens baked in, plus the concept table.
    base_rows = emb.num_base if isinstance(emb, tk.NewTokenEmbedding) else rows.shape[0]
    pipe = c.pipeline()
    tk.bake(c.text_encoder)
    with atomic_dir(folder) as tmp:
        from diffusers.models.attention_processor import AttnProcessor2_0

        procs = dict(c.unet.attn_processors)
        c.unet.set_attn_processor(AttnProcessor2_0())  # the saved model must not depend on our processors
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            c.unet.set_attn_processor(procs)
        (tmp / "new_concept_cfg.json").write_text(json.dumps(concept_cfg, indent=1))
    # 2. The single file keeps the base vocabulary, so A1111/ComfyUI load it; the tokens travel separately.
    sd = pipeline_to_ldm(c.unet, c.vae, c.text_encoder, c.family.name)
    for k in list(sd):
        if k.endswith("token_embedding.weight"):
            sd[k] = sd[k][:base_rows]
    single = save_safetensors(sd, out_dir / f"{name}.safetensors", meta)
    emb_file = save_safetensors(concepts, out_dir / f"{name}.concepts.safetensors", meta)
    atomic_write_text(out_dir / f"{name}.new_concept_cfg.json", json.dumps(concept_cfg, indent=1))
    return [folder, single, emb_file]


def load_concept_table(c) -> dict[str, list[str]]:
    """After loading a fused diffusers folder as a base: its concept table (concepts.layerwise.concept_table reads it)."""
    return concept_table(c)


def run_fuse(cfg: FuseConfig, emit=lambda ev: None, commands=None, home: Path | None = None) -> list[Path]:
    """Load the base, fuse every concept, save; what `sdstudio fuse` and the UI run in a job."""
    from ..devices import pick_device
    from ..models.loading import load_base

    check = commands.check if commands is not None else (lambda: None)
    files = [read_edlora(x.path) for x in cfg.concepts]
    check_concepts(files)
    emit(Status(f"loading {cfg.base_model}", stage="load"))
    c = load_base(cfg.base_model, device=pick_device(cfg.device))
    report = fuse(c, files, cfg, emit, check, [(x.text_encoder_weight, x.unet_weight) for x in cfg.concepts])
    emit(Status(report.summary(), stage="fuse"))
    if cfg.output_dir:
        out = Path(cfg.output_dir).expanduser()
    else:
        from ..workspace import Workspace, default_home

        out = Workspace.open(home or default_home()).root / "models" / "checkpoints"
    from ..workspace import safe_name

    paths = save_fused(c, out, safe_name(cfg.output_name), report)
    for p in paths:
        emit(Saved(path=str(p), kind="fused"))
    return paths
