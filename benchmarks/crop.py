"""`fercache crop` throughput against its two parts, on the same video, in one run.

(a) decode only:     PyAV decoding every frame to an RGB array -- the floor of any crop;
(b) detection only:  MTCNN on the decoded frames, already in memory, in batches of --batch;
(c) fercache `crop` end to end (decode, detect, track, align, JPEG writes, the record).

    python benchmarks/crop.py                            # CPU: 240 x 320, 300 frames
    python benchmarks/crop.py --frames 600 --height 480 --width 640 --device cuda

The video is the astronaut photograph of scikit-image moving across a grey frame, encoded
with libx264 first (not timed). Each figure is the best of --repeats interleaved runs.
Prints frames/s and c/a, c/b.
"""

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image
from skimage import data as skimage_data

from fercache.video.crop import CropOptions, crop_videos
from fercache.video.pyav import open_video


def make_video(path: Path, frames: int, height: int, width: int) -> Path:
    face = skimage_data.astronaut()[0:260, 100:330]
    side = height * 2 // 3
    patch = np.asarray(Image.fromarray(face).resize((side * 230 // 260, side)))
    travel = width - patch.shape[1]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for i in range(frames):
            canvas = np.full((height, width, 3), 110, np.uint8)
            left = int(travel * (0.5 + 0.5 * np.sin(i / 20)))
            top = (height - side) // 2
            canvas[top : top + side, left : left + patch.shape[1]] = patch
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode(path: Path) -> list[np.ndarray]:
    with open_video(path) as video:  # as crop decodes
        return list(video.rgb_frames())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "bench.mp4", args.frames, args.height, args.width)

        frames = decode(video)
        detector = MTCNN(keep_all=True, device=device)
        detector.detect(frames[: args.batch], landmarks=True)  # warm-up
        options = CropOptions(batch=args.batch, device=device, progress=False)
        rates: dict[str, list[float]] = {"decode": [], "detect": [], "crop": []}
        for repeat in range(args.repeats):  # interleaved, best of each: the machine is shared
            started = time.perf_counter()
            decode(video)
            rates["decode"].append(len(frames) / (time.perf_counter() - started))

            started = time.perf_counter()
            for start in range(0, len(frames), args.batch):
                detector.detect(frames[start : start + args.batch], landmarks=True)
            rates["detect"].append(len(frames) / (time.perf_counter() - started))

            started = time.perf_counter()
            report = crop_videos([video], Path(tmp) / f"out{repeat}", options)
            rates["crop"].append(len(frames) / (time.perf_counter() - started))
        decode_rate, detect_rate, crop_rate = (max(rates[k]) for k in ("decode", "detect", "crop"))
        (result,) = report.videos

    print(f"video: {len(frames)} frames, {args.width} x {args.height}, device {device}")
    print(f"(a) decode only          {decode_rate:8.1f} frames/s")
    print(f"(b) detection only       {detect_rate:8.1f} frames/s  (batch {args.batch})")
    print(f"(c) fercache crop        {crop_rate:8.1f} frames/s  ({result.found} faces written)")
    print(f"c/a = {crop_rate / decode_rate:.3f}   c/b = {crop_rate / detect_rate:.2f}")


if __name__ == "__main__":
    main()
