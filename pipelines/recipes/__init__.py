"""What each preprocessing mode makes of a video: one recipe per mode, chosen once when the job starts.

    pretrain.py    TVLT pretraining: windows of a few seconds, frames centre-cropped, each clip's log-mel
    grounding.py   TVP grounding: one sample per video, frames over the whole video at its longest edge, and the
                   video's queries from the annotation files

The stages (``pipelines.stages``) and the job (``pipelines.preprocess``) ask the recipe everything that depends on
the mode and never test the mode's name (video2dataset picks its subsamplers once from the config the same way).
Adding a mode is a new module here with a ``Recipe`` subclass, its line in ``RECIPES``, and its name in
``tvlt_core.shards.Mode`` (the shard contract the loaders read).

Torch-free: probe actors and the config import this.
"""

from __future__ import annotations

from pipelines.recipes.base import Recipe
from pipelines.recipes.grounding import GroundingRecipe
from pipelines.recipes.pretrain import PretrainRecipe

RECIPES: dict[str, type[Recipe]] = {"pretrain": PretrainRecipe, "grounding": GroundingRecipe}


def for_config(cfg) -> Recipe:
    """The recipe of ``cfg.mode`` (a ``pipelines.config.PreprocessConfig``), built from its sections."""
    return RECIPES[cfg.mode].from_config(cfg)


__all__ = ["RECIPES", "GroundingRecipe", "PretrainRecipe", "Recipe", "for_config"]
