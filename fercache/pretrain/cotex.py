"""Masked CoTEX (Li et al. §3.3): two ViTs trained on labelled faces, each seeing its own random
subset of patch tokens (MAE-style: the dropped tokens are gone, no mask tokens stand in);
loss = mean cross-entropy of the two views + λ · Jensen-Shannon divergence of their softmax
outputs. At inference nothing is masked and the two views' logits are summed.
"""

import math

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn

from fercache.backbone.network import ViewPair
from fercache.errors import FercacheError
from fercache.pretrain.finetune import FineTune
from fercache.pretrain.recipe_base import Autocast, ModelFactory


def keep_random_tokens(tokens: torch.Tensor, mask_ratio: float, prefix_tokens: int) -> torch.Tensor:
    """Each sample keeps its prefix tokens (class, registers) and round(L·(1-r)) of its L patch
    tokens (at least one), a random subset per sample (argsort of uniform noise) in their
    original order. With r = 0 the tokens come back unchanged."""
    prefix, patches = tokens[:, :prefix_tokens], tokens[:, prefix_tokens:]
    batch, length, width = patches.shape
    keep = max(1, round(length * (1 - mask_ratio)))
    noise = torch.rand(batch, length, device=tokens.device)
    kept = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
    return torch.cat([prefix, patches], dim=1)


def masked_logits(vit: VisionTransformer, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """timm's ViT forward with token dropping after the position embeddings are added:
    patch_embed → pos_embed (+ class token) → keep a subset → blocks → norm → head."""
    tokens = vit._pos_embed(vit.patch_embed(images))
    tokens = vit.norm_pre(keep_random_tokens(tokens, mask_ratio, vit.num_prefix_tokens))
    return vit.forward_head(vit.norm(vit.blocks(tokens)))


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per sample, JS(p, q) = (KL(p‖m) + KL(q‖m)) / 2 with m = (p + q) / 2, p and q the
    softmax of the logits (natural log: 0 for equal views, at most ln 2)."""
    log_p = F.log_softmax(logits_a, dim=1)
    log_q = F.log_softmax(logits_b, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return (kl_p + kl_q) / 2


class MaskedCoTex(ViewPair):
    """Two ViTs. Called plainly (evaluation, extraction): unmasked, the views' logits summed.
    With `train_outputs=True`: each view's logits on its own random token subset, (2, B, C)."""

    def __init__(self, views: list[VisionTransformer], mask_ratio: float) -> None:
        super().__init__(views)
        self.mask_ratio = mask_ratio

    def forward(self, images: torch.Tensor, train_outputs: bool = False) -> torch.Tensor:
        if not train_outputs:
            return super().forward(images)
        return torch.stack([masked_logits(view, images, self.mask_ratio) for view in self.views])


class CoTex(FineTune):
    description = "two masked ViTs + JS consistency, Li et al."

    def network(self, create: ModelFactory) -> nn.Module:
        views = [create(self.config.seed + index, **self.timm_options()) for index in range(2)]
        if not isinstance(views[0], VisionTransformer):
            raise FercacheError(
                f"recipe cotex drops patch tokens, so it needs a timm ViT backbone (e.g. "
                f"vit_base_patch16_224); '{self.config.backbone}' is a {type(views[0]).__name__}"
            )
        return MaskedCoTex(views, self.config.mask_ratio)

    def trained_parts(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        return list(model.views), []

    def losses(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None,
        autocast: Autocast,
    ) -> dict[str, torch.Tensor]:
        with autocast():
            first, second = model(images, train_outputs=True).float()
        cross_entropy = (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)) / 2
        js = js_divergence(first, second).mean()
        return {"loss": cross_entropy + self.config.js_weight * js, "ce": cross_entropy, "js": js}

    def export_part(self, model: nn.Module) -> nn.Module:
        # a MaskedCoTex has the state keys of the ViewPair that extraction builds
        return model if self.config.cotex_export == "both" else model.views[0]

    def export_keys(self) -> dict:
        views = {"views": 2} if self.config.cotex_export == "both" else {}
        return super().export_keys() | views
