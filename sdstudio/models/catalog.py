"""A small curated list of models one click away in the Library (and `sdstudio download KEY`): the base
models, ControlNets, T2I-Adapters, annotator weights, captioners and background-removal models SD Studio
uses. Each names its real source; tests/test_models_hub.py checks every id against its pattern (never the
network). Any other hub id typed by the user downloads the same way (models/hub.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .refs import HubId, parse_hub_id

REMBG_RELEASE = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
# What the detectors in data/detectors.py read from models/annotators (a test keeps them in step): HED, MLSD,
# MiDaS depth, openpose (body, hand, face), PiDiNet soft edge, the normal (ScanNet) model, lineart realistic
# (coarse and fine) and anime.
ANNOTATOR_FILES = ("ControlNetHED.pth", "mlsd_large_512_fp32.pth", "dpt_hybrid-midas-501f0c75.pt",
                   "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth", "table5_pidinet.pth", "scannet.pt",
                   "sk_model.pth", "sk_model2.pth", "netG.pth")


@dataclass(frozen=True)
class Entry:
    key: str  # `sdstudio download KEY`
    label: str
    kind: str  # checkpoint | controlnet | t2i_adapter | annotators | captioner | rembg
    source: str  # a hub id, or an https URL (rembg's models are GitHub release files)
    family: str = ""  # sd1 | sdxl for base models and adapters
    files: tuple[str, ...] = ()  # exactly these files (else what loading needs)
    convert_bin: bool = False  # the repo has only a pickle .bin: kept as .safetensors (loaded with weights_only)
    note: str = ""

    @property
    def hub(self) -> HubId | None:
        return parse_hub_id(self.source)


CATALOG: tuple[Entry, ...] = (
    Entry("sd15", "Stable Diffusion 1.5", "checkpoint", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1",
          note="the base every *-sd15 preset trains on"),
    Entry("sdxl", "Stable Diffusion XL base 1.0", "checkpoint", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    Entry("cn-canny", "ControlNet 1.1 canny (SD 1.5)", "controlnet", "lllyasviel/control_v11p_sd15_canny", "sd1"),
    Entry("cn-lineart", "ControlNet 1.1 lineart (SD 1.5)", "controlnet", "lllyasviel/control_v11p_sd15_lineart", "sd1"),
    Entry("cn-openpose", "ControlNet 1.1 openpose (SD 1.5)", "controlnet", "lllyasviel/control_v11p_sd15_openpose",
          "sd1"),
    Entry("cn-depth", "ControlNet 1.1 depth (SD 1.5)", "controlnet", "lllyasviel/control_v11f1p_sd15_depth", "sd1"),
    Entry("cn-softedge", "ControlNet 1.1 soft edge (SD 1.5)", "controlnet", "lllyasviel/control_v11p_sd15_softedge",
          "sd1"),
    Entry("t2i-sketch", "T2I-Adapter sketch (SD 1.5)", "t2i_adapter", "TencentARC/t2iadapter_sketch_sd15v2", "sd1",
          convert_bin=True),
    Entry("t2i-canny", "T2I-Adapter canny (SD 1.5)", "t2i_adapter", "TencentARC/t2iadapter_canny_sd15v2", "sd1",
          convert_bin=True),
    Entry("t2i-depth", "T2I-Adapter depth (SD 1.5)", "t2i_adapter", "TencentARC/t2iadapter_depth_sd15v2", "sd1",
          convert_bin=True),
    Entry("annotators", "Annotator weights (HED, MLSD, depth, openpose, soft edge, normal, lineart)", "annotators", "lllyasviel/Annotators",
          files=ANNOTATOR_FILES, note="for the controlnet-aux preprocessors"),
    Entry("blip", "BLIP captioner (base)", "captioner", "Salesforce/blip-image-captioning-base"),
    Entry("wd14", "WD14 tagger (SwinV2 v3)", "captioner", "SmilingWolf/wd-swinv2-tagger-v3",
          files=("model.onnx", "selected_tags.csv")),
    Entry("rembg-u2net", "Background removal: u2net", "rembg", REMBG_RELEASE + "u2net.onnx"),
    Entry("rembg-isnet", "Background removal: isnet-general-use", "rembg", REMBG_RELEASE + "isnet-general-use.onnx"),
    Entry("rembg-human", "Background removal: u2net_human_seg", "rembg", REMBG_RELEASE + "u2net_human_seg.onnx"),
    Entry("rembg-anime", "Background removal: isnet-anime", "rembg", REMBG_RELEASE + "isnet-anime.onnx"),
)


def get(key: str) -> Entry:
    for e in CATALOG:
        if e.key == key:
            return e
    raise UserError(f"No catalog entry {key!r}: use one of {', '.join(e.key for e in CATALOG)}, or a hub id.")


def by_source(source: str) -> Entry | None:
    return next((e for e in CATALOG if e.source == source), None)


def destination(entry_kind: str, workspace_root: Path, hub: HubId | None, url: str = "") -> Path:
    """Where a download of this kind goes in the workspace (the folder the app reads it from)."""
    models = Path(workspace_root) / "models"
    if entry_kind == "annotators":
        return models / "annotators"
    if entry_kind == "rembg":
        return models / "rembg"
    folder = {"checkpoint": "checkpoints", "controlnet": "controlnet", "t2i_adapter": "t2i_adapter",
              "captioner": "captioners"}.get(entry_kind)
    if folder is None or hub is None:
        raise UserError(f"Cannot download a {entry_kind!r}: choose a base model, ControlNet, T2I-Adapter or "
                        f"captioner.")
    return models / folder / hub.folder_name


def installed(entry: Entry, workspace_root: Path) -> bool:
    from .hub import is_complete

    dest = destination(entry.kind, workspace_root, entry.hub)
    if entry.kind in ("annotators", "rembg"):
        names = entry.files or (entry.source.rsplit("/", 1)[-1],)
        return all((dest / n).is_file() for n in names)
    return is_complete(dest, entry.kind if entry.kind == "checkpoint" else "other")


def download_work(source: str, workspace_root: Path, *, kind: str = "auto", half: bool = False):
    """The Job work that downloads a catalog key, a catalog source or any hub id into the workspace: the
    Library's Download button and `sdstudio download` both run it. Returns the model's folder (or file)."""
    from . import hub as hubmod

    text = (source or "").strip()
    entry = next((e for e in CATALOG if text in (e.key, e.source)), None)
    if entry is not None:
        kind = entry.kind
        text = entry.source
    ws = Path(workspace_root)

    def work(ctx):
        from ..events import Status

        if text.startswith(("https://", "http://")):  # a plain file (rembg's models are GitHub release files)
            name = text.rsplit("/", 1)[-1]
            plan = hubmod.plan_url(text, destination("rembg", ws, None), name, workspace=ws)
            if (plan.dest / name).is_file():
                ctx.emit(Status(f"{name} is already in models/rembg", stage="download"))
                return plan.dest / name
            hubmod.download(plan, ctx.emit, ctx.commands.check)
            return plan.dest / name
        hub = parse_hub_id(text)
        if hub is None:
            raise UserError(f"{text!r} is not a hub id (org/name, optionally @revision) or a catalog entry: check it.")
        kinds = [kind] if kind != "auto" else ["checkpoint", "controlnet", "t2i_adapter", "captioner"]
        for k in kinds if not (entry and entry.files) else []:
            dest = destination(k, ws, hub)
            if hubmod.is_complete(dest, k):
                ctx.emit(Status(f"{hub} is already in {dest.relative_to(ws).as_posix()}", stage="download"))
                return dest
        ctx.emit(Status(f"asking the hub about {hub}", stage="download"))
        plan, k = hubmod.plan_hub(hub, ws, kind=kind, half=half, files=entry.files if entry else (),
                                  convert_bin=bool(entry and entry.convert_bin), workspace=ws)
        plan.dest = destination(k, ws, hub)
        return hubmod.download(plan, ctx.emit, ctx.commands.check)

    return work
