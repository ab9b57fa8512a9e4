"""Weights from elsewhere: timm's pretrained weights by name, checkpoints in other layouts, and
the one explicit way to turn a pickled model into a state dict (`fercache convert`).

- **By name** (`pretrained_model`): timm's own loader and cache resolve a model name, a tagged
  name (`convnext_base.fb_in22k`) or an `hf-hub:` name; a local file given with it replaces
  the download (timm's `pretrained_cfg_overlay` `file=`). Offline without the weights in the
  Hugging Face cache is one FercacheError saying how to provide them.
- **Other layouts** (`read_torch_state`, `unwrap_state`, `select_weights`): the state dict may
  sit under `state_dict`, `model`, `student`, `teacher` or `ema` (nested too) and its keys
  under `module.`, `_orig_mod.`, `encoder.`, `backbone.` or `visual.`; a prefix is taken when
  the keys under it match the network better than the keys as they are (keys outside it, e.g. a
  DINO projection head, are left out). Matching stays strict (`mismatch_report`).
- **Pickles**: `torch.load(weights_only=True)` refuses a pickled whole model; so does fercache,
  saying why. `convert_checkpoint(..., trust_pickle=True)` unpickles it once, explicitly, and
  writes its state dict as safetensors.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save
from torch import nn

from fercache.errors import FercacheError
from fercache.outputs import write_made_atomically

WRAPPER_KEYS = ("state_dict", "model", "student", "teacher", "ema")
ALWAYS_STRIPPED = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
PREFIXES = ("encoder.", "backbone.", "visual.")  # where other projects keep the image network
LISTED_KEYS = 5


def _squeezed(error: BaseException, limit: int = 400) -> str:
    """The error's whole text on one line, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- pretrained by name ---------------------------------------------------------------------


def is_hub_name(name: str) -> bool:
    return name.lower().startswith(("hf-hub:", "hf_hub:"))


def pretrained_model(
    name: str,
    file: Path | None = None,
    file_option: str = "--checkpoint FILE with --pretrained",
    **timm_options: object,
) -> tuple[nn.Module, str, str]:
    """timm's model `name` with its pretrained weights (read from `file` when given), its
    architecture name and where the weights came from (`weights_source`). `file_option` is
    how the command takes a local copy instead, for the offline error."""
    overlay = None
    if file is not None:
        if is_hub_name(name):
            raise FercacheError(
                f"{file}: an hf-hub: name loads its weights from the Hugging Face cache, not from "
                "a file; give the architecture's timm name with --pretrained to load a local file"
            )
        if not Path(file).is_file():
            raise FercacheError(f"{file}: no such checkpoint file")
        overlay = {"file": str(file)}
    if not is_hub_name(name) and not timm.is_model(name.partition(".")[0]):
        close = timm.list_models(f"*{name.partition('.')[0]}*")[:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise FercacheError(f"--pretrained '{name}': not a timm model name.{hint}")
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_options
        )
    except FercacheError:
        raise
    except OSError as error:  # no network, not in the cache, a hub error, an unreadable file
        if file is not None:
            raise FercacheError(
                f"{file}: timm could not load it as the weights of '{name}' ({_first_line(error)})"
            ) from error
        raise offline_error(name, error, file_option) from error
    except Exception as error:  # timm raises RuntimeError, ValueError, AssertionError, ...
        text = str(error).lower()
        if file is not None and ("weights only load failed" in text or "blocked loading" in text):
            read_torch_state(Path(file))  # says which: a pickle, or not a checkpoint at all
        if file is not None and "loading state_dict" in text:  # torch's list of key mismatches
            raise FercacheError(
                f"{file}: does not hold the weights of '{name}': {_squeezed(error)}"
            ) from error
        where = f"{file}: " if file is not None else ""
        raise FercacheError(
            f"{where}cannot load timm's pretrained weights '{name}' ({_first_line(error)}). "
            f"Pretrained tags of this model: {_tags(name)}"
        ) from error
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = str(cfg.get("architecture") or name.partition(".")[0])
    return model, architecture, weights_source(cfg)


def offline_error(
    name: str, error: BaseException, file_option: str = "--checkpoint FILE with --pretrained"
) -> FercacheError:
    from huggingface_hub import constants

    return FercacheError(
        f"pretrained weights '{name}' are neither downloadable here nor in the Hugging Face "
        f"cache ({_first_line(error)}). Provide them: download the file elsewhere and pass it "
        f"with {file_option}, or copy a hub cache holding them "
        f"(filled by timm.create_model('{name}', pretrained=True) on a networked machine) to "
        f"{constants.HF_HUB_CACHE} (or set HF_HUB_CACHE to it) and set HF_HUB_OFFLINE=1"
    )


def _tags(name: str) -> str:
    if is_hub_name(name):
        return "(an hf-hub: name has none)"
    tags = timm.list_pretrained(f"{name.partition('.')[0]}.*")
    return ", ".join(tags[:8]) + (" ..." if len(tags) > 8 else "") if tags else "none"


def weights_source(pretrained_cfg: dict) -> str:
    """Where timm took the weights from: `file`, `hf-hub:<id>[/<file>]` or the URL."""
    if pretrained_cfg.get("file") and pretrained_cfg.get("source") != "hf-hub":
        return "file"
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        filename = pretrained_cfg.get("hf_hub_filename")
        return f"hf-hub:{hub_id}" + (f"/{filename}" if filename else "")
    return str(pretrained_cfg.get("url") or "")


def pretrained_architecture(
    name: str, file_option: str = "--checkpoint FILE with --pretrained"
) -> str:
    """The timm architecture a pretrained name builds (an hf-hub: name asks its config)."""
    if not is_hub_name(name):
        return name.partition(".")[0]
    from timm.models import load_model_config_from_hf

    try:
        _, architecture, _ = load_model_config_from_hf(name.partition(":")[2])
    except OSError as error:
        raise offline_error(name, error, file_option) from error
    return str(architecture)


# -- checkpoints in other layouts -----------------------------------------------------------


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a torch.save file, read without unpickling code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        if "unsupported global" in str(error).lower():  # a class or function to unpickle
            raise pickle_error(path, error) from error
        raise FercacheError(
            f"{path}: not a loadable PyTorch checkpoint ({_unpickler_reason(error)}). "
            "Expected a state dict saved with torch.save, or a .safetensors file."
        ) from error
    return unwrap_state(loaded, path)


def _unpickler_reason(error: BaseException) -> str:
    """torch's own reason (after 'WeightsUnpickler error:'), not its advice to unpickle."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    return f"{type(error).__name__}: {found.group(1)}" if found else _first_line(error)


def pickle_error(path: Path, error: BaseException) -> FercacheError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it needs {found.group(1)})" if found else ""
    return FercacheError(
        f"{path}: holds pickled Python objects, e.g. a whole model{what}, which fercache does not "
        "unpickle: unpickling runs code from the file. If you trust it, turn it into a state "
        f"dict once: fercache convert {path} --out WEIGHTS.safetensors --trust-pickle"
    )


def unwrap_state(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside `loaded`: itself, or under the wrapper keys (nested), or a module's."""
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(loaded, nn.Module):
            loaded = loaded.state_dict()
        if _is_state(loaded) or not isinstance(loaded, dict):
            break
        inner = next(
            (loaded[key] for key in WRAPPER_KEYS if isinstance(loaded.get(key), dict | nn.Module)),
            None,
        )
        if inner is None:
            break
        loaded = inner
    if not _is_state(loaded):
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, dict) else ""
        raise FercacheError(
            f"{path}: holds no state dict (a dict of parameter tensors"
            f"{', or one under ' + '/'.join(WRAPPER_KEYS)}){f'; its keys: {keys}' if keys else ''}"
        )
    return dict(loaded)


def _is_state(loaded: object) -> bool:
    return (
        isinstance(loaded, dict)
        and bool(loaded)
        and all(isinstance(value, torch.Tensor) for value in loaded.values())
    )


def select_weights(
    state: dict[str, torch.Tensor], expected: set[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """`state` with its keys' prefix removed: DDP/compile prefixes always, `encoder.`,
    `backbone.`, `visual.` when the keys under one match `expected` better. Returns the state
    and the prefix taken ("" for none)."""
    taken = ""
    for prefix in ALWAYS_STRIPPED:
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
            taken += prefix
    for _ in range(3):  # e.g. module.backbone.encoder.
        best, best_prefix, best_score = state, "", len(expected & set(state))
        for prefix in PREFIXES:
            inner = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            score = len(expected & set(inner))
            if inner and score > best_score:
                best, best_prefix, best_score = inner, prefix, score
        if not best_prefix:
            break
        state, taken = best, taken + best_prefix
    return state, taken


def expected_keys(name: str, num_classes: int | None, model_kwargs: dict) -> dict[str, tuple]:
    """The state keys (and shapes) of timm's `name`, built on the meta device (no memory)."""
    arguments = dict(model_kwargs)
    if num_classes is not None:
        arguments["num_classes"] = num_classes
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **arguments)
    except Exception:  # a model whose init needs real tensors
        model = timm.create_model(name, pretrained=False, **arguments)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def mismatch_report(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> str:
    """'missing keys (n): ...; unexpected keys (n): ...; wrong shapes (n): ...' or ''."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != tuple(shape)
    ]
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:LISTED_KEYS])}"
        f"{' ...' if len(keys) > LISTED_KEYS else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        )
        if keys
    )


# -- fercache convert -----------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """What `convert_checkpoint` wrote."""

    out: Path
    tensors: int
    unpickled: bool  # the file needed --trust-pickle


def convert_checkpoint(checkpoint: Path, out: Path, trust_pickle: bool = False) -> Converted:
    """Write the state dict of `checkpoint` (a state dict, a nested one, or with `trust_pickle`
    a pickled model or training checkpoint) to `out` as safetensors."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise FercacheError(f"{checkpoint}: no such checkpoint file")
    if out.suffix != ".safetensors":
        raise FercacheError(f"{out}: --out must name a .safetensors file")
    unpickled = False
    try:
        state = read_torch_state(checkpoint)
    except FercacheError as refused:
        if "pickled" not in str(refused):
            raise
        if not trust_pickle:
            raise
        state = _unpickle(checkpoint)
        unpickled = True
    # safetensors refuses shared or strided storage (tied weights): every tensor its own copy
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    write_made_atomically(out, lambda: save(tensors), "the converted weights")
    return Converted(out=out, tensors=len(tensors), unpickled=unpickled)


def _unpickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a class the pickle names may not be importable here
        raise FercacheError(
            f"{path}: could not unpickle it ({_first_line(error)}); the classes it names must "
            "be importable in this environment"
        ) from error
    return unwrap_state(loaded, path)
