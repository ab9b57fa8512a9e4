"""The files `fercache extract --checkpoint` reads: `<name>.safetensors` holding a plain timm
state dict (no `module.` prefix) with the model config as JSON in the metadata key
`fercache_model`, and the same JSON in a sidecar `<name>.json`."""

import json
from pathlib import Path

import torch
from safetensors.torch import save

from fercache.backbone.network import MODEL_METADATA_KEY, DataConfig
from fercache.data.tasks import EXPR_CLASSES
from fercache.outputs import write_made_atomically, write_text_atomically
from fercache.resume import RESUME_ADVICE


def model_config(backbone: str, data_config: DataConfig, recipe: str, **extra: object) -> dict:
    """What extraction needs to rebuild the model; `extra` adds the keys some recipes need
    (`views`, `model_kwargs`: see fercache.backbone.network)."""
    return {
        "backbone": backbone,
        "num_classes": len(EXPR_CLASSES),
        "input_size": list(data_config.input_size),
        "mean": list(data_config.mean),
        "std": list(data_config.std),
        "interpolation": data_config.interpolation,
        "classes": list(EXPR_CLASSES),
        "recipe": recipe,
        **extra,
    }


def export_model(model: torch.nn.Module, config: dict, out: Path) -> Path:
    """Write `out` (.safetensors) and its sidecar .json, each via a temporary name and rename,
    so that a reader never sees a half-written checkpoint."""
    state = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in model.state_dict().items()
    }
    metadata = {MODEL_METADATA_KEY: json.dumps(config)}
    write_made_atomically(out, lambda: save(state, metadata=metadata), "the model", RESUME_ADVICE)
    write_text_atomically(
        out.with_suffix(".json"), json.dumps(config, indent=2) + "\n", "the model config"
    )
    return out
