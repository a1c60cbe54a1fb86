"""AdaLoRA (Zhang et al., 2023): a LoRA whose rank moves to the layers that need it, within a total budget.

Each layer's update is in SVD form, B (A * E) x alpha / initial_rank, with E the singular values. Every layer
starts at `initial_rank`. After `tinit` warm-up steps, every `delta_t` steps the least important singular
values (sensitivity |w * grad|, smoothed) are zeroed until the total rank meets a budget that falls on a cubic
curve to `target_rank` x layers; the last `tfinal` steps keep the final allocation. An orthogonality
regulariser keeps A's rows and B's columns close to orthonormal, so zeroing a singular value removes exactly
one direction.

It runs through peft's AdaLoraConfig and `get_peft_model` (peft's allocator only works there; `add_adapter`
never reaches it), with `update_and_allocate` after every optimizer step (the `after_optimizer_step` hook).
The Train tab draws each layer's rank live and the budget schedule from what that hook reports.

Output: a plain kohya LoRA at each module's final rank (a mixed-rank file with one alpha and each module's scale
folded into its weights: A1111, ComfyUI, diffusers and our Playground all load it right), plus the peft adapter
(`<name>.peft/`) to continue from in peft. The rank allocation is checkpointed, so a resumed run repeats the
uninterrupted one exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..fields import setting
from .base import MethodBase, ParamGroup, register
from .lora import ATTENTION, MLP

ADAPTER = "default"


@dataclass
class AdaLoRAConfig:
    """The [adalora] table."""

    target_rank: int = setting(4, "Average rank per layer at the end: the budget is this x the number of layers.",
                               min=1, max=256)
    initial_rank: int = setting(12, "Rank every layer starts with (above target_rank).", min=2, max=512)
    alpha: float = setting(12.0, "Scale: the update is B(A*E) x alpha / initial_rank.", min=0.0, max=4096.0)
    targets: str = setting("attention_mlp", "Which UNet layers learn: attention, or attention_mlp (+ feed-forward).",
                           choices=("attention", "attention_mlp"))
    tinit: int = setting(0, "Warm-up steps before any rank is cut (0: a tenth of max_steps).", min=0,
                         max=10_000_000)
    tfinal: int = setting(0, "Final steps that keep the final ranks (0: a fifth of max_steps; at least 1).", min=0,
                          max=10_000_000)
    delta_t: int = setting(10, "Steps between two reallocations of the budget.", min=1, max=100_000)
    orth_reg_weight: float = setting(0.5, "Weight of the orthogonality regulariser on A and B.", min=0.0,
                                     max=100.0)
    beta1: float = setting(0.85, "Smoothing of the sensitivity estimate.", min=0.01, max=0.999, advanced=True)
    beta2: float = setting(0.85, "Smoothing of its uncertainty.", min=0.01, max=0.999, advanced=True)
    dropout: float = setting(0.0, "Dropout on the adapters' input.", min=0.0, max=0.9, advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved LoRA.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)


def schedule_steps(o: AdaLoRAConfig, max_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of `max_steps`, with the automatic values filled in."""
    tinit = o.tinit if o.tinit else max_steps // 10
    tfinal = o.tfinal if o.tfinal else max(1, max_steps // 5)
    return tinit, tfinal


def budget_schedule(start: int, end: int, tinit: int, tfinal: int, total: int) -> list[tuple[int, int]]:
    """[(step, total rank budget)] over a run of `total` steps, as peft's RankAllocator computes it: `start`
    (initial_rank x layers) through the warm-up, a cubic fall to `end` (target_rank x layers), then flat for
    the last `tfinal` steps. Steps count from 1, as the Train tab shows them."""
    out = []
    for step in range(total):
        if step <= tinit:
            b = start
        elif step > total - tfinal:
            b = end
        else:
            k = 1 - (step - tinit) / (total - tfinal - tinit)
            b = int((start - end) * k ** 3 + end)
        out.append((step + 1, b))
    return out


def orthogonality(model) -> torch.Tensor:
    """peft's AdaLoRA regulariser: the mean over A and B of ||A A^T - I||_F and ||B^T B - I||_F. (peft adds it
    only when the model's output carries a `.loss`, which a UNet's does not, so the method adds it itself.)"""
    total, n = 0.0, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype))
            n += 1
    return total / max(n, 1)


@register
class AdaLoRA(MethodBase):
    name = "adalora"
    Config = AdaLoRAConfig
    # E starts at zero and A, B at N(0, 0.02): two contract steps make a change too small to see unless scaled up.
    contract_settings = {"adalora.alpha": 1024.0}

    def check_settings(self, cfg) -> None:
        o: AdaLoRAConfig = cfg.options
        if o.target_rank >= o.initial_rank:
            raise UserError(f"adalora.target_rank ({o.target_rank}) must be below adalora.initial_rank "
                            f"({o.initial_rank}): the budget only shrinks.")
        tinit, tfinal = schedule_steps(o, cfg.max_steps)
        if tinit >= cfg.max_steps - tfinal:
            raise UserError(f"AdaLoRA's schedule leaves no steps to reallocate ranks (tinit {tinit} + tfinal {tfinal} "
                            f"of max_steps {cfg.max_steps}): lower adalora.tinit / adalora.tfinal or raise max_steps.")

    # 1. What trains: SVD-form adapters on the UNet's transformer layers, through get_peft_model.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from peft import AdaLoraConfig, get_peft_model

        self.check_settings(cfg)
        o: AdaLoRAConfig = cfg.options
        self.cfg = cfg
        self.total_step = int(cfg.max_steps)  # fixed when the run starts; a checkpoint keeps it
        tinit, tfinal = schedule_steps(o, self.total_step)
        suffixes = ATTENTION + (MLP if o.targets == "attention_mlp" else ())
        targets = [p for p, m in c.unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and p.endswith(suffixes) and ("attentions" in p)]
        self.peft = get_peft_model(c.unet, AdaLoraConfig(
            target_r=o.target_rank, init_r=o.initial_rank, lora_alpha=o.alpha, lora_dropout=o.dropout,
            tinit=tinit, tfinal=tfinal, deltaT=o.delta_t, beta1=o.beta1, beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight, total_step=self.total_step, target_modules=targets))
        self.tuner = self.peft.base_model  # the AdaLoraModel: update_and_allocate, the rank allocator
        self.layers = sorted(n.replace(".lora_E." + ADAPTER, "") for n, _ in c.unet.named_parameters()
                             if ".lora_E." in n)
        return [ParamGroup("unet", [p for p in c.unet.parameters() if p.requires_grad], cfg.learning_rate)]

    # For the VRAM/time estimate: a LoRA at the initial rank on the UNet (estimate.py reads initial_rank).
    def footprint(self, cfg, arch, family):
        from .base import Footprint

        return Footprint(trainable=arch["unet_lora"], text_encoder_trains=False)

    # 2. What is minimised: the denoising loss plus the orthogonality regulariser.
    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        loss = denoising_loss(c, batch, self.cfg)
        w = self.cfg.options.orth_reg_weight
        return loss + w * orthogonality(c.unet) if w else loss

    # After each optimizer step (gradients still there): peft's sensitivity update and rank allocation.
    def after_optimizer_step(self, c, step: int) -> dict:
        """peft's update_and_allocate; reports each layer's rank and the schedule (the Train tab draws both)."""
        self.tuner.update_and_allocate(step)
        o: AdaLoRAConfig = self.cfg.options
        ranks = self.ranks(c)
        tinit, tfinal = schedule_steps(o, self.total_step)
        schedule = {"start": o.initial_rank * len(self.layers), "end": o.target_rank * len(self.layers),
                    "tinit": tinit, "tfinal": tfinal, "total": self.total_step}
        return {"ranks": ranks, "total_rank": sum(ranks.values()), "budget": schedule["end"], "schedule": schedule}

    def ranks(self, c) -> dict[str, int]:
        """{layer: its rank}: the singular values the last allocation kept (all of them before the first)."""
        pattern = self.tuner.peft_config[ADAPTER].rank_pattern or {}
        out = {}
        for n, p in c.unet.named_parameters():
            if ".lora_E." in n:
                keep = pattern.get(n)
                out[n.replace(".lora_E." + ADAPTER, "")] = int(sum(keep)) if keep is not None else int(p.shape[0])
        return out

    # Checkpoints: the adapters plus the allocator's state (sensitivity averages, the allocation).
    def trainable_state_dict(self, c) -> dict:
        out = {f"unet.{n}": p.detach() for n, p in c.unet.named_parameters() if p.requires_grad}
        alloc = self.tuner.rankallocator
        for key, table in (("ipt", alloc.ipt), ("avg_ipt", alloc.exp_avg_ipt), ("unc", alloc.exp_avg_unc)):
            out.update({f"adalora.{key}.{n}": t.detach() for n, t in table.items()})
        for n, keep in (self.tuner.peft_config[ADAPTER].rank_pattern or {}).items():
            out[f"adalora.pattern.{n}"] = torch.tensor(keep, dtype=torch.bool)
        out["adalora.total_step"] = torch.tensor(self.total_step, dtype=torch.int64)
        return out

    def load_trainable_state_dict(self, c, sd: dict) -> None:
        params = dict(c.unet.named_parameters())
        alloc = self.tuner.rankallocator
        tables = {"ipt": alloc.ipt, "avg_ipt": alloc.exp_avg_ipt, "unc": alloc.exp_avg_unc}
        pattern = {}
        with torch.no_grad():
            for key, value in sd.items():
                if key.startswith("unet."):
                    params[key[5:]].copy_(value)
                elif key.startswith("adalora.pattern."):
                    pattern[key[len("adalora.pattern."):]] = value.bool().tolist()
                elif key.startswith("adalora.") and key != "adalora.total_step":
                    table, _, name = key[len("adalora."):].partition(".")
                    tables[table][name] = value.clone()
        self.tuner.peft_config[ADAPTER].rank_pattern = pattern or None
        if "adalora.total_step" in sd:
            self.total_step = int(sd["adalora.total_step"])
            self.tuner.peft_config[ADAPTER].total_step = self.total_step

    def text_encoder_trainable(self, c) -> bool:
        return False

    # 3. What comes out: the mixed-rank kohya LoRA, and the peft adapter.
    def export(self, c) -> dict:
        """{module path: runtime LoRA} at each module's final rank. Every module gets the same alpha (target_rank)
        and its own scale is folded into up: diffusers reads one alpha per file (modules whose alpha differs from
        the most common one load mis-scaled), while A1111 and ComfyUI apply alpha/rank per module; both are
        right this way."""
        from ..adapters import LoRA, maths

        alpha = float(self.cfg.options.target_rank)
        pattern = self.tuner.peft_config[ADAPTER].rank_pattern or {}
        out = {}
        for path, mod in c.unet.named_modules():
            if not hasattr(mod, "lora_E") or ADAPTER not in mod.lora_E:
                continue
            e = mod.lora_E[ADAPTER].detach().float()
            keep = pattern.get(f"{path}.lora_E.{ADAPTER}")
            keep = torch.tensor(keep, dtype=torch.bool) if keep is not None else (e.view(-1) != 0)
            if not bool(keep.any()):
                continue  # every direction cut: this layer learnt nothing worth keeping
            scale = float(mod.scaling[ADAPTER]) / (float(mod.ranknum[ADAPTER]) + 1e-5)  # peft's own formula
            rank = int(keep.sum())
            down, up = maths.svd_as_lora(mod.lora_A[ADAPTER].detach().float(), e, mod.lora_B[ADAPTER].detach().float(),
                                         scale * rank / alpha, keep)
            out[path] = LoRA(down, up, alpha=alpha)
        return out

    def save(self, c, out: Path) -> list[Path]:
        from ..formats.lora import kohya_tensors
        from ..formats.metadata import training_metadata
        from ..formats.safe_io import save_safetensors

        o: AdaLoRAConfig = self.cfg.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.save_precision]
        ranks = self.ranks(c)
        # A plain networks.lora file to every reader; how AdaLoRA spread its ranks is ours to note.
        meta = training_metadata(self.run, c.family, network_dim=o.target_rank, network_alpha=o.target_rank,
                                 network_module="networks.lora", kind="lora", unet_lr=self.cfg.learning_rate,
                                 network_dropout=o.dropout)
        meta["sdstudio.targets"] = o.targets
        meta["sdstudio.adalora"] = json.dumps({"initial_rank": o.initial_rank, "target_rank": o.target_rank,
                                               "total_rank": sum(ranks.values())})
        meta["sdstudio.adalora_ranks"] = json.dumps(ranks, sort_keys=True)
        sd = kohya_tensors(self.export(c), "unet", dtype=dtype)
        if not sd:
            raise UserError("AdaLoRA cut every layer's rank to 0: raise adalora.target_rank or train longer.")
        path = save_safetensors(sd, Path(out) / f"{self.cfg.output_name}.safetensors", meta)
        peft_dir = Path(out) / f"{self.cfg.output_name}.peft"
        self.peft.save_pretrained(str(peft_dir))
        return [path, peft_dir]

    def load_output(self, pipe, paths: list[Path]):
        """The mixed-rank file in plain diffusers, as a user loads it."""
        lora = next(p for p in paths if Path(p).suffix == ".safetensors")
        pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
        return pipe
