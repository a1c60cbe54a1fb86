"""The UNet's text conditioning: what a caption becomes for SD1.x/2.x (one CLIP) and SDXL (two, plus a pooled
embedding), as the diffusers pipelines and kohya sd-scripts compute it.

- SD1.x/2.x: the text encoder's last hidden state (or the n-th last with clip_skip, A1111's "Clip skip",
  through the final layer norm).
- SDXL: both encoders' penultimate hidden states (not layer-normed), side by side (768 + 1280 = 2048 on the real
  model), and the second encoder's pooled projection (`text_embeds`) for the UNet's added conditioning, as
  `StableDiffusionXLPipeline.encode_prompt` and sd-scripts' sdxl_train_util do. clip_skip n takes the
  (n+1)-th last layer, as diffusers' pipeline does with its `clip_skip`.

A caption's conditioning is `TextCond(hidden, pooled)`; `pooled` is None on SD1.x/2.x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCond:
    hidden: torch.Tensor  # (B, 77, dim): the UNet's encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, proj): SDXL's added `text_embeds`; None on SD1.x/2.x


def tokenize_prompt(c, captions: list[str], device=None):
    """Token ids for each of the base's tokenizers: a tensor (B, 77) for SD1.x/2.x, a list of two for SDXL."""
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in c.tokenizers]
    if device is not None:
        ids = [i.to(device) for i in ids]
    return ids if c.family.is_xl else ids[0]


def encode_prompt(c, input_ids, clip_skip: int = 1) -> TextCond:
    """Token ids (as `tokenize_prompt` gives them) -> TextCond, with gradients where the encoders train."""
    if not c.family.is_xl:
        from ..concepts.tokens import encode_text

        ids = input_ids[0] if isinstance(input_ids, (list, tuple)) else input_ids
        te = c.text_encoders[0]
        return TextCond(encode_text(te, ids.to(te.device), clip_skip))
    hidden, pooled = [], None
    layer = -(max(clip_skip, 1) + 1)  # SDXL conditions on the penultimate layer by default
    for te, ids in zip(c.text_encoders, input_ids):
        out = te(ids.to(te.device), output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[layer])
        if te is c.text_encoders[-1]:  # CLIPTextModelWithProjection: its first output is the pooled projection
            pooled = out.text_embeds
    return TextCond(torch.cat(hidden, dim=-1), pooled)


def default_time_ids(n: int, height: int, width: int, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image trained at its own size: (orig h, orig w, crop top, crop
    left, target h, target w), what the pipeline passes when it is not told otherwise."""
    return torch.tensor([[height, width, 0, 0, height, width]] * n, dtype=torch.float32, device=device)
