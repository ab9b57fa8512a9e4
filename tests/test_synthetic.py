"""The synthetic Aff-Wild2 generator: determinism, layout, label consistency, difficulty.

Layout and label checks read the files the way any reader would (lines, file names, JPEG
headers), not through the generator's code, and compare with what synth.json claims.
"""

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from fercache.data.tasks import AU, AU_NAMES, EXPR, EXPR_CLASSES, VA
from fercache.errors import FercacheError
from fercache.synth import (
    Nuisance,
    SynthConfig,
    expression_geometry,
    face_landmarks,
    generate,
    plan_videos,
    render_face,
    sample_background,
    sample_identity,
    simulate_video,
    unlabelled_truth,
)
from fercache.synth.plan import MIN_POOL_IMAGES_PER_CLASS
from fercache.synth.pools import plan_labelled_pool, pool_draw, pool_image, pool_kinds
from tests.holder import another_process_holding

TASK_FOLDERS = {
    EXPR: "EXPR_Recognition_Challenge",
    AU: "AU_Detection_Challenge",
    VA: "VA_Estimation_Challenge",
}
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
TINY = SynthConfig(videos=4, frames=64, labelled_pool=40, unlabelled_pool=20)
HAPPINESS, SADNESS, NEUTRAL = (EXPR_CLASSES.index(c) for c in ("Happiness", "Sadness", "Neutral"))


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def read_annotation(root: Path, task, split: str, video: str) -> list[str]:
    """The label lines of one file, after checking its header and line endings."""
    text = (
        root / "Annotations" / TASK_FOLDERS[task] / SPLIT_FOLDERS[split] / f"{video}.txt"
    ).read_text()
    assert "\r" not in text and text.endswith("\n")
    header, *lines = text[:-1].split("\n")
    assert header == task.header
    return lines


def expr_labels(root: Path, split: str, video: str) -> np.ndarray:
    return np.array([int(line) for line in read_annotation(root, EXPR, split, video)])


def au_labels(root: Path, split: str, video: str) -> np.ndarray:
    return np.array(
        [[int(v) for v in line.split(",")] for line in read_annotation(root, AU, split, video)]
    )


def va_labels(root: Path, split: str, video: str) -> np.ndarray:
    lines = read_annotation(root, VA, split, video)
    for line in lines:
        assert line == "-5,-5" or re.fullmatch(r"-?\d\.\d{3},-?\d\.\d{3}", line), line
    return np.array([[float(v) for v in line.split(",")] for line in lines])


def image_frames(root: Path, video: str) -> list[int]:
    names = [path.name for path in (root / "cropped_aligned" / video).iterdir()]
    assert all(re.fullmatch(r"\d{5}\.jpg", name) for name in names)
    return sorted(int(name[:5]) for name in names)


@pytest.fixture(scope="module")
def planted(synthetic_tree) -> dict:
    return json.loads((synthetic_tree / "synth.json").read_text())


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    in_process = generate(tmp_path / "one", TINY, progress=False)
    generate(tmp_path / "two", SynthConfig(**{**TINY.__dict__, "workers": 2}), progress=False)
    generate(tmp_path / "other", SynthConfig(**{**TINY.__dict__, "seed": 1}), progress=False)

    one, two, other = (digests(tmp_path / name) for name in ("one", "two", "other"))
    assert one == two
    assert in_process == json.loads((tmp_path / "one" / "synth.json").read_text())
    shared = sorted(set(one) & set(other) - {"README.txt"})
    assert sum(one[name] != other[name] for name in shared) > 0.9 * len(shared)


def test_annotation_files_match_the_images_and_synth_json(synthetic_tree, planted):
    for video, record in planted["videos"].items():
        expr = expr_labels(synthetic_tree, record["split"], video)
        au = au_labels(synthetic_tree, record["split"], video)
        va = va_labels(synthetic_tree, record["split"], video)
        frames = image_frames(synthetic_tree, video)
        assert len(expr) == len(au) == len(va) == record["frames"]
        assert len(frames) == record["images"] and frames[-1] <= record["frames"]
        assert record["frames_without_image"] == record["frames"] - len(frames)
        assert record["trailing_frames_without_image"] == record["frames"] - frames[-1]
        assert set(expr) <= set(range(-1, 8))
        assert record["expr_invalid"] == int((expr == EXPR.invalid).sum())
        assert record["expr_counts"] == np.bincount(expr[expr >= 0], minlength=8).tolist()
        assert au.shape[1] == len(AU_NAMES) and set(au.ravel()) <= {-1, 0, 1}
        assert record["au_invalid"] == int((au == AU.invalid).all(axis=1).sum())
        assert not ((au == AU.invalid).any(axis=1) & (au != AU.invalid).any(axis=1)).any()
        assert record["va_invalid"] == int((va == VA.invalid).all(axis=1).sum())
        assert (np.abs(va[va != VA.invalid]) <= 1).all()


def test_the_planted_quirks_are_there(synthetic_tree, planted):
    videos = planted["videos"]
    assert (
        sum(
            v["frames_without_image"] - v["trailing_frames_without_image"] > 0
            for v in videos.values()
        )
        >= 1
    )
    assert any(v["trailing_frames_without_image"] > 0 for v in videos.values())
    assert all(v["expr_invalid"] > 0 for v in videos.values())
    left, right = planted["left_right_pair"]
    assert left.endswith("_left") and right == left.removesuffix("_left") + "_right"
    assert videos[left]["split"] == videos[right]["split"]
    assert videos[left]["frames"] == videos[right]["frames"]
    assert videos[left]["identity"] != videos[right]["identity"]
    assert sorted(p.name for p in (synthetic_tree / "cropped_aligned").iterdir()) == sorted(videos)


def test_splits_have_their_own_identities_and_every_class(synthetic_tree, planted):
    identities = [v["identity"] for v in planted["videos"].values()]
    assert len(set(identities)) == len(identities), "one identity per video or subject"
    for split in SPLIT_FOLDERS:
        videos = [name for name, v in planted["videos"].items() if v["split"] == split]
        on_disk = {
            p.stem
            for p in (
                synthetic_tree / "Annotations" / TASK_FOLDERS[EXPR] / SPLIT_FOLDERS[split]
            ).iterdir()
        }
        assert on_disk == set(videos)
        labels = np.concatenate([expr_labels(synthetic_tree, split, video) for video in videos])
        assert set(range(8)) <= set(labels), f"every class in {split}"


def test_images_are_112_rgb_jpegs(synthetic_tree, planted):
    video = next(iter(planted["videos"]))
    for path in sorted((synthetic_tree / "cropped_aligned" / video).iterdir())[:50]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (112, 112))


def test_pools(synthetic_tree, planted):
    pools = planted["pools"]
    header, *rows = (synthetic_tree / "pools" / "labelled.csv").read_text().splitlines()
    assert header == "path,label"
    paths, labels = zip(*(row.split(",") for row in rows), strict=True)
    assert len(rows) == pools["labelled"]
    assert all((synthetic_tree / "pools" / path).is_file() for path in paths)
    counts = np.bincount([EXPR_CLASSES.index(label) for label in labels], minlength=8)
    assert counts.tolist() == pools["labelled_counts"] and counts.min() >= 5
    assert counts.argmax() == HAPPINESS, "AffectNet-like: Happiness dominates"
    assert len(list((synthetic_tree / "pools" / "unlabelled").glob("*.jpg"))) == pools["unlabelled"]
    assert pools["unlabelled_identities"] > pools["labelled_identities"]
    readme = (synthetic_tree / "README.txt").read_text().splitlines()
    assert len(readme) == 2 and "fercache synth" in readme[1]


def test_landmarks_sit_on_the_drawn_face_and_move_with_expression_and_pose():
    rng = np.random.default_rng(0)
    identity, background = sample_identity(rng), sample_background(rng)
    neutral = face_landmarks(identity, expression_geometry(NEUTRAL, 1.0), Nuisance(background))
    surprise_geometry = expression_geometry(EXPR_CLASSES.index("Surprise"), 1.0)
    surprise = face_landmarks(identity, surprise_geometry, Nuisance(background))
    turned = face_landmarks(
        identity, expression_geometry(NEUTRAL, 1.0), Nuisance(background, yaw=0.4)
    )
    assert neutral.shape == (68, 2)
    # the mouth opens between the inner lips' middle points (62 upper, 66 lower)...
    assert surprise[66, 1] - surprise[62, 1] > neutral[66, 1] - neutral[62, 1] + 10
    centre = np.round((surprise[62] + surprise[66]) / 2).astype(int)
    pixels = np.asarray(render_face(identity, surprise_geometry, Nuisance(background)))
    assert pixels[centre[1], centre[0]].tolist() == [70, 25, 30]  # ...onto the drawn opening
    assert surprise[17:27, 1].mean() < neutral[17:27, 1].mean() - 5  # brows raised
    assert np.abs(turned[:17, 0] - neutral[:17, 0]).mean() > 8  # the outline moves with yaw


def test_the_labelled_pool_has_its_landmarks_in_ibug_order(synthetic_tree):
    header, *rows = (synthetic_tree / "pools" / "landmarks.csv").read_text().splitlines()
    assert header.split(",")[:5] == ["path", "x0", "y0", "x1", "y1"]
    assert len(header.split(",")) == 1 + 136
    labelled = (synthetic_tree / "pools" / "labelled.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [row.split(",")[0] for row in labelled]
    points = np.array([[float(v) for v in row.split(",")[1:]] for row in rows])
    points = points.reshape(len(rows), 68, 2)
    inner = points[:, 17:]  # brows, nose, eyes and mouth lie inside the 112 px crop
    assert inner.min() > 0 and inner.max() < 112
    assert (points[:, 36, 0] < points[:, 45, 0]).all()  # the image-left eye's corner comes first
    assert (points[:, 17:27, 1].mean(1) < points[:, 36:48, 1].mean(1)).all()  # brows over eyes
    assert (points[:, 27:36, 1].mean(1) < points[:, 48:68, 1].mean(1)).all()  # nose over mouth


def test_action_units_and_valence_follow_the_expression(synthetic_tree, planted):
    expr, au, va = [], [], []
    for video, record in planted["videos"].items():
        expr.append(expr_labels(synthetic_tree, record["split"], video))
        au.append(au_labels(synthetic_tree, record["split"], video))
        va.append(va_labels(synthetic_tree, record["split"], video))
    expr, au, va = np.concatenate(expr), np.concatenate(au), np.concatenate(va)
    au_valid, va_valid = (au != AU.invalid).all(axis=1), (va != VA.invalid).all(axis=1)

    def au_rate(label: int, unit: str) -> float:
        return au[(expr == label) & au_valid, AU_NAMES.index(unit)].mean()

    assert au_rate(HAPPINESS, "AU12") > au_rate(NEUTRAL, "AU12") + 0.5
    assert au_rate(SADNESS, "AU15") > au_rate(HAPPINESS, "AU15") + 0.5
    valence = {label: va[(expr == label) & va_valid, 0].mean() for label in (HAPPINESS, SADNESS)}
    assert valence[HAPPINESS] > 0.2 and valence[SADNESS] < -0.2


# --- difficulty: a simple per-frame classifier is well above chance and well below perfect


_FACE_BOX = (14, 18, 98, 106)  # the middle of the 112x112 crop: brows to chin


def face_features(path: Path) -> np.ndarray:
    """Histograms of gradient orientation (9 bins) over 8x8 cells of the face: a classic
    hand-made feature, so that a linear classifier sees edges rather than skin and hair."""
    with Image.open(path) as image:
        face = image.convert("L").crop(_FACE_BOX).resize((64, 64), Image.Resampling.BILINEAR)
    pixels = np.asarray(face, dtype=np.float32)
    dx, dy = np.zeros_like(pixels), np.zeros_like(pixels)
    dx[:, 1:-1] = pixels[:, 2:] - pixels[:, :-2]
    dy[1:-1] = pixels[2:] - pixels[:-2]
    orientation = np.minimum((np.arctan2(dy, dx) % np.pi) / np.pi * 9, 8).astype(int)
    votes = np.hypot(dx, dy)[..., None] * (orientation[..., None] == np.arange(9))
    cells = votes.reshape(8, 8, 8, 8, 9).sum(axis=(1, 3))
    return (cells / (np.linalg.norm(cells, axis=2, keepdims=True) + 1e-3)).ravel()


DIFFICULTY_TREE = SynthConfig(videos=12, frames=150, seed=0, labelled_pool=1500, unlabelled_pool=20)


def labelled_frames(root: Path, video: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """1-based frames that have an image and a valid EXPR label, and those labels."""
    expr = expr_labels(root, split, video)
    frames = np.array(image_frames(root, video))
    labels = expr[frames - 1]
    return frames[labels != EXPR.invalid], labels[labels != EXPR.invalid]


@pytest.fixture(scope="module")
def validation_frames(tmp_path_factory) -> dict[str, np.ndarray]:
    """Logistic regression on face features, trained on the labelled pool and Train_Set frames
    (as phase 1 would), applied to every labelled Validation_Set frame. Per frame: the truth,
    the prediction, and from the generator's timeline the intensity and what disturbed it."""
    root = tmp_path_factory.mktemp("difficulty") / "tree"
    planted = generate(root, DIFFICULTY_TREE, progress=False)
    pool = [row.split(",") for row in (root / "pools/labelled.csv").read_text().splitlines()[1:]]
    train_x = [face_features(root / "pools" / path) for path, _ in pool]
    train_y = [EXPR_CLASSES.index(label) for _, label in pool]
    val_x, columns = [], {"truth": [], "intensity": [], "disturbed": []}
    plans = {plan.name: plan for plan in plan_videos(DIFFICULTY_TREE)}
    for video, record in planted["videos"].items():
        frames, labels = labelled_frames(root, video, record["split"])
        features = [
            face_features(root / "cropped_aligned" / video / f"{f:05d}.jpg") for f in frames
        ]
        if record["split"] == "train":
            train_x += features
            train_y += labels.tolist()
            continue
        val_x += features
        timeline = simulate_video(plans[video], DIFFICULTY_TREE.seed)
        events = timeline.events
        disturbed = events["occlusion"] | events["blur"] | events["talking"] | events["micro"]
        columns["truth"].append(labels)
        columns["intensity"].append(timeline.intensity[frames - 1])
        columns["disturbed"].append(disturbed[frames - 1])
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(class_weight="balanced", C=0.01, max_iter=500)
    model.fit(scaler.transform(train_x), train_y)
    result = {name: np.concatenate(values) for name, values in columns.items()}
    result["predicted"] = model.predict(scaler.transform(val_x))
    return result


def test_a_per_frame_classifier_is_imperfect(validation_frames):
    macro_f1 = f1_score(
        validation_frames["truth"], validation_frames["predicted"], average="macro", labels=range(8)
    )
    assert 0.25 < macro_f1 < 0.85, f"chance is about 0.125; got {macro_f1:.3f}"


def test_onset_and_offset_frames_are_harder_than_clean_apex_frames(validation_frames):
    frames = validation_frames
    correct = frames["truth"] == frames["predicted"]
    undisturbed = ~frames["disturbed"]
    clean_apex = (frames["intensity"] > 0.6) & undisturbed
    onset_or_offset = (frames["intensity"] < 0.3) & (frames["truth"] != NEUTRAL) & undisturbed
    accuracy = {
        "clean apex": correct[clean_apex].mean(),
        "onset/offset": correct[onset_or_offset].mean(),
    }
    assert accuracy["clean apex"] > accuracy["onset/offset"] + 0.15, accuracy


# --- refusing to overwrite


def test_refuses_a_folder_that_is_not_a_synthetic_tree(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FercacheError, match=r"synth\.json"):
        generate(tmp_path, TINY, progress=False, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_replaces_an_earlier_tree_only_with_force(tmp_path):
    (tmp_path / "synth.json").write_text("{}")
    (tmp_path / "stale.txt").write_text("from an older tree")
    with pytest.raises(FercacheError, match="--force"):
        generate(tmp_path, TINY, progress=False)
    generate(tmp_path, TINY, progress=False, force=True)
    assert not (tmp_path / "stale.txt").exists()
    assert json.loads((tmp_path / "synth.json").read_text())["fercache_synth"] == 1


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"videos": 3}, "--videos"),
        ({"frames": 10}, "--frames"),
        ({"labelled_pool": 8}, "--labelled"),
    ],
)
def test_rejects_configs_it_cannot_honour(tmp_path, change, option):
    with pytest.raises(FercacheError, match=option):
        generate(tmp_path / "out", SynthConfig(**{**TINY.__dict__, **change}), progress=False)
    assert not (tmp_path / "out").exists()


def test_unlabelled_truth_is_what_each_unlabelled_image_was_drawn_with(synthetic_tree):
    """The classes benchmarks score pseudo labels against: recomputed from the seed, they are
    the very draws the images were rendered from (re-rendered here, same pixels)."""
    config = SynthConfig(**json.loads((synthetic_tree / "synth.json").read_text())["config"])
    classes, intensities = unlabelled_truth(config)
    assert len(classes) == len(intensities) == config.unlabelled_pool
    assert set(classes.tolist()) <= set(range(len(EXPR_CLASSES)))
    assert intensities.min() >= 0 and intensities.max() < 1
    kind = pool_kinds(config)["unlabelled"]
    for index in (0, 7, config.unlabelled_pool - 1):
        draw = pool_draw(config.seed, kind, index, None)
        assert (draw.expression, draw.intensity) == (classes[index], intensities[index])
        image, quality, _ = pool_image(config.seed, kind, index, None)
        saved = Image.open(synthetic_tree / "pools" / "unlabelled" / f"{index + 1:06d}.jpg")
        image.save(buffer := io.BytesIO(), format="JPEG", quality=quality)
        assert np.array_equal(np.asarray(Image.open(buffer)), np.asarray(saved))


@pytest.mark.parametrize("size", [40, 41, 60, 100, 800])
def test_the_labelled_pool_holds_every_class_at_least_its_minimum(size):
    counts = np.bincount(plan_labelled_pool(SynthConfig(labelled_pool=size)), minlength=8)
    assert counts.sum() == size and counts.min() >= MIN_POOL_IMAGES_PER_CLASS, counts


def test_a_folder_another_live_process_writes_a_tree_into_is_refused(tmp_path):
    out = tmp_path / "tree"
    out.mkdir()
    with another_process_holding(out) as pid:
        with pytest.raises(FercacheError, match=f"pid {pid} is writing a synthetic tree"):
            generate(out, SynthConfig(videos=4, frames=64, workers=1), progress=False)
        assert [path.name for path in out.iterdir()] == [".run.claim"]  # the holder's, alone
