"""Weights from elsewhere (issue 19, parts 1 and 4): timm's pretrained weights by name (tagged
and hf-hub: names, through timm's loader and a Hugging Face cache made here: no network),
the one-line offline error, checkpoints nested and prefixed as other projects save them,
headless MAE/DINO-style weights, pickled models refused, `fercache convert --trust-pickle`."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from typer.testing import CliRunner

from fercache.backbone.network import load_backbone
from fercache.backbone.weights import convert_checkpoint, select_weights
from fercache.cli import app
from fercache.data.affwild2 import AffWild2
from fercache.errors import FercacheError
from fercache.features.store import read_store
from fercache.pretrain.recipe_base import NUM_CLASSES, create_network

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TAGGED = "test_resnet.r160_in1k"  # timm's tiny test model, a tagged pretrained name
HUB_NAME = "hf-hub:local/tiny-resnet"


def _args(data: Path, out: Path, video: str, *more: str) -> list[str]:
    return [
        "extract", str(data), "--out", str(out), "--videos", video, "--input-size", "64",
        "--batch-size", "64", "--workers", "0", "--no-progress", *more,
    ]  # fmt: skip


def _one_line_error(result, *names: str) -> str:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for name in names:
        assert name in text, text
    return text


def _same_weights(left: torch.nn.Module, right: torch.nn.Module, skip: str = "-") -> None:
    a, b = left.state_dict(), right.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        if not key.startswith(skip):
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A 'downloaded' test_resnet.r160_in1k: a seeded model and its file."""
    torch.manual_seed(7)
    model = timm.create_model(TAGGED).eval()
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, weights) -> Path:
    """An offline Hugging Face cache holding HUB_NAME, laid out as the hub client leaves it."""
    cache, commit = tmp_path / "hub", "0" * 40
    repo = cache / "models--local--tiny-resnet"
    timm.models.save_for_hf(weights[0], str(repo / "snapshots" / commit), safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def offline(tmp_path, monkeypatch) -> None:
    """No network and an empty Hugging Face cache (fails at once instead of retrying)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- part 1: pretrained weights by name ----------------------------------------------------


def test_pretrained_by_name_equals_the_same_file_by_path(synthetic_tree, tmp_path, weights):
    model, path = weights
    by_name = load_backbone(None, path, pretrained=TAGGED)  # timm's file override
    by_path = load_backbone("test_resnet", path)
    _same_weights(by_name.model, model)
    _same_weights(by_name.model, by_path.model)
    assert (by_name.name, by_name.num_classes) == ("test_resnet", 1000)
    assert (by_name.pretrained, by_name.weights_source) == (TAGGED, "file")
    assert by_name.data_config == by_path.data_config

    video = AffWild2(synthetic_tree).videos()[0]
    named, plain = tmp_path / "named", tmp_path / "plain"
    result = runner.invoke(
        app, _args(synthetic_tree, named, video, "--pretrained", TAGGED, "--checkpoint", str(path))
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        _args(synthetic_tree, plain, video, "--backbone", "test_resnet", "--checkpoint", str(path)),
    )
    assert result.exit_code == 0, result.output
    a, b = read_store(named / f"{video}.h5"), read_store(plain / f"{video}.h5")
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert (a.provenance.pretrained, a.provenance.weights_source) == (TAGGED, "file")
    assert (b.provenance.pretrained, b.provenance.weights_source) == ("", "")
    assert a.provenance.checkpoint_sha256 == b.provenance.checkpoint_sha256
    assert a.provenance.fingerprint != b.provenance.fingerprint  # the name is provenance


def test_hf_hub_name_resolves_through_timm_and_its_cache(
    synthetic_tree, tmp_path, hub_cache, weights
):
    model, _ = weights
    backbone = load_backbone(None, None, pretrained=HUB_NAME)
    _same_weights(backbone.model, model)
    assert backbone.name == "test_resnet" and backbone.checkpoint == ""
    assert backbone.weights_source == "hf-hub:local/tiny-resnet"

    video = AffWild2(synthetic_tree).videos()[0]
    cache = tmp_path / "cache"
    result = runner.invoke(app, _args(synthetic_tree, cache, video, "--pretrained", HUB_NAME))
    assert result.exit_code == 0, result.output
    store = read_store(cache / f"{video}.h5")
    assert store.provenance.pretrained == HUB_NAME
    assert store.provenance.weights_source == "hf-hub:local/tiny-resnet"
    assert store.provenance.backbone == "test_resnet" and store.logits.shape[1] == 1000


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", [TAGGED, HUB_NAME])
def test_offline_is_one_line_saying_how_to_provide_the_file(synthetic_tree, tmp_path, name):
    cache = tmp_path / "cache"
    video = AffWild2(synthetic_tree).videos()[0]
    result = runner.invoke(app, _args(synthetic_tree, cache, video, "--pretrained", name))
    _one_line_error(result, name, "--checkpoint FILE", "HF_HUB_CACHE", "HF_HUB_OFFLINE=1")
    assert not cache.exists()


@pytest.mark.usefixtures("offline")
def test_bad_pretrained_names_are_clean_errors(synthetic_tree, tmp_path, weights):
    video = AffWild2(synthetic_tree).videos()[0]
    cache = tmp_path / "cache"
    result = runner.invoke(
        app, _args(synthetic_tree, cache, video, "--pretrained", "test_resnet.nope")
    )
    _one_line_error(result, "test_resnet.nope", "r160_in1k")
    result = runner.invoke(app, _args(synthetic_tree, cache, video, "--pretrained", "no_such_net"))
    _one_line_error(result, "no_such_net", "not a timm model name")
    more = ("--pretrained", TAGGED, "--backbone", "resnet18", "--checkpoint", str(weights[1]))
    result = runner.invoke(app, _args(synthetic_tree, cache, video, *more))
    _one_line_error(result, TAGGED, "resnet18")
    hub_and_file = ("--pretrained", HUB_NAME, "--checkpoint", str(weights[1]))
    result = runner.invoke(app, _args(synthetic_tree, cache, video, *hub_and_file))
    _one_line_error(result, str(weights[1]), "hf-hub")
    assert not cache.exists()


def test_pretrain_starts_from_pretrained_weights_by_name(hub_cache, weights):
    network = create_network("test_resnet", None, 0, pretrained=HUB_NAME)
    reference = weights[0].state_dict()
    for key, value in network.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, reference[key]), key
    assert network.get_classifier().out_features == NUM_CLASSES  # a new EXPR head


@pytest.mark.usefixtures("offline")
def test_pretrain_pretrained_option_errors(synthetic_tree, tmp_path, weights):
    base = ["pretrain", "--labelled", str(synthetic_tree), "--out", str(tmp_path / "run")]
    both = ["--pretrained", TAGGED, "--init-checkpoint", str(weights[1])]
    _one_line_error(runner.invoke(app, [*base, *both]), str(weights[1]), "--pretrained")
    other = ["--pretrained", TAGGED, "--backbone", "resnet18"]
    _one_line_error(runner.invoke(app, [*base, *other]), TAGGED, "resnet18")
    offline = ["--pretrained", TAGGED, "--steps", "1", "--recipe", "supervised"]
    _one_line_error(
        runner.invoke(app, [*base, *offline]), TAGGED, "HF_HUB_CACHE", "--init-checkpoint FILE"
    )
    assert not (tmp_path / "run").exists()


# -- part 4: checkpoints from elsewhere ----------------------------------------------------


def test_nested_and_prefixed_checkpoints_load(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=5)
    state = model.state_dict()
    layouts = {
        "ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "dino": {  # teacher, DDP-wrapped backbone, and a projection head outside it
            "teacher": {f"module.backbone.{k}": v for k, v in state.items()}
            | {"module.head.mlp.0.weight": torch.zeros(4, 3)},
            "epoch": torch.tensor(3),
        },
        "encoder": {"model": {"ema": {f"encoder.{k}": v for k, v in state.items()}}},
        "clip": {f"visual.{k}": v for k, v in state.items()} | {"text.proj": torch.zeros(2)},
    }
    for name, layout in layouts.items():
        torch.save(layout, tmp_path / f"{name}.pth")
        backbone = load_backbone("test_resnet", tmp_path / f"{name}.pth")
        assert backbone.num_classes == 5, name
        _same_weights(backbone.model, model)


def test_prefix_is_taken_only_when_it_matches_better():
    state = {"backbone.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert select_weights(state, {"backbone.weight", "head.weight"}) == (state, "")
    chosen, prefix = select_weights(state, {"weight"})
    assert prefix == "backbone." and list(chosen) == ["weight"]


def test_mae_style_vit_extracts_with_allow_missing_head(synthetic_tree, tmp_path):
    torch.manual_seed(2)
    vit = timm.create_model("test_vit", num_classes=10)
    full = tmp_path / "full.pth"
    torch.save(vit.state_dict(), full)
    headless = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    mae = tmp_path / "mae_pretrain.pth"
    torch.save({"model": headless}, mae)
    video = AffWild2(synthetic_tree).videos()[1]
    base = ["extract", str(synthetic_tree), "--videos", video, "--batch-size", "64"]
    base += ["--workers", "0", "--no-progress", "--backbone", "test_vit"]

    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--checkpoint", str(mae)])
    _one_line_error(refused, str(mae), "missing keys (2): head.bias, head.weight")
    assert "--allow-missing-head" in refused.output and not (tmp_path / "x").exists()

    args = ["--checkpoint", str(mae), "--allow-missing-head"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "mae"), *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "full"), "--checkpoint", str(full)])
    assert result.exit_code == 0, result.output
    a, b = (
        read_store(tmp_path / "mae" / f"{video}.h5"),
        read_store(tmp_path / "full" / f"{video}.h5"),
    )
    assert a.logits is None and a.provenance.num_classes == 0 and b.logits.shape[1] == 10
    np.testing.assert_array_equal(a.features, b.features)  # the pooled output, head or not

    with_decoder = tmp_path / "mae_visualize.pth"  # the decoder stays unexpected, flag or not
    torch.save({"model": headless | {"decoder_embed.weight": torch.zeros(2, 2)}}, with_decoder)
    result = runner.invoke(
        app,
        [
            *base,
            "--out",
            str(tmp_path / "y"),
            "--checkpoint",
            str(with_decoder),
            "--allow-missing-head",
        ],
    )
    _one_line_error(result, str(with_decoder), "unexpected keys (1): decoder_embed.weight")


def test_pickled_model_is_refused_and_convert_round_trips(synthetic_tree, tmp_path):
    torch.manual_seed(4)
    model = timm.create_model("test_resnet", num_classes=3)
    pickled = tmp_path / "whole_model.pth"
    torch.save({"model": model, "args": {"lr": 0.1}}, pickled)
    video = AffWild2(synthetic_tree).videos()[0]
    cache = tmp_path / "cache"
    args = ["--backbone", "test_resnet", "--checkpoint", str(pickled)]
    refused = runner.invoke(app, _args(synthetic_tree, cache, video, *args))
    _one_line_error(refused, str(pickled), "ResNet", "fercache convert", "--trust-pickle")
    assert not cache.exists()

    out = tmp_path / "weights.safetensors"
    refused = runner.invoke(app, ["convert", str(pickled), "--out", str(out)])
    _one_line_error(refused, str(pickled), "--trust-pickle")
    assert not out.exists()
    result = runner.invoke(app, ["convert", str(pickled), "--out", str(out), "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert "weights.safetensors" in result.output
    backbone = load_backbone("test_resnet", out)
    _same_weights(backbone.model, model)
    assert backbone.num_classes == 3


def test_convert_needs_no_trust_for_a_plain_state_dict(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    source = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, source)
    converted = convert_checkpoint(source, tmp_path / "plain.safetensors")
    assert not converted.unpickled and converted.tensors == len(model.state_dict())
    _same_weights(load_backbone("test_resnet", converted.out).model, model)
    with pytest.raises(FercacheError, match="must name a"):
        convert_checkpoint(source, tmp_path / "plain.pt")
    result = runner.invoke(
        app, ["convert", str(tmp_path / "none.pth"), "--out", str(tmp_path / "a.safetensors")]
    )
    _one_line_error(result, "none.pth", "no such checkpoint file")


def test_damaged_or_pickled_files_are_told_apart(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    pickled = tmp_path / "whole.pth"
    torch.save(timm.create_model("test_resnet"), pickled)
    for pretrained in (None, TAGGED):  # fercache's reader, then timm's file override
        with pytest.raises(FercacheError, match="not a loadable PyTorch checkpoint") as caught:
            load_backbone("test_resnet", junk, pretrained=pretrained)
        assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)
        with pytest.raises(FercacheError, match=r"ResNet\), which fercache does not unpickle"):
            load_backbone("test_resnet", pickled, pretrained=pretrained)


def test_pretrain_cli_runs_from_a_pretrained_name(synthetic_tree, tmp_path, hub_cache):
    tiny = {"image_size": 32, "batch_size": 16, "workers": 0, "eval_every": 2, "log_every": 2}
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "pretrain", f"--labelled={synthetic_tree / 'pools' / 'labelled.csv'}",
            f"--out={run}", "--recipe=supervised", "--steps=2", "--no-progress",
            "--pretrained", HUB_NAME, *[f"--set={key}={value}" for key, value in tiny.items()],
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    backbone = load_backbone(None, run / "student.safetensors")
    assert backbone.name == "test_resnet" and backbone.num_classes == NUM_CLASSES
