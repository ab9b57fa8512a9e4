"""What a training run is resumed from: the files every run folder of a training phase
(`fercache pretrain`, `fercache train`) keeps, one convention for both.

- `config.yaml`    the resolved settings, flat YAML (one key per setting) under a comment
                   header; `--resume` reads them back, and `--config` accepts the file as is
- `last.pt`        what `--resume` needs (weights, optimizer state, progress, history), read with
                   `torch.load(weights_only=True)`: tensors and plain Python values only
- `metrics.jsonl`  one JSON record per line, rewritten whole from the checkpointed history, so
                   it never holds a record the checkpoint does not (nor misses one it does)

A folder holds a run once it holds a checkpoint (`holds_run`). While a process writes a run,
it holds the folder (`writing_run`: the claim `.run.claim`, `fercache.claims`), so a
second process writing into it, a new run or a `--resume`, is refused. A resumed run keeps its saved
settings (`resumed_settings`): only the settings its config class declares safe to change on
resume may differ from them; anything else given is refused, naming each change.

Every file is written whole under a temporary name, then renamed (`fercache.outputs`).
"""

import io
import json
import pickle
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
import yaml

from fercache.claims import Claims
from fercache.errors import FercacheError
from fercache.outputs import write_made_atomically, write_text_atomically
from fercache.readers import first_line, read_text

RUN_CLAIM = "run"  # `.run.claim`: the process writing a run folder
RUN_WAIT = "wait until it ends (`--resume` then continues the run), or choose another --out"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "last.pt"
# what to do when a run's checkpoint or weights cannot be written (a full disk)
RESUME_ADVICE = "the last checkpoint written is kept: free disk space, then go on with --resume"
METRICS_FILE = "metrics.jsonl"
_UNSET = "<unset>"  # a key one side of a comparison lacks (a run of another version)


def config_text(settings: dict[str, Any], header: str) -> str:
    """What `write_config` writes: `header` as comment lines, then the settings as YAML in
    their order (for `--print-config`)."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comments + yaml.safe_dump(settings, sort_keys=False)


def write_config(run_dir: Path, settings: dict[str, Any], header: str) -> Path:
    """Write the resolved settings as `config.yaml` (`config_text`)."""
    return write_text_atomically(
        Path(run_dir) / CONFIG_FILE, config_text(settings, header), "the run's settings"
    )


def read_config(run_dir: Path) -> dict[str, Any]:
    """The settings `config.yaml` holds; FercacheError naming it when missing or damaged."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FercacheError(
            f"{path}: missing, so {Path(run_dir)} holds no run to resume (a run writes it when "
            "it starts); give the folder of a run, or start a new run without --resume"
        )
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise FercacheError(
            f"{path}: unreadable saved settings ({first_line(error)}); restore the file, or "
            "start a new run in another folder"
        ) from error
    if not isinstance(loaded, dict):
        raise FercacheError(
            f"{path}: does not hold a mapping of setting: value; restore the file, or start a "
            "new run in another folder"
        )
    return {str(key): value for key, value in loaded.items()}


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `last.pt`: tensors (state dicts) and plain Python values (numbers, strings, None,
    lists, tuples, dicts), which is all `read_checkpoint` accepts."""
    path = Path(run_dir) / CHECKPOINT_FILE
    return write_made_atomically(path, lambda: _torch_image(state), "the checkpoint", RESUME_ADVICE)


def _torch_image(state: dict[str, Any]) -> memoryview:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer()


def read_checkpoint(run_dir: Path, keys: Collection[str] = ()) -> dict[str, Any]:
    """`last.pt` on the CPU; FercacheError naming it when missing or damaged, or when it lacks
    one of `keys` (the checkpoint of another kind of run). Loads with `weights_only=True`: a
    checkpoint cannot run code."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FercacheError(
            f"{path}: no checkpoint to resume from (a run writes it when it first saves its "
            "progress); start the run again without --resume"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise FercacheError(
            f"{path}: unreadable checkpoint ({first_line(error)}); it is damaged or not "
            "fercache's: start the run again without --resume, or in another folder"
        ) from error
    if not isinstance(state, dict):
        raise FercacheError(
            f"{path}: not a fercache checkpoint (it holds a {type(state).__name__}); start the "
            "run again without --resume, or in another folder"
        )
    lacking = [key for key in keys if key not in state]
    if lacking:
        raise FercacheError(
            f"{path}: not a checkpoint of this kind of run (no {', '.join(lacking)}); start the "
            "run again without --resume, or in another folder"
        )
    return state


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    """Rewrite `metrics.jsonl` whole from `records` (the history the checkpoint holds)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    return write_text_atomically(Path(run_dir) / METRICS_FILE, text, "the metrics")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `metrics.jsonl` ([] before the run's first one); FercacheError naming
    the file and line of one that is not a JSON object."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    text = read_text(path, "metrics", "resume the run (--resume) to write it again")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            record = error
        if not isinstance(record, dict):
            raise FercacheError(
                f"{path}:{number}: not a JSON record; resume the run (--resume) to write the "
                "file again from its checkpoint"
            )
        records.append(record)
    return records


def resumed_settings(
    saved: dict[str, Any], given: dict[str, Any], may_change: Collection[str], path: Path
) -> dict[str, Any]:
    """The settings a resumed run continues with: `saved` (read from `path`), with the
    differences `given` makes to keys in `may_change`. `given` holds the settings resolved
    from what the command line gives now on top of `saved`; a difference in any other key is a
    FercacheError listing every such change as `key old -> new`."""
    keys = [*saved, *(key for key in given if key not in saved)]
    changed = [key for key in keys if saved.get(key, _UNSET) != given.get(key, _UNSET)]
    refused = [key for key in changed if key not in may_change]
    if refused:
        shown = ", ".join(
            f"{key} {saved.get(key, _UNSET)!r} -> {given.get(key, _UNSET)!r}" for key in refused
        )
        allowed = (
            f" (only {', '.join(sorted(may_change))} may change on resume)" if may_change else ""
        )
        raise FercacheError(
            f"{path}: --resume continues the run with its saved settings, but the options "
            f"given change {shown}{allowed}. Drop those options, or start a new run in another "
            "--out."
        )
    return {**saved, **{key: given[key] for key in changed if key in given}}


def holds_run(run_dir: Path) -> bool:
    """Whether the folder holds a run that `--resume` can continue (it has a checkpoint)."""
    return (Path(run_dir) / CHECKPOINT_FILE).is_file()


@contextmanager
def writing_run(
    run_dir: Path, hold: bool = True, what: str = "a run", wait: str = RUN_WAIT
) -> Iterator[None]:
    """Hold `run_dir` for this process while the body writes `what` into it (`hold` False: a
    rank other than 0 under torchrun, for which rank 0 holds it).

    A FercacheError naming the holder and saying to `wait` when a live process holds it (a
    second run into one --out, or a `--resume` while the run's writer still runs); a dead
    process's claim is taken over, as every claim of fercache is. The folder (and its missing
    parents) is created, and removed again when the body fails before anything is written into
    it. The hold is the hidden file `claim_path(run_dir, RUN_CLAIM)`.
    """
    if not hold:
        yield
        return
    run_dir = Path(run_dir)
    created = [folder for folder in [run_dir, *run_dir.parents] if not folder.exists()]
    claims = Claims(run_dir)
    try:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            taken = claims.take(RUN_CLAIM)
        except OSError as error:
            raise FercacheError(
                f"{run_dir}: cannot write into the run folder ({error.strerror or error}); "
                "check it is a writable folder, or choose another --out"
            ) from error
        if not taken:
            raise FercacheError(
                f"{run_dir}: {claims.holder(RUN_CLAIM) or 'another process'} is writing {what} "
                f"into this folder; {wait}"
            )
        with claims, claims.kept_alive():
            yield
    finally:
        with suppress(OSError):  # not empty: the run wrote something, which stays
            for folder in created:
                folder.rmdir()
