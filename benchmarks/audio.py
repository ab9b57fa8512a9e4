"""`fercache audio` in seconds of sound per second, against the encoder's forward pass alone on
the same chunks (the limit) and a naive whole-file pass, side by side in one run.

(a) forward only:   the encoder over each chunk fercache cuts (`SpeechEncoder.spans`: 30 s kept,
                    1 s of context each side), the samples already decoded and in memory;
(b) fercache audio: end to end (`compute_audio`: PyAV decode and resample, the feature
                    extractor, the chunked forward passes, alignment to frames, store writes,
                    the manifest);
(c) naive:          one forward pass over each whole track, decoded and in memory (what a
                    script without chunks does; its attention grows with the square of the
                    track's length);
(d) decode only:    PyAV decoding and resampling each track (`read_sound_track`).

Beside the speeds, the forward pass's operations per second of sound, counted by torch's
FlopCounterMode on the meta device: over fercache's chunks, and in one pass over a whole track
of the benchmark's length and of an hour.

    python benchmarks/audio.py                           # wav2vec2-base size, 2 videos of 90 s
    python benchmarks/audio.py --size tiny --seconds 600 --videos 3

The encoder is a wav2vec 2.0 built from `transformers.Wav2Vec2Config` with random weights
(`fercache.synth.sound`: `base` is the default config, the size of wav2vec2-base; nothing is
downloaded); random weights cost what trained ones cost. The videos are 30 fps with a 48 kHz
stereo sound track of tones in noise, generated first and not timed. Each figure is the best
of --repeats interleaved runs. Prints the table and writes it to --out with the command, the
commit and the machine.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2Config, Wav2Vec2Model

from fercache.distributed import resolve_device
from fercache.features.audio import AudioOptions, compute_audio, load_encoder, read_sound_track
from fercache.synth.sound import (
    ENCODER_RATE,
    ENCODER_SIZES,
    save_speech_encoder,
    write_frame_tree,
    write_video,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "audio.md"
FPS = 30
SOURCE_RATE = 48000


def make_videos(folder: Path, count: int, seconds: float, seed: int) -> list[Path]:
    """`count` videos of `seconds`: 48 kHz stereo tones that change every second, in noise."""
    rng = np.random.default_rng(seed)
    videos = []
    for index in range(count):
        pitches = np.repeat(rng.uniform(200, 2000, size=int(np.ceil(seconds))), SOURCE_RATE)
        t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
        sound = 0.3 * np.sin(2 * np.pi * pitches[: len(t)] * t) + 0.05 * rng.normal(size=len(t))
        stereo = np.stack([sound, 0.8 * sound])
        path = folder / "videos" / f"bench{index:02d}.mov"
        videos.append(write_video(path, FPS, int(seconds * FPS), stereo, SOURCE_RATE))
    return videos


def forward_flops(size: str, seconds: float) -> float:
    """Operations of one forward pass of the wav2vec 2.0 of `size` over `seconds` of sound,
    every hidden state out, counted on the meta device (no memory, no time)."""
    model = Wav2Vec2Model(Wav2Vec2Config(**ENCODER_SIZES[size])).eval()
    conv = model.encoder.pos_conv_embed.conv
    if parametrize.is_parametrized(conv):  # the weight norm cannot move to the meta device
        parametrize.remove_parametrizations(conv, "weight")
    model = model.to("meta")
    samples = torch.empty(1, int(seconds * ENCODER_RATE), device="meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(samples, output_hidden_states=True)
    return float(counter.get_total_flops())


def best_rate(seconds_of_sound: float, runs: list[float]) -> float:
    return seconds_of_sound / min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each video")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = make_videos(root, args.videos, args.seconds, args.seed)
        frames = {video.stem: int(args.seconds * FPS) for video in videos}
        data = write_frame_tree(root / "data", frames)
        folder = save_speech_encoder(root / f"wav2vec2-{args.size}", args.size, args.seed)
        encoder = load_encoder(str(folder), None, device)
        options = AudioOptions(model=str(folder), device=str(device), progress=False)
        tracks = [read_sound_track(video, encoder.sample_rate).samples for video in videos]
        sound = sum(len(samples) for samples in tracks) / encoder.sample_rate
        encoder.forward(tracks[0][: 5 * encoder.sample_rate], None)  # warm-up

        runs: dict[str, list[float]] = {"forward": [], "audio": [], "naive": [], "decode": []}
        for repeat in range(args.repeats):  # interleaved, best of each: the machine is shared
            started = time.perf_counter()
            for samples in tracks:
                for span in encoder.spans(len(samples), options.chunk, options.overlap):
                    encoder.forward(encoder.piece(samples, span), None)
            runs["forward"].append(time.perf_counter() - started)

            started = time.perf_counter()
            compute_audio([root / "videos"], root / f"cache{repeat}", data, options)
            runs["audio"].append(time.perf_counter() - started)

            started = time.perf_counter()
            for samples in tracks:
                encoder.forward(samples, None)
            runs["naive"].append(time.perf_counter() - started)

            started = time.perf_counter()
            for video in videos:
                read_sound_track(video, encoder.sample_rate)
            runs["decode"].append(time.perf_counter() - started)

    forward, audio, naive, decode = (
        best_rate(sound, runs[key]) for key in ("forward", "audio", "naive", "decode")
    )
    span = options.chunk + 2 * options.overlap
    operations = [
        (f"fercache's chunks ({span:g} s passes, {options.chunk:g} s kept)",
         forward_flops(args.size, span) / options.chunk),
        (f"one pass over a whole track of {args.seconds:g} s",
         forward_flops(args.size, args.seconds) / args.seconds),
        ("one pass over a whole track of an hour", forward_flops(args.size, 3600) / 3600),
    ]  # fmt: skip
    passes = sum(len(encoder.spans(len(s), options.chunk, options.overlap)) for s in tracks)
    rows = [
        ("(a) forward only, on fercache's chunks (the limit)", forward, ""),
        ("(b) `fercache audio` end to end", audio, f"b/a = {audio / forward:.2f}"),
        ("(c) naive: one pass over each whole track", naive, f"c/a = {naive / forward:.2f}"),
        ("(d) decode and resample only (PyAV)", decode, f"b/d = {audio / decode:.3f}"),
    ]
    table = [
        "| | seconds of sound per second | |",
        "|---|---|---|",
        *(f"| {name} | {rate:,.1f} | {ratio} |" for name, rate, ratio in rows),
        "",
        "| forward pass over | GFLOP per second of sound |",
        "|---|---|",
        *(f"| {name} | {flops / 1e9:,.2f} |" for name, flops in operations),
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    command = "python benchmarks/audio.py " + " ".join(sys.argv[1:])
    size = "wav2vec2-base size (12 layers of 768)" if args.size == "base" else "tiny (2 of 32)"
    load = os.getloadavg()[0]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    text = "\n".join(
        [
            "# Audio feature speed",
            "",
            "`fercache audio` against the encoder's forward pass alone on the same chunks, a "
            "naive whole-file pass and decoding alone, in one run. See "
            "[docs/audio.md](../docs/audio.md) for what the command does.",
            "",
            *table,
            "",
            f"- Command: `{command.strip()}`.",
            f"- Encoder: wav2vec 2.0 of the {size}, random weights from `Wav2Vec2Config` (no "
            f"download), {encoder.rate:g} rows per second of {encoder.sample_rate} Hz sound; "
            f"mean of all hidden states; chunks of {options.chunk:g} s with {options.overlap:g} s "
            f"of context each side ({passes} passes).",
            f"- Sound: {args.videos} videos of {args.seconds:g} s (48 kHz stereo, 30 fps), "
            f"{sound:,.0f} s in all; best of {args.repeats} interleaved runs.",
            f"- Commit: {commit or 'unknown'}.",
            f"- Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {device.type}, "
            f"{gpu}; load average {load:.1f} when it finished.",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
