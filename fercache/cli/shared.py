"""What the areas of the command line share: the consoles, and options of several areas."""

from typing import Annotated

import typer
from rich.console import Console

console = Console()
error_console = Console(stderr=True)

ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars on long work.")
]
PrintConfigOption = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved settings (YAML, as the run's config.yaml holds them; with "
        "--resume the saved ones) and exit without training.",
    ),
]
