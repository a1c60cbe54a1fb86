"""Control-image preprocessors (controlnet-aux). Canny, lineart (standard) and content shuffle need no weights
and work offline; HED, MLSD, depth and openpose load their weights from the workspace's models/annotators
folder and say exactly which file is missing when it is not there."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

OFFLINE = ("none", "canny", "lineart", "shuffle", "invert")
# name -> (controlnet_aux class, the weight file(s) it reads from models/annotators)
NEEDS_WEIGHTS = {
    "hed": ("HEDdetector", ("ControlNetHED.pth",)),
    "mlsd": ("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "depth": ("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "openpose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
}
PREPROCESSORS = OFFLINE + tuple(NEEDS_WEIGHTS)
_loaded: dict[tuple, object] = {}


def preprocess(image, name: str, annotators_dir: Path | None = None, *, low: int = 100, high: int = 200,
               seed: int = 0):
    """Turn `image` (PIL) into a control image with preprocessor `name`; the result has the image's size."""
    import numpy as np
    from PIL import Image, ImageOps

    key = (name or "none").strip().lower()
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
    if key in NEEDS_WEIGHTS:
        detector = _detector(key, annotators_dir)
        out = detector(image, detect_resolution=min(512, max(image.size)), image_resolution=max(image.size),
                       output_type="pil")
        return out.convert("RGB").resize(image.size)
    raise UserError(f"Unknown preprocessor {name!r}: use one of {', '.join(PREPROCESSORS)}.")


def _detector(key: str, annotators_dir: Path | None):
    import controlnet_aux

    cls_name, files = NEEDS_WEIGHTS[key]
    folder = Path(annotators_dir) if annotators_dir else None
    for f in files[:1] if key != "openpose" else files:
        if folder is None or not (folder / f).is_file():
            raise UserError(f"The {key} preprocessor needs {f} in models/annotators: download it from "
                            f"lllyasviel/Annotators and put it there, or use canny/lineart/shuffle.")
    cache_key = (key, str(folder))
    if cache_key not in _loaded:
        cls = getattr(controlnet_aux, cls_name)
        _loaded[cache_key] = cls.from_pretrained(str(folder), filename=files[0])
    return _loaded[cache_key]
