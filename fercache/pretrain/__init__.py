"""Phase 1: semi-supervised spatial pretraining (Meta Pseudo Labels with debiased feedback)."""

from fercache.pretrain.config import PretrainConfig, load_config
from fercache.pretrain.loop import PretrainReport, pretrain, saved_settings

__all__ = ["PretrainConfig", "PretrainReport", "load_config", "pretrain", "saved_settings"]
