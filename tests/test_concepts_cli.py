"""`sdstudio train` with the concept presets (TI, pivotal, EDLoRA) through the real loop, on the tiny model."""
from __future__ import annotations

import pytest
from concepts_util import torch  # (importing it sets one CPU thread)
from train_helpers import fast_sets, make_kohya_dataset

from sdstudio.cli import main
from sdstudio.formats.kinds import detect_kind

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset,extra,expect", [
    ("object-ti-sd15", ["textual_inversion.token=<sks-obj>", "textual_inversion.save_format=both"],
     {"run.safetensors": "embedding", "run.learned_embeds.safetensors": "embedding"}),
    ("pivotal-character-sd15", ["pivotal.token=<sks-char>", "pivotal.rank=4"],
     {"run.safetensors": "lora", "run.lora-only.safetensors": "lora", "run.embedding.safetensors": "embedding"}),
    ("edlora-character-sd15", ["edlora.concept_tokens=<sk1> <sk2>", "edlora.caption_trigger=sks"],
     {"run.safetensors": "edlora"}),
])
def test_train_presets_from_cli(preset, extra, expect, tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2, repeats=1)
    out = tmp_path / "run"
    sets = fast_sets(ds, out, max_steps=2, output_name="run", sample_every=2, sample_prompts='["a photo"]')
    args = ["--home", str(tmp_path / "ws"), "train", str(ROOT / "presets" / f"{preset}.toml")]
    for s in sets + extra:
        args += ["--set", s]
    assert main(args) == 0
    for name, kind in expect.items():
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
        assert detect_kind(out / name) == kind
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert list((out / "samples").glob("*.png"))  # previews drew (EDLoRA through its layer-wise pipeline)


def test_train_refuses_known_token(tmp_path, capsys):
    ds = make_kohya_dataset(tmp_path / "ds", n=1, repeats=1)
    args = ["train", str(ROOT / "presets" / "object-ti-sd15.toml")]
    for s in fast_sets(ds, tmp_path / "run", max_steps=1) + ["textual_inversion.token=person"]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # status lines, then one error line
    assert err[-1].startswith("error: ") and "already in the tokenizer's vocabulary" in err[-1]


@pytest.mark.parametrize("preset,extra", [
    ("edlora-character-sd15", ["edlora.concept_tokens=<r1> <r2>", "edlora.embedding_lr=0.05"]),
    ("pivotal-character-sd15", ["pivotal.token=<rp>", "pivotal.rank=4", "pivotal.order=joint"]),
])
def test_resume_continues_exactly(preset, extra, tmp_path):
    """1 step + resume to 2 gives the same file as 2 steps straight (the methods' own checkpoint state)."""
    from sdstudio.formats.safe_io import load_state_dict

    ds = make_kohya_dataset(tmp_path / "ds", n=2, repeats=1)

    def run(out, steps, resume=False):
        args = ["train", str(ROOT / "presets" / f"{preset}.toml")] + (["--resume"] if resume else [])
        for s in fast_sets(ds, out, max_steps=steps, output_name="r", sample_prompts='[]', lr_scheduler="constant",
                           warmup_steps=0) + extra:
            args += ["--set", s]
        assert main(args) == 0

    run(tmp_path / "straight", 2)
    run(tmp_path / "split", 1)
    run(tmp_path / "split", 2, resume=True)
    a = load_state_dict(tmp_path / "straight" / "r.safetensors")
    b = load_state_dict(tmp_path / "split" / "r.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_generate_cli_with_regions(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('base_model = "tiny"\nprompt = "two friends"\nsteps = 2\nwidth = 64\nheight = 64\n'
                      '[[region]]\nprompt = "a robot"\nbox = [0.0, 0.0, 0.5, 1.0]\n'
                      '[[region]]\nprompt = "a dog"\nbox = [0.5, 0.0, 1.0, 1.0]\n')
    assert main(["--home", str(tmp_path / "ws"), "generate", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert list((tmp_path / "out").glob("*.png"))
