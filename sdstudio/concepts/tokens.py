"""New tokens for concept methods (TI, pivotal, EDLoRA): check names, add rows that alone train, encode text.

The base embedding table is never handed to the optimizer. `NewTokenEmbedding` wraps it and keeps the new rows
in their own small Parameter, so every original row stays bit-identical by construction (no masking of
gradients or restoring after each step, which optimizers with weight decay or momentum can get wrong).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UserError


def check_new_token(tokenizer, token: str) -> None:
    """A placeholder must be a fresh string: one the tokenizer already knows would mix with its old meaning."""
    check_token_name(token, tokenizer.get_vocab())


def check_tokens_before_loading(tokens: list[str]) -> None:
    """The same check against CLIP's vocabulary (SD 1.x and 2.x share it), which we have offline: a bad word
    is refused in the preflight, before minutes of model loading. The model's own tokenizer checks again
    when it loads (a custom tokenizer may know more words)."""
    from ..models.tiny import clip_vocab_and_merges

    vocab, _ = clip_vocab_and_merges()
    for t in tokens:
        check_token_name(t, vocab)


def check_token_name(token: str, vocab: dict) -> None:
    token = token.strip()
    if not token or any(ch.isspace() for ch in token):
        raise UserError(f"The token {token!r} must be one word with no spaces, for example '<my-cat>'.")
    if token in vocab or f"{token}</w>" in vocab or token.lower() in vocab or f"{token.lower()}</w>" in vocab:
        raise UserError(f"The token {token!r} is already in the tokenizer's vocabulary: pick a new one such as "
                        f"'<{token.strip('<>')}-concept>'.")


class NewTokenEmbedding(nn.Module):
    """The text encoder's token embedding plus trainable rows for ids >= `base.num_embeddings`."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.num_base = base.num_embeddings
        self.new = nn.Parameter(new_rows.clone().to(base.weight.dtype))
        self.frozen = False  # True: the new rows stop learning (EDLoRA's norm threshold)

    @property
    def weight(self) -> torch.Tensor:  # what loaders such as `load_textual_inversion` read
        return torch.cat([self.base.weight, self.new.detach()], 0)

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.num_base
        out = self.base(ids.clamp(max=self.num_base - 1))
        if not bool(is_new.any()):
            return out
        new = self.new.detach() if self.frozen else self.new
        picked = new[(ids - self.num_base).clamp(min=0, max=new.shape[0] - 1)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), picked, out)


def add_new_tokens(tokenizer, text_encoder, names: list[str], init: torch.Tensor) -> NewTokenEmbedding:
    """Add `names` to the tokenizer and give them rows `init` (len(names), dim) in a NewTokenEmbedding.

    Calling it again on a text encoder that already has a NewTokenEmbedding appends to it (several concepts)."""
    emb = text_encoder.get_input_embeddings()
    rows = emb.num_embeddings
    if len(tokenizer) != rows:
        raise UserError(f"The tokenizer has {len(tokenizer)} tokens but the text encoder {rows} embeddings: "
                        "reload the base model before adding new tokens.")
    for n in names:
        check_new_token(tokenizer, n)
    if tokenizer.add_tokens(names) != len(names):
        raise UserError(f"Some of the tokens {names} are already known to the tokenizer: pick new names.")
    if isinstance(emb, NewTokenEmbedding):
        emb.new = nn.Parameter(torch.cat([emb.new.detach(), init.to(emb.new)], 0))
        return emb
    wrapped = NewTokenEmbedding(emb, init)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def token_ids(tokenizer, names: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def init_rows(text_encoder, tokenizer, n: int, init_word: str, std: float, generator=None) -> torch.Tensor:
    """n rows from `init_word`'s embedding (averaged over its sub-tokens), or random N(0, std) when it is empty."""
    base = text_encoder.get_input_embeddings()
    weight = base.weight.detach()
    if init_word.strip():
        ids = tokenizer(init_word.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"The initial word {init_word!r} gives no tokens: use a plain word such as 'dog'.")
        row = weight[ids].float().mean(0)
        return row.expand(n, -1).clone()
    return torch.randn(n, weight.shape[1], generator=generator) * std


def bake(text_encoder) -> None:
    """Replace a NewTokenEmbedding with one plain nn.Embedding (for saving a whole model or for pipelines)."""
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, NewTokenEmbedding):
        return
    plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device=emb.base.weight.device,
                         dtype=emb.base.weight.dtype)
    plain.weight.data.copy_(emb.weight)
    plain.weight.requires_grad_(False)
    text_encoder.set_input_embeddings(plain)
    text_encoder.config.vocab_size = emb.num_embeddings


def replace_word(text: str, word: str, by: str) -> str:
    """Replace `word` as a whole word (not inside a longer token such as '<cat10>' for '<cat1>')."""
    # Case-insensitive, as CLIP's tokenizer lowercases prompts (and the tokens added to it).
    return re.sub(rf"(?<![\w<>#]){re.escape(word)}(?![\w<>#])", lambda m: by, text, flags=re.IGNORECASE)


def encode_text(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Encoder hidden states for the UNet; clip_skip 2 takes the penultimate layer (A1111's "Clip skip")."""
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    return text_encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip]) \
        if hasattr(text_encoder, "text_model") else text_encoder.final_layer_norm(out.hidden_states[-clip_skip])


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
