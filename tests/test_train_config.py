"""TrainConfig: presets merge over defaults, --set overrides (method tables too), typos name the nearest key."""
from __future__ import annotations

import pytest

from sdstudio.errors import UserError
from sdstudio.train.config import TrainConfig, list_presets, load_config, read_toml, resolve, user_fields


def test_every_preset_resolves_and_has_a_header():
    names = list_presets()
    assert {"character-lora-sd15", "style-lora-sd15", "dreambooth-person-sd15", "full-finetune-sd15"} <= set(names)
    from sdstudio.train.config import PRESETS_DIR, preset_header

    for name in names:
        cfg = load_config(PRESETS_DIR / f"{name}.toml")
        assert cfg.method in ("lora", "dreambooth", "full") or cfg.method
        header = preset_header(name)
        assert "VRAM" in header and "per 1,000 steps" in header, name


def test_preset_is_partial_and_set_overrides_top_level_and_method_table():
    cfg = load_config("character-lora-sd15", ["max_steps=6", "lora.rank=8", "resolution=64", "ema=true",
                                              "sample_prompts=a | b"])
    assert cfg.max_steps == 6 and cfg.resolution == 64 and cfg.ema is True
    assert cfg.options.rank == 8 and cfg.options.alpha == 8.0  # alpha from the preset, rank from --set
    assert cfg.sample_prompts == ["a", "b"]
    assert cfg.optimizer == "adamw"  # a default the preset does not mention
    assert cfg.schema_version == 1


@pytest.mark.parametrize("sets,match", [
    (["max_step=6"], "Did you mean 'max_steps'"),
    (["lora.rnak=8"], "Did you mean 'lora.rank'"),
    (["lorra.rank=8"], "Did you mean 'lora'"),
    (["optimizer=adamw9bit"], "adamw8bit"),
    (["resolution=100"], "multiple of 64"),
    (["max_steps=0"], "below its minimum"),
    (["learning_rate=fast"], "not a number"),
    (["ema=maybe"], "true or false"),
    (["method=lorra"], "Did you mean 'lora'"),
    (["max_steps"], "key=value"),
])
def test_bad_settings_are_one_sentence_user_errors(sets, match):
    with pytest.raises(UserError, match=match):
        load_config("character-lora-sd15", sets)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("style-lora-sd15", ["lora.rank=4"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = resolve(read_toml(path))
    assert again.to_dict() == cfg.to_dict()


def test_every_field_is_documented_and_bounded():
    for f in user_fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        if f.type in ("int", "float"):
            assert f.metadata.get("min") is not None, f.name
    for key in ("method", "base_model", "dataset", "output_dir", "output_name", "resolution", "max_steps",
                "batch_size", "learning_rate", "seed", "save_every", "sample_every", "sample_prompts"):
        assert key in TrainConfig.__dataclass_fields__


def test_newer_schema_is_refused():
    with pytest.raises(UserError, match="newer"):
        resolve({"schema_version": 99})
