"""LoRA files: peft/diffusers <-> kohya (lora_unet_*, lora_te_*, .alpha) <-> LyCORIS (hada_*, lokr_*).

Module names come from formats/kinds.py (kohya_unet_name, kohya_te_name, kohya_names_for, group_kohya).
"""
from __future__ import annotations


# ======================================================================================================
# Writing (owned by the training-engine issue): trained adapters -> kohya / diffusers files.
# ======================================================================================================


# ======================================================================================================
# Reading (owned by the Playground issue): kohya / diffusers / peft / LyCORIS files -> modules, with each
# module's alpha/rank applied per module (diffusers mis-scales files whose modules differ in rank or alpha).
# ======================================================================================================
