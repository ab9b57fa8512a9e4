"""Meta Pseudo Labels as Yu, Wei and Cai use it (Exploring Facial Expression Recognition through
Semi-Supervised Pretraining and Temporal Modeling): a teacher and a student, SGD each; the
teacher learns from the labelled batch, UDA consistency on unlabelled faces and the student's
feedback; the student learns only the teacher's pseudo labels, then optionally fine-tunes alone
on the labels for the last `student_finetune_steps` steps (MPL's last stage)."""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fercache.distributed import Ranks
from fercache.pretrain.config import PretrainConfig
from fercache.pretrain.recipe_base import (
    NUM_CLASSES,
    Autocast,
    Metrics,
    ModelFactory,
    Recipe,
    StepBatch,
    optimizer_for,
    placed,
    unwrap,
    warmup_cosine,
)
from fercache.pretrain.supervised import fit_labels


@dataclass(frozen=True)
class MplSettings:
    temperature: float  # of the teacher's soft pseudo labels on the weak view
    threshold: float  # confidence below which an image adds no consistency loss
    lambda_u: float  # weight of the consistency loss once ramped in
    uda_steps: int  # steps over which the consistency weight ramps linearly to lambda_u
    feedback_sign: int  # +1: f = old - new (Yu et al. eq. 6); -1: f = new - old
    label_smoothing: float = 0.0  # of the teacher's cross-entropy on the labelled batch


@dataclass(frozen=True)
class MplBatch:
    labelled: torch.Tensor  # (B, 3, H, W), class-balanced
    labels: torch.Tensor  # (B,)
    weak: torch.Tensor  # (μB, 3, H, W) weak view of the unlabelled images
    strong: torch.Tensor  # (μB, 3, H, W) strong view of the same images


class DistributionAlignment(nn.Module):
    """Distribution alignment of ReMixMatch (Berthelot et al. 2020): the teacher's weak-view
    class distributions are multiplied by (target shares / their running mean) and renormalised
    before they become pseudo labels. The target is uniform, the shares the class-balanced
    labelled batches teach. Without it the teacher's confident mistakes on the unlabelled faces
    feed on themselves until one class takes most pseudo labels (confirmation bias).
    """

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.running.mul_(self.momentum).add_(probabilities.mean(0), alpha=1 - self.momentum)
        aligned = probabilities / self.running / len(self.running)
        return aligned / aligned.sum(dim=1, keepdim=True)


def consistency_weight(settings: MplSettings, step: int) -> float:
    return settings.lambda_u * min(1.0, (step + 1) / max(1, settings.uda_steps))


def feedback_loss(teacher_strong_logits: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f · CE(teacher strong logits, their own argmax): its gradient is f times that CE's."""
    hard = teacher_strong_logits.detach().argmax(dim=1)
    return f.detach() * F.cross_entropy(teacher_strong_logits, hard)


def mpl_step(
    teacher: nn.Module,
    student: nn.Module,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    batch: MplBatch,
    settings: MplSettings,
    step: int,
    autocast: Autocast,
    alignment: DistributionAlignment | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher forward, student step on hard pseudo labels, feedback, teacher step.

    The student learns the arg-max of the teacher's weak-view distribution (the pseudo label
    comes from the weak view, as in Face2Exp's and MPL's reference code). The feedback term
    reinforces the arg-max of the teacher's own strong-view logits (Yu et al. eq. 5). Not one
    label for both: a strong view is often unrecognisable (RandAugment plus erasing), so
    strong-view labels would teach the student mostly noise.
    """
    labelled_count, unlabelled_count = len(batch.labelled), len(batch.weak)
    with autocast():
        teacher_logits = teacher(torch.cat([batch.labelled, batch.weak, batch.strong])).float()
    t_labelled, t_weak, t_strong = teacher_logits.split(
        [labelled_count, unlabelled_count, unlabelled_count]
    )
    t_supervised = F.cross_entropy(
        t_labelled, batch.labels, label_smoothing=settings.label_smoothing
    )
    weak_log_probs = pseudo_log_probabilities(t_weak, alignment)
    t_consistency, mask = consistency_loss(weak_log_probs, t_strong, settings)
    hard_pseudo = weak_log_probs.argmax(dim=1)

    s_old = labelled_loss(student, batch, autocast)
    with autocast():
        # the labelled images go through with the strong views, as in the MPL reference code:
        # batch norm's running statistics then describe clean faces too, not strong views alone
        s_strong = student(torch.cat([batch.labelled, batch.strong])).float()[labelled_count:]
    s_unlabelled = F.cross_entropy(s_strong, hard_pseudo)
    student_optimizer.zero_grad(set_to_none=True)
    s_unlabelled.backward()
    student_optimizer.step()
    s_new = labelled_loss(student, batch, autocast)

    f = settings.feedback_sign * (s_old - s_new)
    t_feedback = feedback_loss(t_strong, f)
    t_loss = t_supervised + consistency_weight(settings, step) * t_consistency + t_feedback
    teacher_optimizer.zero_grad(set_to_none=True)
    t_loss.backward()
    teacher_optimizer.step()
    return {
        "teacher_loss": t_loss.detach(),
        "teacher_supervised": t_supervised.detach(),
        "teacher_consistency": t_consistency.detach(),
        "teacher_feedback": t_feedback.detach(),
        "student_unlabelled": s_unlabelled.detach(),
        "student_labelled_old": s_old,
        "student_labelled_new": s_new,
        "feedback": f,
        "mask_ratio": mask.mean(),
    }


@torch.no_grad()
def pseudo_log_probabilities(
    t_weak: torch.Tensor, alignment: DistributionAlignment | None
) -> torch.Tensor:
    """Log of the teacher's weak-view class distribution, aligned when `alignment` is given."""
    log_probs = F.log_softmax(t_weak.detach(), dim=1)
    return log_probs if alignment is None else torch.log(alignment(log_probs.exp()))


def consistency_loss(
    weak_log_probs: torch.Tensor, t_strong: torch.Tensor, settings: MplSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA: CE between the sharpened weak-view distribution (no gradient) and the strong-view
    prediction, counting only images whose weak confidence reaches the threshold; and the mask."""
    soft_pseudo = torch.softmax(weak_log_probs / settings.temperature, dim=1)
    mask = (soft_pseudo.max(dim=1).values >= settings.threshold).float()
    per_image = -(soft_pseudo * F.log_softmax(t_strong, dim=1)).sum(dim=1)
    return (per_image * mask).mean(), mask


@torch.no_grad()
def labelled_loss(student: nn.Module, batch: MplBatch, autocast: Autocast) -> torch.Tensor:
    """The student's CE on the labelled batch, measured in train mode (as it is trained) but
    leaving batch-norm running statistics as they were: `old` and `new` differ only by the
    student's step, and the statistics extraction will use see only the training batches."""
    buffers = [buffer.clone() for buffer in student.buffers()]
    with autocast():
        logits = student(batch.labelled).float()
    for buffer, saved in zip(student.buffers(), buffers, strict=True):
        buffer.copy_(saved)
    return F.cross_entropy(logits, batch.labels)


class Mpl(Recipe):
    uses_unlabelled = True
    description = "teacher/student with feedback, the default"

    teacher: nn.Module  # as placed: DDP-wrapped under torchrun
    model: nn.Module  # the student, as placed
    teacher_optimizer: torch.optim.Optimizer
    optimizer: torch.optim.Optimizer
    alignment: DistributionAlignment | None = None

    def check(self) -> None:
        """Every setting applies (student_finetune_steps included)."""

    def draws_unlabelled(self, step: int) -> bool:
        # after the MPL steps the student fine-tunes alone: no unlabelled batch is drawn
        return step < self.config.mpl_steps

    def evaluates_after(self, step: int) -> bool:
        # the last MPL step before the student's fine-tuning: what MPL alone gave
        return self.config.student_finetune_steps > 0 and step == self.config.mpl_steps

    def build(self, create: ModelFactory, ranks: Ranks) -> None:
        config = self.config
        student = create(config.seed)
        teacher = create(config.seed + 1)
        self.optimizer = optimizer_for(student, config.student_lr, config)
        self.teacher_optimizer = optimizer_for(teacher, config.teacher_lr, config)
        self._schedule(self.optimizer, partial(mpl_student_lr_factor, config=config))
        # the teacher's cosine ends with the MPL steps: it does not learn while the student
        # fine-tunes
        self._schedule(
            self.teacher_optimizer,
            partial(warmup_cosine, warmup=config.warmup_steps, total=config.mpl_steps),
        )
        self._average(student, ranks.device)
        self.model, self.teacher = placed(student, ranks), placed(teacher, ranks)
        if config.distribution_alignment:
            self.alignment = DistributionAlignment(NUM_CLASSES).to(ranks.device)

    def train_step(self, batch: StepBatch, step: int, autocast: Autocast) -> Metrics:
        if batch.weak is None:  # the student's fine-tuning on the labels
            return fit_labels(self.model, self.optimizer, batch, autocast, self.config)
        settings = MplSettings(
            self.config.temperature,
            self.config.threshold,
            self.config.lambda_u,
            self.config.uda_steps,
            self.config.feedback_sign,
            self.config.label_smoothing,
        )
        return mpl_step(
            self.teacher,
            self.model,
            self.teacher_optimizer,
            self.optimizer,
            MplBatch(batch.images, batch.labels, batch.weak, batch.strong),
            settings,
            step,
            autocast,
            self.alignment,
        )

    def student(self) -> nn.Module:
        return unwrap(self.model)

    def evaluated(self) -> dict[str, nn.Module]:
        return super().evaluated() | {"teacher": unwrap(self.teacher)}

    def exported(self) -> dict[str, nn.Module]:
        return super().exported() | {"teacher": unwrap(self.teacher)}

    def learning_rates(self) -> dict[str, float]:
        return {
            "student": self.optimizer.param_groups[0]["lr"],
            "teacher": self.teacher_optimizer.param_groups[0]["lr"],
        }

    def state_dict(self) -> dict:
        state = {
            "student": self.student().state_dict(),
            "student_optimizer": self.optimizer.state_dict(),
            "teacher": unwrap(self.teacher).state_dict(),
            "teacher_optimizer": self.teacher_optimizer.state_dict(),
            **self._common_state(),
        }
        if self.alignment is not None:
            state["alignment"] = self.alignment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student().load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["student_optimizer"])
        unwrap(self.teacher).load_state_dict(state["teacher"])
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        if self.alignment is not None:
            self.alignment.load_state_dict(state["alignment"])
        self._load_common_state(state)


def mpl_student_lr_factor(step: int, config: PretrainConfig) -> float:
    """The MPL student's lr / student_lr: 0 for `student_wait_steps` (Face2Exp / MPL practice:
    the teacher's pseudo labels mean nothing yet), warm-up and cosine over the MPL steps left,
    then a fresh cosine from `student_finetune_lr` over the fine-tuning steps (MPL's last
    stage: the student meets the labels themselves)."""
    wait, mpl_steps = config.student_wait_steps, config.mpl_steps
    if step < wait:
        return 0.0
    if step >= mpl_steps and config.student_finetune_steps > 0:
        finetune_scale = config.student_finetune_lr / config.student_lr
        return finetune_scale * warmup_cosine(step - mpl_steps, 0, config.student_finetune_steps)
    return warmup_cosine(step - wait, config.warmup_steps, mpl_steps - wait)
