"""Another live process holding a folder as fercache's writers hold theirs (its `.run.claim`),
for the tests of a second writer."""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def another_process_holding(folder: Path) -> Iterator[int]:
    """A process that holds `folder` while the body runs; its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from fercache.claims import Claims; "
         f"Claims({str(folder)!r}).take('run'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
