"""One network that teaches itself on the unlabelled faces: FixMatch (Sohn et al. 2020) and plain
pseudo-labelling (Lee 2013), the references Meta Pseudo Labels is measured against.

Each step the network's own weak-view arg-max on the unlabelled images becomes their label
where its confidence reaches `threshold`; FixMatch fits the strong view of the image to it,
pseudo-labelling the weak view itself. The labelled batch is learnt as by the supervised
baseline, and the unlabelled term ramps in over `uda_steps` to `lambda_u`. The exported student
is that one network.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F

from fercache.distributed import Ranks
from fercache.errors import FercacheError
from fercache.pretrain.mpl import DistributionAlignment, pseudo_log_probabilities
from fercache.pretrain.recipe_base import NUM_CLASSES, Autocast, Metrics, ModelFactory, StepBatch
from fercache.pretrain.supervised import Supervised


class FixMatch(Supervised):
    """The supervised baseline's network and optimizer, plus the unlabelled term."""

    uses_unlabelled = True
    description = (
        "one network fitting its own confident predictions on the unlabelled images' strong view"
    )
    fits_strong_view: ClassVar[bool] = True  # False: the weak view (plain pseudo-labelling)
    alignment: DistributionAlignment | None = None

    def check(self) -> None:
        """Refuse a `threshold` label smoothing puts out of reach: trained towards 1 - e + e/C
        on its labelled images, the network's confidence settles below that, so no unlabelled
        image would count and the recipe would be the supervised baseline."""
        super().check()
        smoothing, threshold = self.config.label_smoothing, self.config.threshold
        reachable = 1 - smoothing + smoothing / NUM_CLASSES
        if smoothing > 0 and threshold >= reachable:
            raise FercacheError(
                f"pretrain settings: threshold {threshold:g} is out of reach of "
                f"{self.config.recipe}: with label_smoothing {smoothing:g} the network learns "
                f"to be at most {reachable:.4g} sure of a class (1 - {smoothing:g} + {smoothing:g}/"
                f"{NUM_CLASSES}), so no unlabelled image would count; set threshold below "
                f"{reachable:.4g}, or label_smoothing=0"
            )

    def build(self, create: ModelFactory, ranks: Ranks) -> None:
        super().build(create, ranks)
        if self.config.distribution_alignment:
            self.alignment = DistributionAlignment(NUM_CLASSES).to(ranks.device)

    def train_step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        assert batch.weak is not None and batch.strong is not None
        config = self.config
        fitted = batch.strong if self.fits_strong_view else batch.weak
        count, unlabelled = len(batch.images), len(batch.weak)
        with autocast():
            logits = self.model(torch.cat([batch.images, batch.weak, fitted])).float()
        labelled, weak, fitted_logits = logits.split([count, unlabelled, unlabelled])
        log_probs = pseudo_log_probabilities(weak, self.alignment)
        confidence, pseudo = log_probs.exp().max(dim=1)
        mask = (confidence >= config.threshold).float()
        supervised = F.cross_entropy(labelled, batch.labels, label_smoothing=config.label_smoothing)
        per_image = F.cross_entropy(fitted_logits, pseudo, reduction="none")
        weight = config.lambda_u * min(1.0, (step + 1) / max(1, config.uda_steps))
        unsupervised = (per_image * mask).mean()
        loss = supervised + weight * unsupervised
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {
            "student_supervised": supervised.detach(),
            "student_unlabelled": unsupervised.detach(),
            "mask_ratio": mask.mean(),
        }

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.alignment is not None:
            state["alignment"] = self.alignment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.alignment is not None:
            self.alignment.load_state_dict(state["alignment"])


class PseudoLabel(FixMatch):
    description = "the same on the weak view"
    fits_strong_view = False
