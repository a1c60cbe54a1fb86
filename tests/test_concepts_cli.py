"""`sdstudio train` with the concept presets (TI, pivotal, EDLoRA) through the real loop, on the tiny model."""
from __future__ import annotations

import pytest
from concepts_util import torch  # noqa: F401  (sets one CPU thread)
from train_helpers import fast_sets, make_kohya_dataset

from sdstudio.cli import main
from sdstudio.formats.kinds import detect_kind

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset,extra,expect", [
    ("object-ti-sd15", ["textual_inversion.token=<sks-obj>", "textual_inversion.save_format=both"],
     {"run.safetensors": "embedding", "run.learned_embeds.safetensors": "embedding"}),
    ("pivotal-character-sd15", ["pivotal.token=<sks-char>", "pivotal.rank=4"],
     {"run.safetensors": "lora", "run.embedding.safetensors": "embedding"}),
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
