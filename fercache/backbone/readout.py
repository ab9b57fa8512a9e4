"""Which features `fercache extract` reads out of the network: `--layer`, `--pool`, `--tta`.

The default readout (`Readout()`: layer -1, pool "", no TTA) is the network's own pooled
pre-logits, `forward_head(forward_features(x), pre_logits=True)`, computed by
`fercache.features.extract.forward_backbone` on its unchanged path. Otherwise:

- `layer K` (0 <= K < the number of timm's intermediates, `len(model.feature_info)`): the output
  of intermediate K of `forward_intermediates(x, indices=[K], stop_early=True)`, i.e. the
  network cut after it. For a token model (a ViT: `forward_features` gives (B, L, D) tokens)
  the tokens pass through the network's final norm (timm's `norm=True`), prefix tokens kept,
  and are pooled as the head would (below). For any other network (a CNN: NCHW maps) the map
  is averaged over space. No logits: an intermediate block has no classifier.
- `pool` (token models only), on the token sequence T of the chosen layer:
    ""           the network's own head: `forward_head(T, pre_logits=True)` (its global_pool
                 then its fc_norm);
    "cls"        the class token T[:, 0], then the head's fc_norm (timm's pooling 'token');
    "avg"        timm's pooling 'avg' (the mean of the patch tokens; prefix tokens too only
                 for a model built with `pool_include_prefix`), then the head's fc_norm: what
                 `forward_head(pre_logits=True)` gives for the network built with
                 global_pool='avg';
    "tokens-mean" the plain mean of the patch tokens (prefix tokens never), nothing after.
  On a ViT without fc_norm and without pool_include_prefix (timm's default 'token' ViTs)
  "avg" and "tokens-mean" give the same numbers, under two provenances. The logits, when the
  checkpoint has a head and no `layer` is given, stay the network's own (its head on its own
  pooling), whatever `pool` says.
- `tta "flip"`: the batch and its horizontal mirror go through the network as one doubled
  batch; each frame's features (and logits) are the mean of the two.
"""

from dataclasses import dataclass

import torch
from timm.layers import global_pool_nlc

from fercache.backbone.network import ViewPair
from fercache.errors import FercacheError

POOLS = ("avg", "cls", "tokens-mean")
TTAS = ("flip",)


@dataclass(frozen=True)
class Readout:
    """What to read: layer -1 is the pooled output; pool "" the network's own; tta "" none."""

    layer: int = -1
    pool: str = ""
    tta: str = ""

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_READOUT


DEFAULT_READOUT = Readout()


def is_token_model(model: torch.nn.Module) -> bool:
    """A ViT-like timm model: its blocks carry (B, L, D) tokens, prefix tokens first."""
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks")


def intermediates(model: torch.nn.Module) -> int:
    """How many intermediates timm's `forward_intermediates` offers (0: none)."""
    if not hasattr(model, "forward_intermediates"):
        return 0
    return len(getattr(model, "feature_info", None) or ())


def check_readout(model: torch.nn.Module, name: str, readout: Readout, feature_dim: int) -> int:
    """Refuse a readout the network cannot give (one-line FercacheError); its feature width."""
    if readout.tta not in ("", *TTAS):
        raise FercacheError(f"--tta takes {' or '.join(TTAS)}, not '{readout.tta}'")
    if readout.pool not in ("", *POOLS):
        raise FercacheError(f"--pool takes {', '.join(POOLS)}, not '{readout.pool}'")
    if readout.layer == -1 and not readout.pool:
        return feature_dim
    if isinstance(model, ViewPair):
        raise FercacheError(
            "--layer and --pool are not available for a two-view checkpoint (views: 2)"
        )
    if readout.pool and not is_token_model(model):
        raise FercacheError(
            f"--pool {readout.pool}: '{name}' is not a token model (a ViT); its feature maps "
            "are averaged over space. Leave --pool out."
        )
    if readout.pool == "cls" and getattr(model, "cls_token", None) is None:
        raise FercacheError(
            f"--pool cls: '{name}' has no class token; use --pool avg or tokens-mean"
        )
    if readout.layer == -1:
        return feature_dim
    count = intermediates(model)
    if not count:
        raise FercacheError(
            f"--layer: '{name}' offers no intermediates (timm's forward_intermediates)"
        )
    if not 0 <= readout.layer < count:
        raise FercacheError(
            f"--layer {readout.layer}: '{name}' has intermediates 0 to {count - 1} "
            f"(timm's forward_intermediates); leave --layer out for the pooled output"
        )
    return int(model.feature_info[readout.layer]["num_chs"])


def forward_readout(
    model: torch.nn.Module, batch: torch.Tensor, with_logits: bool, readout: Readout
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (B, D) and logits (B, C) or None of the readout, on a checked model."""
    if readout.tta == "flip":
        batch = torch.cat([batch, batch.flip(-1)])
    if readout.layer >= 0:
        features, logits = _intermediate(model, batch, readout), None
    else:
        tokens = model.forward_features(batch)
        pooled = model.forward_head(tokens, pre_logits=True)
        features = _pool_tokens(model, tokens, readout.pool) if readout.pool else pooled
        logits = model.get_classifier()(pooled) if with_logits else None
    if readout.tta == "flip":
        features = features.float().unflatten(0, (2, -1)).mean(0)
        if logits is not None:
            logits = logits.float().unflatten(0, (2, -1)).mean(0)
    return features, logits


def _intermediate(model: torch.nn.Module, batch: torch.Tensor, readout: Readout) -> torch.Tensor:
    if not is_token_model(model):
        (maps,) = model.forward_intermediates(
            batch, indices=[readout.layer], stop_early=True, intermediates_only=True
        )
        return maps.mean(dim=(2, 3))
    (taken,) = model.forward_intermediates(
        batch,
        indices=[readout.layer],
        return_prefix_tokens=True,
        norm=True,
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    tokens = torch.cat([taken[1], taken[0]], dim=1) if isinstance(taken, tuple) else taken
    if readout.pool:
        return _pool_tokens(model, tokens, readout.pool)
    return model.forward_head(tokens, pre_logits=True)


def _pool_tokens(model: torch.nn.Module, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    prefix = int(model.num_prefix_tokens)
    if pool == "tokens-mean":
        return tokens[:, prefix:].mean(dim=1)
    pooled = global_pool_nlc(
        tokens,
        pool_type="token" if pool == "cls" else "avg",
        num_prefix_tokens=prefix,
        reduce_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
    )
    fc_norm = getattr(model, "fc_norm", None)
    return fc_norm(pooled) if fc_norm is not None else pooled
