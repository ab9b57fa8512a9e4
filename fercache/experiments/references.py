"""Reference learners: the figure a phase-1 network on the same data must at least reach.

HOG (9 orientations, 6 px cells, grey at 48 px) + logistic regression (balanced class weights,
C 0.05), a linear model on hand-made features, trained on a labelled source of a tree and scored
on a fixed sample of its validation frames (people never seen in training). A network below it
on the same source is broken; the data is not the suspect until both fail. The demo reports
these figures beside its rows; `benchmarks/reference_learners.py` adds the demo's own network
and writes results/synthetic.md.

HOG comes from scikit-image (a `dev` dependency, installed by `make`); without it the figures
are not computed and the caller says so.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from fercache.pretrain.sources import LabelledImages, affwild2_frames, read_labelled

VALIDATION_SAMPLE = 3000  # validation frames scored, drawn once with generator seed 0
IMAGE_SIZE = 48
_CHUNK = 500  # images per HOG task
# the labelled sources of Yu et al.'s Table 1 on a synthetic tree, as `--labelled` gets them
SOURCES = {
    "frames": ("",),  # the training videos' frames: few people
    "still": ("pools/labelled.csv",),  # the labelled still images
}


@dataclass(frozen=True)
class Labelled:
    paths: list[Path]
    labels: np.ndarray


def hog_available() -> bool:
    try:
        import skimage.feature  # noqa: F401
    except ImportError:
        return False
    return True


def source_paths(tree: Path, source: str) -> list[Path]:
    return [tree / part if part else tree for part in SOURCES[source]]


def labelled_source(tree: Path, source: str) -> Labelled:
    return _labelled(read_labelled(source_paths(tree, source)))


def validation_sample(tree: Path, size: int | None = VALIDATION_SAMPLE) -> Labelled:
    """`size` labelled validation frames (all when None or fewer), the same ones each call."""
    frames = _labelled(affwild2_frames(tree, "val"))
    if size is None or len(frames.paths) <= size:
        return frames
    keep = np.sort(np.random.default_rng(0).choice(len(frames.paths), size, replace=False))
    return Labelled([frames.paths[i] for i in keep], frames.labels[keep])


def hog_features(paths: list[Path]) -> np.ndarray:
    """One HOG vector per image, computed on every core (joblib, as scikit-learn does)."""
    chunks = [paths[start : start + _CHUNK] for start in range(0, len(paths), _CHUNK)]
    parts = Parallel(n_jobs=-1)(delayed(_hog_of)(chunk) for chunk in chunks)
    return np.concatenate(parts)


def _hog_of(paths: list[Path]) -> np.ndarray:
    from skimage.feature import hog

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            grey = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return hog(np.asarray(grey), orientations=9, pixels_per_cell=(6, 6))

    return np.stack([one(path) for path in paths])


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 (%) over the 8 classes, rounded to 2 decimals."""
    return round(100 * f1_score(labels, predicted, average="macro", labels=range(8)), 2)


def hog_logistic(
    train: Labelled, validation: Labelled, validation_features: np.ndarray | None = None
) -> float:
    """Validation macro-F1 (%) of HOG + logistic regression trained on `train`."""
    if validation_features is None:
        validation_features = hog_features(validation.paths)
    model = LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000)
    model.fit(hog_features(train.paths), train.labels)
    return macro_f1(validation.labels, model.predict(validation_features))


def hog_references(tree: Path, sample: int | None = VALIDATION_SAMPLE) -> dict[str, float]:
    """HOG + logistic regression trained on each source of `tree` (SOURCES), scored on the
    same validation frames (`sample` of them; None: every labelled one)."""
    validation = validation_sample(tree, sample)
    features = hog_features(validation.paths)
    return {
        source: hog_logistic(labelled_source(tree, source), validation, features)
        for source in SOURCES
    }


def _labelled(images: LabelledImages) -> Labelled:
    return Labelled(list(images.paths), np.asarray(images.labels))
