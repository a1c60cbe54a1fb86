"""EDLoRA's attention regularisation (Mix-of-Show, arXiv 2305.18292): a concept's words look at its subject.

While EDLoRA trains, every cross-attention layer's attention probabilities for the two concept words are kept
(the two columns only). After the UNet call, for each feature resolution, the maps are averaged over heads
and layers and divided by their maximum, and the subject mask (the `<image>.mask.png` beside each photo,
nearest-resized) says where the background is. Then
    loss = weight * sum over resolutions of ( mean(word1 map outside the mask) + mean(word2 map outside) )
with `full_identity` replacing the second term by mse(word2 map, mask), as Mix-of-Show's reg_full_identity.
This follows `EDLoRATrainer.cal_attn_reg` in TencentARC/Mix-of-Show (mixofshow/pipelines/trainer_edlora.py,
commit 51270fd5f9907cada8f416a4eff191a74f842660), with two differences: a resolution whose mask has no
background (a 1x1 mid-block cell, a full mask) is skipped rather than voiding the whole term, and maps of
non-square images are laid out as they are rather than assumed square.

Without masks (all ones) there is no background and the term is zero, as in Mix-of-Show.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..concepts.layerwise import AttnContext, LayerwiseAttnProcessor


class RecordContext(AttnContext):
    """What the recording processors read and fill during one training forward pass."""

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None  # (B, 2) token positions of the concept words; None: off
        self.maps: list[torch.Tensor] = []  # per layer call: (B, heads, HW, 2) attention probabilities

    def start(self, positions: torch.Tensor | None) -> None:
        """Record from the next UNet call on (None: stop recording)."""
        self.positions, self.maps = positions, []

    def take(self) -> list[torch.Tensor]:
        """The maps recorded since `start`. Recording stays on until the next `start`, so that a gradient-
        checkpointing recompute during backward runs the same computation as the forward it repeats."""
        maps, self.maps = self.maps, []
        return maps


class RecordingAttnProcessor(LayerwiseAttnProcessor):
    """Layer-wise cross-attention that, while its context records, computes the attention itself (as diffusers'
    AttnProcessor does) to keep the concept words' probability columns, with their gradients."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = self.ctx
        ehs = self.pick(encoder_hidden_states)
        if (not isinstance(ctx, RecordContext) or ctx.positions is None or ehs is None or hidden_states.ndim != 3
                or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross):
            return self.inner(attn, hidden_states, ehs, attention_mask, temb)
        b = hidden_states.shape[0]
        residual = hidden_states
        mask = attn.prepare_attention_mask(attention_mask, ehs.shape[1], b)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states)).contiguous()
        k = attn.head_to_batch_dim(attn.to_k(ehs)).contiguous()
        v = attn.head_to_batch_dim(attn.to_v(ehs)).contiguous()
        probs = attn.get_attention_scores(q, k, mask)  # (B * heads, HW, tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        pos = ctx.positions.to(probs.device)
        p = probs.view(b, -1, *probs.shape[1:])  # (B, heads, HW, tokens)
        ctx.maps.append(torch.gather(p, 3, pos[:, None, None, :].expand(b, p.shape[1], p.shape[2], 2)))
        return out


def concept_positions(ids: torch.Tensor, first_ids: tuple[int, int]) -> torch.Tensor:
    """(B, 2): where each prompt (token ids (B, 77) of the layer-0 prompt) has the two concept words; -1 when a
    word is missing (a truncated caption)."""
    out = torch.full((ids.shape[0], 2), -1, dtype=torch.long)
    for j, tid in enumerate(first_ids):
        hit = ids == tid
        found = hit.any(1)
        out[found, j] = hit[found].float().argmax(1).cpu()
    return out


def feature_grid(latent_hw: tuple[int, int], seq: int) -> tuple[int, int]:
    """(h, w) of a UNet level with `seq` positions, from the latent size (stride-2 convs round up)."""
    h, w = latent_hw
    while h * w > seq and h > 1:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != seq:
        raise RuntimeError(f"cannot place {seq} positions on a {latent_hw} latent")
    return h, w


def attention_reg_loss(maps: list[torch.Tensor], mask: torch.Tensor, weight: float,
                       full_identity: bool = False) -> torch.Tensor:
    """The regularisation term from the recorded maps (each (B, heads, HW, 2)) and the subject masks (B, 1, h, w)
    in latent space (1 = subject). Returns 0 (with a graph) when nothing applies."""
    if not maps or weight <= 0:
        return torch.zeros(())
    by_size: dict[int, list[torch.Tensor]] = {}
    for m in maps:
        by_size.setdefault(m.shape[2], []).append(m)
    total = maps[0].new_zeros((), dtype=torch.float32)
    latent_hw = tuple(mask.shape[-2:])
    for seq, group in by_size.items():
        fh, fw = feature_grid(latent_hw, seq)
        cross = torch.cat(group, 1).float().mean(1)  # (B, HW, 2): all heads of all layers at this size
        cross = cross.view(cross.shape[0], fh, fw, 2)
        adjective, subject = cross[..., 0], cross[..., 1]
        adjective = adjective / adjective.max().clamp(min=1e-12)
        subject = subject / subject.max().clamp(min=1e-12)
        gt = F.interpolate(mask.float().to(cross.device), size=(fh, fw), mode="nearest").squeeze(1) >= 0.5
        outside = ~gt
        if not bool(outside.any()):
            continue  # no background at this size (a full mask, or a 1x1 cell inside it)
        loss_subject = F.mse_loss(subject, gt.float()) if full_identity else subject[outside].mean()
        total = total + loss_subject + adjective[outside].mean()
    return weight * total
