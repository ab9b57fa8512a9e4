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
outputs and is reported as skipped; a video that cannot be read is reported as failed.

Everything that can be refused is refused before the crop: OUT that is a file, the checkpoint
(missing, damaged, not fitting its backbone, without the 8 EXPR classes, pretrain's teacher)
and the run (unfinished, or trained on features of another checkpoint), and crops of an
earlier call into OUT made with another --size or --subjects. A rerun into OUT replaces all
outputs of a video together: the ones it does not write again (an annotated MP4 without
`annotate`) are removed.
"""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.data.tasks import AU_NAMES, EXPR_CLASSES, VA_NAMES
from fercache.errors import FercacheError
from fercache.framewise.pred_file import Predictions, VideoPredictions
from fercache.outputs import write_atomically, write_text_atomically
from fercache.resume import writing_run

# One colour per EXPR class (matplotlib's tab10 without its grey), RGB 0-255.
COLOURS = (
    (31, 119, 180), (214, 39, 40), (140, 86, 75), (148, 103, 189),
    (44, 160, 44), (23, 190, 207), (255, 127, 14), (188, 189, 34),
)  # fmt: skip
# How the timeline marks the frames without a face: not a colour of a class
NO_FACE = {"facecolor": "lightgrey", "edgecolor": "dimgrey", "hatch": "//"}


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


# What a checkpoint that does not fit its backbone asks of `analyse`'s user, who has no
# --backbone: analyse builds the network the checkpoint's model config names
CHECKPOINT_ADVICE = (
    "analyse builds the network its model config names (resnet50 without one): give the "
    "student.safetensors that `fercache pretrain` exported, or write the model config beside "
    "the checkpoint as <name>.json (docs/formats.md)"
)


@dataclass
class AnalyseReport:
    """What `analyse` wrote; `skipped`: subjects/videos without any face; `failed`: (video,
    why) of the videos that could not be cropped."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    predictions: Path | None = None


def analyse(
    videos: list[Path], checkpoint: Path, out: Path, options: AnalyseOptions = AnalyseOptions()
) -> AnalyseReport:
    """Crop, extract, predict and smooth `videos`, then write each one's CSV, timeline PNG and
    (with `options.annotate`) annotated MP4 into `out`."""
    from fercache.video.crop import check_out_folder, video_sources

    out = Path(out)
    check_out_folder(out)
    videos = video_sources(videos)
    if not videos:
        raise FercacheError("give at least one video file (or a folder of videos) to analyse")
    _check(Path(checkpoint), options)
    # held: two analyses into one OUT would mix their videos' outputs
    with writing_run(out, what="an analysis", wait="wait until it ends, or choose another --out"):
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
    """Refuse, before the crop, a checkpoint or run that would fail after it."""
    from fercache.backbone.network import load_backbone
    from fercache.features.extract import extraction_provenance

    if options.window < 1:
        raise FercacheError(f"--window must be at least 1, not {options.window}")
    if not checkpoint.is_file():
        raise FercacheError(f"{checkpoint}: no such student checkpoint")
    student = checkpoint.with_name("student.safetensors")
    if checkpoint.name == "teacher.safetensors" and student.is_file():
        raise FercacheError(
            f"{checkpoint}: the teacher that `fercache pretrain` exported beside the student; "
            f"analyse shows what the student says: give --checkpoint {student}"
        )
    backbone = load_backbone(None, checkpoint, advice=CHECKPOINT_ADVICE)
    if options.run is None:
        if backbone.num_classes != len(EXPR_CLASSES):
            raise FercacheError(
                f"{checkpoint}: the network has {backbone.num_classes} output classes, not the "
                f"{len(EXPR_CLASSES)} EXPR classes; give an EXPR student (the "
                "student.safetensors of `fercache pretrain`), or a --run trained on a cache of "
                "this checkpoint"
            )
        return
    if not Path(options.run).is_dir():
        raise FercacheError(f"{options.run}: no such temporal run folder")
    from fercache.temporal.inference import TemporalPredictor

    trained_on = TemporalPredictor.load(options.run, "cpu", options.weights).cache_fingerprints
    extract_options = _extract_options(checkpoint, options, ())
    fingerprint = extraction_provenance(backbone, extract_options, backbone.feature_dim)
    if trained_on != [fingerprint.fingerprint]:
        raise FercacheError(
            f"--run {options.run}: trained on features with fingerprint(s) "
            f"{', '.join(trained_on)}, but analyse extracts {checkpoint} as "
            f"{fingerprint.fingerprint}; give a run trained on one cache of this checkpoint "
            f"(`fercache extract --checkpoint {checkpoint}` with its default settings), or the "
            "checkpoint that run's cache was extracted with"
        )


def _extract_options(checkpoint: Path, options: AnalyseOptions, videos: tuple[str, ...]):
    """How analyse extracts: the same settings for the run check and for the extraction."""
    from fercache.features.extract import ExtractOptions

    return ExtractOptions(
        checkpoint=Path(checkpoint),
        batch_size=options.batch,
        workers=options.workers,
        device=options.device,
        force=True,  # the crop was just rewritten
        videos=videos,
        progress=options.progress,
    )


def analyse_cropped(
    videos: list[Path], crops, checkpoint: Path, out: Path, options: AnalyseOptions
) -> AnalyseReport:
    """Steps 2-4 and the outputs, after `crop_videos` wrote `out/work/data` (its CropReport)."""
    from fercache.features.extract import extract
    from fercache.predictions.predict import PredictOptions, predict
    from fercache.predictions.smooth import smooth_predictions

    out = Path(out)
    work = out / "work"
    report = AnalyseReport(failed=list(crops.failed))
    with_face = [crop for crop in crops.videos if crop.found > 0]
    report.skipped = [crop.name for crop in crops.videos if crop.found == 0]
    if not with_face:
        if report.failed:  # said per video, as `crop` says it
            return report
        raise FercacheError(
            f"no face found in any frame of {', '.join(str(video) for video in videos)}; "
            "nothing to analyse"
        )
    names = tuple(crop.name for crop in with_face)
    extract(work / "data", work / "cache", _extract_options(checkpoint, options, names))
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
    source = _source(Path(checkpoint), options)
    for video in videos:
        mine = [crop for crop in with_face if _source_of(crop.name, videos) == video]
        if not mine:
            continue
        _remove_outputs(video, out, options)
        for crop in mine:
            rows, voted = raw.videos[crop.name], smoothed.videos[crop.name]
            csv_text = table(rows, voted, crop.fps)
            report.written.append(write_text_atomically(out / f"{crop.name}.csv", csv_text, "CSV"))
            title = f"{crop.name}: {source}"
            report.written.append(timeline(rows, voted, crop.fps, title, out / f"{crop.name}.png"))
        if options.annotate:
            path = out / f"{video.stem}.annotated.mp4"
            report.written.append(annotate(video, mine, smoothed, path))
    return report


def _remove_outputs(video: Path, out: Path, options: AnalyseOptions) -> None:
    """Delete every output of `video` an earlier call wrote into `out`, before this call writes
    its own: one it does not write again (the annotated MP4 without `annotate`) must not stay
    beside outputs that contradict it."""
    from fercache.video.crop import subject_names

    names = subject_names(video.stem, options.subjects)
    paths = [out / f"{name}{suffix}" for name in names for suffix in (".csv", ".png")]
    for path in [*paths, out / f"{video.stem}.annotated.mp4"]:
        path.unlink(missing_ok=True)


def _source(checkpoint: Path, options: AnalyseOptions) -> str:
    """What the numbers come from, as the timeline's title names it."""
    if options.run is None:
        return f"student {checkpoint.name}"
    return f"run {options.run} ({options.weights} weights) on student {checkpoint.name}"


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


def timeline(
    rows: VideoPredictions, voted: VideoPredictions, fps: float, title: str, path: Path
) -> Path:
    """Write `timeline_figure` as the PNG `path`."""
    figure = timeline_figure(rows, voted, fps, title)
    return write_atomically(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=100), "the timeline plot"
    )


def timeline_figure(rows: VideoPredictions, voted: VideoPredictions, fps: float, title: str):
    """Stacked EXPR probabilities over time above a colour strip of the smoothed label, titled
    `title`; the frames without a face (their numbers are their neighbours') are hatched grey
    across both."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if rows.probabilities is None:
        raise FercacheError(f"{title}: the predictions carry no EXPR probabilities to plot")
    colours = [tuple(c / 255 for c in colour) for colour in COLOURS]
    seconds = (rows.frames - 1) / fps
    figure = Figure(figsize=(10, 4))
    top, strip = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    stack = top.stackplot(seconds, rows.probabilities.T, labels=EXPR_CLASSES, colors=colours)
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    top.set_title(title)
    end = seconds[-1] + 1 / fps if len(seconds) else 1
    top.set_xlim(0, end)
    strip.imshow(
        voted.labels[None, :],
        aspect="auto",
        cmap=ListedColormap(colours),
        vmin=-0.5,
        vmax=len(EXPR_CLASSES) - 0.5,
        extent=(0, end, 0, 1),
        interpolation="nearest",
    )
    for start, stop in _runs(~rows.has_image):
        for axes in (top, strip):  # a frame's band spans its time to the next frame's
            axes.axvspan(seconds[start], seconds[stop - 1] + 1 / fps, linewidth=0, **NO_FACE)
    no_face = Patch(label="no face: filled from the nearest faces", **NO_FACE)
    # the legend lists the classes top to bottom as the stack piles them up
    handles = [*reversed(stack), *([no_face] if not rows.has_image.all() else [])]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    strip.set_yticks([])
    strip.set_ylabel("smoothed", rotation=0, ha="right", va="center")
    strip.set_xlabel("time (s)")
    figure.tight_layout()
    return figure


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


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
