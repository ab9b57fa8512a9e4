"""The registry of pretraining recipes: `fercache pretrain --recipe NAME` builds `RECIPES[NAME]`.
A new recipe is a module with a `Recipe` subclass (fercache.pretrain.recipe_base) and a line
here."""

from fercache.errors import FercacheError
from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.cotex import CoTex
from fercache.pretrain.emma import Emma
from fercache.pretrain.fixmatch import FixMatch, PseudoLabel
from fercache.pretrain.landmarks import MultitaskLandmarks
from fercache.pretrain.mpl import Mpl
from fercache.pretrain.recipe_base import Recipe
from fercache.pretrain.supervised import Supervised

RECIPES: dict[str, type[Recipe]] = {
    "mpl": Mpl,
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "pseudo-label": PseudoLabel,
    "cotex": CoTex,
    "emma": Emma,
    "multitask-landmarks": MultitaskLandmarks,
}


def recipe_for(config: PretrainConfig) -> Recipe:
    """A new recipe object of `config.recipe` (its settings checked)."""
    if config.recipe not in RECIPES:
        raise FercacheError(
            f"pretrain settings: unknown recipe '{config.recipe}'; "
            f"choose one of {', '.join(RECIPES)}"
        )
    return RECIPES[config.recipe](config)
