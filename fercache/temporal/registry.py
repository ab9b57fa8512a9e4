"""The registry of temporal models: `--set model=NAME` builds `TEMPORAL_MODELS[NAME]`. A new
model is a module with a `TemporalModel` subclass (fercache.temporal.model) and a line here."""

from fercache.errors import FercacheError
from fercache.temporal.model import ModelConfig, TemporalModel
from fercache.temporal.tcn import TemporalConvNet
from fercache.temporal.transformer import TemporalTransformer

TEMPORAL_MODELS: dict[str, type[TemporalModel]] = {
    "transformer": TemporalTransformer,
    "tcn": TemporalConvNet,
}


def model_class(name: str) -> type[TemporalModel]:
    """The registered model `name`; an error naming the registered ones otherwise."""
    if name not in TEMPORAL_MODELS:
        raise FercacheError(
            f"unknown temporal model '{name}'; choose one of {', '.join(TEMPORAL_MODELS)}"
        )
    return TEMPORAL_MODELS[name]


def build_model(config: ModelConfig) -> TemporalModel:
    """A new, randomly initialised model of `config.model` (torch's generator draws)."""
    return model_class(config.model)(config)
