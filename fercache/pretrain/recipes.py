"""The recipes that plug into the shared pretraining run as a `Recipe` (fercache.pretrain.finetune);
mpl and supervised are the run's own steps."""

from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.cotex import CoTex
from fercache.pretrain.emma import Emma
from fercache.pretrain.finetune import Recipe
from fercache.pretrain.landmarks import MultitaskLandmarks

RECIPE_CLASSES: dict[str, type[Recipe]] = {
    "cotex": CoTex,
    "emma": Emma,
    "multitask-landmarks": MultitaskLandmarks,
}


def recipe_for(config: PretrainConfig) -> Recipe | None:
    """The recipe object of `config.recipe`; None for mpl and supervised."""
    recipe = RECIPE_CLASSES.get(config.recipe)
    return recipe(config) if recipe else None


def export_keys(config: PretrainConfig) -> dict:
    """What the exported model config adds for `config.recipe` (see fercache.backbone)."""
    recipe = recipe_for(config)
    return recipe.export_keys() if recipe else {}
