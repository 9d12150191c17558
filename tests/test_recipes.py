"""Every recipe shipped in recipes/ is a valid config for each stage it names, and so is every
variant of its experiment: a typo in a recipe fails here, not hours into a study."""

from pathlib import Path

import pytest

from shrinkcli.config import STAGE_CONFIGS, load_recipe, stage_config_from_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_the_recipes_folder_is_found():
    assert len(RECIPES) >= 5, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_builds_every_stage_and_variant(path):
    recipe = load_recipe(path)
    stages = [stage for stage in STAGE_CONFIGS if stage in recipe]
    assert stages, f"{path.name} names no stage"
    for stage in stages:
        config = stage_config_from_recipe(recipe, stage, path.name)
        assert all(config.source(key) == "recipe" for key in recipe[stage]), (path.name, stage)
    for name, changes in recipe.get("experiment", {}).get("variants", {}).items():
        table = {**recipe.get("distill", {}), **changes}
        config = stage_config_from_recipe({**recipe, "distill": table}, "distill", f"{path.name} variant {name}")
        for key, value in changes.items():
            assert getattr(config, key) == value and config.source(key) == "recipe", (name, key)
