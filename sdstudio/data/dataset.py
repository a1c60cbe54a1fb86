"""The training dataset: aspect buckets, repeats, caption dropout/shuffle with keep-tokens, the named
conditioning each item carries (control images, loss masks: data/conditioning.py), and the latent and
text-embedding caches.

Every random choice (data order, flips, caption dropout, shuffles) is a pure function of (seed, epoch,
position), so a resumed run sees exactly the data the uninterrupted run would have seen, with no state to save.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .conditioning import Condition, Cut, get_condition, problems_sentence, upright_size
from .crop import make_buckets, nearest_bucket  # one bucket list for the preparer and the trainer
from .folder import DatasetLayout


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    is_class: bool
    size: tuple[int, int]  # original (w, h), upright (EXIF rotation applied, as the pixels are read)
    bucket: tuple[int, int]  # training (w, h)


def _rng(*key) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def process_caption(caption: str, rng: random.Random, dropout: float, shuffle: bool, keep_tokens: int) -> str:
    """Caption dropout, then a shuffle of the comma-separated tags after the first `keep_tokens`."""
    if dropout and rng.random() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        return ", ".join(head + tail)
    return caption


def tag_frequency(layout: DatasetLayout) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {concept folder: {tag: count}}."""
    out = {}
    for c in layout.concepts:
        counts: Counter = Counter()
        for p in c.images:
            counts.update(t.strip() for t in layout.captions[p].split(",") if t.strip())
        out[f"{c.repeats}_{c.prompt_prefix}" if c.prompt_prefix else c.path.name] = dict(counts)
    return out


def dataset_hash(layout: DatasetLayout) -> str:
    """A short fingerprint of the images (names, sizes) and their captions: identifies what a model saw."""
    h = hashlib.sha256()
    for p in sorted(layout.images + layout.class_images):
        h.update(f"{p.name}\0{p.stat().st_size}\0{layout.captions[p]}\n".encode())
    return h.hexdigest()[:16]


class TrainDataset:
    """The expanded, bucketed dataset. `batch_indices(g)` names the items of global batch g (across epochs).

    `conditioning` names what the method needs besides the image (its `conditioning` attribute, e.g.
    ("control",)); a loss mask joins when masked loss is on. Each item's sources are found and checked here,
    before any model loads, and every bad one is reported at once."""

    def __init__(self, layout: DatasetLayout, cfg, conditioning: tuple[str, ...] = ()) -> None:
        self.layout, self.cfg = layout, cfg
        buckets = make_buckets(cfg.resolution) if cfg.buckets else [(cfg.resolution, cfg.resolution)]
        self.items: list[Item] = []
        self.instance_idx: list[int] = []  # with repeats
        self.class_idx: list[int] = []
        for concepts, is_class in ((layout.concepts, False), (layout.class_concepts, True)):
            for c in concepts:
                for p in c.images:
                    try:
                        size = upright_size(p)
                    except Exception as exc:
                        raise UserError(f"{p.name} in {c.path} is not a readable image ({exc}): remove it.") from None
                    self.items.append(Item(p, layout.captions[p], is_class, size, nearest_bucket(size[0], size[1], buckets)))
                    (self.class_idx if is_class else self.instance_idx).extend([len(self.items) - 1] * (
                        1 if is_class else c.repeats))
        # Batches are built once (structure) and shuffled per epoch (order), so every epoch has the same count.
        self._groups: dict[tuple[int, int], list[int]] = {}
        for i in self._epoch_indices(0):
            self._groups.setdefault(self.items[i].bucket, []).append(i)
        self.batches_per_epoch = sum(math.ceil(len(v) / cfg.batch_size) for v in self._groups.values())
        # Subject masks: asked for at the top level (masked_loss) or by the method's own table, which says so with
        # a `uses_masks` property (EDLoRA: its masked loss or its attention regularisation).
        opts = getattr(cfg, "options", None)
        self.masks_wanted = bool(getattr(cfg, "masked_loss", False)
                                 or getattr(opts, "uses_masks", getattr(opts, "masked_loss", False)))
        names = list(dict.fromkeys(list(conditioning) + (["mask"] if self.masks_wanted else [])))
        self.conditions: dict[str, Condition] = {n: get_condition(n) for n in names}
        self.sources: dict[str, list] = {n: self._locate(c) for n, c in self.conditions.items()}

    def _locate(self, cond: Condition) -> list:
        """Each item's source for `cond`; raises one UserError naming every missing or bad one."""
        sizes = {it.path: it.size for it in self.items}  # each image once (a class image may repeat)
        found = dict(zip(sizes, cond.locate_all(self.layout, list(sizes))))
        bad = []
        for path, src in found.items():
            why = cond.check(src, sizes[path]) if src is not None else (f"has no {cond.label}" if cond.required else None)
            if why:
                bad.append((path, why))
        if bad:
            raise UserError(problems_sentence(bad, len(found), cond.label))
        return [found[it.path] for it in self.items]

    def _epoch_indices(self, epoch: int) -> list[int]:
        """Instance images with repeats, plus as many class images (cycled) for prior preservation."""
        idx = list(self.instance_idx)
        if self.class_idx:
            rng = _rng(self.cfg.seed, "class", epoch)
            pool = list(self.class_idx)
            rng.shuffle(pool)
            idx += [pool[i % len(pool)] for i in range(len(self.instance_idx))]
        return idx

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = _rng(self.cfg.seed, "order", epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in self._epoch_indices(epoch):
            groups.setdefault(self.items[i].bucket, []).append(i)
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            batches += [members[j:j + self.cfg.batch_size] for j in range(0, len(members), self.cfg.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch_indices(self, g: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of global batch number g."""
        epoch, pos = divmod(g, self.batches_per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_batches = epoch, self.epoch_batches(epoch)
        return epoch, self._cached_batches[pos]

    # -- one sample -----------------------------------------------------------------------------------
    def cut(self, i: int, flip: bool = False, shift: tuple[float, float] | None = None) -> Cut:
        """How item i becomes a sample: the one cut its pixels and all of its conditioning share."""
        item = self.items[i]
        return Cut(item.size, item.bucket, flip, shift or (0.5, 0.5))

    def pixels(self, i: int, flip: bool = False, shift: tuple[float, float] | None = None) -> torch.Tensor:
        """The image resized to cover its bucket, cropped (centred, or at `shift`), as (3, H, W) in [-1, 1]."""
        from PIL import Image

        from .images import open_rgb

        im = self.cut(i, flip, shift).image(open_rgb(self.items[i].path), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def cond(self, i: int, name: str, flip: bool = False, shift: tuple[float, float] | None = None) -> torch.Tensor:
        """Item i's conditioning `name`, cut exactly like `pixels(i, flip, shift)`."""
        return self.conditions[name].read(self.sources[name][i], self.cut(i, flip, shift))

    def mask(self, i: int, flip: bool = False) -> torch.Tensor:
        """The loss mask in latent space, (1, H/8, W/8) in [0, 1], cut exactly like `pixels`; all ones when the
        image has no `<name>.mask.png` beside it."""
        from .folder import mask_path

        return get_condition("mask").read(mask_path(self.items[i].path), self.cut(i, flip))

    def caption(self, i: int, epoch: int, pos: int) -> str:
        cfg = self.cfg
        rng = _rng(cfg.seed, "caption", epoch, pos, i)
        return process_caption(self.items[i].caption, rng, cfg.caption_dropout, cfg.shuffle_captions, cfg.keep_tokens)

    def flip(self, i: int, epoch: int, pos: int) -> bool:
        return bool(self.cfg.flip) and _rng(self.cfg.seed, "flip", epoch, pos, i).random() < 0.5

    def crop_shift(self, i: int, epoch: int, pos: int) -> tuple[float, float] | None:
        """Where item i is cropped this time (x, y in [0, 1] of the slack) with random_crop on; None: centred."""
        if not getattr(self.cfg, "random_crop", False):
            return None
        rng = _rng(self.cfg.seed, "crop", epoch, pos, i)
        return rng.random(), rng.random()

    def all_captions(self) -> list[str]:
        """The captions the text cache should hold up front (dropout adds the empty one)."""
        caps = {it.caption for it in self.items}
        if self.cfg.caption_dropout:
            caps.add("")
        return sorted(caps)

    def latent_key(self, i: int, base_ref: str) -> str:
        """The disk-cache name of item i: changes when the image, its bucket, the base or a conditioning
        source changes."""
        it = self.items[i]
        st = it.path.stat()
        conds = "|".join(f"{n}={c.fingerprint(self.sources[n][i])}" for n, c in sorted(self.conditions.items()))
        key = f"{it.path}|{st.st_size}|{st.st_mtime_ns}|{it.bucket}|{base_ref}" + (f"|{conds}" if conds else "")
        return hashlib.sha1(key.encode()).hexdigest()
