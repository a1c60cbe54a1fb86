"""LoRA-Block-Weight (the A1111 extension's per-block weights): block ids, the block each module belongs to,
and a user's list of weights read as a table."""
from __future__ import annotations

import re

from ..errors import UserError


def block_ids(unet) -> list[str]:
    """A1111 LoRA-Block-Weight ids in full form: BASE, IN00.., M00, OUT00.. (26 for SD1.x, 20 for SDXL)."""
    per_block = unet.config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    n_down = len(unet.config.down_block_types)
    n_in = n_down * (per_block + 1)
    n_out = len(unet.config.up_block_types) * (per_block + 1)
    return ["BASE"] + [f"IN{i:02d}" for i in range(n_in)] + ["M00"] + [f"OUT{i:02d}" for i in range(n_out)]


# The short forms list only the blocks that hold attention (what most LoRAs train).
SHORT_FORMS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
         "OUT08", "OUT09", "OUT10", "OUT11"],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
}


def block_of(model_key: str, path: str, unet) -> str:
    """The LoRA-Block-Weight block a module belongs to; resnets, convs, samplers included (not only attention)."""
    if model_key != "unet":
        return "BASE"
    per_block = unet.config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    n_up = len(unet.config.up_block_types) * (per_block + 1)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)", path)
    if m:
        b, part, j = int(m[1]), m[2], int(m[3])
        idx = b * (per_block + 1) + (per_block + 1 if part == "downsamplers" else j + 1)
        return f"IN{idx:02d}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)", path)
    if m:
        b, part, j = int(m[1]), m[2], int(m[3])
        idx = b * (per_block + 1) + (per_block if part == "upsamplers" else j)
        return f"OUT{idx:02d}"
    if path.startswith("mid_block"):
        return "M00"
    if path.startswith(("conv_out", "conv_norm_out")):
        return f"OUT{n_up - 1:02d}"
    return "IN00"  # conv_in, time_embedding, add_embedding: the entry of the network


def block_table(blocks: list[float], unet, where: str = "blocks") -> dict[str, float]:
    """Block weights by id. Accepts the full form (26 SD1.x / 20 SDXL) or the short form (17 / 12); blocks a
    short form leaves out keep weight 1."""
    ids = block_ids(unet)
    if not blocks:
        return {}
    if len(blocks) == len(ids):
        return dict(zip(ids, blocks))
    short = SHORT_FORMS.get(len(blocks))
    if short and all(b in ids for b in short):
        table = {i: 1.0 for i in ids}
        table.update(zip(short, blocks))
        return table
    forms = [str(len(ids))] + [str(n) for n, s in SHORT_FORMS.items() if all(b in ids for b in s)]
    raise UserError(f"{where} has {len(blocks)} block weights; this base takes {' or '.join(forms)} "
                    f"(LoRA-Block-Weight order: {', '.join(ids[:4])}, ...).")
