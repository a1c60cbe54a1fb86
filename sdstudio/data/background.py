"""Background removal with rembg, from model files kept in the workspace (models/rembg), offline.

rembg only loads ONNX files from inside its home folder (U2NET_HOME / REMBG_HOME), so we point its home at
models/rembg while a session is made. A known model is `<name>.onnx` there; any other `.onnx` file there is
loaded as a custom U²-Net-style model (320 px input, one mask output).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import UserError

_RELEASE = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
# rembg's model names -> the file to download (it must be saved as <name>.onnx in models/rembg).
KNOWN_MODELS = {
    "u2net": "u2net.onnx",
    "u2netp": "u2netp.onnx",
    "u2net_human_seg": "u2net_human_seg.onnx",
    "silueta": "silueta.onnx",
    "isnet-general-use": "isnet-general-use.onnx",
    "isnet-anime": "isnet-anime.onnx",
    "birefnet-general": "BiRefNet-general-epoch_244.onnx",
    "birefnet-general-lite": "BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
    "birefnet-portrait": "BiRefNet-portrait-epoch_150.onnx",
}
DEFAULT_MODEL = "u2net"
_ENV_LOCK = threading.Lock()  # rembg reads its home from the environment: one session is made at a time


def available_models(models_dir: Path) -> list[str]:
    """Model names the user can pick: every known name, plus custom .onnx files found in `models_dir`."""
    custom = sorted(p.stem for p in Path(models_dir).glob("*.onnx") if p.stem not in KNOWN_MODELS)
    return list(KNOWN_MODELS) + custom


def model_file(name: str, models_dir: Path) -> Path:
    """Where the model's file must be, or a UserError naming the file to download and where to put it."""
    models_dir = Path(models_dir)
    path = models_dir / f"{name}.onnx"
    if path.is_file():
        return path
    if name in KNOWN_MODELS:
        raise UserError(f"The background-removal model '{name}' is not installed: download "
                        f"{_RELEASE}{KNOWN_MODELS[name]} and save it as {path}.")
    raise UserError(f"No background-removal model '{name}': put {name}.onnx in {models_dir}, or pick one of "
                    f"{', '.join(KNOWN_MODELS)}.")


class BackgroundRemover:
    """One loaded rembg session; `remove(image, background)` returns the subject on a plain colour."""

    def __init__(self, name: str, models_dir: Path) -> None:
        path = model_file(name, models_dir)
        home = str(Path(models_dir).resolve())
        import onnxruntime as ort
        from rembg import new_session

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in ("U2NET_HOME", "REMBG_HOME")}
            os.environ["U2NET_HOME"] = os.environ["REMBG_HOME"] = home
            try:
                if name in KNOWN_MODELS:
                    self.session = new_session(name, sess_opts=opts, providers=_providers())
                else:
                    self.session = new_session("u2net_custom", sess_opts=opts, model_path=str(path.resolve()),
                                               providers=_providers())
            except Exception as exc:  # onnxruntime: a damaged or wrong-shaped file
                raise UserError(f"{path.name} could not be loaded as a background-removal model ({exc}); "
                                f"re-download it.") from exc
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        self.name = name

    def mask(self, image):
        """The subject's mask (L mode, same size as `image`): 255 = keep."""
        from rembg import remove

        return remove(image.convert("RGB"), session=self.session, only_mask=True)

    def remove(self, image, background: tuple[int, int, int] = (255, 255, 255)):
        """The image with its background replaced by a plain `background` colour (RGB, same size)."""
        from PIL import Image

        mask = self.mask(image)
        out = Image.new("RGB", image.size, background)
        out.paste(image.convert("RGB"), mask=mask)
        return out


def _providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]
