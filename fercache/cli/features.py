"""`fercache extract`, `import-features`, `audio` and `convert`: feature caches and the weights
they are extracted with (fercache.features, fercache.backbone)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fercache.cli.shared import ProgressOption, console, error_console
from fercache.errors import FercacheError

commands = typer.Typer()


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


@commands.command()
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
        typer.Option(
            min=1, help="Frames per forward pass; batches span videos. Default 256 GPU, 64 CPU."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="DataLoader processes decoding JPEGs (0: decode in this process). "
            "Default: a quarter of the cores, 1 to 8.",
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
        typer.Option(
            min=16, max=4096, help="Square input size in pixels. Default: the model's data config."
        ),
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Normalisation mean 'R,G,B'. Default: the model's.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalisation std 'R,G,B'. Default: the model's.")
    ] = None,
    init_seed: Annotated[
        int,
        typer.Option(
            min=0, max=2**63 - 1, help="Seed of the random init used when no --checkpoint is given."
        ),
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
    from fercache.features.extract import ExtractOptions
    from fercache.features.extract import extract as run_extract

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


@commands.command("import-features")
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
    from fercache.features.importing import ImportOptions
    from fercache.features.importing import import_features as run_import

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


@commands.command()
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
    from fercache.features.audio import AudioOptions, compute_audio

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


@commands.command()
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
    from fercache.backbone.weights import convert_checkpoint

    converted = convert_checkpoint(checkpoint, out, trust_pickle=trust_pickle)
    console.print(
        f"wrote {converted.out}: {converted.tensors} tensors"
        + (" (unpickled, as --trust-pickle allowed)" if converted.unpickled else ""),
        soft_wrap=True,
    )
