"""Every registered temporal model (`fercache.temporal.registry`) is trained, resumed,
predicted, swept and folded as the transformer is; a toy model registered from the test joins
the command line with one registry line."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn
from typer.testing import CliRunner

from fercache.cli import app
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions
from fercache.resume import read_metrics
from fercache.temporal import loop
from fercache.temporal.config import load_config
from fercache.temporal.features import load_fused_features
from fercache.temporal.inference import TemporalPredictor
from fercache.temporal.loop import TrainRequest, train
from fercache.temporal.model import ModelConfig, TemporalModel
from fercache.temporal.registry import TEMPORAL_MODELS, build_model
from tests.train_data import TINY_TEMPORAL, TreeSpec, write_cache, write_tree

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = sorted(TEMPORAL_MODELS)
VAL_VIDEOS = ["val00", "val01", "val02"]


class MeanOfClip(TemporalModel):
    """A toy: each frame plus the mean of the clip's real frames, through one linear."""

    description = "each frame and its clip's mean"

    def build_encoder(self, config: ModelConfig) -> nn.Module:
        return nn.Linear(2 * config.width, config.width)

    def encode(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        keep = torch.ones_like(x[..., :1]) if padding is None else (~padding)[..., None].to(x)
        mean = (x * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True)
        return self.encoder(torch.cat([x, mean.expand_as(x)], dim=-1))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    labels = write_tree(root / "data", TreeSpec(train_videos=6, val_videos=3, frames=200))
    write_cache(root / "cache", root / "data", labels)
    return {"data": root / "data", "cache": root / "cache", "labels": labels}


def _request(model: str, epochs: int = 2, **options) -> TrainRequest:
    overrides = (*TINY_TEMPORAL, f"model={model}")
    return TrainRequest(overrides=overrides, epochs=epochs, device="cpu", progress=False, **options)


def _without_timing(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "timing"} for record in records]


@pytest.mark.parametrize("name", MODELS)
def test_padding_rows_never_change_the_real_rows(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(6, ("expr", "va"), 64, 8, 2, 2, 16, 0.0, 0.0, name)).eval()
    assert isinstance(model, TEMPORAL_MODELS[name])
    features = torch.randn(2, 40, 6)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 25:] = True
    scrambled = features.clone()
    scrambled[1, 25:] = torch.randn(15, 6) * 100
    with torch.no_grad():
        first, second = model(features, padding), model(scrambled, padding)
    assert first["expr"].shape == (2, 40, 8) and first["va"].abs().max() <= 1
    for task in first:
        assert torch.allclose(first[task][1, :25], second[task][1, :25], atol=1e-5)
        assert torch.equal(first[task][0], second[task][0])


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_resumes_and_predicts_what_validation_scored(
    name, small, tmp_path, monkeypatch
):
    whole = train([small["cache"]], small["data"], tmp_path / "whole", _request(name))

    validate = loop.validate

    def interrupted_in_epoch_two(*arguments):
        if len(read_metrics(tmp_path / "cut")) == 1:
            raise KeyboardInterrupt  # as a Ctrl-C during the second epoch's validation
        return validate(*arguments)

    monkeypatch.setattr(loop, "validate", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train([small["cache"]], small["data"], tmp_path / "cut", _request(name))
    monkeypatch.setattr(loop, "validate", validate)
    train([small["cache"]], small["data"], tmp_path / "cut", _request(name, resume=True))
    assert _without_timing(read_metrics(tmp_path / "cut")) == _without_timing(
        read_metrics(tmp_path / "whole")
    )

    assert json.loads((tmp_path / "whole" / "model.json").read_text())["model"] == name
    predictor = TemporalPredictor.load(tmp_path / "whole")
    assert isinstance(predictor.model, TEMPORAL_MODELS[name])
    predicted, truth = [], []
    for video, fused in load_fused_features([small["cache"]], VAL_VIDEOS).items():
        predicted.append(predictor.predict(fused.features)["expr"].argmax(axis=1))
        truth.append(small["labels"][video][fused.frames - 1])
    predicted, truth = np.concatenate(predicted), np.concatenate(truth)
    valid = truth >= 0
    f1 = f1_score(truth[valid], predicted[valid], average="macro", labels=range(8), zero_division=0)
    assert f1 == pytest.approx(whole["best_val_f1"], abs=1e-9)

    out = tmp_path / "val.h5"
    result = runner.invoke(app, [
        "predict", str(tmp_path / "whole"), "--cache", str(small["cache"]),
        "--data", str(small["data"]), "--split", "val", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(Predictions.read(out).videos) == VAL_VIDEOS


def test_a_sweep_and_folds_run_every_model(small, tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [item for setting in TINY_TEMPORAL for item in ("--set", setting)]
    result = runner.invoke(app, [
        "sweep", str(small["cache"]), "--data", str(small["data"]), "--out", str(sweep),
        "--grid", f"model={','.join(MODELS)}", "--epochs", "1", "--no-progress", *tiny,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    trained = {json.loads(path.read_text())["model"] for path in sweep.glob("*/model.json")}
    assert trained == set(MODELS)

    folds = tmp_path / "folds"
    result = runner.invoke(app, [
        "train", str(small["cache"]), "--data", str(small["data"]), "--out", str(folds),
        "--folds", "2", "--epochs", "1", "--device", "cpu", "--no-progress", *tiny,
        "--set", "model=tcn",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    fold_models = [json.loads(path.read_text())["model"] for path in folds.glob("*/model.json")]
    assert fold_models == ["tcn", "tcn"]


def test_a_toy_model_registered_from_a_test_trains_predicts_and_is_listed(
    small, tmp_path, monkeypatch
):
    monkeypatch.setitem(TEMPORAL_MODELS, "mean-of-clip", MeanOfClip)
    shown = runner.invoke(app, ["train", "--help"]).output
    help_text = " ".join(shown.replace("│", " ").split())  # the help, unwrapped
    assert "mean-of-clip (each frame and its clip's mean)" in help_text
    assert "tcn (dilated temporal convolutions" in help_text

    run = tmp_path / "toy"
    train([small["cache"]], small["data"], run, _request("mean-of-clip", epochs=1))
    predictor = TemporalPredictor.load(run)
    assert isinstance(predictor.model, MeanOfClip)
    fused = load_fused_features([small["cache"]], ["val00"])["val00"]
    assert predictor.predict(fused.features)["expr"].shape == (len(fused.frames), 8)


def test_an_unknown_model_is_refused_with_the_registered_names(small, tmp_path):
    with pytest.raises(FercacheError, match="model must be one of transformer, tcn"):
        load_config(None, ["model=lstm"])
    run = tmp_path / "run"
    train([small["cache"]], small["data"], run, _request("tcn", epochs=1))
    details = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**details, "model": "lstm"}))
    with pytest.raises(FercacheError, match=r"model\.json: unknown temporal model 'lstm'"):
        TemporalPredictor.load(run)


def test_a_run_whose_model_json_names_no_model_is_a_transformer(small, tmp_path):
    run = tmp_path / "run"
    train([small["cache"]], small["data"], run, _request("transformer", epochs=1))
    details = json.loads((run / "model.json").read_text())
    del details["model"]  # as runs trained before models were registered
    (run / "model.json").write_text(json.dumps(details))
    assert type(TemporalPredictor.load(run).model).__name__ == "TemporalTransformer"


def test_the_transformer_alone_checks_width_against_heads():
    with pytest.raises(FercacheError, match="width must be a multiple of heads"):
        load_config(None, ["width=10", "heads=4"])
    assert load_config(None, ["model=tcn", "width=10", "heads=4"]).width == 10
