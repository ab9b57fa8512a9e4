"""Phase-1 pretraining: the MPL step against a hand computation, balanced sampling, sources that
report bad entries, a short run on the synthetic pools, the exported student, resume, DDP."""

import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from fercache.backbone.network import DataConfig, load_backbone
from fercache.cli import app
from fercache.data.tasks import EXPR_CLASSES
from fercache.distributed import Ranks
from fercache.errors import FercacheError
from fercache.pretrain import PretrainConfig, load_config, loop, pretrain
from fercache.pretrain.loop import Progress, _load_state, _save_state
from fercache.pretrain.mpl import (
    DistributionAlignment,
    Mpl,
    MplBatch,
    MplSettings,
    consistency_weight,
    feedback_loss,
    labelled_loss,
    mpl_step,
)
from fercache.pretrain.registry import recipe_for
from fercache.pretrain.sampling import BalancedBatchSampler, holdout_split
from fercache.pretrain.sources import other_from_videos_only, read_labelled, read_unlabelled
from fercache.pretrain.views import LabelledDataset, build_views, data_config_of, strong_augment
from tests.holder import another_process_holding

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# tiny but real: a timm ResNet at 32 px, a few steps, no loader processes
TINY = {
    "backbone": "resnet10t",
    "image_size": 32,
    "batch_size": 16,
    "mu": 1,
    "workers": 0,
    "eval_every": 4,
    "log_every": 2,
    "checkpoint_every": 4,
}


# --- the step, by hand ---------------------------------------------------------------------


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
    )


def _fixed_batch() -> MplBatch:
    generator = torch.Generator().manual_seed(1)
    # a colour offset per image, so the teacher's arg-max differs between images and views
    count = 16 + 2 * 12
    images = torch.randn(count, 3, 6, 6, generator=generator)
    images += 2 * torch.randn(count, 3, 1, 1, generator=generator)
    labels = torch.arange(16) % 8
    return MplBatch(images[:16], labels, images[16:28], images[28:])


SETTINGS = MplSettings(temperature=0.7, threshold=0.2, lambda_u=1.0, uda_steps=4, feedback_sign=1)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def _step(settings: MplSettings):
    teacher, student = _tiny_net(1), _tiny_net(2)
    batch = _fixed_batch()
    t_opt = torch.optim.SGD(teacher.parameters(), lr=1.0)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = (copy.deepcopy(teacher), copy.deepcopy(student))
    metrics = mpl_step(teacher, student, t_opt, s_opt, batch, settings, 1, _no_autocast)
    return metrics, batch, before, (teacher, student)


def _teacher_logits(teacher: nn.Module, batch: MplBatch):
    logits = teacher(torch.cat([batch.labelled, batch.weak, batch.strong]))
    return logits.split([16, 12, 12])


def test_feedback_is_the_students_labelled_loss_before_minus_after_its_step():
    metrics, batch, (teacher0, student0), (_, student1) = _step(SETTINGS)

    # by hand: the student's SGD step, on its strong view, towards the arg-max of the teacher's
    # weak view (the strong view's arg-max differs here: the check tells the two apart)
    _, t_weak, t_strong = _teacher_logits(copy.deepcopy(teacher0), batch)
    hard = t_weak.argmax(dim=1)
    assert (hard != t_strong.argmax(dim=1)).any()
    manual = copy.deepcopy(student0)
    old = F.cross_entropy(copy.deepcopy(manual)(batch.labelled), batch.labels)
    # the strong views go through beside the labelled images (batch norm sees both)
    loss = F.cross_entropy(manual(torch.cat([batch.labelled, batch.strong]))[16:], hard)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    with torch.no_grad():
        for parameter, grad in zip(manual.parameters(), grads, strict=True):
            parameter -= 0.5 * grad
    new = F.cross_entropy(copy.deepcopy(manual)(batch.labelled), batch.labels)

    for mine, theirs in zip(manual.parameters(), student1.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(metrics["student_labelled_old"], old.detach())
    torch.testing.assert_close(metrics["student_labelled_new"], new.detach())
    torch.testing.assert_close(metrics["feedback"], (old - new).detach())
    assert abs(float(metrics["feedback"])) > 1e-6  # the check is not vacuous

    flipped, *_ = _step(MplSettings(**{**SETTINGS.__dict__, "feedback_sign": -1}))
    torch.testing.assert_close(flipped["feedback"], -metrics["feedback"])


def test_teacher_gradient_is_supervised_plus_consistency_plus_f_times_its_own_argmax_ce():
    metrics, batch, (teacher0, _), (teacher1, _) = _step(SETTINGS)
    f = float(metrics["feedback"])

    def grads_of(loss_of) -> list[torch.Tensor]:
        model = copy.deepcopy(teacher0)
        return torch.autograd.grad(
            loss_of(*_teacher_logits(model, batch)), list(model.parameters())
        )

    def rest(t_labelled, t_weak, t_strong):  # written independently of mpl.consistency_loss
        target = torch.softmax(t_weak.detach() / 0.7, dim=1)
        keep = target.max(dim=1).values >= 0.2
        per_image = F.cross_entropy(t_strong, target, reduction="none") * keep
        weight = consistency_weight(SETTINGS, 1)
        return F.cross_entropy(t_labelled, batch.labels) + weight * per_image.mean()

    def own_argmax_ce(_, __, t_strong):
        return F.cross_entropy(t_strong, t_strong.detach().argmax(dim=1))

    g_rest, g_feedback = grads_of(rest), grads_of(own_argmax_ce)
    # SGD with lr 1 and no momentum: the teacher moved by minus its whole gradient
    for p0, p1, r, g in zip(
        teacher0.parameters(), teacher1.parameters(), g_rest, g_feedback, strict=True
    ):
        torch.testing.assert_close(p0 - p1, r + f * g)


def test_feedback_loss_gradient_is_f_times_the_ce_gradient_numerically():
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    f = torch.tensor(-0.37, dtype=torch.float64)
    (grad,) = torch.autograd.grad(feedback_loss(logits, f), logits)
    hard = logits.detach().argmax(dim=1)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(logits, hard), logits)
    torch.testing.assert_close(grad, f * ce_grad)
    # central finite differences of f * CE(z, argmax z) (the argmax held fixed)
    eps, numeric = 1e-6, torch.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        step = torch.zeros_like(logits)
        step[index] = eps
        up = f * F.cross_entropy(logits.detach() + step, hard)
        down = f * F.cross_entropy(logits.detach() - step, hard)
        numeric[index] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-5)


def test_the_students_batch_norm_statistics_see_the_labelled_images_too():
    """Trained on strong views alone, the student's running statistics described RandAugment
    output, not the faces extraction feeds it (results/demo.md: recomputing them on clean faces
    lifted such a student's validation F1 to its teacher's)."""
    _, batch, (_, student0), (_, student1) = _step(SETTINGS)
    joint, strong_only = copy.deepcopy(student0), copy.deepcopy(student0)
    joint(torch.cat([batch.labelled, batch.strong]))
    strong_only(batch.strong)
    torch.testing.assert_close(student1[1].running_mean, joint[1].running_mean)
    assert not torch.allclose(student1[1].running_mean, strong_only[1].running_mean)


def test_distribution_alignment_divides_by_the_running_mean_and_renormalises():
    align = DistributionAlignment(4, momentum=0.5)
    probabilities = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    aligned = align(probabilities)
    running = 0.5 * 0.25 + 0.5 * probabilities.mean(0)
    expected = probabilities / running
    torch.testing.assert_close(align.running, running)
    torch.testing.assert_close(aligned, expected / expected.sum(1, keepdim=True))
    for _ in range(20):  # a teacher that keeps favouring class 0 has it pulled down
        aligned = align(probabilities)
    assert aligned[:, 0].mean() < 0.4 < probabilities[:, 0].mean()


def test_aligned_pseudo_labels_teach_the_student_the_aligned_arg_max():
    teacher, student = _tiny_net(1), _tiny_net(2)
    batch = _fixed_batch()
    align = DistributionAlignment(8, momentum=0.0)  # aligns to this batch's own mean
    with torch.no_grad():
        weak = torch.softmax(
            copy.deepcopy(teacher)(torch.cat([batch.labelled, batch.weak, batch.strong]))[16:28], 1
        )
    aligned = weak / weak.mean(0)
    expected_hard = aligned.argmax(1)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.5)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=1.0)
    manual = copy.deepcopy(student)
    mpl_step(teacher, student, t_opt, s_opt, batch, SETTINGS, 1, _no_autocast, align)
    loss = F.cross_entropy(manual(torch.cat([batch.labelled, batch.strong]))[16:], expected_hard)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    for parameter, grad, stepped in zip(
        manual.parameters(), grads, student.parameters(), strict=True
    ):
        torch.testing.assert_close(parameter - 0.5 * grad, stepped)
    assert not torch.equal(expected_hard, weak.argmax(1))  # alignment changed some labels


def _tiny_mpl(config: PretrainConfig) -> Mpl:
    """An MPL recipe on tiny networks (student from seed 0, teacher from seed 1)."""
    recipe = Mpl(config)
    recipe.build(_tiny_net, Ranks(rank=0, world_size=1, device=torch.device("cpu")))
    return recipe


def test_the_alignment_running_mean_survives_a_restart(tmp_path):
    config = PretrainConfig(steps=10, distribution_alignment=True)
    recipe = _tiny_mpl(config)
    recipe.alignment(torch.softmax(torch.randn(6, 8), dim=1))
    _save_state(tmp_path, recipe, Progress(step=3))
    restarted = _tiny_mpl(config)
    assert not torch.equal(restarted.alignment.running, recipe.alignment.running)
    assert _load_state(tmp_path, restarted).step == 3
    torch.testing.assert_close(restarted.alignment.running, recipe.alignment.running)
    assert _tiny_mpl(PretrainConfig(steps=10)).alignment is None


def test_measuring_the_labelled_loss_leaves_batch_norm_statistics_alone():
    student, batch = _tiny_net(2), _fixed_batch()
    before = [buffer.clone() for buffer in student.buffers()]
    labelled_loss(student, batch, _no_autocast)
    for saved, now in zip(before, student.buffers(), strict=True):
        torch.testing.assert_close(saved, now)


# --- sampling -----------------------------------------------------------------------------


def _learning_rates(config: PretrainConfig) -> tuple[list[float], list[float]]:
    """The student's and the teacher's lr at each step of an MPL run with `config`."""
    recipe = _tiny_mpl(config)
    student_lrs, teacher_lrs = [], []
    for _ in range(config.steps):
        student_lrs.append(recipe.learning_rates()["student"])
        teacher_lrs.append(recipe.learning_rates()["teacher"])
        for scheduler in recipe.schedulers:
            scheduler.optimizer.step()  # no gradients: moves nothing, keeps torch's order
            scheduler.step()
    return student_lrs, teacher_lrs


def test_the_student_waits_at_lr_0_then_warms_up_and_decays_over_the_rest():
    config = PretrainConfig(steps=10, student_wait_steps=4, warmup_steps=2, student_lr=0.1)
    student_lrs, teacher_lrs = _learning_rates(config)
    assert student_lrs[:4] == [0.0] * 4
    assert student_lrs[4:6] == pytest.approx([0.05, 0.1])  # warm-up restarts after the wait
    assert student_lrs[6] == pytest.approx(0.1) and student_lrs[-1] < student_lrs[6]
    assert teacher_lrs[0] > 0  # the teacher learns from the first step


def test_the_teacher_stops_and_the_student_restarts_its_cosine_for_the_fine_tuning():
    config = PretrainConfig(
        steps=10, student_finetune_steps=4, student_lr=0.1, student_finetune_lr=0.2
    )
    student_lrs, teacher_lrs = _learning_rates(config)
    assert student_lrs[0] == pytest.approx(0.1) and teacher_lrs[0] == pytest.approx(0.01)
    assert student_lrs[5] < student_lrs[0] and teacher_lrs[5] < teacher_lrs[0]
    assert teacher_lrs[6:] == pytest.approx([0.0] * 4, abs=1e-12)  # cosine over 6 MPL steps
    assert student_lrs[6] == pytest.approx(0.2)
    assert student_lrs[6] > student_lrs[7] > student_lrs[8] > student_lrs[9] > 0


def test_balanced_sampler_gives_equal_class_counts_from_a_1_to_20_source():
    labels = np.repeat(np.arange(8), [400, 20, 400, 40, 200, 400, 100, 400])  # 1:20
    sampler = BalancedBatchSampler(labels, 8, batch_size=32, seed=0)
    batches = [next(iter(sampler)) for _ in range(50)]
    for batch in batches:
        assert np.bincount(labels[batch], minlength=8).tolist() == [4] * 8
    # the rare class is walked through fully before any of its images repeats
    rare = [index for batch in batches[:5] for index in batch if labels[index] == 1]
    assert sorted(rare) == list(range(400, 420))


def test_balanced_sampler_spreads_a_remainder_and_needs_every_class():
    labels = np.repeat(np.arange(8), 3)
    counts = np.bincount(labels[BalancedBatchSampler(labels, 8, 10, 0).next_batch()], minlength=8)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1
    with pytest.raises(FercacheError, match=r"hold no image of Fear \(3\)"):
        BalancedBatchSampler(labels[labels != 3], 8, 8, 0)


def test_a_pool_without_a_class_is_named_and_the_run_writes_nothing(tmp_path):
    rows = ["path,label"]
    for index in range(21):  # every class but Happiness (4), three images each
        label = [0, 1, 2, 3, 5, 6, 7][index % 7]
        rows.append(f"{_image(tmp_path / 'pool' / f'{index}.jpg', 10 * index).name},{label}")
    (tmp_path / "pool" / "labels.csv").write_text("\n".join(rows) + "\n")
    source = f"abaw:{tmp_path / 'pool' / 'labels.csv'}"
    config = PretrainConfig(recipe="supervised", backbone="test_resnet", image_size=32, workers=0)
    with pytest.raises(FercacheError, match=r"labels\.csv hold no image of Happiness \(4\)"):
        pretrain([source], [], tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists()


def test_holdout_split_holds_out_a_share_of_every_class():
    labels = np.repeat(np.arange(8), [100, 10, 3, 2, 1, 50, 20, 30])
    train, held = holdout_split(labels, [None] * len(labels), 0.1, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=8).tolist() == [10, 1, 1, 1, 0, 5, 2, 3]


def test_holdout_split_of_video_frames_holds_out_whole_videos_and_keeps_every_class():
    # ten videos of 50 frames; only video 0 shows class 7 and only video 1 class 6
    videos = [f"video{v}" for v in range(10) for _ in range(50)]
    labels = np.array([v % 6 for v in range(10) for _ in range(50)])
    labels[:50], labels[50:100] = 7, 6
    stills = np.repeat(np.arange(6), 10)  # no still image of class 6 or 7
    labels = np.concatenate([labels, stills])
    train, held = holdout_split(labels, [*videos, *[None] * len(stills)], 0.2, seed=3)
    frames_of = {v: {i for i in range(len(videos)) if videos[i] == v} for v in set(videos)}
    held_videos = {videos[i] for i in held if i < len(videos)}
    assert held_videos and not {"video0", "video1"} & held_videos
    assert all(frames_of[v] <= set(held) for v in held_videos)  # never part of a video
    assert len(held_videos) == 2  # 100 of 500 frames
    assert set(labels[train]) == set(range(8))
    assert np.bincount(labels[held[held >= len(videos)]], minlength=8).tolist() == [2] * 6 + [0, 0]


# --- sources and views --------------------------------------------------------------------


def _image(path: Path, colour: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (colour, 64, 32)).save(path)
    return path


def test_bad_labels_and_missing_files_are_reported_with_file_and_line(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    (tmp_path / "list.csv").write_text(
        "path,label\na.jpg,4\nb.jpg,9\nb.jpg,-1\nb.jpg,cheerful\ngone.jpg,2\nb.jpg,Fear\n"
    )
    _image(tmp_path / "folders" / "Happiness" / "x.png")
    _image(tmp_path / "folders" / "7" / "y.jpg")
    (tmp_path / "folders" / "misc").mkdir()

    images = read_labelled([f"abaw:{tmp_path / 'list.csv'}", f"abaw:{tmp_path / 'folders'}"])

    assert images.labels == [4, 3, 7, 4]
    assert [p.name for p in images.paths] == ["a.jpg", "b.jpg", "y.jpg", "x.png"]
    problems = [str(problem) for problem in images.problems]
    outside = "is neither a class name nor in the Aff-Wild2 (ABAW) numbering (0-7)"
    assert problems[:3] == [
        f"{tmp_path / 'list.csv'}:3: label '9' {outside}",
        f"{tmp_path / 'list.csv'}:4: label '-1' {outside}",
        f"{tmp_path / 'list.csv'}:5: label 'cheerful' {outside}",
    ]
    assert (
        problems[3].startswith(f"{tmp_path / 'list.csv'}:6: image ") and "gone.jpg" in problems[3]
    )
    assert problems[4].startswith(str(tmp_path / "folders" / "misc"))


def test_other_comes_from_the_video_frames_only_when_there_are_some(synthetic_tree):
    frames = read_labelled([synthetic_tree])
    both = read_labelled([synthetic_tree, synthetic_tree / "pools" / "labelled.csv"])
    other = EXPR_CLASSES.index("Other")
    still_other = sum(
        1
        for video, label in zip(both.videos, both.labels, strict=True)
        if video is None and label == other
    )
    assert still_other > 0 and all(video is not None for video in frames.videos)
    kept = other_from_videos_only(both)
    assert len(kept.paths) == len(both.paths) - still_other
    assert kept.labels.count(other) == frames.labels.count(other)  # the frames' Other stay
    assert f"{still_other} still images labelled Other left out" in str(kept.problems[-1])
    stills = read_labelled([synthetic_tree / "pools" / "labelled.csv"])
    assert other_from_videos_only(stills) is stills  # no frames: a still source keeps Other


def test_sources_that_give_nothing_usable_fail_before_training(tmp_path):
    (tmp_path / "empty.csv").write_text("path,label\nnothing.jpg,Anger\n")
    with pytest.raises(FercacheError, match=r"empty\.csv: no usable labelled image"):
        read_labelled([tmp_path / "empty.csv"])
    (tmp_path / "wrong.csv").write_text("file,class\n")
    with pytest.raises(FercacheError, match="columns path,label"):
        read_labelled([tmp_path / "wrong.csv"])
    with pytest.raises(FercacheError, match="no such folder or image list"):
        read_unlabelled([tmp_path / "nowhere"])


def test_unlabelled_list_reports_missing_lines(tmp_path):
    _image(tmp_path / "faces" / "1.jpg")
    (tmp_path / "faces.txt").write_text("faces/1.jpg\n\nfaces/2.jpg\n")
    images = read_unlabelled([tmp_path / "faces.txt", tmp_path / "faces"])
    assert [p.name for p in images.paths] == ["1.jpg", "1.jpg"]
    assert [problem.where for problem in images.problems] == [f"{tmp_path / 'faces.txt'}:3"]


def test_an_unreadable_image_is_replaced_by_one_of_its_class_and_named(tmp_path):
    good = [_image(tmp_path / f"{i}.jpg", 40 * i) for i in range(3)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    model = timm.create_model("resnet10t", num_classes=8)
    views = build_views(data_config_of(model, 32), 1.0, "rand-m9-mstd0.5-inc1-mmax9", 0.25)
    dataset = LabelledDataset(
        [good[0], broken, good[1], good[2]], np.array([1, 2, 1, 2]), views.weak
    )

    image, label, failed = dataset[1]

    assert image.shape == (3, 32, 32) and label == 2 and failed == str(broken)
    assert dataset[0][2] == ""


def test_grayscale_prob_greys_the_weak_view_only_and_is_checked(tmp_path):
    with Image.open(_image(tmp_path / "face.jpg", 40)) as opened:
        image = opened.convert("RGB")
    image.putpixel((0, 0), (255, 0, 0))  # a red pixel: grey only if the view made it so
    config = DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    coloured = build_views(config, 1.0, "rand-m9-mstd0.5-inc1-mmax9", 0.0)
    grey = build_views(config, 1.0, "rand-m9-mstd0.5-inc1-mmax9", 0.0, grayscale_prob=1.0)

    def channels_equal(tensor: torch.Tensor) -> bool:
        return bool(torch.allclose(tensor[0], tensor[1]) and torch.allclose(tensor[1], tensor[2]))

    assert all(channels_equal(grey.weak(image)) for _ in range(4))
    assert not all(channels_equal(coloured.weak(image)) for _ in range(4))
    assert not channels_equal(grey.evaluation(image))
    with pytest.raises(FercacheError, match="grayscale_prob must lie in"):
        load_config(None, ["grayscale_prob=1.5"])


def test_randaugment_settings_that_would_crash_pillow_are_refused_up_front():
    strong_augment("rand-m9-mstd0.5-inc1-mmax9", 32, (0.5, 0.5, 0.5))
    with pytest.raises(FercacheError, match="mmax9"):
        strong_augment("rand-m9-mstd0.5-inc1", 32, (0.5, 0.5, 0.5))
    with pytest.raises(FercacheError, match="not a timm RandAugment string"):
        strong_augment("rand-q3", 32, (0.5, 0.5, 0.5))


# --- settings -----------------------------------------------------------------------------


def test_the_shipped_yaml_states_the_defaults_and_overrides_apply_in_order(tmp_path):
    shipped = load_config(ROOT / "configs" / "pretrain.yaml")
    defaults = PretrainConfig()
    for key, value in defaults.to_json().items():
        assert getattr(shipped, key) == pytest.approx(value), key
    config = load_config(ROOT / "configs" / "pretrain.yaml", ["mu=7", "teacher_lr=1e-1"], steps=9)
    assert (config.mu, config.teacher_lr, config.steps) == (7, 0.1, 9)
    with pytest.raises(FercacheError, match="unknown pretrain setting"):
        load_config(None, ["mew=3"])
    with pytest.raises(FercacheError, match="feedback_sign must be 1 or -1"):
        load_config(None, ["feedback_sign=0"])


# --- runs -----------------------------------------------------------------------------------


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mpl_run(synthetic_tree, tmp_path_factory) -> tuple[Path, object, Path]:
    """A short MPL run on the synthetic pools plus a bad CSV and an unlabelled folder that
    holds a broken image."""
    scratch = tmp_path_factory.mktemp("sources")
    pool = synthetic_tree / "pools"
    with open(pool / "labelled.csv") as handle:
        first = next(csv.DictReader(handle))["path"]
    (scratch / "extra.csv").write_text(
        f"path,label\n{pool / first},8\n{pool / first},2\n{scratch / 'gone.jpg'},1\n"
    )
    faces = scratch / "faces"
    faces.mkdir()
    for source in sorted((pool / "unlabelled").iterdir())[:7]:
        shutil.copy(source, faces / source.name)
    (faces / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    run = scratch / "run"
    config = load_config(None, ["ema_decay=0.9"], base=PretrainConfig(**TINY), steps=8)
    report = pretrain(
        [pool / "labelled.csv", Path(f"abaw:{scratch / 'extra.csv'}")],
        [faces],
        run,
        config,
        progress=False,
    )
    return run, report, scratch


def test_a_teacher_export_is_refused_as_the_frozen_network_whatever_its_name(
    mpl_run, synthetic_tree, tmp_path
):
    run, _, _ = mpl_run
    posing = tmp_path / "elsewhere" / "student.safetensors"  # the teacher, under another name
    posing.parent.mkdir()
    shutil.copyfile(run / "teacher.safetensors", posing)
    video = tmp_path / "clip.mp4"  # analyse refuses the checkpoint before it reads a video
    video.write_bytes(b"not read")
    video_folder = sorted((synthetic_tree / "cropped_aligned").iterdir())[0].name
    net = ["--device=cpu", "--workers=0", "--no-progress", f"--videos={video_folder}"]
    cache = f"--out={tmp_path / 'cache'}"
    refused = (
        f"error: {posing}: the teacher that `fercache pretrain` exported (its model config says "
        "role 'teacher'); the frozen network is the student: pass the student's export, "
        "student.safetensors of the same run"
    )
    for arguments in (
        ["extract", synthetic_tree, cache, f"--checkpoint={posing}", *net],
        ["analyse", video, f"--checkpoint={posing}", f"--out={tmp_path / 'analysed'}"],
    ):
        result = runner.invoke(app, [str(argument) for argument in arguments])
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [refused]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "analysed").exists()

    student = run / "student.safetensors"
    arguments = ["extract", synthetic_tree, cache, f"--checkpoint={student}", *net]
    result = runner.invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    assert "extracted 1 videos" in result.output


def test_a_run_writes_metrics_checkpoints_and_reports_problems(mpl_run):
    run, report, scratch = mpl_run
    assert report.steps == 8
    assert {"student.safetensors", "student.json", "teacher.safetensors", "teacher.json"} <= {
        p.name for p in run.iterdir()
    }
    records = _read_metrics(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    last = records[-1]
    for key in ("teacher_supervised", "teacher_consistency", "teacher_feedback", "feedback"):
        assert np.isfinite(last[key])
    feedback = [r["feedback"] for r in records]  # each the mean over its 2 steps
    assert last["feedback_running_mean"] == pytest.approx(np.mean(feedback))
    assert 0 <= last["heldout_student_f1"] <= 1 and "heldout_teacher_accuracy" in last
    assert last["lr_student"] == pytest.approx(0.0, abs=1e-12)  # cosine decay to 0

    problems = (run / "problems.txt").read_text()
    assert f"{scratch / 'extra.csv'}:2: label '8' is neither a class name nor in the" in problems
    assert "gone.jpg does not exist" in problems
    assert f"{scratch / 'faces' / 'broken.jpg'}: unreadable image, replaced" in problems
    assert last["unreadable_images"] >= 1
    assert report.problems == problems.splitlines()


def test_the_exported_student_is_the_extraction_contract(mpl_run):
    run, _, _ = mpl_run
    path = run / "student.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        described = json.loads(handle.metadata()["fercache_model"])
        keys = set(handle.keys())
    assert described == json.loads((run / "student.json").read_text())
    assert described == {
        "backbone": "resnet10t",
        "num_classes": 8,
        "input_size": [3, 32, 32],
        "mean": list(timm.data.IMAGENET_DEFAULT_MEAN),
        "std": list(timm.data.IMAGENET_DEFAULT_STD),
        "interpolation": "bilinear",
        "classes": list(EXPR_CLASSES),
        "recipe": "mpl",
        "role": "student",
    }
    assert keys == set(timm.create_model("resnet10t", num_classes=8).state_dict())

    backbone = load_backbone(None, path)  # name, size and normalisation from the checkpoint

    assert (backbone.name, backbone.num_classes) == ("resnet10t", 8)
    assert backbone.data_config.input_size == (3, 32, 32)
    assert backbone.data_config.interpolation == "bilinear"
    with safe_open(str(path), framework="pt") as handle:
        weight = handle.get_tensor("fc.weight")
    torch.testing.assert_close(backbone.model.state_dict()["fc.weight"], weight)


def test_extract_runs_on_the_exported_student_with_no_other_option(
    mpl_run, synthetic_tree, tmp_path
):
    from fercache.features.extract import ExtractOptions, extract

    run, _, _ = mpl_run
    options = ExtractOptions(checkpoint=run / "student.safetensors", progress=False, workers=0)
    report = extract(synthetic_tree, tmp_path / "cache", options)
    assert report.extracted and report.frames > 0


def test_resume_refuses_changed_settings_and_a_new_run_refuses_a_used_folder(mpl_run):
    run, _, _ = mpl_run
    with pytest.raises(FercacheError, match="already holds a run"):
        pretrain([run], [run], run, PretrainConfig(**TINY), progress=False)
    changed = PretrainConfig(**{**TINY, "mu": 3})
    with pytest.raises(FercacheError, match="mu 1 -> 3"):
        pretrain([run], [run], run, changed, resume=True, progress=False)


def test_a_run_folder_another_live_process_writes_is_refused(mpl_run):
    run, _, _ = mpl_run
    with another_process_holding(run) as pid:
        before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
        saved = load_config(run / "config.yaml")
        with pytest.raises(FercacheError, match=f"pid {pid} is writing a run"):
            pretrain([run], [run], run, saved, resume=True, progress=False)
        assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == before


def test_print_config_shows_the_resolved_or_saved_settings_and_runs_nothing(mpl_run, tmp_path):
    run, _, _ = mpl_run
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
    labelled = f"--labelled={run}"

    fresh = runner.invoke(
        app, ["pretrain", labelled, f"--out={tmp_path / 'new'}", "--set", "mu=3", "--print-config"]
    )
    resumed = runner.invoke(
        app, ["pretrain", labelled, f"--out={run}", "--resume", "--steps=12", "--print-config"]
    )
    refused = runner.invoke(
        app, ["pretrain", labelled, f"--out={run}", "--resume", "--set=mu=3", "--print-config"]
    )

    assert (
        fresh.exit_code == 0
        and yaml.safe_load(fresh.output) == load_config(None, ["mu=3"]).to_json()
    )
    assert not (tmp_path / "new").exists()
    shown = yaml.safe_load(resumed.output)
    assert shown == {**yaml.safe_load((run / "config.yaml").read_text()), "steps": 12}
    assert shown["ema_decay"] == 0.9 and shown["backbone"] == "resnet10t"  # the saved ones
    assert refused.exit_code == 2 and "mu 1 -> 3" in refused.output
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == before


def test_pretrain_prints_one_line_per_held_out_evaluation(synthetic_tree, tmp_path):
    sets = [f"--set={key}={value}" for key, value in TINY.items()]
    labelled = f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}"
    command = ["pretrain", labelled, f"--out={tmp_path / 'run'}", "--recipe=supervised", *sets]

    shown = runner.invoke(app, [*command, "--steps=8"])
    quiet = runner.invoke(app, [*command, "--steps=10", "--resume", "--no-progress"])

    lines = [line for line in shown.output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/8", "8/8"]
    assert all("student_supervised" in line and "held-out " in line for line in lines)
    assert all("student_f1" in line.split("held-out ")[1] for line in lines)
    assert lines[-1].endswith(" s")
    assert quiet.exit_code == 0 and not any(
        line.startswith("step ") for line in quiet.output.splitlines()
    )


def test_the_supervised_baseline_lowers_its_loss_and_writes_no_teacher(synthetic_tree, tmp_path):
    # held-out F1 over chance needs hundreds of steps: benchmarks/pretrain_ssl_vs_supervised.py
    config = PretrainConfig(
        **{**TINY, "image_size": 48, "eval_every": 100, "log_every": 20, "checkpoint_every": 100},
        recipe="supervised",
        steps=40,
        student_lr=0.05,
    )
    report = pretrain(
        [synthetic_tree / "pools" / "labelled.csv"], [], tmp_path / "run", config, progress=False
    )
    first, last = _read_metrics(tmp_path / "run")
    assert last["student_supervised"] < first["student_supervised"]
    assert set(report.evaluation) == {"student_accuracy", "student_f1"}
    assert not (tmp_path / "run" / "teacher.safetensors").exists()


def test_the_student_fine_tunes_alone_after_the_mpl_steps(synthetic_tree, tmp_path):
    pool = synthetic_tree / "pools"
    settings = {**TINY, "eval_every": 100, "log_every": 1, "checkpoint_every": 100}
    mpl_only = PretrainConfig(**settings, steps=3)
    with_finetuning = PretrainConfig(**settings, steps=5, student_finetune_steps=2)
    for name, config in (("mpl", mpl_only), ("finetuned", with_finetuning)):
        pretrain(
            [pool / "labelled.csv"], [pool / "unlabelled"], tmp_path / name, config, progress=False
        )

    records = _read_metrics(tmp_path / "finetuned")
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
    assert all("feedback" in record for record in records[:3])
    assert "heldout_student_f1" in records[2]  # what MPL alone gave, before the fine-tuning
    for record in records[3:]:  # the student's CE on labelled batches; the teacher rests
        assert "feedback" not in record and np.isfinite(record["student_supervised"])
        assert record["lr_teacher"] == pytest.approx(0.0, abs=1e-12)
    teacher = load_file(tmp_path / "mpl" / "teacher.safetensors")
    student = load_file(tmp_path / "mpl" / "student.safetensors")
    # the same first three steps (same seed and schedules), then only the student moved
    torch.testing.assert_close(load_file(tmp_path / "finetuned" / "teacher.safetensors"), teacher)
    moved = load_file(tmp_path / "finetuned" / "student.safetensors")
    assert not torch.equal(moved["fc.weight"], student["fc.weight"])


def test_fine_tuning_is_refused_where_it_cannot_apply():
    with pytest.raises(FercacheError, match="at least one Meta Pseudo Labels step"):
        load_config(None, ["steps=10", "student_finetune_steps=10"])
    with pytest.raises(FercacheError, match=r"applies to a teacher-student recipe \(mpl\)"):
        recipe_for(load_config(None, ["recipe=supervised", "student_finetune_steps=2"]))


def test_two_processes_under_torchrun_train_one_model(synthetic_tree, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "cli.py"), "pretrain",
        f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}",
        f"--unlabelled={synthetic_tree / 'pools' / 'unlabelled'}",
        f"--out={run}", "--steps=4", "--no-progress",
        *[f"--set={key}={value}" for key, value in TINY.items()],
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [record["step"] for record in _read_metrics(run)] == [2, 4]  # rank 0 alone logs
    with safe_open(str(run / "student.safetensors"), framework="pt") as handle:
        assert not any(key.startswith("module.") for key in handle.keys())  # noqa: SIM118


def test_a_full_disk_at_a_checkpoint_names_it_and_keeps_the_last_one(
    synthetic_tree, tmp_path, monkeypatch, full_disk_after
):
    labelled, run = [synthetic_tree / "pools" / "labelled.csv"], tmp_path / "run"
    config = PretrainConfig(**{**TINY, "recipe": "supervised", "steps": 8})
    full_disk_after(torch, "save", calls=1)  # the state of step 4 is written, that of step 8 not

    message = re.escape(f"{run / 'last.pt'}: could not write the checkpoint (No space left")
    with pytest.raises(FercacheError, match=message):
        pretrain(labelled, [], run, config, progress=False)
    monkeypatch.undo()

    assert torch.load(run / "last.pt", weights_only=True)["progress"][0] == 4
    assert not [path.name for path in run.iterdir() if ".tmp-" in path.name]
    assert pretrain(labelled, [], run, config, resume=True, progress=False).steps == 8


def test_the_command_resumes_a_run_killed_mid_way(synthetic_tree, tmp_path):
    run = tmp_path / "run"
    sets = [f"--set={key}={value}" for key, value in {**TINY, "checkpoint_every": 2}.items()]
    command = [
        sys.executable,
        "-m",
        "fercache",
        "pretrain",
        f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}",
        f"--unlabelled={synthetic_tree / 'pools' / 'unlabelled'}",
        f"--out={run}",
        "--steps=400",
        "--no-progress",
        *sets,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _has_checkpoint_after(run, 4):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)["progress"][0]
    assert 4 <= killed_at < 400

    result = runner.invoke(
        app,
        [
            "pretrain",
            f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}",
            f"--unlabelled={synthetic_tree / 'pools' / 'unlabelled'}",
            f"--out={run}",
            f"--steps={killed_at + 2}",
            "--resume",
            "--no-progress",
        ],
    )

    assert result.exit_code == 0, result.output
    assert f"{killed_at + 2} steps; wrote" in result.output
    steps = [record["step"] for record in _read_metrics(run)]
    assert steps == list(range(2, killed_at + 3, 2))  # nothing lost, nothing twice


def _has_checkpoint_after(run: Path, step: int) -> bool:
    checkpoint = run / "last.pt"  # renamed into place whole: never read half-written
    return checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["progress"][0] >= step


class _Killed(Exception):
    """Stands for the kill of a run between two steps."""


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("recipe", "workers"), [("supervised", 0), ("fixmatch", 0), ("pseudo-label", 0), ("mpl", 2)]
)
def test_a_run_stopped_after_a_checkpoint_and_resumed_ends_bit_identical(
    recipe, workers, synthetic_tree, tmp_path, monkeypatch
):
    pool = synthetic_tree / "pools"
    labelled, unlabelled = [pool / "labelled.csv"], [pool / "unlabelled"]
    settings = {**TINY, "backbone": "test_resnet", "batch_size": 8, "log_every": 1}
    settings |= {"checkpoint_every": 2, "eval_every": 2, "warmup_steps": 1, "ema_decay": 0.5}
    settings |= {"recipe": recipe, "steps": 4, "distribution_alignment": recipe != "supervised"}
    config = PretrainConfig(**settings)
    pretrain(labelled, unlabelled, tmp_path / "whole", config, progress=False)

    real_step = loop._one_step

    def killed_at_step_3(*args):  # args[-1]: the step about to be taken
        if args[-1] == 3:  # after the checkpoint of step 2 and one step past it
            raise _Killed
        return real_step(*args)

    run = tmp_path / "stopped"
    monkeypatch.setattr(loop, "_one_step", killed_at_step_3)
    with pytest.raises(_Killed):  # loader processes too, where asked: they draw the views
        pretrain(labelled, unlabelled, run, replace(config, workers=workers), progress=False)
    monkeypatch.undo()
    assert torch.load(run / "last.pt", weights_only=True)["progress"][0] == 2
    pretrain(labelled, unlabelled, run, config, resume=True, progress=False)

    written = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert ("teacher.safetensors" in written) == (recipe == "mpl")
    for name in ["metrics.jsonl", *(name for name in written if name.endswith(".safetensors"))]:
        assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


# tiny enough for a few runs per test: timm's smallest ResNet, 8 images a batch
SMALL = {**TINY, "backbone": "test_resnet", "batch_size": 8, "recipe": "supervised", "steps": 4}


@pytest.mark.usefixtures("one_thread")
def test_a_diverged_run_stops_naming_the_step_and_reports_no_success(synthetic_tree, tmp_path):
    run = tmp_path / "run"
    settings = {**SMALL, "log_every": 4, "eval_every": 4, "checkpoint_every": 4}
    labelled = f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}"
    command = ["pretrain", labelled, f"--out={run}", "--no-progress"]
    command += [*(f"--set={key}={value}" for key, value in settings.items())]

    infinite = runner.invoke(app, [*command, "--set=student_lr=inf", "--set=teacher_lr=.nan"])
    assert infinite.exit_code == 2 and not run.exists()
    assert infinite.output == "error: pretrain settings: teacher_lr, student_lr must be finite\n"

    diverged = runner.invoke(app, [*command, "--set=student_lr=1e30"])  # finite, far too high

    assert diverged.exit_code == 2
    assert diverged.output.startswith(  # step 2 of the 4 before the first log line
        "error: pretraining diverged at step 2: loss student_supervised nan; "
        f"{run} holds no weights (no checkpoint was written)."
    )
    assert len(diverged.output.splitlines()) == 1 and "steps; wrote" not in diverged.output
    assert not [path.name for path in run.iterdir() if path.suffix in (".pt", ".safetensors")]
    assert (run / "metrics.jsonl").read_text() == ""


@pytest.mark.usefixtures("one_thread")
def test_weights_gone_non_finite_after_a_finite_loss_are_never_saved(
    synthetic_tree, tmp_path, monkeypatch
):
    from fercache.pretrain.supervised import Supervised

    real_step = Supervised.train_step

    def overflowing_in_step_4(self, batch, step, autocast):  # as an lr near float32's top can
        metrics = real_step(self, batch, step, autocast)
        if step == 3:  # the last: its loss is finite, the weights after it are not
            with torch.no_grad():
                self.student().get_classifier().weight.fill_(float("inf"))
        return metrics

    monkeypatch.setattr(Supervised, "train_step", overflowing_in_step_4)
    run, config = tmp_path / "run", PretrainConfig(**{**SMALL, "checkpoint_every": 2})
    message = re.escape(
        "pretraining diverged by step 4: the weights of the student are not finite; "
        f"{run} keeps its last checkpoint, step 2 (last.pt and the exported weights)."
    )
    with pytest.raises(FercacheError, match=message):
        pretrain([synthetic_tree / "pools" / "labelled.csv"], [], run, config, progress=False)

    assert torch.load(run / "last.pt", weights_only=True)["progress"][0] == 2
    saved = load_file(run / "student.safetensors")
    assert all(weight.isfinite().all() for weight in saved.values())
    assert [record["step"] for record in _read_metrics(run)] == [2]


@pytest.mark.usefixtures("one_thread")
def test_a_run_removes_what_a_killed_run_left_half_written(synthetic_tree, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    dead = [run / f".{name}.tmp-{int(finished.stdout)}" for name in ("last.pt", "student.json")]
    live = run / f".student.safetensors.tmp-{os.getppid()}"  # a process still writing it
    for path in [*dead, live]:
        path.write_bytes(b"half-written")

    config = PretrainConfig(**{**SMALL, "steps": 1})
    pretrain([synthetic_tree / "pools" / "labelled.csv"], [], run, config, progress=False)

    assert not any(path.exists() for path in dead) and live.exists()
    assert (run / "last.pt").is_file() and (run / "student.safetensors").is_file()
