"""The Li et al. / LSD recipes: token dropping and the JS term of masked CoTEX, EMMA's stopped
VA gradient and masked labels, the landmark sources, layer-wise lr decay, and for each recipe
a short run whose exported student extracts with no other option and trains a temporal model."""

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.spatial.distance import jensenshannon
from typer.testing import CliRunner

from fercache.backbone.network import DataConfig, ViewPair, load_backbone
from fercache.cli import app
from fercache.errors import FercacheError
from fercache.features.extract import ExtractOptions, extract
from fercache.framewise.metrics import concordance as numpy_concordance
from fercache.pretrain import PretrainConfig, load_config, pretrain
from fercache.pretrain.cotex import CoTex, js_divergence, keep_random_tokens, masked_logits
from fercache.pretrain.emma import Emma, EmmaNet, ccc_loss, concordance, read_multitask
from fercache.pretrain.export import export_model, model_config
from fercache.pretrain.landmarks import attach_landmarks
from fercache.pretrain.recipe_base import ModelFactory, OneNetwork, StepBatch, create_network
from fercache.pretrain.registry import RECIPES, recipe_for
from fercache.pretrain.sources import read_labelled
from fercache.pretrain.views import data_config_of
from fercache.synth import SynthConfig, generate
from fercache.temporal.loop import TrainRequest, train
from tests.train_data import TINY_TEMPORAL, TreeSpec, write_tree

TREE = SynthConfig(videos=4, frames=64, seed=7, labelled_pool=48, unlabelled_pool=1, workers=1)
RUN = {"batch_size": 16, "workers": 0, "steps": 4, "eval_every": 4, "log_every": 2}
RUN |= {"checkpoint_every": 4, "finetune_lr": 0.05}
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes") / "tree"
    generate(root, TREE, progress=False)
    return root


def _vit(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=8, img_size=32, **options).eval()


# --- masked CoTEX ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_token_dropping_keeps_round_l_times_1_minus_r_patches_differently_per_sample(ratio):
    batch, patches = 6, 49
    # token j carries its own number in every channel, so the kept ones can be read back
    numbers = torch.arange(1 + patches, dtype=torch.float32).view(1, -1, 1)
    tokens = numbers.expand(batch, -1, 4).clone()

    first_view, second_view = (keep_random_tokens(tokens, ratio, 1) for _ in range(2))

    keep = round(patches * (1 - ratio))
    assert first_view.shape == (batch, 1 + keep, 4)
    kept = first_view[:, :, 0].long()
    assert (kept[:, 0] == 0).all()  # the class token always stays
    assert all(len(set(row[1:].tolist())) == keep for row in kept)  # a subset, no repeats
    assert len({tuple(row.tolist()) for row in kept}) == batch  # different per sample
    assert not torch.equal(first_view, second_view)  # each view draws its own


def test_no_dropping_reproduces_the_plain_vit_forward_and_the_pair_sums_its_views():
    vit, images = _vit(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(masked_logits(vit, images, 0.0), vit(images))
        pair = ViewPair([vit, _vit()])
        torch.testing.assert_close(pair(images), vit(images) + pair.views[1](images))


def test_each_view_runs_its_blocks_on_the_kept_tokens_only():
    config = PretrainConfig(recipe="cotex", backbone="test_vit", image_size=32, drop_path=0.0)
    model = CoTex(config).network(partial(create_network, "test_vit", None))
    lengths = []
    for view in model.views:
        view.blocks[0].register_forward_hook(lambda _, inputs, __: lengths.append(inputs[0].shape))
    logits = model(torch.randn(5, 3, 32, 32), train_outputs=True)
    assert logits.shape == (2, 5, 8)
    assert lengths == [(5, 1 + round(4 * 0.25), 64)] * 2  # 32 px / 16 px patches: L = 4


def test_js_divergence_equals_a_numpy_reference_and_is_zero_symmetric_and_at_most_ln2():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(32, 8, generator=generator, dtype=torch.float64) * 3
    b = torch.randn(32, 8, generator=generator, dtype=torch.float64) * 3
    p, q = torch.softmax(a, 1).numpy(), torch.softmax(b, 1).numpy()
    reference = np.array([jensenshannon(p[i], q[i]) ** 2 for i in range(32)])  # natural log

    np.testing.assert_allclose(js_divergence(a, b).numpy(), reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(js_divergence(a, a), torch.zeros(32, dtype=torch.float64))
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    opposite = torch.tensor([[60.0, 0.0], [0.0, 60.0]], dtype=torch.float64)
    extreme = js_divergence(opposite[:1], opposite[1:])
    assert extreme <= math.log(2) and extreme > math.log(2) - 1e-9


def test_an_mae_style_checkpoint_starts_both_views(tmp_path):
    encoder = {k: v for k, v in _vit().state_dict().items() if not k.startswith("head.")}
    encoder["pos_embed"] = torch.randn_like(encoder["pos_embed"])
    torch.save({"model": encoder}, tmp_path / "mae.pth")  # MAE's own layout: no head
    config = PretrainConfig(recipe="cotex", backbone="test_vit", image_size=32)
    model = CoTex(config).network(partial(create_network, "test_vit", tmp_path / "mae.pth"))
    for view in model.views:
        torch.testing.assert_close(view.pos_embed.detach(), encoder["pos_embed"])


@pytest.mark.parametrize("exported", ["both", "first"])
def test_the_cotex_student_is_both_views_or_the_first_and_extraction_rebuilds_it(
    exported, tmp_path
):
    config = PretrainConfig(
        recipe="cotex", backbone="test_vit", image_size=32, cotex_export=exported
    )
    recipe = CoTex(config)
    model = recipe.network(partial(create_network, "test_vit", None)).eval()
    data_config = data_config_of(model, 32)
    described = model_config("test_vit", data_config, "cotex", **recipe.export_keys())
    export_model(recipe.export_part(model), described, tmp_path / "student.safetensors")

    backbone = load_backbone(None, tmp_path / "student.safetensors")

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone.model.forward_head(
            backbone.model.forward_features(images), pre_logits=True
        )
        logits = backbone.model.get_classifier()(features)
        expected = model(images) if exported == "both" else model.views[0](images)
    assert backbone.feature_dim == (128 if exported == "both" else 64)
    assert isinstance(backbone.model, ViewPair) == (exported == "both")
    assert backbone.num_classes == 8 and backbone.data_config.input_size == (3, 32, 32)
    torch.testing.assert_close(logits, expected)


def test_cotex_refuses_a_backbone_that_is_not_a_vit():
    config = PretrainConfig(recipe="cotex", backbone="resnet10t", image_size=32)
    with pytest.raises(FercacheError, match="needs a timm ViT"):
        CoTex(config).network(partial(create_network, "resnet10t", None))


# --- EMMA -----------------------------------------------------------------------------------


def _emma() -> EmmaNet:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", num_classes=8)
    return EmmaNet(backbone, data_config_of(backbone, 32), None).train()


def test_the_ccc_loss_gradient_reaches_the_va_head_and_never_the_backbone():
    model, images = _emma(), torch.randn(6, 3, 32, 32)
    truth = torch.rand(6, 2) * 2 - 1
    _, _, va = model(images, train_outputs=True)
    ccc_loss(va, truth).backward()

    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.au_head.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.va_head.parameters())
    expr, au, _ = model(images, train_outputs=True)  # the check is not vacuous:
    (expr.sum() + au.sum()).backward()  # the other heads do train the backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_ccc_agrees_with_the_evaluation_metric_and_invalid_values_count_for_nothing():
    generator = torch.Generator().manual_seed(1)
    predicted, truth = (
        torch.rand(50, 2, generator=generator),
        torch.rand(50, 2, generator=generator),
    )
    for d in range(2):
        expected = numpy_concordance(truth[:, d].numpy(), predicted[:, d].numpy())
        assert float(concordance(predicted[:, d], truth[:, d])) == pytest.approx(expected, 1e-5)
    with_gaps = truth.clone()
    with_gaps[:10, 0] = torch.nan  # VA -5, read as NaN
    expected = 2 - float(concordance(predicted[10:, 0], truth[10:, 0]))
    expected -= float(concordance(predicted[:, 1], truth[:, 1]))
    assert float(ccc_loss(predicted, with_gaps)) == pytest.approx(expected, 1e-5)
    assert float(ccc_loss(predicted, torch.full_like(truth, torch.nan))) == 0.0


def test_emma_reads_every_task_with_nan_where_a_label_is_invalid(tree):
    images = read_multitask([tree])
    by_path = dict(zip(images.paths, zip(images.labels, images.targets, strict=True), strict=True))
    annotations = tree / "Annotations"
    video = sorted(p.stem for p in (annotations / "AU_Detection_Challenge" / "Train_Set").iterdir())
    name = video[0]
    read = {
        task: (annotations / folder / "Train_Set" / f"{name}.txt").read_text().splitlines()[1:]
        for task, folder in (
            ("expr", "EXPR_Recognition_Challenge"),
            ("au", "AU_Detection_Challenge"),
            ("va", "VA_Estimation_Challenge"),
        )
    }
    checked = 0
    for frame in sorted(p for p in (tree / "cropped_aligned" / name).iterdir()):
        line = int(frame.stem) - 1
        expr = int(read["expr"][line])
        au = [float(v) for v in read["au"][line].split(",")]
        va = [float(v) for v in read["va"][line].split(",")]
        if expr < 0 and au[0] < 0 and va[0] == -5:
            assert frame not in by_path  # nothing to learn from
            continue
        label, targets = by_path[frame]
        assert label == expr
        expected = [np.nan if v < 0 else v for v in au] + [np.nan if v == -5 else v for v in va]
        np.testing.assert_allclose(targets, expected, rtol=1e-6)
        checked += 1
    assert checked > 20
    assert (np.array(images.labels) == -1).any()  # frames with AU/VA but no EXPR label are kept


def test_emma_refuses_sources_without_au_labels(tmp_path):
    write_tree(tmp_path / "expr_only", TreeSpec(train_videos=2, val_videos=1, frames=40))
    with pytest.raises(FercacheError, match=r"needs train annotations of EXPR, AU and VA.*AU, VA"):
        read_multitask([tmp_path / "expr_only"])
    (tmp_path / "list.csv").write_text("path,label\n")
    with pytest.raises(FercacheError, match=r"list\.csv: recipe emma reads EXPR, AU and VA"):
        read_multitask([tmp_path / "list.csv"])


def test_a_frozen_reference_adds_its_expression_scores_to_the_va_input(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("resnet10t", num_classes=8).eval()
    its_data = DataConfig((3, 48, 48), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    export_model(
        reference, model_config("resnet10t", its_data, "supervised"), tmp_path / "r.safetensors"
    )
    config = PretrainConfig(
        recipe="emma",
        backbone="resnet10t",
        image_size=32,
        emma_reference=str(tmp_path / "r.safetensors"),
    )
    model = Emma(config).network(partial(create_network, "resnet10t", None)).train()
    images = torch.randn(4, 3, 32, 32)

    _, _, va = model(images, train_outputs=True)
    ccc_loss(va, torch.rand(4, 2)).backward()

    assert model.va_head[0].in_features == 8 + 12 + 8 and not model.reference.training
    assert all(p.grad is None for p in model.reference.parameters())
    ours = data_config_of(model.backbone, 32)
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (ours.mean, ours.std))
    pixels = images * std + mean  # what our normalisation had turned into `images`
    resized = torch.nn.functional.interpolate(
        pixels.clamp(0, 1), size=(48, 48), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        expected = reference((resized - 0.5) / 0.5)
    torch.testing.assert_close(model._reference_scores(images), expected, atol=1e-4, rtol=1e-4)

    headless = timm.create_model("resnet10t", num_classes=0)
    export_model(
        headless, model_config("resnet10t", its_data, "supervised"), tmp_path / "h.safetensors"
    )
    config = PretrainConfig(recipe="emma", emma_reference=str(tmp_path / "h.safetensors"))
    with pytest.raises(
        FercacheError, match=r"h\.safetensors: emma_reference must predict expressions"
    ):
        Emma(config).network(partial(create_network, "resnet10t", None))


# --- landmarks sources ----------------------------------------------------------------------


def _landmark_row(path: str, value: float = 10.0) -> str:
    return ",".join([path, *[str(value)] * 136])


def test_a_landmarks_csv_with_a_wrong_column_count_is_refused(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,Fear\n")
    header = ",".join(["path"] + [f"x{i}" for i in range(99)])
    (tmp_path / "marks.csv").write_text(header + "\n" + _landmark_row("a.jpg") + "\n")
    with pytest.raises(FercacheError, match=r"marks\.csv: needs a header of 137 columns"):
        attach_landmarks(read_labelled([tmp_path / "labels.csv"]), tmp_path / "marks.csv")
    with pytest.raises(FercacheError, match="no such landmarks CSV"):
        attach_landmarks(read_labelled([tmp_path / "labels.csv"]), tmp_path / "gone.csv")


def test_bad_landmark_rows_and_images_without_landmarks_are_reported(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (20, 20)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,Fear\nb.jpg,Happiness\nc.jpg,Sadness\n")
    header = ",".join(["path"] + [f"{axis}{i}" for i in range(68) for axis in "xy"])
    rows = [
        _landmark_row("a.jpg", 5.0),
        _landmark_row("gone.jpg"),
        _landmark_row("b.jpg").replace(",10.0", ",ten", 1),
        _landmark_row("c.jpg")[: -len(",10.0")],
    ]
    (tmp_path / "marks.csv").write_text("\n".join([header, *rows]) + "\n")

    images = attach_landmarks(read_labelled([tmp_path / "labels.csv"]), tmp_path / "marks.csv")

    marks = tmp_path / "marks.csv"
    problems = [str(problem) for problem in images.problems]
    assert problems[0].startswith(f"{marks}:3: image ") and "gone.jpg does not exist" in problems[0]
    assert problems[1:3] == [
        f"{marks}:4: a coordinate is not a number",
        f"{marks}:5: 136 values where the header has 137",
    ]
    assert problems[3].startswith(f"{marks}: 2 labelled images have no landmarks here")
    assert images.labels == [3, 4, 5]  # still trained on expression
    np.testing.assert_array_equal(images.targets[0], np.full(136, 5.0))
    assert np.isnan(images.targets[1]).all() and np.isnan(images.targets[2]).all()


def test_the_multitask_landmarks_recipe_needs_its_csv():
    with pytest.raises(FercacheError, match="needs landmarks=PATH"):
        recipe_for(load_config(None, ["recipe=multitask-landmarks"]))


# --- optimisation ---------------------------------------------------------------------------


def test_adamw_with_layer_wise_lr_decay_from_timm():
    config = PretrainConfig(recipe="emma", finetune_lr=5e-4, batch_size=64, layer_decay=0.65)
    recipe_model = _emma()

    optimizer = Emma(config).make_optimizer(recipe_model, world_size=2)

    assert isinstance(optimizer, torch.optim.AdamW)
    top = 5e-4 * 64 * 2 / 256  # MAE's rule: base lr x global batch / 256
    rates = sorted({round(group["lr"], 12) for group in optimizer.param_groups}, reverse=True)
    assert rates[0] == pytest.approx(top) and optimizer.param_groups[0]["lr"] == pytest.approx(top)
    np.testing.assert_allclose(np.array(rates[1:]) / np.array(rates[:-1]), 0.65)
    heads = {
        id(p) for p in [*recipe_model.au_head.parameters(), *recipe_model.va_head.parameters()]
    }
    for group in optimizer.param_groups:
        if any(id(p) in heads for p in group["params"]):
            assert group["lr"] == pytest.approx(top)
    stem = recipe_model.backbone.conv1[0].weight
    assert [g["lr"] for g in optimizer.param_groups if any(p is stem for p in g["params"])] == [
        pytest.approx(rates[-1])
    ]


# --- runs: pretrain -> extract with no other option -> temporal training ---------------------


RECIPE_RUNS = {
    "cotex": {"backbone": "test_vit", "image_size": 32, "mask_ratio": 0.5},
    "emma": {"backbone": "resnet10t", "image_size": 32},
    "multitask-landmarks": {"backbone": "resnet10t", "image_size": 32},
}
LOSS_KEYS = {
    "cotex": {"ce", "js"},
    "emma": {"expr_ce", "au_bce", "va_ccc_loss"},
    "multitask-landmarks": {"expr_ce", "landmark_mse"},
}
FEATURE_DIMS = {"cotex": 2 * 64, "emma": 512, "multitask-landmarks": 512}


@pytest.mark.parametrize("recipe", list(RECIPE_RUNS))
def test_each_recipe_trains_exports_extracts_and_feeds_the_temporal_trainer(recipe, tree, tmp_path):
    settings = {**RUN, **RECIPE_RUNS[recipe], "recipe": recipe}
    if recipe == "multitask-landmarks":
        settings["landmarks"] = str(tree / "pools" / "landmarks.csv")
    labelled = [tree] if recipe == "emma" else [tree / "pools" / "labelled.csv"]

    report = pretrain(labelled, [], tmp_path / "run", PretrainConfig(**settings), progress=False)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [record["step"] for record in records] == [2, 4]
    assert all(np.isfinite(records[-1][key]) for key in {"loss"} | LOSS_KEYS[recipe])
    assert {"student_accuracy", "student_f1"} == set(report.evaluation)
    student = tmp_path / "run" / "student.safetensors"
    options = ExtractOptions(checkpoint=student, workers=0, progress=False)  # nothing else
    extracted = extract(tree, tmp_path / "cache", options)
    assert extracted.extracted and not extracted.skipped_frames
    request = TrainRequest(overrides=TINY_TEMPORAL, epochs=1, device="cpu", progress=False)
    summary = train([tmp_path / "cache"], tree, tmp_path / "temporal", request)
    assert summary["epochs"] == 1 and summary["feature_dim"] == FEATURE_DIMS[recipe]
    assert (tmp_path / "temporal" / "final.safetensors").is_file()


# --- a new recipe is a class and a registry line ---------------------------------------------


class LabelSmoothing(OneNetwork):
    """A toy recipe: the supervised baseline with label smoothing, from outside the package."""

    description = "the supervised baseline with label smoothing 0.1"

    def network(self, create: ModelFactory) -> torch.nn.Module:
        return create(self.config.seed)

    def make_optimizer(self, model: torch.nn.Module, world_size: int) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step(self, batch: StepBatch, step: int, autocast) -> dict[str, torch.Tensor]:
        logits = self.model(batch.images)
        loss = torch.nn.functional.cross_entropy(logits, batch.labels, label_smoothing=0.1)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"smoothed_ce": loss.detach()}


def test_a_toy_recipe_registered_from_a_test_trains_checkpoints_resumes_and_exports(
    tree, tmp_path, monkeypatch
):
    monkeypatch.setitem(RECIPES, "label-smoothing", LabelSmoothing)
    settings = {**RUN, "recipe": "label-smoothing", "backbone": "resnet10t", "image_size": 32}
    labelled = [tree / "pools" / "labelled.csv"]
    run = tmp_path / "run"

    pretrain(labelled, [], run, PretrainConfig(**settings), progress=False)
    longer = PretrainConfig(**{**settings, "steps": 6, "eval_every": 2})
    report = pretrain(labelled, [], run, longer, resume=True, progress=False)

    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [record["step"] for record in records] == [2, 4, 6]
    assert all(record["recipe"] == "label-smoothing" for record in records)
    assert all(np.isfinite(record["smoothed_ce"]) for record in records)
    assert records[0]["lr_student"] == pytest.approx(0.005)  # the cosine half-way through 4
    assert report.steps == 6 and {"student_accuracy", "student_f1"} == set(report.evaluation)
    exported = json.loads((run / "student.json").read_text())
    assert exported["recipe"] == "label-smoothing"
    assert load_backbone(None, run / "student.safetensors").name == "resnet10t"


def test_the_command_line_lists_and_runs_a_toy_recipe_registered_from_a_test(
    tree, tmp_path, monkeypatch
):
    monkeypatch.setitem(RECIPES, "label-smoothing", LabelSmoothing)
    sets = [f"--set={key}={value}" for key, value in {**RUN, "image_size": 32}.items()]
    run = tmp_path / "run"

    shown = runner.invoke(app, ["pretrain", "--help"]).output
    listed = " ".join(shown.replace("│", " ").split())  # the help, unwrapped
    result = runner.invoke(
        app,
        [
            "pretrain",
            f"--labelled={tree / 'pools' / 'labelled.csv'}",
            f"--out={run}",
            "--recipe=label-smoothing",
            "--backbone=resnet10t",
            "--no-progress",
            *sets,
        ],
    )

    assert "label-smoothing (the supervised baseline with label smoothing 0.1)" in listed
    assert result.exit_code == 0, result.output
    assert json.loads((run / "student.json").read_text())["recipe"] == "label-smoothing"


def test_an_unknown_recipe_is_refused_with_the_registered_names():
    with pytest.raises(FercacheError, match="unknown recipe 'toy'; choose one of mpl, supervised"):
        pretrain([], [], Path("unused"), PretrainConfig(recipe="toy"))
