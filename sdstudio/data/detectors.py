"""Control-image detectors (controlnet-aux): what turns a photo into the edges, lines, depth or pose a ControlNet or
T2I-Adapter follows. The Dataset tab and `sdstudio prepare --condition` make training pairs with them; the
Playground makes control images with them (playground/preprocess.py).

Canny, lineart (lineart_standard), content shuffle and invert need no weights and work offline. The others load
their weights from the workspace's models/annotators folder (the files of lllyasviel/Annotators) and say exactly
which file is missing, and where it goes, when it is not there.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

OFFLINE = ("none", "canny", "lineart", "shuffle", "invert")
# name -> (controlnet_aux class, the weight files it reads from models/annotators; the first is the main one)
NEEDS_WEIGHTS = {
    "hed": ("HEDdetector", ("ControlNetHED.pth",)),
    "softedge": ("PidiNetDetector", ("table5_pidinet.pth",)),
    "mlsd": ("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "depth": ("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "normal": ("NormalBaeDetector", ("scannet.pt",)),
    "openpose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
    "lineart_realistic": ("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "lineart_anime": ("LineartAnimeDetector", ("netG.pth",)),
}
PREPROCESSORS = OFFLINE + tuple(NEEDS_WEIGHTS)
# Other names users know them by (controlnet-aux's and ControlNet 1.1's).
ALIASES = {"lineart_standard": "lineart", "content_shuffle": "shuffle", "pidinet": "softedge", "midas": "depth",
           "normal_bae": "normal", "pose": "openpose"}
_loaded: dict[tuple, object] = {}


def canonical(name: str) -> str:
    """The detector's name as PREPROCESSORS lists it, or a UserError naming the ones there are."""
    key = (name or "none").strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PREPROCESSORS:
        raise UserError(f"Unknown preprocessor {name!r}: use one of {', '.join(PREPROCESSORS)}.")
    return key


def missing_weights(name: str, annotators_dir: Path | None) -> list[str]:
    """The weight files detector `name` needs that are not in `annotators_dir` ([] when it needs none)."""
    key = canonical(name)
    files = NEEDS_WEIGHTS[key][1] if key in NEEDS_WEIGHTS else ()
    folder = Path(annotators_dir) if annotators_dir else None
    return [f for f in files if folder is None or not (folder / f).is_file()]


def preprocess(image, name: str, annotators_dir: Path | None = None, *, low: int = 100, high: int = 200,
               seed: int = 0):
    """Turn `image` (PIL) into a control image with detector `name`; the result has the image's size."""
    import numpy as np
    from PIL import Image, ImageOps

    key = canonical(name)
    image = image.convert("RGB")
    if key == "none":
        return image
    if key == "invert":  # white-on-black sketches for T2I sketch adapters drawn black-on-white
        return ImageOps.invert(image)
    if key == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(image), low, high)
        return Image.fromarray(edges).convert("RGB")
    if key == "lineart":
        from controlnet_aux.lineart_standard import LineartStandardDetector

        out = LineartStandardDetector()(image, detect_resolution=max(image.size))
        return out.convert("RGB").resize(image.size)
    if key == "shuffle":
        from controlnet_aux.shuffle import ContentShuffleDetector

        np.random.seed(seed)  # content shuffle draws a random flow field: make it repeatable
        out = ContentShuffleDetector()(image, detect_resolution=max(image.size), image_resolution=max(image.size))
        return out.convert("RGB").resize(image.size)
    detector = _detector(key, annotators_dir)
    out = detector(image, detect_resolution=min(512, max(image.size)), image_resolution=max(image.size),
                   output_type="pil")
    return out.convert("RGB").resize(image.size)


def _detector(key: str, annotators_dir: Path | None):
    import controlnet_aux

    cls_name, files = NEEDS_WEIGHTS[key]
    missing = missing_weights(key, annotators_dir)
    if missing:
        raise UserError(f"The {key} preprocessor needs {' and '.join(missing)} in models/annotators: download "
                        f"{'it' if len(missing) == 1 else 'them'} from lllyasviel/Annotators and put "
                        f"{'it' if len(missing) == 1 else 'them'} there, or use canny/lineart/shuffle.")
    folder = Path(annotators_dir)
    cache_key = (key, str(folder))
    if cache_key not in _loaded:
        cls = getattr(controlnet_aux, cls_name)
        _loaded[cache_key] = cls.from_pretrained(str(folder), filename=files[0])
    return _loaded[cache_key]
