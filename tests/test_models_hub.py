"""Downloads from the hub (models/hub.py, models/catalog.py) against a stand-in hub on 127.0.0.1 (fake_hub.py:
the real hub is out of reach here, and CI must never download a model). Everything on our side is the real code:
the file choice, the resumable download, the progress, the errors, and then training and generating from the
hub id through the CLI, the Train tab's start and the Playground's session."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub, repo_from_folder
from sdstudio.errors import UserError
from sdstudio.events import Progress
from sdstudio.jobs import Job
from sdstudio.models import catalog
from sdstudio.models.hub import plain_name, select_files, weights_in

ROOT = Path(__file__).resolve().parent.parent
REPO = "org/tiny-sd"
# What loading the stand-in repo needs: model_index.json and each component's configs and weights. Not the root
# single file, README or marker, not the safety checker, not the non-EMA copy, the fp16 variant or a pickle.
NEEDED = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_repo(tiny_dir, tmp_path_factory):
    """The tiny model as a hub repo whose root also holds a single-file checkpoint, with the extras real repos
    carry: an fp16 unet, a non-EMA copy, a pickle, a safety checker listed in model_index.json, a README."""
    import torch
    from safetensors.torch import load_file, save_file

    from sdstudio.formats.ldm import pipeline_to_ldm
    from sdstudio.models.loading import load_base

    files = repo_from_folder(tiny_dir)
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    files["model_index.json"] = json.dumps(index, indent=2).encode()
    tmp = tmp_path_factory.mktemp("repo")
    unet = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in unet.items()}, tmp / "fp16.safetensors")
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = (tmp / "fp16.safetensors").read_bytes()
    files["unet/diffusion_pytorch_model.non_ema.safetensors"] = files["unet/diffusion_pytorch_model.safetensors"]
    files["text_encoder/pytorch_model.bin"] = b"a pickle nobody should fetch"
    save_file({"w": torch.zeros(4)}, tmp / "sc.safetensors")
    files["safety_checker/config.json"] = b"{}"
    files["safety_checker/model.safetensors"] = (tmp / "sc.safetensors").read_bytes()
    c = load_base("tiny")
    save_file(pipeline_to_ldm(c.unet, c.vae, c.text_encoder), tmp / "full.safetensors")
    files["tiny-sd-full.safetensors"] = (tmp / "full.safetensors").read_bytes()
    files["README.md"] = b"# tiny-sd\n"
    return files


@pytest.fixture
def hub(tiny_repo, monkeypatch, tmp_path):
    """The stand-in hub, online: HF_ENDPOINT points at it and HF_HUB_OFFLINE (which conftest sets) is unset."""
    import huggingface_hub.constants

    server = FakeHub({REPO: tiny_repo, "org/gated-sd": tiny_repo}, gated={"org/gated-sd"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
    yield server
    server.close()


def _run(work, stop_when=None) -> tuple[Job, list]:
    events = []
    job = Job(name="t", kind="download", work=work)

    def listen(ev):
        events.append(ev)
        if stop_when is not None and stop_when(ev):
            job.stop()

    job.listeners.append(listen)
    job.start().join(300)
    return job, events


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- which files, pure -------------------------------------------------------------------------------------

SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "requires_safety_checker": True, "scheduler": ["diffusers", "PNDMScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def test_sd15_layout_fetches_no_root_single_file_and_one_set_of_weights():
    common = ["model_index.json", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
              "text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
              "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "vae/config.json"]
    fp32 = select_files(SD15_FILES, index=SD15_INDEX)
    assert sorted(fp32) == sorted(common + ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"])
    fp16 = select_files(SD15_FILES, index=SD15_INDEX, half=True)
    assert sorted(fp16) == sorted(common + ["text_encoder/model.fp16.safetensors",
                                            "unet/diffusion_pytorch_model.fp16.safetensors",
                                            "vae/diffusion_pytorch_model.fp16.safetensors"])
    assert [plain_name(f) for f in fp16 if "fp16" in f] == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors"]


def test_sharded_fp16_weights_an_onnx_folder_and_a_single_model_repo():
    names = ["model_index.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
             "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
             "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
             "text_encoder_2/model.fp16-00002-of-00002.safetensors", "text_encoder_2/model.onnx",
             "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/model.onnx",
             "vae_decoder/model.onnx", "vae_decoder/config.json", "sd_xl_base_1.0.safetensors"]
    index = {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "unet": ["diffusers", "UNet2DConditionModel"]}
    assert select_files(names, index=index, half=True) == [
        "model_index.json", "text_encoder_2/config.json", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.fp16.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    # fp32 asked, but the unet only has fp16 weights: those, rather than nothing
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in select_files(names, index=index)
    assert plain_name("text_encoder_2/model.fp16-00002-of-00002.safetensors") == \
        "text_encoder_2/model-00002-of-00002.safetensors"
    assert plain_name("text_encoder_2/model.safetensors.index.fp16.json") == "text_encoder_2/model.safetensors.index.json"
    controlnet = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
                  "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
                  "control_net_canny.py", "images/input.png", "README.md"]
    assert select_files(controlnet) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert weights_in(["a.bin", "b.onnx"], half=False) == []


def test_catalog_names_real_ids_by_pattern():
    """No network: each id against the pattern of what it must be, and in step with the code that uses it."""
    from sdstudio.data.background import KNOWN_MODELS
    from sdstudio.data.caption import DEFAULT_BLIP, DEFAULT_WD14
    from sdstudio.models.refs import parse_hub_id
    from sdstudio.playground.preprocess import NEEDS_WEIGHTS

    by_kind: dict[str, list] = {}
    for e in catalog.CATALOG:
        by_kind.setdefault(e.kind, []).append(e)
        assert e.source.startswith("https://") or parse_hub_id(e.source) is not None, e.source
    assert len({e.key for e in catalog.CATALOG}) == len(catalog.CATALOG)
    assert {e.source for e in by_kind["checkpoint"]} == {"stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                         "stabilityai/stable-diffusion-xl-base-1.0"}
    cn = [re.fullmatch(r"lllyasviel/control_v11(?:p|f1p)_sd15_(\w+)", e.source) for e in by_kind["controlnet"]]
    assert all(cn) and sorted(m.group(1) for m in cn) == ["canny", "depth", "lineart", "openpose", "softedge"]
    t2i = [re.fullmatch(r"TencentARC/t2iadapter_(\w+)_sd15v2", e.source) for e in by_kind["t2i_adapter"]]
    assert all(t2i) and sorted(m.group(1) for m in t2i) == ["canny", "depth", "sketch"]
    (ann,) = by_kind["annotators"]
    assert ann.source == "lllyasviel/Annotators"
    assert {f for _cls, files in NEEDS_WEIGHTS.values() for f in files} <= set(ann.files)
    caps = {e.key: e.source for e in by_kind["captioner"]}
    assert caps["blip"] == DEFAULT_BLIP == "Salesforce/blip-image-captioning-base"
    assert caps["wd14"] == DEFAULT_WD14 and re.fullmatch(r"SmilingWolf/wd-[\w.-]+-tagger-v\d", caps["wd14"])
    for e in by_kind["rembg"]:
        m = re.fullmatch(r"https://github\.com/danielgatis/rembg/releases/download/v[\d.]+/([\w.-]+\.onnx)", e.source)
        assert m and m.group(1) in KNOWN_MODELS.values(), e.source


# -- downloading from the stand-in hub ------------------------------------------------------------------------

def test_download_fetches_only_what_loading_needs_with_progress(hub, tiny_repo, workspace):
    from sdstudio.library import list_models
    from sdstudio.models.loading import load_base

    token = workspace.change_token()
    job, events = _run(catalog.download_work(REPO, workspace.root))
    assert job.state == "finished", job.log.snapshot()["end"]
    assert set(hub.fetched(REPO)) == NEEDED  # model_index.json and configs read first, then the weights
    dest = workspace.root / "models" / "checkpoints" / "org--tiny-sd"
    assert job.result == dest
    got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert got == NEEDED | {".sdstudio-source.json"}
    assert all((dest / f).read_bytes() == tiny_repo[f] for f in NEEDED)
    source = json.loads((dest / ".sdstudio-source.json").read_text())
    assert source["repo"] == REPO and source["commit"] and source["variant"] is None
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "download"]
    total = sum(len(tiny_repo[f]) for f in NEEDED)
    assert len(progress) >= 2 and progress[-1].done == progress[-1].total == total
    assert all(a.done <= b.done for a, b in zip(progress, progress[1:]))
    assert re.search(r"of .* · .*(/s|starting) · ETA", progress[-1].message), progress[-1].message
    assert workspace.change_token() != token  # the other tabs' pickers refresh
    assert [m.path for m in list_models(workspace, "checkpoint")] == ["models/checkpoints/org--tiny-sd"]
    assert list(load_base(str(dest)).unet.config.block_out_channels) == [32, 32, 64, 64]
    # A second download of the same id fetches nothing.
    n = len(hub.log)
    job, _ = _run(catalog.download_work(REPO, workspace.root))
    assert job.state == "finished" and len(hub.log) == n


def test_fp16_download_keeps_the_variant_under_plain_names(hub, workspace):
    from safetensors import safe_open

    from sdstudio.models.loading import load_base

    job, _ = _run(catalog.download_work(REPO, workspace.root, half=True))
    assert job.state == "finished", job.log.snapshot()["end"]
    fetched = set(hub.fetched(REPO))
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched
    assert "unet/diffusion_pytorch_model.safetensors" not in fetched and "tiny-sd-full.safetensors" not in fetched
    unet = workspace.root / "models/checkpoints/org--tiny-sd/unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(unet), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
    assert load_base(str(unet.parent.parent)).unet is not None  # a plain diffusers folder: no variant= needed


def test_a_stopped_download_resumes_where_it_stopped(hub, tiny_repo, workspace):
    from sdstudio.library import list_models

    total = sum(len(tiny_repo[f]) for f in NEEDED)
    name = "unet/diffusion_pytorch_model.safetensors"
    hub.slow[name] = 0.01  # a slow link for the big file, so that Stop lands in its middle
    job, events = _run(catalog.download_work(REPO, workspace.root),
                       stop_when=lambda ev: isinstance(ev, Progress) and ev.message.endswith(name)
                       and ev.done > total * 0.5)
    assert job.state == "stopped"
    staging = workspace.root / "models" / "checkpoints" / ".org--tiny-sd.download"
    parts = list(staging.rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size
    stopped_at = [e for e in events if isinstance(e, Progress)][-1].done
    assert stopped_at < total
    assert not (workspace.root / "models" / "checkpoints" / "org--tiny-sd").exists()
    assert list_models(workspace, "checkpoint") == []  # half a model is never listed
    assert parts[0].relative_to(staging).as_posix() == name + ".part"
    have = parts[0].stat().st_size
    assert have < len(tiny_repo[name])
    hub.slow.clear()

    job, events = _run(catalog.download_work(REPO, workspace.root))
    assert job.state == "finished", job.log.snapshot()["end"]
    ranged = [e for e in hub.requests_for(REPO, name) if e["range"]]
    assert ranged and ranged[-1]["range"] == f"bytes={have}-" and ranged[-1]["status"] == 206
    assert ranged[-1]["bytes"] == len(tiny_repo[name]) - have  # only the rest was sent
    dest = workspace.root / "models" / "checkpoints" / "org--tiny-sd"
    assert _sha((dest / name).read_bytes()) == _sha(tiny_repo[name])
    assert not staging.exists()
    first = [e for e in events if isinstance(e, Progress)][0]
    assert first.done >= have  # progress starts from what was already there


def test_missing_gated_offline_and_unreachable_are_one_sentence_each(hub, workspace, monkeypatch):
    cases = [("org/nothing", "is not on the hub"), ("org/gated-sd", "is gated: accept its terms")]
    for repo, words in cases:
        job, _ = _run(catalog.download_work(repo, workspace.root))
        end = job.log.snapshot()["end"]
        assert job.state == "failed" and words in end.message and "\n" not in end.message, end
        assert not end.details  # a user's problem, not a bug: no traceback
    assert not list((workspace.root / "models" / "checkpoints").iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="you are offline"):
        catalog.download_work(REPO, workspace.root)(_Ctx())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match=r"Cannot reach 127\.0\.0\.1.*check your connection") as e:
        catalog.download_work(REPO, workspace.root)(_Ctx())
    assert "\n" not in str(e.value)


class _Ctx:
    """A job context for calling work directly (its errors are what the test reads)."""

    def __init__(self):
        from sdstudio.jobs import Commands

        self.commands = Commands()
        self.events = []

    def emit(self, ev):
        self.events.append(ev)


# -- training and generating from a hub id -----------------------------------------------------------------

def _cli(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_train_and_generate_from_a_hub_id_through_the_cli(hub, tmp_path):
    """A new user's first run, headless: a preset on a hub id with a workspace dataset path, then a recipe on
    the same id. Only the needed files are fetched, once."""
    from train_helpers import make_kohya_dataset

    ws = tmp_path / "ws"
    make_kohya_dataset(ws / "datasets" / "d", n=2, repeats=1)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.url, OMP_NUM_THREADS="1")
    sets = ["base_model=org/tiny-sd", "dataset=datasets/d", "max_steps=2", "resolution=64", "sample_every=0",
            "save_every=0", "sample_steps=1", "device=cpu", "output_name=hubrun", 'sample_prompts=["a photo"]']
    r = _cli(["--home", str(ws), "train", "character-lora-sd15", *sum((["--set", s] for s in sets), [])], env,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(hub.fetched(REPO)) == NEEDED, r.stderr[-3000:]  # never tiny-sd-full.safetensors at the root
    assert "downloading org/tiny-sd" in r.stderr
    assert (ws / "models" / "checkpoints" / "org--tiny-sd" / "model_index.json").is_file()  # into --home's models/
    lora = ws / "models" / "lora" / "hubrun.safetensors"
    assert lora.is_file()
    from sdstudio.formats.safe_io import read_safetensors_metadata

    assert read_safetensors_metadata(lora)["ss_sd_model_name"] == REPO  # the id, not the folder it went to
    n = len(hub.log)
    (ws / "recipes").mkdir()
    (ws / "recipes" / "r.toml").write_text('base_model = "org/tiny-sd"\nprompt = "a photo"\nsteps = 2\n'
                                           'width = 64\nheight = 64\n[[lora]]\npath = "models/lora/hubrun.safetensors"\n'
                                           'weight = 0.8\n')
    r = _cli(["--home", str(ws), "generate", "recipes/r.toml", "--out", "out", "--device", "cpu"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((ws / "out").glob("*.png"))) == 1  # --out is a workspace path too
    assert len(hub.log) == n, (r.stderr[-2000:], hub.log[n:n + 3])  # the downloaded copy was used: no request at all


@pytest.mark.slow
def test_playground_session_and_train_tab_from_a_hub_id(hub, tmp_path):
    """The app's paths: the Playground session downloads a hub id with progress and generates; the Train tab's
    start accepts the same id and a workspace-relative dataset."""
    from train_helpers import make_kohya_dataset

    from sdstudio.models.refs import Places
    from sdstudio.playground.recipe import Recipe
    from sdstudio.playground.session import Playground, generation_work
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.train_tab import start_run
    from sdstudio.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    session = Playground(places=Places.app(ws), device="cpu")
    recipe = Recipe(base_model=REPO, prompt="a photo", steps=2, width=64, height=64)
    job, events = _run(generation_work(session, recipe, ws.root / "outputs"))
    assert job.state == "finished", job.log.snapshot()["end"]
    assert len(job.result) == 1 and Path(job.result[0]).is_file()
    assert set(hub.fetched(REPO)) == NEEDED
    assert any(isinstance(e, Progress) and e.stage == "download" for e in events)
    assert session.comps.source == ws.root / "models" / "checkpoints" / "org--tiny-sd"

    make_kohya_dataset(ws.root / "datasets" / "d", n=1, repeats=1)
    ctx = AppContext(workspace=ws)
    values = {"method": "lora", "base_model": REPO, "dataset": "datasets/d", "output_name": "tabrun",
              "max_steps": 1, "resolution": 64, "sample_every": 0, "save_every": 0, "device": "cpu",
              "sample_prompts": []}
    job = start_run(ctx, values, None)
    job.join(300)
    assert job.state == "finished", job.log.snapshot()["end"]
    assert (ws.root / "models" / "lora" / "tabrun.safetensors").is_file()
    with pytest.raises(UserError, match="tried") as e:
        start_run(ctx, dict(values, base_model="nothing-like-it", output_name="x"), None)
    assert "\n" not in str(e.value) and str(ws.root / "nothing-like-it") in str(e.value)


# -- the other kinds of the curated list, served under their real ids by the stand-in -----------------------------

def test_annotators_t2i_adapter_and_a_plain_url(hub, workspace, tiny_components, tmp_path):
    """Annotator weights go flat into models/annotators (only the files the preprocessors read); a pickle-only
    T2I-Adapter repo is kept as .safetensors (read with weights_only); rembg's files come from a plain URL."""
    import torch
    from diffusers import T2IAdapter

    from sdstudio.models.catalog import ANNOTATOR_FILES
    from sdstudio.playground.session import load_control_model

    hub.repos["lllyasviel/Annotators"] = {**{f: f"weights of {f}".encode() for f in ANNOTATOR_FILES},
                                          "ZoeD_M12_N.pt": b"not needed", "README.md": b"#"}
    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8)
    torch.save(adapter.state_dict(), tmp_path / "adapter.bin")
    hub.repos["TencentARC/t2iadapter_sketch_sd15v2"] = {
        "config.json": json.dumps(dict(adapter.config, _class_name="T2IAdapter")).encode(),
        "diffusion_pytorch_model.bin": (tmp_path / "adapter.bin").read_bytes(), "images/sketch.png": b"png"}
    hub.repos["files/rembg"] = {"u2net.onnx": b"onnx bytes"}

    job, _ = _run(catalog.download_work("annotators", workspace.root))
    assert job.state == "finished", job.log.snapshot()["end"]
    assert sorted(hub.fetched("lllyasviel/Annotators")) == sorted(ANNOTATOR_FILES)
    assert all((workspace.root / "models" / "annotators" / f).read_bytes() == f"weights of {f}".encode()
               for f in ANNOTATOR_FILES)

    job, _ = _run(catalog.download_work("t2i-sketch", workspace.root))
    assert job.state == "finished", job.log.snapshot()["end"]
    dest = workspace.root / "models" / "t2i_adapter" / "TencentARC--t2iadapter_sketch_sd15v2"
    assert sorted(p.name for p in dest.iterdir()) == [".sdstudio-source.json", "config.json",
                                                      "diffusion_pytorch_model.safetensors"]
    model = load_control_model(dest, "t2i_adapter")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapter.state_dict().items())

    job, _ = _run(catalog.download_work(f"{hub.url}/files/rembg/resolve/main/u2net.onnx", workspace.root))
    assert job.state == "finished", job.log.snapshot()["end"]
    assert (workspace.root / "models" / "rembg" / "u2net.onnx").read_bytes() == b"onnx bytes"


def test_a_user_hub_id_with_only_pickles_is_refused(hub, workspace):
    hub.repos["someone/old-controlnet"] = {"config.json": b'{"_class_name": "ControlNetModel"}',
                                          "diffusion_pytorch_model.bin": b"pickle"}
    job, _ = _run(catalog.download_work("someone/old-controlnet", workspace.root))
    end = job.log.snapshot()["end"]
    assert job.state == "failed" and "no .safetensors weights" in end.message
    assert hub.fetched("someone/old-controlnet") == ["config.json"]  # told what it is; never the pickle


def test_disk_space_is_checked_before_any_byte(hub, workspace, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    job, _ = _run(catalog.download_work(REPO, workspace.root))
    end = job.log.snapshot()["end"]
    assert job.state == "failed" and re.match(r"Not enough disk space for org/tiny-sd: it needs \d+\.\d MB more and "
                                              r"1\.0 MB is free on .*; free some space", end.message), end.message
    assert [f for f in hub.fetched(REPO) if f.endswith(".safetensors")] == []  # nothing big was fetched
