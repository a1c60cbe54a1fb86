"""Captions: a `Captioner` protocol with BLIP (transformers), the WD14 tagger (ONNX) and file names; then the
edits people make to a whole dataset (trigger and class words, find/replace, add/remove tags).

Models load from a hub id or a local folder (the workspace keeps them in models/captioners/<name>/). Offline,
a missing model is one sentence naming what to download and where to put it.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import UserError

CAPTIONERS = ("none", "filename", "blip", "wd14")
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
DEFAULT_WD14 = "SmilingWolf/wd-swinv2-tagger-v3"
# Tags that ARE underscores and must keep them when underscores become spaces.
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


class Captioner(Protocol):
    name: str

    def caption(self, images: list, paths: list[Path]) -> list[str]:
        """One caption per image (`paths` are the source files, for captioners that read names)."""
        ...


def _local_or_hub(ref: str, search_dir: Path | None, probe: str, files: str) -> tuple[str, bool]:
    """(where to load from, local only) for a captioning model: a folder path, a folder name inside
    `search_dir`, a hub id already in the Hugging Face cache (`probe` is one of its files), or a hub id to
    download. Offline with none of these, a UserError at once: the hub client would otherwise retry for a
    minute before saying the same."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p), True
    if search_dir is not None and (Path(search_dir) / ref).is_dir():
        return str(Path(search_dir) / ref), True
    if search_dir is not None and (Path(search_dir) / ref.replace("/", "--")).is_dir():
        return str(Path(search_dir) / ref.replace("/", "--")), True
    if in_hf_cache(ref, probe):
        return ref, True
    if not hub_reachable():
        raise _missing(ref, files, search_dir, "is not on this machine and huggingface.co cannot be reached")
    return ref, False


PROBE_FILE = {"blip": "config.json", "wd14": "model.onnx"}  # one file a captioner's model always has


def model_reachable(kind: str, ref: str, search_dir: Path | None) -> bool:
    """Whether `make_captioner` can get this model now (local folder, Hugging Face cache or a hub that answers),
    decided in seconds: callers with a fallback (the wizard) use it to skip the captioner offline."""
    try:
        _local_or_hub(ref, search_dir, PROBE_FILE[kind], "")
    except UserError:
        return False
    return True


def in_hf_cache(ref: str, filename: str) -> bool:
    """Whether the Hugging Face cache already holds `filename` of the hub repo `ref`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(ref, filename), str)
    except Exception:  # not a valid repo id, no cache folder
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can answer: False at once with HF_HUB_OFFLINE set, else a TCP connection
    within `timeout` seconds. Behind a proxy (HTTPS_PROXY) the direct connection proves nothing: True."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing(ref: str, files: str, search_dir: Path | None, why: str) -> UserError:
    """The one sentence for a captioning model we cannot get: `why`, then what to download and where to."""
    where = Path(search_dir) / ref.replace("/", "--") if search_dir else "a local folder"
    return UserError(f"The captioning model '{ref}' {why}: connect to the internet once, or download {files} from "
                     f"huggingface.co/{ref} into {where}.")


# -- file names ----------------------------------------------------------------------------------------------------
class FilenameCaptioner:
    """`a_red-car (2).jpg` -> "a red car": separators become spaces, counters and camera numbers go."""

    name = "filename"

    def caption(self, images: list, paths: list[Path]) -> list[str]:
        return [caption_from_filename(p) for p in paths]


def caption_from_filename(path: Path | str) -> str:
    stem = Path(path).stem
    stem = re.sub(r"\(\d+\)|\b(IMG|DSC|DSCN|PXL|VID)[_-]?\d+\b", " ", stem, flags=re.I)
    stem = re.sub(r"[_\-.]+", " ", stem)
    stem = re.sub(r"\b\d+\b", " ", stem)
    return re.sub(r"\s+", " ", stem).strip()


# -- BLIP ------------------------------------------------------------------------------------------------------------
class BlipCaptioner:
    """BLIP image captioning (transformers BlipForConditionalGeneration), e.g. "a woman standing on a beach"."""

    name = "blip"

    def __init__(self, ref: str = DEFAULT_BLIP, device: str = "cpu", search_dir: Path | None = None,
                 max_new_tokens: int = 40, num_beams: int = 3, prompt: str = "") -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        files = "the model folder (config.json, model.safetensors, the processor files)"
        where, local = _local_or_hub(ref, search_dir, PROBE_FILE[self.name], files)
        try:
            self.processor = BlipProcessor.from_pretrained(where, local_files_only=local)
            self.model = BlipForConditionalGeneration.from_pretrained(where, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise _missing(ref, files, search_dir, f"could not be loaded ({type(exc).__name__})") from exc
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.max_new_tokens, self.num_beams, self.prompt = max_new_tokens, num_beams, prompt

    def caption(self, images: list, paths: list[Path]) -> list[str]:
        import torch

        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt", **kwargs)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [clean_blip(t) for t in texts]


def clean_blip(text: str) -> str:
    """BLIP's known artefacts: the made-up word "arafed" (and kin) and a leading "there is"."""
    text = re.sub(r"\b(arafed|araffe|araffed|arafe|arafa)\b\s*", "", text, flags=re.I)
    text = re.sub(r"^(there is|there are)\s+", "", text.strip(), flags=re.I)
    return re.sub(r"\s+", " ", text).strip()


# -- WD14 tagger ---------------------------------------------------------------------------------------------------
@dataclass
class TaggerConfig:
    general_threshold: float = 0.35  # keep general tags at or above this probability
    character_threshold: float = 0.85  # keep character tags at or above this probability
    exclude: list[str] = field(default_factory=list)  # tags never written (e.g. "simple background")
    keep_underscores: bool = False  # "long_hair" stays as is instead of "long hair"
    include_rating: bool = False  # add the best rating tag (general, sensitive, ...)


class WD14Tagger:
    """SmilingWolf's WD14 taggers: an ONNX model (NHWC, BGR, 0-255, white-padded square) and selected_tags.csv
    (name, category: 0 general, 4 character, 9 rating)."""

    name = "wd14"

    def __init__(self, ref: str = DEFAULT_WD14, search_dir: Path | None = None,
                 config: TaggerConfig | None = None) -> None:
        import onnxruntime as ort

        self.config = config or TaggerConfig()
        files = "model.onnx and selected_tags.csv"
        where, local = _local_or_hub(ref, search_dir, PROBE_FILE[self.name], files)
        try:
            if Path(where).is_dir():
                model_path, tags_path = Path(where) / "model.onnx", Path(where) / "selected_tags.csv"
                if not model_path.is_file() or not tags_path.is_file():
                    raise FileNotFoundError(f"{where} needs model.onnx and selected_tags.csv")
            else:
                from huggingface_hub import hf_hub_download

                model_path = Path(hf_hub_download(ref, "model.onnx", local_files_only=local))
                tags_path = Path(hf_hub_download(ref, "selected_tags.csv", local_files_only=local))
        except Exception as exc:
            raise _missing(ref, files, search_dir, f"could not be loaded ({type(exc).__name__})") from exc
        with open(tags_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.tags = [r["name"] for r in rows]
        self.categories = [int(r.get("category", 0)) for r in rows]
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model_path), providers=providers)
        except Exception as exc:
            raise UserError(f"{model_path} is not a loadable ONNX tagger ({exc}); re-download it.") from exc
        inp = self.session.get_inputs()[0]
        self.input_name, self.size = inp.name, int(inp.shape[1]) if isinstance(inp.shape[1], int) else 448
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise UserError(f"{tags_path.name} lists {len(self.tags)} tags but the model gives {n_out}: use the "
                            f"selected_tags.csv that came with the model.")

    def _prepare(self, image):
        import numpy as np
        from PIL import Image

        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR, as the taggers were trained

    def scores(self, images: list) -> list[dict[str, float]]:
        """Every tag's probability per image."""
        import numpy as np

        batch = np.stack([self._prepare(im) for im in images])
        probs = self.session.run(None, {self.input_name: batch})[0]
        return [dict(zip(self.tags, map(float, row))) for row in probs]

    def tags_for(self, probs: dict[str, float]) -> list[str]:
        c = self.config
        exclude = {normalise_tag(t, True) for t in c.exclude} | {normalise_tag(t, False) for t in c.exclude}
        ratings, picked = [], []
        for (tag, p), cat in zip(probs.items(), self.categories):
            if cat == 9:
                ratings.append((p, tag))
            elif (cat == 4 and p >= c.character_threshold) or (cat not in (4, 9) and p >= c.general_threshold):
                picked.append((cat == 4, p, tag))
        # Characters first (they name the subject), then general tags by confidence.
        picked.sort(key=lambda x: (not x[0], -x[1]))
        out = [normalise_tag(t, c.keep_underscores) for _, _, t in picked]
        if c.include_rating and ratings:
            out.insert(0, normalise_tag(max(ratings)[1], c.keep_underscores))
        return [t for t in out if t not in exclude]

    def caption(self, images: list, paths: list[Path]) -> list[str]:
        return [", ".join(self.tags_for(p)) for p in self.scores(images)]


def normalise_tag(tag: str, keep_underscores: bool = False) -> str:
    tag = tag.strip()
    if keep_underscores or tag in KAOMOJI:
        return tag
    return tag.replace("_", " ")


def make_captioner(kind: str, *, model: str = "", search_dir: Path | None = None, device: str = "cpu",
                   tagger: TaggerConfig | None = None) -> Captioner | None:
    """The captioner the user picked ("none" gives None)."""
    if kind in ("", "none"):
        return None
    if kind == "filename":
        return FilenameCaptioner()
    if kind == "blip":
        return BlipCaptioner(model or DEFAULT_BLIP, device=device, search_dir=search_dir)
    if kind == "wd14":
        return WD14Tagger(model or DEFAULT_WD14, search_dir=search_dir, config=tagger)
    raise UserError(f"Unknown captioner {kind!r}: use one of {', '.join(CAPTIONERS)}.")


# -- caption edits -------------------------------------------------------------------------------------------------
def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_prefix(caption: str, trigger: str = "", class_word: str = "") -> str:
    """`sks dog, <caption>`: the trigger and class word first (once), as kohya's keep_tokens expects."""
    prefix = " ".join(w for w in (trigger.strip(), class_word.strip()) if w)
    caption = caption.strip()
    if not prefix:
        return caption
    if caption == prefix or caption.startswith(prefix + ",") or caption.startswith(prefix + " "):
        return caption
    return f"{prefix}, {caption}" if caption else prefix


def find_replace(caption: str, find: str, replace: str, whole_words: bool = True) -> str:
    if not find:
        return caption
    if whole_words:
        out = re.sub(rf"(?<!\w){re.escape(find)}(?!\w)", lambda _m: replace, caption)
    else:
        out = caption.replace(find, replace)
    return re.sub(r"\s*,\s*(,\s*)+", ", ", re.sub(r"  +", " ", out)).strip(" ,")


def add_tags(caption: str, tags: list[str], at_start: bool = False) -> str:
    have = split_tags(caption)
    new = [t for t in (x.strip() for x in tags) if t and t not in have]
    return ", ".join(new + have if at_start else have + new)


def remove_tags(caption: str, tags: list[str]) -> str:
    drop = {t.strip() for t in tags if t.strip()}
    return ", ".join(t for t in split_tags(caption) if t not in drop)
