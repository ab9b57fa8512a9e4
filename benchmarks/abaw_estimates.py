"""GPU time of each command of the audio-visual ABAW run (docs/abaw.md) on Aff-Wild2, estimated
from each network's floating-point operations and an assumed GPU throughput.

    python benchmarks/abaw_estimates.py                 # writes results/abaw-estimates.md
    python benchmarks/abaw_estimates.py --large-tflops 60 --small-tflops 6

The operations are counted by torch's FlopCounterMode (multiply-adds count two) on the networks
the commands run with the settings docs/abaw.md gives: MTCNN (facenet-pytorch) on a 1280 x 720
frame with one face, ResNet-50 at 224 px, wav2vec 2.0 base on a 32 s pass (30 s kept), the
temporal transformer of configs/temporal.yaml on a 64-frame window (training: three times the
forward pass). Networks of large layers (ResNet-50, wav2vec 2.0) are assumed to run at
--large-tflops, the temporal transformer (small layers) at --small-tflops and MTCNN (small
layers, per-frame steps on the host between its three networks) at --mtcnn-tflops; all three
are assumptions, not measurements. Decoding the sound is timed here on the CPU (PyAV, 48 kHz
stereo to 16 kHz mono). Every figure stays an estimate until the commands are timed on a GPU.
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
import timm
import torch
from audio import forward_flops  # benchmarks/audio.py
from facenet_pytorch import MTCNN
from PIL import Image
from skimage import data as skimage_data
from torch.utils.flop_counter import FlopCounterMode

from fercache.features.audio import read_sound_track
from fercache.synth.sound import write_video
from fercache.temporal.config import load_config
from fercache.temporal.model import ModelConfig
from fercache.temporal.transformer import TemporalTransformer

RESULTS = Path(__file__).resolve().parents[1] / "results" / "abaw-estimates.md"
SETTINGS = {  # option: (default, meaning): the work on Aff-Wild2 and the assumed throughputs
    "frames": (2.7e6, "Aff-Wild2's frames"),
    "sound-hours": (25.0, "its hours of sound"),
    "folds-frames": (0.87e6, "labelled EXPR frames of train + val"),
    "test-frames": (1.0e6, "frames to predict"),
    "epochs": (20, "epochs of each fold"),
    "large-tflops": (30.0, "ResNet-50's and wav2vec 2.0's"),
    "small-tflops": (3.0, "the temporal model's"),
    "mtcnn-tflops": (0.5, "MTCNN's"),
}


def counted(run) -> float:
    """Floating-point operations of `run()`."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        run()
    return float(counter.get_total_flops())


def mtcnn_flops() -> float:
    """MTCNN's operations on one 1280 x 720 frame holding one face (the astronaut)."""
    canvas = np.full((720, 1280, 3), 110, np.uint8)
    face = np.asarray(Image.fromarray(skimage_data.astronaut()[0:260, 100:330]).resize((230, 260)))
    canvas[230:490, 525:755] = face
    detector = MTCNN(keep_all=True, device="cpu")
    return counted(lambda: detector.detect([canvas], landmarks=True))


def resnet_flops() -> float:
    model = timm.create_model("resnet50", pretrained=False).eval().to("meta")
    return counted(lambda: model(torch.empty(1, 3, 224, 224, device="meta")))


def temporal_flops(feature_dim: int) -> float:
    """The default temporal transformer's forward pass on one 64-frame window."""
    settings = load_config(None, [])
    config = ModelConfig(
        feature_dim=feature_dim, tasks=("expr",), clip_frames=settings.clip_frames,
        width=settings.width, layers=settings.layers, heads=settings.heads,
        ff_width=settings.ff_width, dropout=0.0, input_dropout=0.0,
    )  # fmt: skip
    # training mode (no dropout): eval mode's fused encoder path is not counted by the counter
    model = TemporalTransformer(config).train()
    return counted(lambda: model(torch.zeros(1, settings.clip_frames, feature_dim)))


def decode_rate(seconds: float) -> float:
    """Seconds of 48 kHz stereo sound PyAV decodes and resamples to 16 kHz mono per second."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        sound = 0.1 * rng.normal(size=(2, int(seconds * 48000)))
        video = write_video(Path(tmp) / "sound.mov", 30, int(seconds * 30), sound, 48000)
        started = time.perf_counter()
        read_sound_track(video, 16000)
        return seconds / (time.perf_counter() - started)


def hours(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (default, meaning) in SETTINGS.items():
        parser.add_argument(f"--{name}", type=float, default=default, help=meaning)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    large, small = args.large_tflops * 1e12, args.small_tflops * 1e12
    detector = args.mtcnn_tflops * 1e12

    crop = mtcnn_flops()
    resnet = resnet_flops()
    chunk = forward_flops("base", 32.0) / 30.0  # per second kept: 30 s of rows, a 32 s pass
    window = temporal_flops(2048 + 768)  # ResNet-50's 2048 features beside wav2vec 2.0's 768
    decode = decode_rate(60.0)
    sound = args.sound_hours * 3600
    windows = args.folds_frames * 4 / 5 / 64 * args.epochs * 5  # 5 folds of 4/5 of the frames
    predicted = args.test_frames / 64 * 2 * 5  # windows at stride 32, by each of the 5 folds

    rows = [
        ("`crop`", "MTCNN per 1280 x 720 frame", crop, args.frames * crop / detector),
        ("`extract --pretrained resnet50…`", "ResNet-50 at 224 px per frame", resnet,
         args.frames * resnet / large),
        ("`audio --model …wav2vec2-base…`", "wav2vec 2.0 base per second of sound", chunk,
         sound * chunk / large + sound / decode),
        ("`train VISUAL AUDIO --folds 5`", "temporal model per training window (3 forward passes)",
         3 * window, windows * 3 * window / small),
        ("`predict FOLDS --split test`", "temporal model per window, 5 fold models", window,
         predicted * window / small),
    ]  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    text = "\n".join(
        [
            "# GPU time of the audio-visual run on Aff-Wild2: estimates",
            "",
            "Not measured on a GPU: each network's operations (torch's FlopCounterMode) times "
            "the work on Aff-Wild2, at an assumed throughput. See "
            "[docs/abaw.md](../docs/abaw.md) for the run.",
            "",
            "| command | counted | GFLOP | estimated GPU time |",
            "|---|---|---|---|",
            *(f"| {c} | {what} | {f / 1e9:,.2f} | {hours(t)} |" for c, what, f, t in rows),
            "| `smooth`, `submit` | no network | | seconds |",
            "",
            f"- Work: {args.frames / 1e6:g} M frames, {args.sound_hours:g} h of sound, "
            f"{args.folds_frames / 1e6:g} M labelled frames in the folds ({args.epochs:g} epochs "
            f"of 64-frame windows over 4/5 of them, 5 folds), {args.test_frames / 1e6:g} M test "
            "frames (windows at stride 32, 5 fold models).",
            f"- Assumed throughput: {args.large_tflops:g} TFLOP/s for ResNet-50 and wav2vec 2.0 "
            f"(half precision, large layers), {args.small_tflops:g} TFLOP/s for the temporal "
            f"model (small layers), {args.mtcnn_tflops:g} TFLOP/s for MTCNN (small layers and "
            "per-frame steps on the host between its three networks).",
            f"- Decoding the sound (measured here, on the CPU): {decode:,.0f} seconds of sound "
            "per second, added to `audio`'s time.",
            "- Not counted: JPEG decoding (extract's DataLoader workers run beside the GPU) and "
            "video decoding in `crop`.",
            f"- Command: `{' '.join(['python benchmarks/abaw_estimates.py', *sys.argv[1:]])}`.",
            f"- Commit: {commit or 'unknown'}.",
            f"- Machine (for the counts and the decoding): {platform.machine()}, "
            f"{os.cpu_count()} cores, no GPU.",
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
