"""The one-network semi-supervised recipes (FixMatch, plain pseudo-labelling) and the short-budget
optimisation every demo row shares (AdamW, label smoothing)."""

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from fercache.distributed import Ranks
from fercache.errors import FercacheError
from fercache.pretrain import PretrainConfig, load_config, pretrain
from fercache.pretrain.recipe_base import StepBatch, optimizer_for
from fercache.pretrain.registry import recipe_for
from fercache.pretrain.supervised import supervised_step
from fercache.synth import SynthConfig, generate

TREE = SynthConfig(videos=4, frames=64, seed=3, labelled_pool=48, unlabelled_pool=32, workers=1)
RUN = {"batch_size": 16, "workers": 0, "steps": 4, "eval_every": 4, "log_every": 2}
RUN |= {"checkpoint_every": 2, "backbone": "test_resnet", "image_size": 32, "mu": 1}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixmatch") / "tree"
    generate(root, TREE, progress=False)
    return root


def _built(recipe: str, **settings) -> object:
    config = PretrainConfig(recipe=recipe, backbone="test_resnet", **settings)
    built = recipe_for(config)

    def create(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return timm.create_model("test_resnet", num_classes=8)

    built.build(create, Ranks(rank=0, world_size=1, device=torch.device("cpu")))
    return built


def _batch(seed: int = 0) -> StepBatch:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    weak = torch.randn(6, 3, 32, 32, generator=generator)
    strong = weak + 0.5 * torch.randn(6, 3, 32, 32, generator=generator)
    return StepBatch(images, torch.arange(8) % 8, None, weak, strong)


def _loss_gradient(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(("recipe", "fitted"), [("fixmatch", "strong"), ("pseudo-label", "weak")])
def test_the_unlabelled_term_fits_the_confident_weak_arg_max(recipe, fitted):
    """Loss = CE on the labels + weight * mean over the unlabelled images of mask * CE(fitted
    view, weak-view arg-max); the gradient of one step is that loss's, computed here apart."""
    built = _built(recipe, threshold=0.0, lambda_u=2.0, uda_steps=1, label_smoothing=0.1)
    model, batch = built.model, _batch()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(torch.cat([batch.images, batch.weak, getattr(batch, fitted)]))
    labelled, weak, fitted_logits = logits.split([8, 6, 6])
    pseudo = weak.detach().argmax(dim=1)
    expected = F.cross_entropy(labelled, batch.labels, label_smoothing=0.1)
    expected = expected + 2.0 * F.cross_entropy(fitted_logits, pseudo)
    expected_gradient = _loss_gradient(model, expected)

    model.load_state_dict(reference)
    built.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights
    metrics = built.train_step(batch, step=0, autocast=nullcontext)
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(got, expected_gradient, atol=1e-5)
    assert metrics["mask_ratio"] == 1.0


def test_images_below_the_threshold_teach_nothing():
    built = _built("fixmatch", threshold=1.0, label_smoothing=0.0)
    model, batch = built.model, _batch(1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(torch.cat([batch.images, batch.weak, batch.strong]))[:8]
    supervised_only = F.cross_entropy(logits, batch.labels)
    expected = _loss_gradient(model, supervised_only)
    model.load_state_dict(reference)
    built.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = built.train_step(batch, step=0, autocast=nullcontext)
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert metrics["mask_ratio"] == 0.0 and float(metrics["student_unlabelled"]) == 0.0
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("recipe", ["fixmatch", "pseudo-label"])
def test_a_run_learns_checkpoints_resumes_and_exports_one_student(recipe, tree, tmp_path):
    labelled = [tree / "pools" / "labelled.csv"]
    unlabelled = [tree / "pools" / "unlabelled"]
    settings = {**RUN, "recipe": recipe, "distribution_alignment": True}
    run = tmp_path / "run"
    pretrain(labelled, unlabelled, run, PretrainConfig(**{**settings, "steps": 2}), progress=False)
    report = pretrain(
        labelled, unlabelled, run, PretrainConfig(**settings), resume=True, progress=False
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [record["step"] for record in records] == [2, 4]
    assert all(np.isfinite(r["student_supervised"]) and 0 <= r["mask_ratio"] <= 1 for r in records)
    assert set(report.evaluation) == {"student_accuracy", "student_f1"}
    assert (run / "student.safetensors").is_file() and not (run / "teacher.safetensors").exists()


def test_adamw_and_label_smoothing_are_settings_of_every_one_network_recipe():
    model = torch.nn.Linear(4, 8)
    adamw = optimizer_for(model, 0.01, PretrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    assert isinstance(optimizer_for(model, 0.01, PretrainConfig()), torch.optim.SGD)
    images, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4])
    expected = F.cross_entropy(model(images), labels, label_smoothing=0.2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = supervised_step(model, sgd, images, labels, nullcontext, 0.2)
    assert torch.isclose(metrics["student_supervised"], expected.detach())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optimizer=adam", "optimizer must be one of sgd, adamw"),
        ("label_smoothing=1", "label_smoothing must lie in"),
    ],
)
def test_bad_optimisation_settings_are_refused(setting, message):
    with pytest.raises(FercacheError, match=message):
        load_config(None, [setting])


@pytest.mark.parametrize("recipe", ["fixmatch", "pseudo-label"])
def test_a_threshold_label_smoothing_puts_out_of_reach_is_refused(recipe):
    # smoothing 0.1 over 8 classes trains towards 0.9125 at most: 0.95 would mask every image
    with pytest.raises(FercacheError, match=r"threshold 0\.95 is out of reach.*below 0\.9125"):
        recipe_for(PretrainConfig(recipe=recipe, label_smoothing=0.1, threshold=0.95))
    assert recipe_for(PretrainConfig(recipe=recipe, label_smoothing=0.1, threshold=0.9))
    assert recipe_for(PretrainConfig(recipe=recipe, label_smoothing=0.0, threshold=0.95))
