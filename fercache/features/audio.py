"""`fercache audio`: speech-encoder features of each video's own sound track, aligned to the
video's frames and written as a feature cache that `train`, `predict` and `sweep` fuse with a
visual cache.

Per video file (`VIDEO_OR_FOLDER…`, read as `fercache crop` reads them):

1. PyAV decodes the first audio stream (`fercache.video.pyav`) and resamples it with FFmpeg's
   resampler (`av.AudioResampler`: float, mono, the encoder's rate; several channels are
   down-mixed by it). Sample 0 lies at the stream's first decoded frame, measured from the
   video stream's start (`audio_offset`); frame f of the video at (f - 1) / fps, fps the video
   stream's own.
2. A speech encoder of `transformers` (`AutoModel` + `AutoFeatureExtractor`, by hub name or a
   local `save_pretrained` folder; wav2vec 2.0, HuBERT, WavLM and other encoders with a
   convolutional front end) turns the samples into rows: row r reads samples
   [r * stride, r * stride + window), stride and window from the config's `conv_stride` and
   `conv_kernel` (320 and 400 samples at 16 kHz: 50 rows per second), and lies at
   offset + r * stride / rate seconds, as sample r of `import-features --rate`.
3. In chunks: rows [a, b) of `chunk` seconds come from one forward pass over the samples of
   rows [a - o, b + o), `overlap` seconds of context o on each side (clipped at the ends;
   the last pass reads to the track's end); the context rows are dropped. A track of one
   chunk is one pass over all of it. Each pass sees its own samples only (the feature extractor
   normalises them as one input), so memory stays that of one chunk however long the video.
4. The row is the hidden state of `layer` K (0: the encoder's input, after the convolutional
   front end and the positional convolution; K: the output of transformer layer K), or by
   default the mean of all of them (the SUPERB benchmark's practice is a weighted sum of
   layers; the mean is its uniform weighting).
5. The rows are aligned to the video's N frames by `alignment.align_to_frames` (the rules
   of `import-features`: `nearest` or `linear`, no extrapolation) and written by its
   `write_aligned`: frames the sound track does not cover get no row, never zeros, and are
   listed in `missing_frames`. N comes from the tree (as for `import-features`), the span
   check does not apply: a sound track shorter than its video leaves the rest missing.

A video file X feeds the tree's video X, or `X_left` and `X_right` (the same sound, each aligned
to its own frames). A file without an audio stream gets stores whose every frame is missing and
is reported as silent; a file PyAV cannot read (truncated MP4, not a video) is reported as
failed and gets no store; the others go on. Stores are written atomically, one per video, and
`manifest.json` last, listing every complete store of this provenance in the folder: a rerun
skips finished videos (a killed run resumes), a cache of other features is refused unless
`force`. The provenance names the encoder (hub name and commit, or the folder), the SHA-256 of
its files, the layer, the sample rate, the row rate, the chunking and the alignment.
"""

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fercache.data.affwild2 import AffWild2
from fercache.distributed import resolve_device
from fercache.errors import FercacheError
from fercache.features import alignment
from fercache.features.store import (
    Provenance,
    prepare_cache,
    store_state,
)
from fercache.outputs import output_folder
from fercache.progress import progress_bar
from fercache.video.crop import check_out_folder, video_sources
from fercache.video.pyav import open_video, require

INSTALL_HINT = "fercache audio needs transformers and PyAV: pip install 'fercache[audio,video]'"
LAYERS_MEAN = "layers-mean"  # the `pool` of a cache of the mean of all hidden states
MODEL_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class AudioOptions(alignment.CacheOptions):
    """What `fercache audio` takes besides the videos, --out and --data (with `align`, `dtype`,
    `force` and `progress` as `import-features` takes them)."""

    model: str
    revision: str | None = None  # a hub branch, tag or commit
    layer: int | None = None  # None: the mean of all hidden states
    chunk: float = 30.0  # seconds of rows kept from each forward pass
    overlap: float = 1.0  # seconds of context on each side of a chunk
    device: str = "auto"


@dataclass
class AudioReport:
    """What a run did: tree videos written and resumed, files without sound, files failed;
    seconds of sound encoded and of run time; rows and missing frames of the whole cache."""

    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # files without an audio stream
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    audio_seconds: float = 0.0
    seconds: float = 0.0
    rows: int = 0
    missing: int = 0
    manifest: Path | None = None


@dataclass(frozen=True)
class SoundTrack:
    """A video file's sound, mono float32 at the encoder's rate, and how it sits in time."""

    samples: np.ndarray
    offset: float  # seconds from the video stream's start to sample 0
    fps: float  # the video stream's frame rate
    has_audio: bool


@dataclass(frozen=True)
class ChunkSpan:
    """One forward pass: rows [first, last) computed, rows [start, stop) kept."""

    first: int
    last: int
    start: int
    stop: int


@dataclass
class SpeechEncoder:
    """A `transformers` speech encoder with its feature extractor, and where it came from."""

    name: str
    model: torch.nn.Module
    extractor: object
    sample_rate: int
    stride: int  # input samples per output row
    window: int  # input samples one row reads
    hidden_size: int
    layers: int  # transformer layers: hidden states 0..layers
    sha256: str
    weights_source: str  # hf-hub:<name>@<commit>, or file
    local: bool
    device: torch.device

    @property
    def rate(self) -> float:
        """Rows per second."""
        return self.sample_rate / self.stride

    def rows(self, samples: int) -> int:
        """Rows of a pass over `samples` samples: every full window."""
        return (samples - self.window) // self.stride + 1 if samples >= self.window else 0

    def spans(self, samples: int, chunk: float, overlap: float) -> list[ChunkSpan]:
        """The forward passes of a track of `samples` samples, in `chunk` seconds of kept rows
        with `overlap` seconds of context each side."""
        total = self.rows(samples)
        size = max(1, round(chunk * self.rate))
        context = max(0, round(overlap * self.rate))
        spans = []
        for start in range(0, total, size):
            stop = min(total, start + size)
            first, last = max(0, start - context), min(total, stop + context)
            spans.append(ChunkSpan(first, last, start, stop))
        return spans

    def piece(self, samples: np.ndarray, span: ChunkSpan) -> np.ndarray:
        """The samples rows [span.first, span.last) read; the last span takes the track's tail
        too (less than a stride: no row of its own), so a track of one span is passed whole."""
        last_row = span.last == self.rows(len(samples))
        end = len(samples) if last_row else (span.last - 1) * self.stride + self.window
        return samples[span.first * self.stride : end]

    def forward(self, samples: np.ndarray, layer: int | None) -> np.ndarray:
        """(rows, hidden size) float32 of one pass over `samples`: hidden state `layer`, or the
        mean of all hidden states."""
        inputs = self.extractor(samples, sampling_rate=self.sample_rate, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        cuda = self.device.type == "cuda"
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda),
        ):
            states = self.model(**inputs, output_hidden_states=True).hidden_states
            chosen = states[layer] if layer is not None else torch.stack(states).mean(0)
        rows = chosen[0].float().cpu().numpy()
        if len(rows) != self.rows(len(samples)):
            raise FercacheError(
                f"--model {self.name}: {len(rows)} rows for {len(samples)} samples, not the "
                f"{self.rows(len(samples))} its convolutional front end gives; fercache audio "
                "takes encoders whose rows follow conv_kernel and conv_stride (no adapter)"
            )
        return rows

    def encode(
        self, samples: np.ndarray, layer: int | None, chunk: float, overlap: float
    ) -> np.ndarray:
        """(rows, hidden size) float32 of a whole track, chunk by chunk."""
        features = np.empty((self.rows(len(samples)), self.hidden_size), np.float32)
        for span in self.spans(len(samples), chunk, overlap):
            rows = self.forward(self.piece(samples, span), layer)
            features[span.start : span.stop] = rows[
                span.start - span.first : span.stop - span.first
            ]
        return features


def compute_audio(videos: list[Path], out: Path, data: Path, options: AudioOptions) -> AudioReport:
    """Features of the sound track of every video file in `videos` (files or folders), aligned
    to DATA's frames, into the cache OUT; resumes where stores exist."""
    _check_options(options)
    _require_extras()
    check_out_folder(out)  # before the encoder loads; nothing is created yet
    files = video_sources(videos)
    if not files:
        raise FercacheError(
            f"{', '.join(map(str, videos))}: no video files (.mp4, .avi, .mkv, ...) to read"
        )
    tree = AffWild2(data)
    lengths = alignment.video_lengths(tree, alignment.subject_names(path.stem for path in files))
    plan = {path: alignment.tree_videos(tree, lengths, path.stem, path) for path in files}
    encoder = load_encoder(options.model, options.revision, resolve_device(options.device))
    if options.layer is not None and options.layer > encoder.layers:
        raise FercacheError(
            f"--layer {options.layer}: {options.model} has hidden states 0 to {encoder.layers}; "
            "leave --layer out for their mean"
        )
    provenance = _provenance(encoder, videos, options)
    out = Path(out)
    output_folder(out)
    prepare_cache(out, provenance, options.force)
    report = AudioReport()
    todo = []
    for path, names in plan.items():
        if any(alignment.needs_work(out, name, provenance, options.force) for name in names):
            todo.append(path)
        else:
            report.resumed += names
    started = time.perf_counter()
    with progress_bar("audio of videos", len(todo), enabled=options.progress) as advance:
        for path in todo:
            try:
                track = read_sound_track(path, encoder.sample_rate)
            except FercacheError as error:
                report.failed.append((str(path), str(error)))
                advance()
                continue
            if not track.has_audio:
                report.silent.append(str(path))
            features = encoder.encode(track.samples, options.layer, options.chunk, options.overlap)
            report.audio_seconds += len(track.samples) / encoder.sample_rate
            for name in plan[path]:
                target = alignment.Target(name, path.stem, lengths[name], track.fps, encoder.rate)
                covered, values = _aligned(features, track, target, encoder.rate, options.align)
                details = {
                    "source_file": path.name,
                    "audio_offset": track.offset,
                    "audio_seconds": len(track.samples) / encoder.sample_rate,
                }
                alignment.write_aligned(out, target, covered, values, provenance, details)
                report.computed.append(name)
            advance()
    report.seconds = time.perf_counter() - started
    entries = _finished_stores(out, provenance)
    report.rows, report.missing, report.manifest = alignment.finish_cache(out, provenance, entries)
    return report


def _check_options(options: AudioOptions) -> None:
    options.check()
    if not options.chunk > 0:
        raise FercacheError(f"--chunk {options.chunk}: give a positive number of seconds")
    if not options.overlap >= 0:
        raise FercacheError(f"--overlap {options.overlap}: give 0 or more seconds")
    if options.layer is not None and options.layer < 0:
        raise FercacheError(
            f"--layer {options.layer}: give a hidden state's index from 0 (the encoder's "
            "input); leave --layer out for the mean of all of them"
        )


def _aligned(
    features: np.ndarray, track: SoundTrack, target: alignment.Target, rate: float, align: str
) -> tuple[np.ndarray, np.ndarray]:
    """(covered frames, their rows) of a track's rows; no frame is covered without rows."""
    if len(features) == 0:
        return np.zeros(target.frames, bool), np.zeros((0, features.shape[1]))
    times = track.offset + np.arange(len(features)) / rate
    samples = alignment.Samples(
        features.astype(np.float64), np.ones(len(features), bool), times=times
    )
    return alignment.align_to_frames(samples, target, align, check_span=False)


def _finished_stores(out: Path, provenance: Provenance) -> dict[str, dict]:
    """The manifest lines of every complete store of this provenance in OUT."""
    entries = {}
    for path in sorted(out.glob("*.h5")):
        state, found = store_state(path)
        if state == "complete" and found.fingerprint == provenance.fingerprint:
            entries[path.stem] = alignment.stored_entry(path)
    return entries


# --- the sound track ---------------------------------------------------------------------------


def _require_extras() -> None:
    """Both extras are needed: PyAV for the sound, transformers for the encoder."""
    require(INSTALL_HINT)
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise FercacheError(INSTALL_HINT) from error


def read_sound_track(path: Path, sample_rate: int) -> SoundTrack:
    """The first audio stream of `path`, down-mixed and resampled to mono float32 at
    `sample_rate`; no samples (and `has_audio` False) when the file has no audio stream."""
    with open_video(path, INSTALL_HINT) as video:  # and a video stream to time frames by
        if not video.fps:
            raise FercacheError(f"{path}: no frame rate recorded; re-mux it with one")
        sound = video.sound(sample_rate)
    if sound is None:
        return SoundTrack(np.zeros(0, np.float32), 0.0, video.fps, has_audio=False)
    samples, offset = sound
    return SoundTrack(samples, offset, video.fps, has_audio=True)


# --- the encoder -------------------------------------------------------------------------------


def load_encoder(name: str, revision: str | None, device: torch.device) -> SpeechEncoder:
    """The speech encoder `name` (a `save_pretrained` folder, or a hub name found in the Hugging
    Face cache or downloaded), in float32 and eval mode on `device`."""
    try:
        import transformers
    except ImportError as error:
        raise FercacheError(INSTALL_HINT) from error
    folder = Path(name)
    local = folder.is_dir()
    with _quiet(transformers):
        config = _load(transformers.AutoConfig, name, revision, local)
        kernels, strides = (
            getattr(config, "conv_kernel", None),
            getattr(config, "conv_stride", None),
        )
        if not kernels or not strides or getattr(config, "add_adapter", False):
            raise FercacheError(
                f"--model {name}: a '{config.model_type}' model; fercache audio takes speech "
                "encoders with a convolutional front end and no adapter (wav2vec2, hubert, "
                "wavlm, data2vec-audio, unispeech, sew)"
            )
        extractor = _load(transformers.AutoFeatureExtractor, name, revision, local)
        model = _load(transformers.AutoModel, name, revision, local, dtype=torch.float32)
        if not local:
            folder = Path(
                transformers.utils.cached_file(
                    name, "config.json", revision=revision, local_files_only=True
                )
            ).parent
    stride = int(np.prod(strides))
    window = 1 + sum((k - 1) * int(np.prod(strides[:i])) for i, k in enumerate(kernels))
    commit = getattr(config, "_commit_hash", None) or folder.name
    return SpeechEncoder(
        name=name,
        model=model.eval().to(device),
        extractor=extractor,
        sample_rate=int(extractor.sampling_rate),
        stride=stride,
        window=window,
        hidden_size=int(config.hidden_size),
        layers=int(config.num_hidden_layers),
        sha256=model_files_sha256(folder),
        weights_source="file" if local else f"hf-hub:{name}@{commit}",
        local=local,
        device=device,
    )


def _load(loader, name: str, revision: str | None, local: bool, **kwargs):
    """`loader.from_pretrained`: from the folder or the hub cache first, else downloaded."""
    try:
        return loader.from_pretrained(name, revision=revision, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a config of no known model
        if local:
            raise FercacheError(
                f"{name}: not a complete save_pretrained folder of a speech encoder "
                f"({_first_line(error)}); save the model and its feature extractor into it "
                "(model.save_pretrained(FOLDER), feature_extractor.save_pretrained(FOLDER))"
            ) from error
        from huggingface_hub import constants

        if isinstance(error, ValueError):
            raise _not_a_model(name, error) from error
        if constants.is_offline_mode():
            raise _offline_error(name, error) from error
    try:
        return loader.from_pretrained(name, revision=revision, **kwargs)
    except OSError as error:
        raise _offline_error(name, error) from error
    except ValueError as error:
        raise _not_a_model(name, error) from error


def _not_a_model(name: str, error: BaseException) -> FercacheError:
    return FercacheError(
        f"--model {name}: transformers cannot load it as a speech encoder "
        f"({_first_line(error)}); give a wav2vec2, hubert or wavlm model"
    )


def _offline_error(name: str, error: BaseException) -> FercacheError:
    from huggingface_hub import constants

    return FercacheError(
        f"--model {name}: no such folder, and as a Hugging Face hub name neither downloadable "
        f"here nor in the hub cache ({_first_line(error)}). Provide it: on a networked machine "
        f"save AutoModel.from_pretrained('{name}') and AutoFeatureExtractor.from_pretrained("
        f"'{name}') with save_pretrained(FOLDER) and pass --model FOLDER, or copy a hub cache "
        f"holding it to {constants.HF_HUB_CACHE} (or set HF_HUB_CACHE) and set HF_HUB_OFFLINE=1"
    )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def _quiet(transformers) -> Iterator[None]:
    """No weight-loading bars or warnings about an unused CTC head while loading."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_files_sha256(folder: Path) -> str:
    """SHA-256 of an encoder folder's config, feature-extractor config and weight files (names
    and contents, by name)."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in Path(folder).iterdir()
        if path.name in MODEL_FILES or path.name.endswith(WEIGHT_SUFFIXES)
    )
    for path in files:
        digest.update(f"{path.name}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _provenance(encoder: SpeechEncoder, videos: list[Path], options: AudioOptions) -> Provenance:
    return alignment.imageless_provenance(
        options.dtype,
        encoder.hidden_size,
        checkpoint=Path(encoder.name).name if encoder.local else "",
        checkpoint_sha256=encoder.sha256,
        pretrained="" if encoder.local else encoder.name,
        weights_source=encoder.weights_source,
        layer=-1 if options.layer is None else options.layer,
        pool=LAYERS_MEAN if options.layer is None else "",
        source=", ".join(str(Path(video).resolve()) for video in videos),
        source_kind="audio",
        rate=encoder.rate,
        fps=0.0,
        align=options.align,
        sample_rate=encoder.sample_rate,
        chunk=float(options.chunk),
        overlap=float(options.overlap),
    )
