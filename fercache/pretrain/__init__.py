"""Phase 1: semi-supervised spatial pretraining (Meta Pseudo Labels with debiased feedback)."""

from fercache.pretrain.config import (
    PretrainConfig,
    load_config,
    requested_config,
    resumed_config,
    settings_text,
)
from fercache.pretrain.loop import PretrainReport, pretrain

__all__ = [
    "PretrainConfig",
    "PretrainReport",
    "load_config",
    "pretrain",
    "requested_config",
    "resumed_config",
    "settings_text",
]
