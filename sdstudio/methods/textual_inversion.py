"""Textual Inversion: learn a new word (one or more vectors) for a concept; the model itself stays untouched.

Multi-vector tokens follow diffusers' convention: `<tok>` is stored as the tokens `<tok> <tok>_1 ... <tok>_{n-1}`,
and a prompt's `<tok>` expands to all of them, exactly what `load_textual_inversion` and A1111 do at load time.
Saves the A1111 format (`.safetensors` with `emb_params`) and/or diffusers' `learned_embeds` format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
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


def save_embedding(rows, out: Path, token: str, fmt: str, meta: dict | None = None,
                   step: int = 0) -> list[Path]:
    """Write `rows` (n, dim) through formats/embeddings.py: A1111 (`<out>.safetensors`, key `emb_params`) and/or
    diffusers learned_embeds (`<out>.learned_embeds.safetensors`, key = the token). `step`: the steps trained."""
    from ..formats import embeddings

    n = rows[0].shape[0] if isinstance(rows, (list, tuple)) else rows.shape[0]  # SDXL: [clip_l, clip_g]
    meta = {"sdstudio.token": token, "sdstudio.vectors": str(n), **(meta or {})}
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
        o.token = o.token.strip().lower()  # CLIP lowercases prompts and added tokens alike
        if c.family.is_xl and o.save_format != "a1111":
            raise UserError("On SDXL an embedding is saved as one A1111/ComfyUI file with clip_l and clip_g (diffusers "
                            "loads it too): set save_format to a1111.")
        self.names = vector_names(o.token, o.num_vectors)
        gen = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
        # The word gets rows in every text encoder (SDXL: CLIP-L and bigG, each started from init_word in its own
        # table), trained together at one lr, as sd-scripts' sdxl_train_textual_inversion does.
        self.embs, self.target_norms = [], []
        for te, tok in zip(c.text_encoders, c.tokenizers):
            init = tk.init_rows(te, tok, o.num_vectors, o.init_word, o.init_std, gen)
            emb = tk.add_new_tokens(tok, te, self.names, init)
            self.embs.append(emb)
            self.target_norms.append(o.target_norm or float(emb.base.weight.detach().float().norm(dim=-1).mean()))
        self.emb = self.embs[0]
        self.first = len(self.emb.new) - o.num_vectors  # our rows in emb.new (others may be other concepts')
        self.expanded = " ".join(self.names)
        self.target_norm = self.target_norms[0]
        return [ParamGroup("embedding", [e.new for e in self.embs], lr=float(getattr(cfg, "learning_rate", 5e-3)),
                           weight_decay=0.0)]

    def rows(self) -> torch.Tensor:
        """The word's vectors in the first text encoder (n, dim)."""
        return self.emb.new[self.first:self.first + self.o.num_vectors]

    def all_rows(self) -> list[torch.Tensor]:
        """The word's vectors in every text encoder: [clip_l] or, on SDXL, [clip_l, clip_g]."""
        return [e.new[self.first:self.first + self.o.num_vectors] for e in self.embs]

    def set_frozen(self, frozen: bool) -> None:
        for e in self.embs:
            e.frozen = frozen

    def prompt(self, caption: str) -> str:
        return ensure_token(caption, self.o.token.strip(), self.expanded)

    def text(self, c, captions: list[str]):
        """The captions (with the word) as the UNet's text conditioning, a train.text.TextCond (hidden states and,
        on SDXL, the pooled embedding)."""
        from ..train.text import encode_prompt, tokenize_prompt

        ids = tokenize_prompt(c, [self.prompt(x) for x in captions], c.text_encoder.device)
        return encode_prompt(c, ids, self.o.clip_skip)

    def encode(self, c, captions: list[str]) -> torch.Tensor:
        """The captions' encoder hidden states (with the word)."""
        return self.text(c, captions).hidden

    def loss(self, c, batch, step: int) -> torch.Tensor:
        from ..train.noise import denoising_loss

        text = self.text(c, batch.captions)
        loss = denoising_loss(c, batch, self.cfg, encoder_hidden_states=text.hidden, pooled_embeds=text.pooled)
        if self.o.norm_decay:
            for rows, target in zip(self.all_rows(), self.target_norms):
                loss = loss + self.o.norm_decay * norm_penalty(rows, target)
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
            load_embedding_into(pipe, p, read_safetensors_metadata(p).get("sdstudio.token"))
        return pipe

    def save(self, c, out: Path) -> list[Path]:
        """`<run>/<output_name>.safetensors` (A1111; SDXL: clip_l + clip_g) and/or
        `<output_name>.learned_embeds.safetensors`."""
        rows = self.all_rows()
        return save_embedding(rows if len(rows) > 1 else rows[0], output_stem(self.cfg, out), self.o.token.strip(),
                              self.o.save_format, self.metadata(c), step=self.run.step if self.run is not None else 0)


def load_embedding_into(pipe, path: Path, token: str | None) -> None:
    """Load an embedding file into a diffusers pipeline the documented way: one `load_textual_inversion` call, or
    on SDXL two (clip_l into text_encoder, clip_g into text_encoder_2)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        pipe.load_textual_inversion(str(path), token=token)
        return
    from ..formats.safe_io import load_state_dict

    sd = load_state_dict(path)
    pipe.load_textual_inversion(sd["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
