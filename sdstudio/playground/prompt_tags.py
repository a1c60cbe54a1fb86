"""A1111's `<lora:name:weight>` tags in a prompt, turned into the recipe's [[lora]] items."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .recipe import LoraItem, Recipe


_PROMPT_LORA = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)


def extract_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """Remove A1111 `<lora:name>`, `<lora:name:w>`, `<lora:name:te_w:unet_w>` tags from a prompt.

    Returns the clean prompt and [(name, unet weight, text-encoder weight)]."""
    found = []

    def take(m: re.Match) -> str:
        args = [a for a in m[3].split(":")[1:] if a.strip()]
        try:
            nums = [float(a) for a in args]
        except ValueError:
            raise UserError(f"The prompt tag {m[0]} has a weight that is not a number: write <lora:name:0.8>.") from None
        te = nums[0] if nums else 1.0
        unet = nums[1] if len(nums) > 1 else te
        found.append((m[2].strip(), unet, te))
        return ""

    clean = _PROMPT_LORA.sub(take, prompt)
    clean = re.sub(r"\s*,\s*(,\s*)+", ", ", clean).strip().strip(",").strip()
    return clean, found


def resolve_prompt_loras(recipe: Recipe, lora_dir: Path | None) -> Recipe:
    """The recipe with its prompt's <lora:...> tags turned into [[lora]] items found in `lora_dir`."""
    clean, tags = extract_prompt_loras(recipe.prompt)
    if not tags:
        return recipe
    items = list(recipe.lora)
    for name, unet_w, te_w in tags:
        path = None
        if lora_dir is not None:
            for cand in sorted(lora_dir.rglob("*")):
                if cand.is_file() and cand.suffix in (".safetensors", ".pt") and cand.stem == name:
                    path = cand
                    break
        if path is None:
            raise UserError(f"<lora:{name}> in the prompt names no file in {lora_dir or 'models/lora'}: "
                            f"put {name}.safetensors there or fix the name.")
        items.append(LoraItem(path=str(path), weight=unet_w, text_encoder_weight=te_w))
    return recipe.replace(prompt=clean, lora=items)
