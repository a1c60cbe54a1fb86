"""Textual Inversion: learn a new word (one or more vectors) for a concept; the model itself stays untouched.

Multi-vector tokens follow diffusers' convention: `<tok>` is stored as the tokens `<tok> <tok>_1 ... <tok>_{n-1}`,
and a prompt's `<tok>` expands to all of them, exactly what `load_textual_inversion` and A1111 do at load time.
Saves the A1111 format (`.safetensors` with `emb_params`) and/or diffusers' `learned_embeds` format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..fields import setting
from ..formats.metadata import shareable
from .base import MethodBase, ParamGroup, register
from ..concepts import tokens as tk


def options(cfg):
    """The method's own table whether the loop hands us the whole TrainConfig or just the table."""
    return getattr(cfg, "options", None) or cfg


def output_stem(cfg, out: Path) -> Path:
    """Where a method's files go: the loop passes the run folder; the name comes from output_name."""
    from ..workspace import safe_name

    return Path(out) / safe_name(cfg.output_name)


def vector_names(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def ensure_token(caption: str, token: str, expanded: str, fallback: str = "a photo of {}") -> str:
    """Put the concept's token in a caption (prepend it when the caption lacks it) and expand multi-vectors."""
    if not caption.strip():
        caption = fallback.format(token)
    elif tk.replace_word(caption, token, "\0") == caption:
        caption = f"{token}, {caption}"
    return tk.replace_word(caption, token, expanded)


def norm_penalty(rows: torch.Tensor, target: float) -> torch.Tensor:
    """clip_ti_decay's idea as a loss: pull each vector's norm toward the vocabulary's typical norm, so the new
    word does not drown the rest of the prompt (large norms) and stays editable."""
    return ((rows.float().norm(dim=-1) - target) ** 2).mean()


def save_embedding(rows: torch.Tensor, out: Path, token: str, fmt: str, meta: dict | None = None,
                   step: int = 0) -> list[Path]:
    """Write `rows` (n, dim) through formats/embeddings.py: A1111 (`<out>.safetensors`, key `emb_params`) and/or
    diffusers learned_embeds (`<out>.learned_embeds.safetensors`, key = the token). `step`: the steps trained."""
    from ..formats import embeddings

    meta = {"sdstudio.token": token, "sdstudio.vectors": str(rows.shape[0]), **(meta or {})}
    written = []
    if fmt in ("a1111", "both"):
        written.append(embeddings.save_embedding(out.with_name(out.name + ".safetensors"), rows, token,
                                                 fmt="a1111", step=step, metadata=meta))
    if fmt in ("diffusers", "both"):
        written.append(embeddings.save_embedding(out.with_name(out.name + ".learned_embeds.safetensors"), rows,
                                                 token, fmt="diffusers", step=step, metadata=meta))
    return written


@dataclass
class TextualInversionConfig:
    token: str = setting("<my-object>", "The new word you will write in prompts; it must not be a known word.")
    num_vectors: int = setting(1, "Vectors behind the word: more capture more detail but use prompt space.",
                               min=1, max=75)
    init_word: str = setting("object", "Start from this word's embedding (empty: random start).")
    init_std: float = setting(0.017, "Spread of the random start when init_word is empty.", min=0.0, max=1.0,
                              advanced=True)
    norm_decay: float = setting(0.0, "Pull the vectors' length toward the vocabulary's (clip_ti_decay); 0: off.",
                                min=0.0, max=100.0, advanced=True)
    target_norm: float = setting(0.0, "Length the norm decay pulls toward (0: the vocabulary's mean).", min=0.0,
                                 max=10.0, advanced=True)
    clip_skip: int = setting(1, "Use the text encoder's n-th last layer (2 for anime models).", min=1, max=4,
                             advanced=True)
    save_format: str = setting("a1111", "File format: a1111 (.safetensors emb_params), diffusers (learned_embeds) "
                               "or both.", choices=("a1111", "diffusers", "both"))


@register
class TextualInversion(MethodBase):
    name = "textual_inversion"
    Config = TextualInversionConfig
    # What the contract test (tests/test_train_contract.py) needs on tiny: a new word, and prompts that use it.
    contract_settings = {"textual_inversion.token": "<sks-obj>", "sample_prompts": '["a photo of <sks-obj>"]'}

    def check_settings(self, cfg) -> None:
        o = options(cfg)
        tk.check_tokens_before_loading(vector_names(o.token.strip().lower(), o.num_vectors))

    def prepare(self, c, cfg) -> list[ParamGroup]:
        o = options(cfg)
        self.cfg, self.o = cfg, o
        te, tok = c.text_encoder, c.tokenizer
        o.token = o.token.strip().lower()  # CLIP lowercases prompts and added tokens alike
        self.names = vector_names(o.token, o.num_vectors)
        gen = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
        init = tk.init_rows(te, tok, o.num_vectors, o.init_word, o.init_std, gen)
        self.emb = tk.add_new_tokens(tok, te, self.names, init)
        self.first = len(self.emb.new) - o.num_vectors  # our rows in emb.new (others may be other concepts')
        self.expanded = " ".join(self.names)
        base_w = self.emb.base.weight.detach().float()
        self.target_norm = o.target_norm or float(base_w.norm(dim=-1).mean())
        return [ParamGroup("embedding", [self.emb.new], lr=float(getattr(cfg, "learning_rate", 5e-3)),
                           weight_decay=0.0)]

    def rows(self) -> torch.Tensor:
        return self.emb.new[self.first:self.first + self.o.num_vectors]

    def prompt(self, caption: str) -> str:
        return ensure_token(caption, self.o.token.strip(), self.expanded)

    def encode(self, c, captions: list[str]) -> torch.Tensor:
        ids = tk.tokenize(c.tokenizer, [self.prompt(x) for x in captions], c.text_encoder.device)
        return tk.encode_text(c.text_encoder, ids, self.o.clip_skip)

    def loss(self, c, batch, step: int) -> torch.Tensor:
        from ..train.noise import denoising_loss

        loss = denoising_loss(c, batch, self.cfg, encoder_hidden_states=self.encode(c, batch.captions))
        if self.o.norm_decay:
            loss = loss + self.o.norm_decay * norm_penalty(self.rows(), self.target_norm)
        return loss

    def metadata(self, c) -> dict:
        meta = {"sdstudio.method": self.name, "sdstudio.base_model": shareable(str(c.ref)),
                "sdstudio.clip_skip": str(self.o.clip_skip)}
        if self.run is not None:
            from ..formats.metadata import training_metadata

            meta = {**training_metadata(self.run, c.family, kind="textual-inversion", clip_skip=self.o.clip_skip),
                    **meta}
        return meta

    def load_output(self, pipe, paths: list[Path]):
        """As a user would in diffusers: `load_textual_inversion(file, token=...)` (A1111 files name no token)."""
        from ..formats.safe_io import read_safetensors_metadata

        for p in paths[:1]:
            pipe.load_textual_inversion(str(p), token=read_safetensors_metadata(p).get("sdstudio.token"))
        return pipe

    def save(self, c, out: Path) -> list[Path]:
        """`<run>/<output_name>.safetensors` (A1111) and/or `<output_name>.learned_embeds.safetensors`."""
        return save_embedding(self.rows(), output_stem(self.cfg, out), self.o.token.strip(), self.o.save_format,
                              self.metadata(c), step=self.run.step if self.run is not None else 0)
