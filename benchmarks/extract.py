"""Extraction throughput against its limit and against the naive peer loop, in one run.

(a) limit:  forward passes alone on random tensors already on the device (same batch size,
            channels_last, autocast on CUDA) -- what the backbone allows;
(b) fercache `extract` end to end on an Aff-Wild2 tree (decode, resize, forward, HDF5 writes);
(c) naive:  the peer loop -- PIL per frame, resize + normalise per frame, batch of one,
            one `.npy` file per frame -- on a subset of the same frames.

    python benchmarks/extract.py                      # CPU: resnet18 at 112 px, synthetic tree
    python benchmarks/extract.py --backbone resnet50 --input-size 224 --videos 48 --frames 600
    python benchmarks/extract.py --backbone vit_tiny_patch16_224 --input-size 224 \
        --layer 8 --tta flip

--layer, --pool and --tta choose the readout as `fercache extract` does; (a) and (c) compute
the same readout (with --tta flip, (a) forwards the doubled batch too).

Without --data a synthetic tree is generated first (not timed). Prints frames/s and b/a, b/c.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fercache.backbone.network import load_backbone
from fercache.backbone.readout import Readout, check_readout
from fercache.data.affwild2 import AffWild2
from fercache.distributed import resolve_device
from fercache.features.extract import ExtractOptions, extract, forward_backbone
from fercache.synth import SynthConfig, generate


def main() -> None:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone = load_backbone(args.backbone, None, input_size=args.input_size)
    readout = Readout(-1 if args.layer is None else args.layer, args.pool, args.tta)
    check_readout(backbone.model, backbone.name, readout, backbone.feature_dim)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        data = args.data or _synthetic_tree(Path(scratch) / "tree", args)
        paths = _frame_paths(data)
        print(
            f"{len(paths):,} frames, {args.backbone} at {backbone.data_config.input_size[1]} px, "
            f"batch {batch_size}, device {device}"
            + (f", {readout}" if not readout.is_default else "")
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        )
        limit = _forward_only(backbone, device, batch_size, len(paths), readout)
        print(f"(a) forward only, random tensors      {limit:10,.0f} frames/s")
        options = ExtractOptions(
            backbone=args.backbone,
            input_size=args.input_size,
            batch_size=batch_size,
            workers=args.workers,
            device=args.device,
            progress=False,
            force=True,
            layer=args.layer,
            pool=args.pool,
            tta=args.tta,
        )
        started = time.perf_counter()
        report = extract(data, Path(scratch) / "cache", options)
        end_to_end = report.frames / (time.perf_counter() - started)
        print(f"(b) fercache extract, end to end      {end_to_end:10,.0f} frames/s")
        naive = _naive_loop(
            backbone, device, paths[: args.naive_frames], Path(scratch) / "npy", readout
        )
        print(f"(c) naive loop ({args.naive_frames} frames)          {naive:10,.0f} frames/s")
    print(f"b/a = {end_to_end / limit:.2f}   (goal >= 0.85 CPU, >= 0.9 GPU)")
    print(f"b/c = {end_to_end / naive:.1f}   (goal >= 5)")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="Aff-Wild2 root; default: a synthetic tree")
    parser.add_argument("--videos", type=int, default=24, help="synthetic videos")
    parser.add_argument("--frames", type=int, default=500, help="mean frames per synthetic video")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--naive-frames", type=int, default=300)
    parser.add_argument("--scratch", type=Path, help="folder for temporary files")
    parser.add_argument(
        "--threads", type=int, help="torch threads; 1 gives steadier figures on a shared CPU"
    )
    parser.add_argument("--layer", type=int, help="as `fercache extract --layer`")
    parser.add_argument("--pool", default="", help="as `fercache extract --pool`")
    parser.add_argument("--tta", default="", help="as `fercache extract --tta`")
    return parser.parse_args()


def _synthetic_tree(root: Path, args: argparse.Namespace) -> Path:
    config = SynthConfig(
        videos=args.videos, frames=args.frames, seed=0, labelled_pool=40, unlabelled_pool=40
    )
    generate(root, config, progress=False)
    return root


def _frame_paths(data: Path) -> list[Path]:
    dataset = AffWild2(data)
    return [
        dataset.images / video / f"{frame:05d}.jpg"
        for video in dataset.videos()
        for frame in dataset.image_frames(video)[0]
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_only(
    backbone, device: torch.device, batch_size: int, frames: int, readout: Readout
) -> float:
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    batch = torch.randn(batch_size, *backbone.data_config.input_size, device=device)
    batch = batch.contiguous(memory_format=torch.channels_last)
    batches = max(3, frames // batch_size)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: cuDNN autotuning, oneDNN primitive caches
            forward_backbone(model, batch, backbone.num_classes > 0, readout)
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            forward_backbone(model, batch, backbone.num_classes > 0, readout)
        _synchronize(device)
    return batches * batch_size / (time.perf_counter() - started)


def _naive_loop(
    backbone, device: torch.device, paths: list[Path], out: Path, readout: Readout
) -> float:
    """What many ABAW repositories do: one image at a time, start to finish."""
    out.mkdir()
    model = backbone.model.to(device)
    config = backbone.data_config
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
    started = time.perf_counter()
    with torch.inference_mode():
        for index, path in enumerate(paths):
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
            pixels = F.interpolate(
                pixels, size=config.input_size[1:], mode="bicubic", antialias=True
            )
            if readout.is_default:
                features = model.forward_head(
                    model.forward_features((pixels - mean) / std), pre_logits=True
                )
            else:
                features, _ = forward_backbone(model, (pixels - mean) / std, False, readout)
            np.save(out / f"{index:06d}.npy", features.cpu().numpy())
    return len(paths) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
