"""Media for testing and benchmarking `fercache audio` without downloads: video files with a
sound track, written with PyAV (the `video` extra, through `fercache.video.pyav`), and
random-initialised speech encoders built from their `transformers` config class and saved with
`save_pretrained` (the `audio` extra).

Videos hold 16 x 16 black H.264 frames and 16-bit PCM sound: in a MOV file (or MKV) the decoded
track is the written one to the last bit.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fercache.video.pyav import write_video_with_sound

ENCODER_RATE = 16000  # the sample rate of the encoders saved here
ROW_RATE = 50.0  # their rows per second: 16 kHz / a stride of 320 samples


def write_video(
    path: Path,
    fps: float | Fraction,
    frames: int,
    sound: np.ndarray | None,
    sample_rate: int = ENCODER_RATE,
) -> Path:
    """`frames` black 16 x 16 video frames at `fps` and `sound` (channels, samples) in [-1, 1] at
    `sample_rate` (None: no audio stream); mono for one channel, stereo for two."""
    path.parent.mkdir(parents=True, exist_ok=True)
    black = np.zeros((16, 16, 3), np.uint8)
    write_video_with_sound(path, fps, (black for _ in range(frames)), sound, sample_rate)
    return path


def tone(seconds: float, frequency: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine of `seconds` at `sample_rate` (one channel)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


# `transformers.Wav2Vec2Config` arguments; both keep its front end (stride 320, window 400
# samples at 16 kHz: 50 rows per second)
ENCODER_SIZES = {
    # hidden size 32, 2 layers, 16 channels in the front end: for tests
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16,) * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
    "base": {},  # the config's defaults: the size of wav2vec2-base (12 layers of 768)
}


def save_speech_encoder(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """A wav2vec 2.0 of `size` (ENCODER_SIZES) with random weights drawn with `seed`, and its
    feature extractor, saved into `folder` with `save_pretrained`."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    Wav2Vec2Model(Wav2Vec2Config(**ENCODER_SIZES[size])).save_pretrained(folder)
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=ENCODER_RATE, do_normalize=True)
    extractor.save_pretrained(folder)
    return folder


def write_frame_tree(root: Path, frames: dict[str, int]) -> Path:
    """An Aff-Wild2 tree in which video X has `frames[X]` frames: an EXPR training annotation of
    that many Neutral frames, and an image folder (one empty file) so the reader finds it."""
    folder = root / "Annotations" / "EXPR_Recognition_Challenge" / "Train_Set"
    folder.mkdir(parents=True)
    for video, count in frames.items():
        (folder / f"{video}.txt").write_text("Neutral\n" + "0\n" * count)
        (root / "cropped_aligned" / video).mkdir(parents=True)
        (root / "cropped_aligned" / video / "00001.jpg").touch()
    return root
