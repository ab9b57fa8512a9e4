"""The `fercache` command line. Each command parses options and calls one plain function."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fercache import __version__
from fercache.errors import FercacheError
from fercache.outputs import write_text_atomically

console = Console()
error_console = Console(stderr=True)


class FercacheGroup(TyperGroup):
    """Shows a FercacheError as one clean line on stderr with exit code 2, never a traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FercacheError as error:
            message = escape(str(error))  # a message may hold brackets: 'fercache[video]'
            error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=error.exit_code) from error


app = typer.Typer(
    cls=FercacheGroup,
    help="Facial-expression recognition in video on a cached frozen-backbone feature store "
    "(Aff-Wild2 / ABAW). Stages talk through files; run any one alone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars on long work.")
]
PrintConfigOption = Annotated[
    bool,
    typer.Option(
        "--print-config",
        help="Print the resolved settings (YAML, as the run's config.yaml holds them; with "
        "--resume the saved ones) and exit without training.",
    ),
]


# the options `import-features` and `audio` share: a cache of features aligned to frames
ALIGN_HELP = (
    "nearest: each frame takes the nearest sample; linear: interpolates between the two around "
    "it. Frames not covered are recorded missing, never zero-filled."
)
FORCE_STORES_HELP = (
    "Rewrite every store, replacing stores of any provenance. Without it finished stores of the "
    "same provenance are skipped and other ones are an error."
)
CACHE_OUT_HELP = "Cache folder to write: one <video>.h5 per video + manifest.json."
DTYPE_HELP = "Stored feature type: float16 (half the disk) or float32."
FRAMES_DATA_HELP = "Aff-Wild2 root: its annotations and image folders give each video's frames."
CacheOutOption = Annotated[Path, typer.Option("--out", help=CACHE_OUT_HELP)]
FramesDataOption = Annotated[Path, typer.Option("--data", help=FRAMES_DATA_HELP)]
AlignOption = Annotated[str, typer.Option("--align", help=ALIGN_HELP)]
DtypeOption = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]
ForceStoresOption = Annotated[bool, typer.Option("--force", help=FORCE_STORES_HELP)]


def _version(value: bool) -> None:
    if value:
        console.print(f"fercache {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Facial-expression recognition in video on a cached frozen-backbone feature store."""


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic Aff-Wild2 tree into.")],
    videos: Annotated[
        int,
        typer.Option(help="Number of annotated videos (a _left/_right pair counts as two)."),
    ] = 24,
    frames: Annotated[
        int, typer.Option(help="Mean frames per video (lengths vary around it, 30 fps).")
    ] = 500,
    seed: Annotated[
        int, typer.Option(help="Random seed: the same seed gives identical bytes.")
    ] = 0,
    labelled: Annotated[
        int, typer.Option(help="Images in the labelled still-image pool (pools/labelled.csv).")
    ] = 2000,
    unlabelled: Annotated[
        int, typer.Option(help="Images in the unlabelled face pool (pools/unlabelled/).")
    ] = 4000,
    workers: Annotated[
        int, typer.Option(help="Worker processes; 0 uses every core. Output does not depend on it.")
    ] = 0,
    force: Annotated[
        bool, typer.Option(help="Replace an earlier synthetic tree in OUT (never other folders).")
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Write a synthetic Aff-Wild2 tree: frames, EXPR/AU/VA annotations and phase-1 image pools."""
    from fercache.synth import SynthConfig, generate

    config = SynthConfig(
        videos=videos,
        frames=frames,
        seed=seed,
        labelled_pool=labelled,
        unlabelled_pool=unlabelled,
        workers=workers,
    )
    info = generate(out, config, progress=progress, force=force)
    total = sum(video["frames"] for video in info["videos"].values())
    console.print(f"wrote {len(info['videos'])} videos ({total:,} frames) and the pools to {out}")


@app.command()
def inspect(
    data: Annotated[Path, typer.Argument(help="Aff-Wild2 root: holds cropped_aligned/.")],
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Folder to search for annotation sets (default: DATA). Use it when several "
            "ABAW releases lie side by side."
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the whole summary, every note included, as JSON."),
    ] = None,
    max_notes: Annotated[
        int, typer.Option(help="Notes on odd data to print (all go to --json).")
    ] = 20,
    progress: ProgressOption = True,
) -> None:
    """Tabulate splits, videos, frames, labels, frames without images and classes of a tree."""
    from fercache.inspect import inspect_dataset, render

    summary = inspect_dataset(data, annotations=annotations, progress=progress)
    console.print(render(summary, max_notes=max_notes))
    if json_out:
        write_text_atomically(json_out, json.dumps(summary.to_json(), indent=2), "the summary")
        console.print(f"summary written to {json_out}")


@app.command()
def crop(
    sources: Annotated[
        list[Path], typer.Argument(help="Video files, or folders of videos, to crop.")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Aff-Wild2 root to write: cropped_aligned/<video>/ and crop_records/."),
    ],
    size: Annotated[int, typer.Option(help="Side of the square aligned crops, pixels.")] = 112,
    margin: Annotated[
        float,
        typer.Option(help="Extra context around the face: 0.2 shows the face 1/1.2 as large."),
    ] = 0.0,
    subjects: Annotated[
        int, typer.Option(help="Faces to follow: 1, or 2 for <video>_left / <video>_right.")
    ] = 1,
    batch: Annotated[int, typer.Option(help="Frames per face-detector call.")] = 32,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    ] = "auto",
    min_confidence: Annotated[
        float, typer.Option(help="Detector face probability below which a face is ignored.")
    ] = 0.9,
    progress: ProgressOption = True,
) -> None:
    """Detect, track and align faces in videos into the Aff-Wild2 cropped_aligned layout."""
    from rich.table import Table

    from fercache.crop import CropOptions, crop_videos

    options = CropOptions(size, margin, subjects, batch, device, min_confidence, progress)
    report = crop_videos(sources, out, options)
    table = Table("video", "frames", "faces found", "missing", "time")
    for video in report.videos:
        table.add_row(
            video.name, str(video.frames), str(video.found), str(video.missing),
            f"{video.seconds:.1f} s",
        )  # fmt: skip
    if report.videos:
        console.print(table)
    for skipped in report.skipped:
        console.print(f"skipped {skipped}: already cropped (its record exists)")
    for video, why in report.failed:
        error_console.print(f"[bold red]failed:[/] {escape(f'{video}: {why}')}", highlight=False)
    console.print(
        f"{len(report.videos)} folder(s) written, {len(report.skipped)} video(s) skipped, "
        f"{len(report.failed)} failed; records in {out / 'crop_records'}"
    )
    if report.failed:
        raise typer.Exit(code=1)


LISTED_SKIPS = 20  # unreadable images named on the terminal; the stores record all of them


def _triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise FercacheError(f"{option} takes three comma-separated numbers (R,G,B), not '{text}'")
    return values


@app.command()
def extract(
    data: Annotated[Path, typer.Argument(help="Aff-Wild2 root: holds cropped_aligned/<video>/.")],
    out: Annotated[
        Path, typer.Option(help="Cache folder: one <video>.h5 per video plus manifest.json.")
    ],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="timm model name. Default: the checkpoint's own (fercache checkpoints record "
            "it), else resnet50 as in the paper."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Weights: a fercache phase-1 student.safetensors, a plain state dict (.pt/.pth; "
            "nested under model, state_dict, teacher, student or ema and prefixed module., "
            "encoder., backbone. or visual. too) or safetensors. With --pretrained: a local "
            "copy of those "
            "weights. Without either, a seeded random init (for tests and benchmarks)."
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="timm's pretrained weights by name, through timm's loader and Hugging Face "
            "cache: a model name, a tagged one (e.g. resnet50.a1_in1k, the MAE tag of a ViT) "
            "or hf-hub:ORG/NAME. Sets the backbone. Offline, give the file with --checkpoint."
        ),
    ] = None,
    allow_missing_head: Annotated[
        bool,
        typer.Option(
            "--allow-missing-head",
            help="Accept a checkpoint without the classifier's keys (MAE/DINO-style weights): "
            "features of the pooled output, no logits. Every other key must still match.",
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Frames per forward pass; batches span videos. Default 256 GPU, 64 CPU."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="DataLoader processes decoding JPEGs (0: decode in this process). "
            "Default: a quarter of the cores, 1 to 8."
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Stored feature type: float16 (half the disk) or float32.")
    ] = "float16",
    device: Annotated[
        str,
        typer.Option(help="auto (CUDA when present), cpu or cuda. AMP and channels_last on CUDA."),
    ] = "auto",
    force: Annotated[
        bool,
        typer.Option(
            help="Recompute every selected video, replacing stores of any provenance. Without it "
            "finished stores of the same provenance are skipped (resume) and stores of another "
            "provenance are an error."
        ),
    ] = False,
    videos: Annotated[
        list[str] | None,
        typer.Option(
            "--videos", help="Only these video folders (repeat the option). Default: all."
        ),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(help="Square input size in pixels. Default: the model's data config."),
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Normalisation mean 'R,G,B'. Default: the model's.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalisation std 'R,G,B'. Default: the model's.")
    ] = None,
    init_seed: Annotated[
        int, typer.Option(help="Seed of the random init used when no --checkpoint is given.")
    ] = 0,
    layer: Annotated[
        int | None,
        typer.Option(
            help="Features of intermediate K (0-based, of timm's forward_intermediates: a ViT's "
            "blocks, a ResNet's stem and 4 stages) instead of the pooled output; no logits. "
            "Tokens are normed and pooled as the head does, maps averaged over space."
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Token models only: avg (timm's 'avg' pooling + the head's norm), cls (the class "
            "token) or tokens-mean (plain mean of the patch tokens). Default: the model's own."
        ),
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(
            help="flip: average each frame's features (and logits) with its mirror's, in one "
            "forward pass of the doubled batch."
        ),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Run the frozen backbone over every frame into per-video HDF5 feature stores (resumable)."""
    from fercache.extract import ExtractOptions
    from fercache.extract import extract as run_extract

    options = ExtractOptions(
        backbone=backbone,
        checkpoint=checkpoint,
        batch_size=batch_size,
        workers=workers,
        dtype=dtype,
        device=device,
        force=force,
        videos=tuple(videos or ()),
        input_size=input_size,
        mean=_triple(mean, "--mean"),
        std=_triple(std, "--std"),
        init_seed=init_seed,
        progress=progress,
        pretrained=pretrained,
        allow_missing_head=allow_missing_head,
        layer=layer,
        pool=pool or "",
        tta=tta or "",
    )
    report = run_extract(data, out, options)
    for video in report.empty:
        error_console.print(f"[yellow]warning:[/] {video}: empty image folder, skipped")
    for reason in report.skipped_frames[:LISTED_SKIPS]:
        error_console.print(f"[yellow]warning:[/] unreadable image skipped: {reason}")
    if len(report.skipped_frames) > LISTED_SKIPS:
        error_console.print(
            f"[yellow]warning:[/] {len(report.skipped_frames) - LISTED_SKIPS} more unreadable "
            "images skipped; each store lists its own in the attribute skipped_reasons"
        )
    console.print(
        f"extracted {len(report.extracted)} videos ({report.frames:,} frames, "
        f"{report.frames_per_second:,.0f} frames/s), {len(report.resumed)} already done"
        + (f", {len(report.elsewhere)} by other processes" if report.elsewhere else "")
        + (f"; manifest: {report.manifest}" if report.manifest else "")
    )


@app.command("import-features")
def import_features(
    source: Annotated[
        Path,
        typer.Argument(
            help="Features made by another tool: a folder of <video>.npy / <video>.npz (T, D) "
            "or <video>.csv files, or one HDF5 file with a (T, D) dataset per video."
        ),
    ],
    out: CacheOutOption,
    data: FramesDataOption,
    rate: Annotated[
        float | None,
        typer.Option(help="Samples per second of an array source (sample i at i/rate seconds)."),
    ] = None,
    fps: Annotated[
        float | None, typer.Option(help="Frames per second of every video (frame f at (f-1)/fps).")
    ] = None,
    video_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the video files (<video>.mp4, .avi, ...): each video's own fps, read "
            "with PyAV (pip install 'fercache[video]'). Instead of --fps."
        ),
    ] = None,
    align: AlignOption = "nearest",
    key: Annotated[
        str | None, typer.Option(help="The array to read from each .npz (when it holds several).")
    ] = None,
    time_column: Annotated[
        str | None,
        typer.Option(help="CSV column of each row's time in seconds. Default: timestamp, time."),
    ] = None,
    frame_column: Annotated[
        str | None,
        typer.Option(help="CSV column of each row's 1-based frame number. Default: frame."),
    ] = None,
    dtype: DtypeOption = "float16",
    force: ForceStoresOption = False,
    progress: ProgressOption = True,
) -> None:
    """Align per-frame features made by another tool (audio embeddings, OpenFace CSVs) to the
    videos' frames and write them as a feature cache to fuse in train, predict and sweep."""
    from fercache.importing import ImportOptions
    from fercache.importing import import_features as run_import

    options = ImportOptions(
        rate=rate,
        fps=fps,
        video_dir=video_dir,
        align=align,
        key=key,
        time_column=time_column,
        frame_column=frame_column,
        dtype=dtype,
        force=force,
        progress=progress,
    )
    report = run_import(source, out, data, options)
    console.print(
        f"imported {len(report.imported)} videos ({report.rows:,} rows, {report.missing:,} "
        f"frames missing), {len(report.resumed)} already done; manifest: {report.manifest}"
    )


AUDIO_VIDEOS_HELP = (
    "Video files, or folders of videos, whose sound tracks to encode (X.mp4 feeds the tree's "
    "video X, or X_left and X_right)."
)
AUDIO_MODEL_HELP = (
    "Speech encoder of transformers: a hub name (facebook/wav2vec2-base-960h, "
    "microsoft/wavlm-base-plus, facebook/hubert-base-ls960) or a save_pretrained folder holding "
    "the model and its feature extractor."
)
AUDIO_LAYER_HELP = (
    "Hidden state K (0: the encoder's input, K: transformer layer K's output). Default: the mean "
    "of all hidden states."
)


@app.command()
def audio(
    videos: Annotated[list[Path], typer.Argument(help=AUDIO_VIDEOS_HELP)],
    out: CacheOutOption,
    data: FramesDataOption,
    model: Annotated[str, typer.Option(help=AUDIO_MODEL_HELP)],
    revision: Annotated[
        str | None, typer.Option(help="Hub branch, tag or commit of a hub --model.")
    ] = None,
    layer: Annotated[int | None, typer.Option(help=AUDIO_LAYER_HELP)] = None,
    chunk: Annotated[
        float,
        typer.Option(help="Seconds of rows kept from each pass (memory grows with its square)."),
    ] = 30.0,
    overlap: Annotated[
        float,
        typer.Option(help="Seconds of context each side of a chunk, computed and dropped."),
    ] = 1.0,
    align: AlignOption = "nearest",
    dtype: DtypeOption = "float16",
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu or cuda. AMP on CUDA.")
    ] = "auto",
    force: ForceStoresOption = False,
    progress: ProgressOption = True,
) -> None:
    """Encode each video's own sound track with a speech encoder (wav2vec 2.0, HuBERT, WavLM),
    align the rows to the video's frames and write them as a feature cache to fuse in train."""
    from fercache.audio import AudioOptions, compute_audio

    options = AudioOptions(
        model=model, revision=revision, layer=layer, chunk=chunk, overlap=overlap,
        align=align, dtype=dtype, device=device, force=force, progress=progress,
    )  # fmt: skip
    report = compute_audio(videos, out, data, options)
    for path in report.silent:
        error_console.print(
            f"[yellow]warning:[/] {escape(path)}: no audio stream; its frames are recorded missing",
            highlight=False,
            soft_wrap=True,
        )
    for path, why in report.failed:
        error_console.print(
            f"[bold red]failed:[/] {escape(f'{path}: {why}')}", highlight=False, soft_wrap=True
        )
    console.print(
        f"encoded {len(report.computed)} videos ({report.audio_seconds:,.0f} s of sound in "
        f"{report.seconds:,.1f} s), {len(report.resumed)} already done, "
        f"{len(report.failed)} failed; cache: {report.rows:,} rows, {report.missing:,} frames "
        f"missing; manifest: {report.manifest}"
    )
    if report.failed:
        raise typer.Exit(code=1)


@app.command()
def convert(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A torch.save file: a state dict (nested under model/state_dict/... too), or "
            "with --trust-pickle a pickled whole model or training checkpoint."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write the state dict to.")],
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Unpickle CHECKPOINT (this runs code from the file: only for files you trust). "
            "Without it a pickled model is refused.",
        ),
    ] = False,
) -> None:
    """Turn a checkpoint (a pickled model too, with --trust-pickle) into a plain safetensors
    state dict that `extract --checkpoint` reads."""
    from fercache.weights import convert_checkpoint

    converted = convert_checkpoint(checkpoint, out, trust_pickle=trust_pickle)
    console.print(
        f"wrote {converted.out}: {converted.tensors} tensors"
        + (" (unpickled, as --trust-pickle allowed)" if converted.unpickled else ""),
        soft_wrap=True,
    )


def _pretrained_backbone(pretrained: str, backbone: str | None, init: Path | None) -> str:
    """The architecture `--pretrained` names, which --backbone may repeat but not contradict."""
    from fercache.weights import pretrained_architecture

    if init is not None:
        raise FercacheError(
            f"{init}: --init-checkpoint and --pretrained both name the initial weights; give one"
        )
    architecture = pretrained_architecture(
        pretrained, "--init-checkpoint FILE instead of --pretrained"
    )
    if backbone and backbone != architecture:
        raise FercacheError(
            f"--pretrained '{pretrained}' is a '{architecture}' but --backbone says '{backbone}'; "
            "drop --backbone or give the matching name"
        )
    return architecture


@app.command()
def pretrain(
    labelled: Annotated[
        list[Path],
        typer.Option(
            help="Labelled images (repeat to combine): an Aff-Wild2 root (EXPR train frames), "
            "a CSV with columns path,label, or a folder with one sub-folder per class. Numeric "
            "labels need their data set's numbering as a prefix, NUMBERING:SOURCE, NUMBERING one "
            "of abaw, affectnet, expw, rafdb, fer2013 (e.g. affectnet:train.csv); class names "
            "(any case) need none. See docs/pretrain.md."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.yaml, sources.json, labels.json, last.pt, metrics.jsonl, "
            "problems.txt, student (and teacher) .safetensors + .json; see docs/formats.md."
        ),
    ],
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(
            help="Unlabelled face images (repeat to combine): a folder (searched recursively) "
            "or a list (.txt, one path a line; .csv with a path column). Read by recipes that "
            "learn from unlabelled images (mpl)."
        ),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="timm model name for teacher and student (default resnet50).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML settings file, e.g. configs/pretrain.yaml (default: built-in)."),
    ] = None,
    set_values: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one setting, key=value (repeatable), e.g. --set mu=4."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps (default from the config: 100000).")
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="mpl (teacher/student with feedback, the default); supervised (the baseline: "
            "labelled data only, same schedule); fixmatch and pseudo-label (one network "
            "fitting its own confident predictions on the unlabelled images, strong or weak "
            "view); cotex (two masked ViTs + JS consistency, "
            "Li et al.); emma (EXPR + AU heads, VA head on their scores; --labelled must be "
            "Aff-Wild2 roots); multitask-landmarks (expression + landmark heads, the LSD "
            "paper; needs --set landmarks=CSV)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its last.pt with its saved settings (--steps, "
            "eval_every, log_every, checkpoint_every and workers may change)."
        ),
    ] = False,
    init_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Local weights (.safetensors/.pth) to start both networks from, e.g. ImageNet; "
            "a head of another class count is replaced."
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Start both networks from timm's pretrained weights by name, through timm's "
            "loader and Hugging Face cache: a model name, a tagged one (e.g. resnet50.a1_in1k) "
            "or hf-hub:ORG/NAME; the EXPR head is new. Sets the backbone. Offline, use "
            "--init-checkpoint with the downloaded file instead."
        ),
    ] = None,
    per_class_cap: Annotated[
        int | None,
        typer.Option(
            help="At most N images per class of the extra labelled sources (not Aff-Wild2 "
            "roots), drawn with the seed; the rest join the unlabelled pool (Yu et al.: 8000). "
            "Setting per_class_cap; 0: no cap."
        ),
    ] = None,
    print_config: PrintConfigOption = False,
    progress: ProgressOption = True,
) -> None:
    """Phase 1: semi-supervised (Meta Pseudo Labels) pretraining of the frozen student."""
    from fercache.pretrain import load_config, resumed_config, settings_text
    from fercache.pretrain import pretrain as run_pretrain

    if pretrained:
        backbone = _pretrained_backbone(pretrained, backbone, init_checkpoint)
    given = {"backbone": backbone, "steps": steps, "recipe": recipe}
    given["per_class_cap"] = per_class_cap
    if resume:
        settings = resumed_config(out, config, set_values, **given)
    else:
        settings = load_config(config, set_values, **given)
    if print_config:
        typer.echo(settings_text(settings), nl=False)
        return
    report = run_pretrain(
        labelled,
        unlabelled or [],
        out,
        settings,
        resume=resume,
        init_checkpoint=init_checkpoint,
        pretrained=pretrained,
        progress=progress,
    )
    for problem in report.problems[:10]:
        error_console.print(f"[yellow]warning:[/] left out: {problem}", highlight=False)
    if len(report.problems) > 10:
        error_console.print(
            f"[yellow]warning:[/] {len(report.problems) - 10} more, all in {out}/problems.txt"
        )
    shown = ", ".join(f"{key} {value:.3f}" for key, value in report.evaluation.items())
    console.print(
        f"{report.steps} steps; wrote {out}/student.safetensors"
        + (f"; held-out: {shown}" if shown else "")
    )


@app.command()
def predict(
    cache: Annotated[
        list[Path],
        typer.Option(
            help="Feature cache folder (repeat for a run trained on fused caches, same order)."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split to predict: train, val or test.")],
    out: Annotated[Path, typer.Option(help="PRED file to write (HDF5; see docs/formats.md).")],
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Temporal training run folder (not needed with --source student), or the "
            "--out folder of `train --folds`: the soft vote of its fold models."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Aff-Wild2 root: its annotations of the run's tasks list the frames to predict."
        ),
    ] = None,
    frames: Annotated[
        Path | None,
        typer.Option(
            help="Frame list ('<video>/00001.jpg' per line, e.g. the organisers' test list): "
            "predict exactly these frames. Required for --split test."
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(help="Folder to search for annotation sets (default: DATA)."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="temporal (the run in RUN_DIR) or student (softmax of the logits stored in the "
            "cache: the per-frame baseline)."
        ),
    ] = "temporal",
    device: Annotated[str, typer.Option(help="Device of the temporal model: cpu or cuda.")] = "cpu",
    weights: Annotated[
        str,
        typer.Option(
            help="Temporal weights: best (the epoch with the best validation score) or final "
            "(the last epoch: nothing chosen on the validation split)."
        ),
    ] = "best",
    tune_thresholds: Annotated[
        bool,
        typer.Option(
            "--tune-thresholds",
            help="With --split val and a run with an AU head: pick each AU's threshold for the "
            "best F1 on the validation annotations, store it in RUN_DIR/thresholds.json (later "
            "predicts with these weights use it) and in the PRED.",
        ),
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Per-frame predictions (EXPR, AU, VA: the run's tasks) for every frame that needs one."""
    from fercache.folds import is_folds_dir, predict_folds
    from fercache.predict import PredictOptions
    from fercache.predict import predict as run_predict

    options = PredictOptions(
        split=split,
        data=data,
        frames=frames,
        annotations=annotations,
        source=source,
        device=device,
        weights=weights,
        tune_thresholds=tune_thresholds,
        progress=progress,
    )
    if run_dir is not None and source == "temporal" and is_folds_dir(run_dir):
        voted = predict_folds(run_dir, cache, out, options)
        for note in voted.notes:
            error_console.print(f"[yellow]warning:[/] {note}", highlight=False)
        predictions = voted.predictions
    else:
        predictions = run_predict(run_dir, cache, out, options)
    filled = sum(int((~rows.has_image).sum()) for rows in predictions.videos.values())
    tasks = "/".join(task.upper() for task in predictions.tasks)
    console.print(
        f"wrote {out}: {tasks} for {len(predictions.videos)} videos, "
        f"{predictions.frame_count:,} frames ({filled:,} without features, filled from their "
        "nearest frames)"
    )
    if tune_thresholds:
        chosen = ", ".join(f"{value:.2f}" for value in predictions.au_thresholds)
        console.print(f"AU thresholds tuned on val and stored in {run_dir}: {chosen}")


@app.command()
def smooth(
    pred: Annotated[Path, typer.Argument(help="PRED file to smooth (from `fercache predict`).")],
    out: Annotated[Path, typer.Option(help="PRED file to write with the voted labels.")],
    window: Annotated[int, typer.Option(help="Vote window in frames (the paper uses 30).")] = 30,
    mode: Annotated[
        str,
        typer.Option(
            help="centered: each frame takes the most frequent label around it; block: windows "
            "tile the video and every frame takes its window's most frequent label."
        ),
    ] = "centered",
) -> None:
    """Sliding-window majority vote over each video's predicted labels (never across videos)."""
    from fercache.smooth import smooth_predictions

    smoothed = smooth_predictions(pred, out, window=window, mode=mode)
    console.print(
        f"wrote {out}: {smoothed.frame_count:,} frames voted, window {window}, mode {mode}"
    )


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="PRED file to score (raw or smoothed).")],
    data: Annotated[Path, typer.Option(help="Aff-Wild2 root holding the split's annotations.")],
    split: Annotated[str, typer.Option(help="Split the PRED file holds: train or val.")] = "val",
    annotations: Annotated[
        Path | None,
        typer.Option(help="Folder to search for annotation sets (default: DATA)."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Also write every figure (per class, AU and dimension; confusion)."
        ),
    ] = None,
    confusion: Annotated[
        Path | None,
        typer.Option(
            help="EXPR confusion-matrix PNG to write (default: PRED's name + -confusion.png)."
        ),
    ] = None,
) -> None:
    """EXPR macro-F1, AU mean F1, VA mean CCC (and P) over all valid frames, per label too."""
    from fercache.evaluate import evaluate as run_evaluate
    from fercache.evaluate import render, write_report

    report = run_evaluate(pred, data, split, annotations=annotations, confusion_png=confusion)
    console.print(render(report))
    if "confusion_png" in report:
        console.print(f"confusion matrix: {report['confusion_png']}")
    if json_out:
        console.print(f"report written to {write_report(report, json_out)}")


@app.command()
def submit(
    pred: Annotated[Path, typer.Argument(help="PRED file (usually smoothed) to submit.")],
    out: Annotated[Path, typer.Option(help="Submission text file to write.")],
    frames: Annotated[
        Path | None,
        typer.Option(
            help="The organisers' frame list: the submission then holds exactly these frames, "
            "and any one PRED lacks is an error. Default: every frame of PRED."
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            help="expr (label 0-7), au (12 decisions at the PRED's thresholds) or va "
            "(valence,arousal): the ABAW format of that challenge."
        ),
    ] = "expr",
) -> None:
    """Write an ABAW submission file (EXPR, AU or VA), validated first (every frame once)."""
    from fercache.submit import write_submission

    rows = write_submission(pred, out, frames, task)
    console.print(f"wrote {out}: {task.upper()} for {rows:,} frames")


# Options shared by `train` and `sweep` (a sweep trains many runs with the same base settings).
CachesArgument = Annotated[
    list[Path],
    typer.Argument(
        metavar="CACHE_DIR",
        help="Feature cache folder(s); several are fused by concatenating each frame's "
        "features in the order given.",
    ),
]
TrainDataOption = Annotated[
    Path, typer.Option("--data", help="Aff-Wild2 root: the labels are read from it.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="YAML settings file, e.g. configs/temporal.yaml (default: built-in)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, key=value (repeatable), e.g. layers=2 or, with its section "
        "of configs/temporal.yaml, model.layers=2.",
    ),
]
EpochsOption = Annotated[
    int | None, typer.Option("--epochs", help="Epochs (default from the config).")
]
SeedOption = Annotated[
    int | None,
    typer.Option("--seed", help="Seed; on CPU the same seed gives identical metrics."),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
]
MemoryBudgetOption = Annotated[
    str,
    typer.Option(
        "--memory-budget",
        help="Largest size of features to hold in RAM (e.g. 16G); above it windows are "
        "read from the HDF5 stores by worker processes. auto: half the RAM.",
    ),
]


@app.command()
def train(
    caches: CachesArgument,
    data: TrainDataOption,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.yaml, model.json, best.safetensors, last.pt, "
            "metrics.jsonl, summary.json, curves.png. With --bagging: one bag-<k> run folder "
            "per model, ensemble-val.h5/.json and bagging.json. With --folds: one fold-<k> run "
            "folder per fold, folds.json and folds-summary.json."
        ),
    ],
    config: ConfigOption = None,
    set_values: SetOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --out from last.pt with its saved settings."),
    ] = False,
    memory_budget: MemoryBudgetOption = "auto",
    bagging: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="Train K models (seeds SEED, SEED+1, ...; each on its own --subsample of the "
            "training videos), soft-vote their validation predictions and evaluate the vote.",
        ),
    ] = None,
    subsample: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the training videos each model uses, drawn with its seed (the "
            "subsample setting; the LSD paper bags 0.2). Default from the config: 1.0."
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            metavar="K",
            help="Subject-grouped K-fold cross-validation over the train and val videos: fold "
            "k trains on the other folds and picks its best epoch on its own; prints each "
            "fold's scores and their mean ± sd. Reruns reuse finished folds and resume the "
            "interrupted one (--resume changes nothing); not with --bagging.",
        ),
    ] = None,
    fold_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the fold assignment (default: the run's seed)."),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option(
            metavar="CSV",
            help="With --folds: CSV with columns video,subject joining the videos of one person "
            "into one fold (unlisted videos: their own subject; X_left/X_right always together).",
        ),
    ] = None,
    print_config: PrintConfigOption = False,
    progress: ProgressOption = True,
) -> None:
    """Train the temporal transformer on 64-frame clips of cached features (phase 2)."""
    from fercache.temporal.loop import TrainRequest, best_scores_text, resolved_config
    from fercache.temporal.loop import train as run_train

    subsampled = () if subsample is None else (f"subsample={subsample}",)
    request = TrainRequest(
        config_file=config,
        overrides=(*(set_values or ()), *subsampled),
        epochs=epochs,
        seed=seed,
        memory_budget=memory_budget,
        device=device,
        resume=resume,
        progress=progress,
    )
    if print_config:
        from fercache.temporal.config import settings_text

        typer.echo(settings_text(resolved_config(out, request)), nl=False)
        return
    if folds is None and (fold_seed is not None or groups is not None):
        raise FercacheError("--fold-seed and --groups go with --folds K")
    if folds is not None:
        if bagging is not None:
            raise FercacheError(
                "--folds and --bagging: choose one (one model per fold, or K bagged models)"
            )
        from fercache.folds import render as render_folds
        from fercache.folds import train_folds

        crossed = train_folds(caches, data, out, request, folds, fold_seed, groups)
        if crossed is not None:
            console.print(render_folds(crossed))
            console.print(f"compare the folds: fercache runs {out}")
        return
    if bagging is not None:
        from fercache.bagging import render, train_bagged

        bagged = train_bagged(caches, data, out, request, bagging)
        if bagged is not None:
            console.print(render(bagged))
        return
    summary = run_train(caches, data, out, request)
    console.print(f"{best_scores_text(summary)}; run in {out}")


@app.command()
def demo(
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for the tree, runs, caches, predictions and report.md/report.png "
            "(missing, empty, or an earlier demo's folder, whose outputs are replaced)."
        ),
    ] = Path("demo-out"),
    seed: Annotated[
        int, typer.Option(help="Seed of the synthetic tree, phase 1 and the temporal model.")
    ] = 0,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Phase-1 steps of each of the three students alike (the same budget); the "
            "default is sized for a 2-core CPU (results/demo.md: the measured time, and figures "
            "at other budgets).",
            show_default=False,
        ),
    ] = None,
    finetune_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Of --pretrain-steps, the last ones fine-tune the SSL student on the labels "
            "(MPL's last stage; with --ssl-recipe mpl only); default 0: none.",
            show_default=False,
        ),
    ] = None,
    ssl_recipe: Annotated[
        str | None,
        typer.Option(
            help="The semi-supervised recipe of rows 2 and 3, one of the recipes that read "
            "unlabelled images (see `fercache pretrain --help`); default: the one that scored "
            "best on held-out training videos (results/demo.md).",
            show_default=False,
        ),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """The whole pipeline on a synthetic tree, sized for a CPU (results/demo.md): the five rows of
    Yu et al.'s Table 1, each trained on the data that row ticks; prints the table."""
    from fercache.demo import DemoSettings, render_table, run_demo

    given = {
        "pretrain_steps": pretrain_steps,
        "ssl_finetune_steps": finetune_steps,
        "ssl_recipe": ssl_recipe,
    }
    settings = DemoSettings(**{key: value for key, value in given.items() if value is not None})
    result = run_demo(out, seed=seed, settings=settings, progress=progress)
    console.print(render_table(result.rows))
    console.print(f"report: {result.report}; chart: {result.chart}")


@app.command()
def analyse(
    videos: Annotated[
        list[Path], typer.Argument(help="Video file(s) (MP4, AVI, ...) or folders of videos.")
    ],
    checkpoint: Annotated[
        Path,
        typer.Option(help="Student checkpoint (.safetensors from `fercache pretrain`, or .pt)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for <video>.csv, <video>.png (and .annotated.mp4); the crops, cache "
            "and PRED files go to OUT/work."
        ),
    ],
    run: Annotated[
        Path | None,
        typer.Option(
            help="Temporal run folder trained on a cache of this checkpoint; default: the "
            "student's own per-frame softmax."
        ),
    ] = None,
    window: Annotated[
        int, typer.Option(min=1, help="Vote window in frames for the smoothed label.")
    ] = 30,
    annotate: Annotated[
        bool,
        typer.Option(
            "--annotate", help="Also write OUT/<video>.annotated.mp4 with face boxes and labels."
        ),
    ] = False,
    size: Annotated[int, typer.Option(help="Side of the cropped face images in pixels.")] = 112,
    subjects: Annotated[
        int, typer.Option(help="Faces to follow per video: 1, or 2 (<video>_left/_right).")
    ] = 1,
    device: Annotated[
        str, typer.Option(help="Device of face detection, extraction and the run: auto, cpu, cuda.")
    ] = "auto",
    batch: Annotated[int, typer.Option(help="Frames per batch in detection and extraction.")] = 32,
    progress: ProgressOption = True,
) -> None:
    """Crop -> extract -> predict -> smooth on video files: per video a CSV of per-frame
    probabilities and labels, a timeline PNG and, with --annotate, an annotated MP4."""
    from fercache.analyse import AnalyseOptions
    from fercache.analyse import analyse as run_analyse

    options = AnalyseOptions(
        run=run,
        window=window,
        annotate=annotate,
        size=size,
        subjects=subjects,
        device=device,
        batch=batch,
        progress=progress,
    )
    report = run_analyse(videos, checkpoint, out, options)
    for path in report.written:
        console.print(f"wrote {path}")
    for name in report.skipped:
        console.print(f"[yellow]no face found in {name}: skipped[/]")
    for video, why in report.failed:
        console.print(f"[yellow]could not crop {video}: {why}[/]", highlight=False)


@app.command()
def ensemble(
    preds: Annotated[
        list[Path],
        typer.Argument(
            metavar="PRED...",
            help="Raw PRED files (not smoothed) of the same split, videos and frames.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="PRED file to write with the soft vote.")],
    weights: Annotated[
        str | None,
        typer.Option(help="One weight per PRED, comma-separated, e.g. 1,2 (default: equal)."),
    ] = None,
) -> None:
    """Soft voting: average the inputs' probabilities (EXPR, AU) and VA values; label = arg-max."""
    from fercache.ensemble import ensemble as run_ensemble
    from fercache.ensemble import parse_weights

    voted = run_ensemble(preds, out, parse_weights(weights))
    for note in voted.notes:
        error_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    shown = ", ".join(f"{weight:.3g}" for weight in voted.weights)
    console.print(
        f"wrote {out}: soft vote of {len(preds)} predictions (weights {shown}), "
        f"{voted.predictions.frame_count:,} frames"
    )


@app.command()
def sweep(
    caches: CachesArgument,
    data: TrainDataOption,
    out: Annotated[Path, typer.Option(help="Sweep folder: one run folder per grid point.")],
    grid: Annotated[
        list[str],
        typer.Option(
            help="A setting and its values, key=v1,v2 (repeat: the points are every "
            "combination), e.g. --grid layers=2,4 --grid lr=1e-4,3e-4; model.layers works too."
        ),
    ],
    config: ConfigOption = None,
    set_values: SetOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    memory_budget: MemoryBudgetOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Train one run per grid point (finished ones skipped, so a killed sweep resumes)."""
    from fercache.runs import best_scores
    from fercache.sweep import sweep as run_sweep
    from fercache.temporal.loop import TrainRequest

    request = TrainRequest(
        config_file=config,
        overrides=tuple(set_values or ()),
        epochs=epochs,
        seed=seed,
        memory_budget=memory_budget,
        device=device,
        progress=progress,
    )
    for run in run_sweep(caches, data, out, grid, request):
        scores = ", ".join(f"{key} {value:.4f}" for key, value in best_scores(run.summary).items())
        console.print(f"{run.path}: {run.status}; {scores} (epoch {run.summary['best_epoch']})")
    console.print(f"compare the runs: fercache runs {out}")


@app.command()
def runs(
    folder: Annotated[
        Path, typer.Argument(help="Folder holding training runs (e.g. a sweep's --out).")
    ],
    sort: Annotated[
        str | None,
        typer.Option(
            help="Column to sort on: scores descending, others ascending (default: the first "
            "score, best_val_f1)."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON to this file.")
    ] = None,
) -> None:
    """One table of all runs: the settings that differ, epochs and best validation scores."""
    from fercache.folds import with_fold_means
    from fercache.runs import render, runs_table

    table = with_fold_means(runs_table(folder, sort), folder)
    console.print(render(table, f"{len(table.rows)} runs in {folder}"))
    if json_out:
        write_text_atomically(json_out, json.dumps(table.to_json(), indent=2), "the table")
        console.print(f"table written to {json_out}")


def main() -> None:
    app()
