"""`fercache analyse`: the whole pipeline on one or more ordinary videos, for a person who wants
to see what the model says about them.

Each step is the existing stage function, talking through files under `OUT/work/`:

1. `fercache.video.crop.crop_videos`: faces detected and aligned into
   `OUT/work/data/cropped_aligned/<video>/00001.jpg, ...` (frames without a face have no image);
2. `fercache.features.extract.extract`: the student checkpoint over every cropped frame into
   `OUT/work/cache`;
3. `fercache.predictions.predict.predict`: the student's own softmax (`source="student"`) or a
   temporal run (`options.run`, trained on a cache of the same checkpoint) for every frame of each
   video, listed in the frame list `OUT/work/frames.txt` (split "test": no annotations needed);
   frames without a face take the predictions of their nearest frames with one (see
   fercache.predictions.predict) -> `OUT/work/predictions.h5`;
4. `fercache.predictions.smooth.smooth_predictions`: the window vote -> `OUT/work/smoothed.h5`.

Then, per detected subject (`<video>`, or `<video>_left`/`<video>_right` with two subjects):
`OUT/<name>.csv` (frame, time_s, face_found, p_<class> for the 8 EXPR classes, label,
smoothed_label, plus au_<AU> and valence/arousal columns when the run predicts them) and
`OUT/<name>.png` (stacked class probabilities over time above a colour strip of the smoothed
label); with `annotate`, `OUT/<video>.annotated.mp4` per input video: the video with each face
box and its smoothed label drawn on it. A video in which no face is found anywhere gets no
outputs and is reported as skipped.
"""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.outputs import write_atomically, write_text_atomically

# One colour per EXPR class (matplotlib's tab10 without its grey), RGB 0-255.
COLOURS = (
    (31, 119, 180), (214, 39, 40), (140, 86, 75), (148, 103, 189),
    (44, 160, 44), (23, 190, 207), (255, 127, 14), (188, 189, 34),
)  # fmt: skip


@dataclass(frozen=True)
class AnalyseOptions:
    """What `analyse` takes besides the videos, the student checkpoint and OUT."""

    run: Path | None = None  # a temporal run; None: the student's own per-frame softmax
    window: int = 30
    annotate: bool = False
    size: int = 112
    subjects: int = 1
    device: str = "auto"
    batch: int = 32
    workers: int | None = None
    weights: str = "best"
    progress: bool = True


@dataclass
class AnalyseReport:
    """What `analyse` wrote; `skipped`: subjects/videos without any face."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list = field(default_factory=list)
    predictions: Path | None = None


def analyse(
    videos: list[Path], checkpoint: Path, out: Path, options: AnalyseOptions = AnalyseOptions()
) -> AnalyseReport:
    """Crop, extract, predict and smooth `videos`, then write each one's CSV, timeline PNG and
    (with `options.annotate`) annotated MP4 into `out`."""
    from fercache.video.crop import video_sources

    _check(checkpoint, options)
    videos = video_sources(videos)
    if not videos:
        raise FercacheError("give at least one video file (or a folder of videos) to analyse")
    out = Path(out)
    crops = _crop(videos, out / "work" / "data", options)
    return analyse_cropped(videos, crops, checkpoint, out, options)


def _crop(videos: list[Path], data: Path, options: AnalyseOptions):
    """The crop stage; videos cropped into `data` by an earlier call are read from their crop
    records. (A seam: the tests replace it to stay independent of face detection.)"""
    from fercache.video.crop import CropOptions, crop_videos, read_crop_record

    crop_options = CropOptions(
        size=options.size,
        subjects=options.subjects,
        batch=options.batch,
        device=options.device,
        progress=options.progress,
    )
    report = crop_videos(videos, data, crop_options)
    for source in report.skipped:
        report.videos += read_crop_record(data, Path(source).stem)
    return report


def _check(checkpoint: Path, options: AnalyseOptions) -> None:
    if not Path(checkpoint).is_file():
        raise FercacheError(f"{checkpoint}: no such student checkpoint")
    if options.window < 1:
        raise FercacheError(f"--window must be at least 1, not {options.window}")
    if options.run is not None and not Path(options.run).is_dir():
        raise FercacheError(f"{options.run}: no such temporal run folder")


def analyse_cropped(
    videos: list[Path], crops, checkpoint: Path, out: Path, options: AnalyseOptions
) -> AnalyseReport:
    """Steps 2-4 and the outputs, after `crop_videos` wrote `out/work/data` (its CropReport)."""
    from fercache.features.extract import ExtractOptions, extract
    from fercache.predictions.predict import PredictOptions, predict
    from fercache.predictions.smooth import smooth_predictions

    work = out / "work"
    report = AnalyseReport(failed=list(getattr(crops, "failed", [])))
    with_face = [crop for crop in crops.videos if crop.found > 0]
    report.skipped = [crop.name for crop in crops.videos if crop.found == 0]
    if not with_face:
        failed = "".join(f"; {video}: {why}" for video, why in report.failed)
        raise FercacheError(
            f"no face found in any frame of {', '.join(str(video) for video in videos)}; "
            f"nothing to analyse{failed}"
        )
    extract(
        work / "data",
        work / "cache",
        ExtractOptions(
            checkpoint=Path(checkpoint),
            batch_size=options.batch,
            workers=options.workers,
            device=options.device,
            force=True,  # the crop was just rewritten
            videos=tuple(crop.name for crop in with_face),
            progress=options.progress,
        ),
    )
    frame_list = "".join(
        f"{crop.name}/{frame:05d}.jpg\n"
        for crop in with_face
        for frame in range(1, crop.frames + 1)
    )
    frames = write_text_atomically(work / "frames.txt", frame_list, "the frame list")
    raw = predict(
        options.run,
        [work / "cache"],
        work / "predictions.h5",
        PredictOptions(
            split="test",
            frames=frames,
            source="student" if options.run is None else "temporal",
            device=_torch_device(options.device),
            weights=options.weights,
            progress=options.progress,
        ),
    )
    smoothed = smooth_predictions(work / "predictions.h5", work / "smoothed.h5", options.window)
    report.predictions = work / "smoothed.h5"
    for crop in with_face:
        rows, voted = raw.videos[crop.name], smoothed.videos[crop.name]
        report.written.append(
            write_text_atomically(out / f"{crop.name}.csv", table(rows, voted, crop.fps), "CSV")
        )
        report.written.append(timeline(rows, voted, crop.fps, out / f"{crop.name}.png"))
    if options.annotate:
        for video in videos:
            mine = [crop for crop in with_face if _source_of(crop.name, videos) == video]
            if mine:
                path = out / f"{video.stem}.annotated.mp4"
                report.written.append(annotate(video, mine, smoothed, path))
    return report


def _torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _source_of(name: str, videos: list[Path]) -> Path | None:
    for video in videos:
        if name == video.stem or name in (f"{video.stem}_left", f"{video.stem}_right"):
            return video
    return None


def table(rows: VideoPredictions, voted: VideoPredictions, fps: float) -> str:
    """The CSV text of one subject: one row per frame of the video."""
    header = ["frame", "time_s", "face_found"]
    has_expr = rows.probabilities is not None
    if has_expr:
        header += [f"p_{name}" for name in EXPR_CLASSES] + ["label", "smoothed_label"]
    if rows.au is not None:
        header += [f"au_{name}" for name in AU_NAMES]
    if rows.va is not None:
        header += list(VA_NAMES)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for i, frame in enumerate(rows.frames.tolist()):
        line = [frame, f"{(frame - 1) / fps:.3f}", int(rows.has_image[i])]
        if has_expr:
            line += [f"{p:.6f}" for p in rows.probabilities[i].tolist()]
            line += [EXPR_CLASSES[rows.labels[i]], EXPR_CLASSES[voted.labels[i]]]
        if rows.au is not None:
            line += [f"{p:.6f}" for p in rows.au[i].tolist()]
        if rows.va is not None:
            line += [f"{v:.6f}" for v in rows.va[i].tolist()]
        writer.writerow(line)
    return text.getvalue()


def timeline(rows: VideoPredictions, voted: VideoPredictions, fps: float, path: Path) -> Path:
    """Stacked EXPR probabilities over time above a colour strip of the smoothed label."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if rows.probabilities is None:
        raise FercacheError(f"{path}: the predictions carry no EXPR probabilities to plot")
    colours = [tuple(c / 255 for c in colour) for colour in COLOURS]
    seconds = (rows.frames - 1) / fps
    figure = Figure(figsize=(10, 4))
    top, strip = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    top.stackplot(seconds, rows.probabilities.T, labels=EXPR_CLASSES, colors=colours)
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    end = seconds[-1] + 1 / fps if len(seconds) else 1
    top.set_xlim(0, end)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    strip.imshow(
        voted.labels[None, :],
        aspect="auto",
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(EXPR_CLASSES) - 0.5,
        extent=(0, end, 0, 1),
        interpolation="nearest",
    )
    strip.set_yticks([])
    strip.set_ylabel("smoothed", rotation=0, ha="right", va="center")
    strip.set_xlabel("time (s)")
    figure.tight_layout()
    return write_atomically(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), "the timeline plot"
    )


def annotate(video: Path, crops: list, smoothed: Predictions, path: Path) -> Path:
    """A copy of `video` with each subject's face box and smoothed label drawn on its frames."""
    from PIL import Image, ImageDraw

    from fercache.video.pyav import write_drawn_copy

    labels = {crop.name: _labels_by_frame(smoothed.videos[crop.name]) for crop in crops}

    def draw_faces(number: int, image: Image.Image) -> None:
        draw = ImageDraw.Draw(image)
        for crop in crops:
            box = crop.boxes.get(number)
            label = labels[crop.name].get(number)
            if box is None or label is None:
                continue
            colour = COLOURS[label]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 2, max(0, box[1] - 12)), EXPR_CLASSES[label], fill=colour)

    return write_atomically(
        path, lambda tmp: write_drawn_copy(video, tmp, draw_faces), "the annotated video"
    )


def _labels_by_frame(rows: VideoPredictions) -> dict[int, int]:
    return dict(zip(rows.frames.tolist(), rows.labels.tolist(), strict=True))
