"""Test media for `fercache audio`: small video files with a sound track, written with PyAV,
and a small random-initialised speech encoder saved as a `save_pretrained` folder.

Videos are MOV files of 16 x 16 black H.264 frames with 16-bit PCM sound (lossless, so a
decoded track is the written one to the last bit); `codec`/`suffix` choose another container.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ENCODER_RATE = 16000  # the tiny encoder's sample rate
ROW_RATE = 50.0  # its rows per second: 16 kHz / a stride of 320 samples


def write_video(
    path: Path,
    fps: float | Fraction,
    frames: int,
    sound: np.ndarray | None,
    sample_rate: int = ENCODER_RATE,
) -> Path:
    """`frames` video frames at `fps` and `sound` (channels, samples) in [-1, 1] at
    `sample_rate` (None: no audio stream); mono for one channel, stereo for two."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = video.height = 16
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast"}
        if sound is not None:  # every stream is added before the first packet is written
            sound = np.atleast_2d(sound)
            layout = "mono" if len(sound) == 1 else "stereo"
            audio = container.add_stream("pcm_s16le", rate=sample_rate)
            audio.layout = layout
        black = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in video.encode(black):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            pcm = np.round(np.clip(sound, -1, 1) * 32767).astype(np.int16)
            for start in range(0, pcm.shape[1], 1024):
                block = np.ascontiguousarray(pcm[:, start : start + 1024].T).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
                frame.sample_rate, frame.pts = sample_rate, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


def tone(seconds: float, frequency: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine of `seconds` at `sample_rate` (one channel)."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


def save_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A wav2vec 2.0 of hidden size 32, 2 layers and a 16-channel front end (stride 320,
    window 400 samples at 16 kHz: 50 rows per second), random weights, and its feature
    extractor, saved with `save_pretrained`."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=ENCODER_RATE, do_normalize=True)
    extractor.save_pretrained(folder)
    return folder
