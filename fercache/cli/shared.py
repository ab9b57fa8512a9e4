"""What the areas of the command line share: the consoles, options of several areas, and help
texts that name the entries of the registries (recipes, numberings, submission formats,
temporal models)."""

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand

console = Console()
error_console = Console(stderr=True)

ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars on long work.")
]


def _weights(value: str) -> str:
    from fercache.temporal.run_files import WEIGHTS

    if value not in WEIGHTS:
        raise typer.BadParameter(f"choose {' or '.join(WEIGHTS)}, not '{value}'")
    return value


WeightsOption = Annotated[
    str,
    typer.Option(
        callback=_weights,
        help="Temporal weights: best (the epoch with the best validation score) or final "
        "(the last epoch: nothing chosen on the validation split).",
    ),
]
PrintConfigOption = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved settings (YAML, as the run's config.yaml holds them; with "
        "--resume the saved ones) and exit without training.",
    ),
]


def _described(entries: dict[str, str]) -> str:
    return "; ".join(f"{name} ({text})" if text else name for name, text in entries.items())


def _recipes() -> str:
    from fercache.pretrain.registry import RECIPES

    return _described({name: recipe.description for name, recipe in RECIPES.items()})


def _ssl_recipes() -> str:
    from fercache.experiments.demo import ssl_recipes

    return ", ".join(ssl_recipes())


def _numberings() -> str:
    from fercache.data.numbering import NUMBERINGS

    return ", ".join(NUMBERINGS)


def _submission_formats() -> str:
    from fercache.predictions.submission_formats import SUBMISSION_FORMATS

    return _described({name: kind.description for name, kind in SUBMISSION_FORMATS.items()})


def _temporal_models() -> str:
    from fercache.temporal.registry import TEMPORAL_MODELS

    return _described({name: model.description for name, model in TEMPORAL_MODELS.items()})


# What an option's help names in braces -> the registered entries, as the help shows them.
REGISTRIES: dict[str, Callable[[], str]] = {
    "{recipes}": _recipes,
    "{ssl-recipes}": _ssl_recipes,
    "{numberings}": _numberings,
    "{submission-formats}": _submission_formats,
    "{temporal-models}": _temporal_models,
}


class RegistryHelp(TyperCommand):
    """A command whose option help names the entries of a registry (`REGISTRIES`), read when
    the help is shown: the command line imports a registry only for the command that shows it,
    and lists whatever is registered then (by a plugin, or a test)."""

    def format_help(self, ctx: typer.Context, formatter) -> None:
        for param in self.params:
            for placeholder, entries in REGISTRIES.items():
                if param.help and placeholder in param.help:
                    param.help = param.help.replace(placeholder, entries())
        super().format_help(ctx, formatter)
