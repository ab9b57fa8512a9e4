"""The kill tests' process: the fercache command line, SIGKILLed once FILE's temporary file is
written and flushed, before its rename (what a kill or a power cut at that moment leaves).

    python -m tests.killed_mid_write FILE [--setup MODULE:FUNCTION] COMMAND [OPTIONS...]

`--setup` names a function called first (a test's stand-in for a model it does not load).

A process of its own, not a fork of the test's: a fork of a process whose torch thread pool has
run can deadlock in it.
"""

import importlib
import os
import signal
import sys
from pathlib import Path

from typer.testing import CliRunner

from fercache import outputs
from fercache.cli import app


def main() -> None:
    target, *arguments = sys.argv[1:]
    if arguments[0] == "--setup":
        module, _, function = arguments[1].partition(":")
        getattr(importlib.import_module(module), function)()
        arguments = arguments[2:]
    real = outputs._flush_to_disk

    def flush(path: Path) -> None:
        real(path)
        if path == outputs.temporary_name(Path(target)):
            os.kill(os.getpid(), signal.SIGKILL)

    outputs._flush_to_disk = flush
    result = CliRunner().invoke(app, arguments)
    sys.exit(f"not killed: exit code {result.exit_code}\n{result.output}")


if __name__ == "__main__":
    main()
