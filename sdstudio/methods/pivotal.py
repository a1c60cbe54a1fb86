"""Pivotal tuning: a new word (Textual Inversion) and a LoRA, trained in a chosen order.

Orders: ti_then_lora (learn the word, freeze it, then fit the LoRA around it: the classic "pivot"),
lora_then_ti (fit the LoRA, then find the word that best uses it), or joint (both at once, each at its own lr).
A phase's idle parameters get no gradient, so the optimizer leaves them alone (no update, no weight decay).

Three files, each named for who loads it:
  <name>.safetensors            the LoRA with the word bundled in (`bundle_emb.<token>.string_to_param.*`): what
                                A1111 and Forge read as one file (`<lora:name:1>`, then write the token), and our
                                Playground too. Only A1111's network loader reads bundle_emb; diffusers refuses the
                                file and ComfyUI warns about its keys.
  <name>.lora-only.safetensors  the same kohya LoRA without the word: ComfyUI, diffusers (`load_lora_weights`),
                                kohya sd-scripts. Load it together with...
  <name>.embedding.safetensors  the word alone (A1111 `emb_params`): ComfyUI (`embedding:<name>.embedding`),
                                diffusers (`load_textual_inversion(file, token=...)`), A1111.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fields import setting
from .base import TE2_LR_HELP, MethodBase, ParamGroup, register
from .lora import TARGETS, Lora, LoraConfig
from .textual_inversion import (TextualInversion, TextualInversionConfig, load_embedding_into, options, output_stem,
                                save_embedding)

ORDERS = ("ti_then_lora", "lora_then_ti", "joint")
LORA_ONLY = ".lora-only.safetensors"  # the LoRA without the word (ComfyUI, diffusers, sd-scripts)
EMBEDDING = ".embedding.safetensors"  # the word alone


@dataclass
class PivotalConfig:
    token: str = setting("<my-concept>", "The new word you will write in prompts; it must not be a known word.")
    num_vectors: int = setting(2, "Vectors behind the word.", min=1, max=75)
    init_word: str = setting("person", "Start the word from this word's embedding (empty: random).")
    order: str = setting("ti_then_lora", "Order: ti_then_lora (word first, then LoRA), lora_then_ti, or joint.",
                         choices=ORDERS)
    first_phase: float = setting(0.3, "Share of the steps the first phase takes (sequential orders).", min=0.0,
                                 max=1.0)
    embedding_lr: float = setting(5e-3, "Learning rate of the word's vectors (the LoRA uses learning_rate).",
                                  min=0.0, max=10.0)
    rank: int = setting(16, "LoRA rank.", min=1, max=1024)
    alpha: float = setting(16.0, "LoRA alpha (scale alpha/rank).", min=0.0, max=4096.0)
    targets: str = setting("attention_mlp", "Which UNet layers get the LoRA.", choices=TARGETS, advanced=True)
    train_text_encoder: bool = setting(False, "Also put a LoRA on the text encoder.", advanced=True)
    text_encoder_lr: float = setting(5e-5, "Learning rate of the text-encoder LoRA.", min=0.0, max=10.0,
                                     advanced=True)
    text_encoder_2_lr: float = setting(0.0, TE2_LR_HELP, min=0.0, max=10.0, advanced=True)
    init_std: float = setting(0.017, "Spread of a random start.", min=0.0, max=1.0, advanced=True)
    norm_decay: float = setting(0.0, "Pull the vectors' length toward the vocabulary's (0: off).", min=0.0,
                                max=100.0, advanced=True)
    clip_skip: int = setting(1, "Use the text encoder's n-th last layer.", min=1, max=4, advanced=True)


@register
class Pivotal(MethodBase):
    name = "pivotal"
    Config = PivotalConfig
    contract_settings = {"pivotal.token": "<sks-piv>", "pivotal.rank": 4, "pivotal.first_phase": 0.5,
                         "sample_prompts": '["a photo of <sks-piv>"]'}

    def check_settings(self, cfg) -> None:
        o: PivotalConfig = options(cfg)
        TextualInversion().check_settings(TextualInversionConfig(token=o.token, num_vectors=o.num_vectors))

    def prepare(self, c, cfg) -> list[ParamGroup]:
        o: PivotalConfig = options(cfg)
        self.cfg, self.o = cfg, o
        # The two halves are the real LoRA and TI methods, each with its own table built from ours.
        lcfg = copy.copy(cfg)
        lcfg.options = LoraConfig(rank=o.rank, alpha=o.alpha, targets=o.targets,
                                  train_text_encoder=o.train_text_encoder, text_encoder_lr=o.text_encoder_lr,
                                  text_encoder_2_lr=o.text_encoder_2_lr)
        tcfg = copy.copy(cfg)
        tcfg.options = TextualInversionConfig(token=o.token, num_vectors=o.num_vectors, init_word=o.init_word,
                                              init_std=o.init_std, norm_decay=o.norm_decay, clip_skip=o.clip_skip)
        tcfg.learning_rate = o.embedding_lr
        self.lora, self.ti = Lora(), TextualInversion()
        self.lora.run = self.ti.run = self.run
        lora_groups = self.lora.prepare(c, lcfg)
        ti_groups = self.ti.prepare(c, tcfg)
        self.lora_params = [p for g in lora_groups for p in g.params]
        self.phase = None
        # The step where the second phase starts, fixed when the run starts: a checkpoint keeps it, so raising
        # max_steps to train more never sends a resumed run back into the first phase.
        self.split = round(o.first_phase * int(cfg.max_steps))
        return ti_groups + lora_groups

    def phase_at(self, step: int) -> str:
        """"ti", "lora" or "both" for this step."""
        if self.o.order == "joint":
            return "both"
        first, second = ("ti", "lora") if self.o.order == "ti_then_lora" else ("lora", "ti")
        return first if step < self.split else second

    def _set_phase(self, phase: str) -> None:
        if phase == self.phase:
            return
        self.phase = phase
        self.ti.set_frozen(phase == "lora")
        for p in self.lora_params:
            p.requires_grad_(phase != "ti")

    def loss(self, c, batch, step: int) -> torch.Tensor:
        self._set_phase(self.phase_at(step))
        return self.ti.loss(c, batch, step)  # TI's loss encodes captions with the word; the LoRA is in the UNet

    def trainable_state_dict(self, c) -> dict:
        # LoRA params frozen in the TI phase still belong in a checkpoint: list every trained tensor by name.
        out = {f"unet.{n}": p.detach() for n, p in c.unet.named_parameters() if "lora_" in n}
        for i, te in enumerate(c.text_encoders):
            out.update({f"te{i}.{n}": p.detach() for n, p in te.named_parameters() if "lora_" in n})
        for i, emb in enumerate(self.ti.embs):  # "embedding" (CLIP-L), "embedding.1" (SDXL's bigG)
            out["embedding" + (f".{i}" if i else "")] = emb.new.detach()
        out["pivotal.split"] = torch.tensor(self.split, dtype=torch.int64)
        return out

    def load_trainable_state_dict(self, c, sd: dict) -> None:
        if "pivotal.split" in sd:  # checkpoints from before the split was kept: the current setting's split
            self.split = int(sd["pivotal.split"])
        with torch.no_grad():
            for i, emb in enumerate(self.ti.embs):
                emb.new.copy_(sd["embedding" + (f".{i}" if i else "")])
            for prefix, module in [("unet", c.unet)] + [(f"te{i}", te) for i, te in enumerate(c.text_encoders)]:
                params = dict(module.named_parameters())
                for k, v in sd.items():
                    if k.startswith(prefix + "."):
                        params[k[len(prefix) + 1:]].copy_(v)

    def load_output(self, pipe, paths: list[Path]):
        """diffusers, as its users load our files: the plain LoRA with load_lora_weights, the word with
        load_textual_inversion (the bundle is A1111's, which diffusers refuses)."""
        from ..formats.safe_io import read_safetensors_metadata

        lora = next(p for p in paths if p.name.endswith(LORA_ONLY))
        emb = next(p for p in paths if p.name.endswith(EMBEDDING))
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        load_embedding_into(pipe, emb, read_safetensors_metadata(emb).get("sdstudio.token"))
        return pipe

    def save(self, c, out: Path) -> list[Path]:
        """[<name>.safetensors (LoRA + word, A1111), <name>.lora-only.safetensors, <name>.embedding.safetensors]."""
        from ..formats.embeddings import bundle_state_dict
        from ..formats.lora import kohya_state_dict
        from ..formats.safe_io import save_safetensors

        stem = output_stem(self.cfg, out)
        name = stem.name
        rows = [r.detach().float().cpu() for r in self.ti.all_rows()]
        token = self.ti.o.token  # lowercased, as the tokenizer holds it
        xl = c.family.is_xl
        sd = kohya_state_dict(c.unet, "unet", xl=xl, dtype=torch.float16)
        if self.o.train_text_encoder:
            for i, te in enumerate(c.text_encoders):
                sd.update(kohya_state_dict(te, "te", index=i, xl=xl, dtype=torch.float16))
        word = self.ti.metadata(c) | {"sdstudio.method": self.name, "sdstudio.order": self.o.order,
                                      "sdstudio.token": token}
        meta = dict(word)
        if self.run is not None:
            from ..formats.metadata import training_metadata

            meta |= training_metadata(self.run, c.family, network_dim=self.o.rank, network_alpha=self.o.alpha,
                                      network_module="networks.lora", kind="lora", unet_lr=self.cfg.learning_rate,
                                      text_encoder_lr=self.o.text_encoder_lr if self.o.train_text_encoder else None,
                                      clip_skip=self.o.clip_skip)
        meta["sdstudio.targets"] = self.o.targets
        # 1. A1111's bundle: the embedding rides inside the LoRA file under its prompt word.
        bundle = save_safetensors({**sd, **bundle_state_dict({token: rows if xl else rows[0]})},
                                  stem.with_name(name + ".safetensors"),
                                  meta | {"modelspec.usage_hint": f"A1111/Forge: <lora:{name}:1> and write {token}; "
                                                                  "the word is inside this file."})
        # 2. The LoRA alone and 3. the word alone, for everything that does not read bundle_emb.
        # (Its own ss_output_name: A1111 names a LoRA by it, and two files sharing one lose their aliases.)
        plain = save_safetensors(sd, stem.with_name(name + LORA_ONLY),
                                 meta | {"modelspec.usage_hint": f"ComfyUI/diffusers: load with {name}{EMBEDDING} "
                                                                 f"and write {token}.",
                                         "ss_output_name": name + LORA_ONLY[:-len(".safetensors")]})
        emb = save_embedding(rows if xl else rows[0], stem.with_name(name + EMBEDDING[:-len(".safetensors")]), token,
                             "a1111", word, step=self.run.step if self.run is not None else 0)
        return [bundle, plain, *emb]

