"""Background removal (rembg) and captioning (BLIP, WD14) on tiny models these tests build offline, through the
real loading code and the `sdstudio prepare` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.errors import UserError


# -- tiny models -------------------------------------------------------------------------------------------------
def tiny_rembg_onnx(path: Path) -> Path:
    """A 'segmentation' model rembg can run: mask = mean brightness per pixel (bright subject on dark ground)."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 320, 320])
    out = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 320])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["input"], ["mask"], axes=[1], keepdims=1)], "tiny",
                              [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


WD14_TAGS = [("general", 9), ("sensitive", 9), ("long_hair", 0), ("red_theme", 0), ("blue_theme", 0), ("^_^", 0),
             ("hatsune_miku", 4), ("simple_background", 0)]


def tiny_wd14(folder: Path) -> Path:
    """A WD14-style tagger: NHWC BGR 0-255 input, sigmoid scores; 'red_theme' fires on red images, 'blue_theme'
    on blue ones, a few tags always, a character tag at 0.73."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(WD14_TAGS)
    W = np.zeros((3, n), np.float32)
    b = np.full((n,), -5, np.float32)
    W[2, 3], b[3] = 0.05, -6.0  # BGR: channel 2 is red
    W[0, 4], b[4] = 0.05, -6.0  # channel 0 is blue
    b[0], b[2], b[5], b[7], b[6] = 2, 3, 3, 3, 1.0
    inp = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", 32, 32, 3])
    out = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", n])
    nodes = [helper.make_node("ReduceMean", ["input_1:0"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"]),
             helper.make_node("Sigmoid", ["y"], ["predictions_sigmoid"])]
    graph = helper.make_graph(nodes, "tagger", [inp], [out], [numpy_helper.from_array(W, "W"),
                                                               numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "".join(
        f"{i},{t},{c},1\n" for i, (t, c) in enumerate(WD14_TAGS)))
    return folder


def tiny_blip(folder: Path) -> Path:
    """A random BLIP (2-layer ViT + 2-layer BERT decoder) with a small local WordPiece vocabulary."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat", "on", "the", "beach",
             "red", "car", "man", "woman", "standing"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=2,
                         sep_token_id=3, pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def subject_on_dark(seed=0, size=(200, 160)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[40:120, 60 + seed:140 + seed] = 230
    return Image.fromarray(arr)


# -- background removal ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rembg_custom_and_named_model_from_workspace(workspace):
    from sdstudio.data.background import BackgroundRemover, available_models

    rembg_dir = workspace.root / "models" / "rembg"
    tiny_rembg_onnx(rembg_dir / "tiny-seg.onnx")
    tiny_rembg_onnx(rembg_dir / "u2netp.onnx")  # stands in for the real file under rembg's own name
    assert "tiny-seg" in available_models(rembg_dir)
    img = subject_on_dark()
    for name in ("tiny-seg", "u2netp"):
        out = BackgroundRemover(name, rembg_dir).remove(img, (255, 0, 0))
        assert out.size == img.size and out.mode == "RGB"
        assert out.getpixel((5, 5)) == (255, 0, 0)  # dark ground replaced by the chosen colour
        r, g, b = out.getpixel((100, 80))
        assert g > 180 and b > 180  # subject kept (the mask is soft, so a little of the colour shows)


def test_rembg_missing_model_names_file_and_place(workspace):
    from sdstudio.data.background import BackgroundRemover

    with pytest.raises(UserError) as err:
        BackgroundRemover("isnet-general-use", workspace.root / "models" / "rembg")
    msg = str(err.value)
    assert "isnet-general-use.onnx" in msg and "download" in msg and str(workspace.root / "models" / "rembg") in msg


def test_prepare_remove_background_cli(tmp_path, capsys):
    models = tmp_path / "models"
    tiny_rembg_onnx(models / "rembg" / "u2net.onnx")
    src = tmp_path / "src"
    src.mkdir()
    subject_on_dark(1).save(src / "a.png")
    subject_on_dark(2, (160, 200)).save(src / "b.png")
    out = tmp_path / "ds"
    assert main(["prepare", str(src), "--out", str(out), "--class-word", "box", "--size", "128", "--crop", "none",
                 "--remove-background", "--background", "0,0,255", "--models-dir", str(models)]) == 0
    capsys.readouterr()
    with Image.open(out / "img" / "10_box" / "a.png") as im:
        assert im.getpixel((3, 3)) == (0, 0, 255)
    # Without the model file: one line saying what to download and where, exit 2.
    (models / "rembg" / "u2net.onnx").unlink()
    assert main(["prepare", str(src), "--out", str(out), "--class-word", "box", "--remove-background",
                 "--models-dir", str(models)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: The background-removal model 'u2net' is not installed") and "u2net.onnx" in err


# -- captioning --------------------------------------------------------------------------------------------------
def test_wd14_tagger_thresholds_exclude_underscores(tmp_path):
    from sdstudio.data.caption import TaggerConfig, WD14Tagger

    folder = tiny_wd14(tmp_path / "wd")
    red, blue = Image.new("RGB", (50, 40), (250, 10, 10)), Image.new("RGB", (40, 40), (10, 10, 250))
    tagger = WD14Tagger(str(folder), config=TaggerConfig(exclude=["simple background"]))
    caps = tagger.caption([red, blue], [])
    assert caps[0].split(", ")[0] == "red theme" and "blue theme" not in caps[0]
    assert "blue theme" in caps[1] and "red theme" not in caps[1]
    for c in caps:
        assert "long hair" in c and "^_^" in c  # underscores become spaces, kaomoji keep theirs
        assert "simple background" not in c  # excluded
        assert "hatsune miku" not in c  # character score 0.73 < 0.85
        assert "general" not in c  # ratings are not tags unless asked
    tagger = WD14Tagger(str(folder), config=TaggerConfig(keep_underscores=True, character_threshold=0.7,
                                                         include_rating=True))
    tags = tagger.caption([red], [])[0].split(", ")
    assert tags[:2] == ["general", "hatsune_miku"] and "long_hair" in tags and "simple_background" in tags


def test_wd14_mismatched_tags_csv(tmp_path):
    from sdstudio.data.caption import WD14Tagger

    folder = tiny_wd14(tmp_path / "wd")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n")
    with pytest.raises(UserError, match="selected_tags.csv"):
        WD14Tagger(str(folder))


def test_blip_tiny_captions(tmp_path):
    from sdstudio.data.caption import BlipCaptioner

    folder = tiny_blip(tmp_path / "blip")
    cap = BlipCaptioner(str(folder), max_new_tokens=6, num_beams=1)
    out = cap.caption([Image.new("RGB", (64, 48), (200, 10, 10)), subject_on_dark()], [Path("a.png"), Path("b.png")])
    vocab = set((folder / "vocab.txt").read_text().split())
    assert len(out) == 2
    for text in out:
        assert text and set(text.split()) <= vocab  # real generation through the saved processor and model


def test_captioner_missing_model_is_one_sentence(tmp_path, monkeypatch):
    from sdstudio.data.caption import make_captioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not on this machine and huggingface.co cannot be reached") as err:
        make_captioner("wd14", model="nobody/no-such-tagger", search_dir=tmp_path / "captioners")
    assert str(tmp_path / "captioners" / "nobody--no-such-tagger") in str(err.value)


@pytest.mark.parametrize("kind", ["blip", "wd14"])
def test_captioner_offline_fails_before_any_download_attempt(tmp_path, monkeypatch, kind):
    """With no local model and no hub, the one-sentence error comes before the hub client is asked at all
    (it would retry for a minute). The hub's entry points are replaced by ones that fail the test: the hub
    is out of reach here anyway, and the point is that we never wait on it."""
    import huggingface_hub
    import transformers

    from sdstudio.data import caption

    def no_hub(*a, **k):
        raise AssertionError("the hub client was called while offline")

    monkeypatch.setattr(caption, "hub_reachable", lambda timeout=2.0: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(transformers.BlipProcessor, "from_pretrained", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="cannot be reached") as err:
        caption.make_captioner(kind, search_dir=tmp_path / "captioners")
    ref = caption.DEFAULT_WD14 if kind == "wd14" else caption.DEFAULT_BLIP
    assert str(tmp_path / "captioners" / ref.replace("/", "--")) in str(err.value)


def test_hub_reachable_respects_offline_and_proxy(monkeypatch):
    from sdstudio.data.caption import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_reachable() is True  # a proxy may reach what a direct connection cannot
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens here
    assert hub_reachable(timeout=1.0) is False


def test_prepare_caption_cli_blip_and_wd14_from_workspace_folder(tmp_path, capsys):
    models = tmp_path / "models"
    tiny_wd14(models / "captioners" / "my-tagger")
    tiny_blip(models / "captioners" / "my-blip")
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (96, 96), (250, 10, 10)).save(src / "red.png")
    Image.new("RGB", (96, 96), (10, 10, 250)).save(src / "blue.png")
    (src / "blue.txt").write_text("my own caption")
    out = tmp_path / "ds"
    # WD14 by folder name inside models/captioners; an existing caption is kept unless overwriting.
    assert main(["prepare", str(src), "--out", str(out), "--size", "64", "--caption", "wd14", "--caption-model",
                 "my-tagger", "--trigger", "ohwx", "--models-dir", str(models), "--exclude-tags", "^_^"]) == 0
    concept = out / "img" / "10_ohwx"
    assert (concept / "red.txt").read_text().strip() == "ohwx, red theme, long hair, simple background"
    assert (concept / "blue.txt").read_text().strip() == "ohwx, my own caption"
    assert main(["prepare", str(src), "--out", str(out), "--size", "64", "--caption", "blip", "--caption-model",
                 "my-blip", "--trigger", "ohwx", "--class-word", "toy", "--models-dir", str(models),
                 "--overwrite-captions"]) == 0
    concept = out / "img" / "10_ohwx toy"
    for name in ("red", "blue"):
        text = (concept / f"{name}.txt").read_text().strip()
        assert text.startswith("ohwx toy, ") and len(text) > len("ohwx toy, ")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(r["text"].startswith("ohwx toy, ") for r in rows)
    capsys.readouterr()


def test_filename_captions_and_edits():
    from sdstudio.data.caption import (add_tags, caption_from_filename, find_replace, remove_tags, with_prefix)

    assert caption_from_filename("a_red-car (2).jpg") == "a red car"
    assert caption_from_filename("IMG_2041 my dog.jpeg") == "my dog"
    assert with_prefix("a dog on grass", "sks", "dog") == "sks dog, a dog on grass"
    assert with_prefix("sks dog, a dog", "sks", "dog") == "sks dog, a dog"
    assert with_prefix("", "sks", "") == "sks"
    assert find_replace("1girl, long hair, girl", "girl", "woman") == "1girl, long hair, woman"
    assert find_replace("a, b, c", "b", "") == "a, c"
    assert add_tags("a, b", ["c", "a"]) == "a, b, c"
    assert add_tags("a, b", ["z"], at_start=True) == "z, a, b"
    assert remove_tags("a, b, c", ["b", "x"]) == "a, c"


def test_blip_cleanup():
    from sdstudio.data.caption import clean_blip

    assert clean_blip("there is a arafed man  standing on a beach") == "a man standing on a beach"
    assert clean_blip("araffe dog") == "dog"
