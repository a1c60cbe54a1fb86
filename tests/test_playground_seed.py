"""A1111's seed habits: -1 draws a seed, and the image records the seed that made it (PNG text and recipe), so
it can be made again."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.errors import UserError
from sdstudio.jobs import run_foreground
from sdstudio.playground.outputs import read_recipe
from sdstudio.playground.recipe import Recipe
from sdstudio.playground.session import Playground, generation_work

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_seed_minus_one_draws_a_seed_and_records_it(tmp_path, tiny_dir):
    pg = Playground(device="cpu")
    recipe = Recipe(base_model="tiny", prompt="a photo of a cat", steps=2, width=64, height=64, seed=-1)
    works = [generation_work(pg, recipe, tmp_path / "out") for _ in range(2)]
    for w in works:
        run_foreground("g", "generate", w)
    seeds = [w.recipe.seed for w in works]
    assert all(0 <= s < 2**32 for s in seeds) and seeds[0] != seeds[1]
    pngs = sorted((tmp_path / "out").glob("*.png"), key=lambda p: p.stat().st_mtime)
    assert len(pngs) == 2
    a, b = (np.asarray(Image.open(p), dtype=float) for p in pngs)
    assert np.abs(a - b).max() > 0  # two draws, two pictures
    for png, seed in zip(pngs, seeds):
        text = Image.open(png).text
        assert f"Seed: {seed}," in text["parameters"] and "Seed: -1" not in text["parameters"]
        assert read_recipe(png).seed == seed
    # The recorded seed makes the same picture again.
    again = pg.run(read_recipe(pngs[0]))[0]
    assert np.array_equal(np.asarray(again, dtype=float), a)


def test_seed_bounds():
    with pytest.raises(UserError, match="seed = -2"):
        Recipe(seed=-2).validate()
    Recipe(seed=-1).validate()
    assert Recipe(seed=5).with_seed().seed == 5
