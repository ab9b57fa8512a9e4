"""The `fercache` command line: the app here, the commands in one module per area, in pipeline
order (`fercache.cli.features`: extract, import-features, convert). Each command parses options
and calls one plain function."""

from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

from fercache import __version__
from fercache.cli import data, features, pipeline, predictions, pretrain, temporal
from fercache.cli.shared import console, error_console
from fercache.errors import FercacheError

INTERRUPTED = (
    "interrupted: what was finished is kept (every file fercache writes is whole or absent); "
    "run the same command again to go on from there (train and pretrain: add --resume)"
)


class FercacheGroup(TyperGroup):
    """Shows a FercacheError as one clean line on stderr with exit code 2, never a traceback;
    Ctrl-C as one line saying what was kept and how to go on, exit code 130."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FercacheError as error:
            message = escape(str(error))  # a message may hold brackets: 'fercache[video]'
            error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=error.exit_code) from error
        except typer.BadParameter as error:  # an option's type or range: one line, not a box
            error_console.print(
                f"[bold red]error:[/] {escape(error.format_message())}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code=error.exit_code) from error
        except KeyboardInterrupt as interrupt:
            error_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
            raise typer.Exit(code=130) from interrupt


app = typer.Typer(
    cls=FercacheGroup,
    help="Facial-expression recognition in video on a cached frozen-backbone feature store "
    "(Aff-Wild2 / ABAW). Stages talk through files; run any one alone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# `fercache --help` lists the commands area by area, in pipeline order
for area in (data, pretrain, features, temporal, predictions, pipeline):
    app.add_typer(area.commands)


def _version(value: bool) -> None:
    if value:
        console.print(f"fercache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Facial-expression recognition in video on a cached frozen-backbone feature store."""


def main() -> None:
    app()
