"""Video files, read and written with PyAV: the one module of fercache that calls it.

`crop` decodes frames (`open_video`), `import-features` reads frame rates (`frame_rate`),
`audio` decodes sound tracks (`Video.sound`), `analyse` writes annotated copies
(`write_drawn_copy`) and the synthetic media for `audio`'s tests are written by
`write_video_with_sound`. PyAV comes with the `video` extra
(pip install 'fercache[video]') and is imported only when a video is opened: without it, each
function raises a FercacheError saying how to install it (`INSTALL_HINT`, or the caller's
`hint`). A file
PyAV cannot open, decode or encode is a FercacheError naming it.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from fercache.errors import FercacheError
from fercache.readers import first_line

INSTALL_HINT = "reading and writing video files needs PyAV: pip install 'fercache[video]'"


def _pyav(hint: str = INSTALL_HINT):
    try:
        import av
    except ImportError as error:
        raise FercacheError(hint) from error
    return av


def require(hint: str = INSTALL_HINT) -> None:
    """A FercacheError saying `hint` unless PyAV can be imported."""
    _pyav(hint)


class Video:
    """The first video stream of an opened file."""

    def __init__(self, path: Path, container, av) -> None:
        if not container.streams.video:
            raise FercacheError(f"{path}: no video stream")
        self.path, self._container, self._av = path, container, av
        self._stream = container.streams.video[0]

    @property
    def fps(self) -> float:
        """Frames per second as the file records them; 0.0 when it records none."""
        return float(self._stream.average_rate or self._stream.guessed_rate or 0.0)

    @property
    def rate(self):
        """The exact average frame rate (a Fraction), None when the file records none."""
        return self._stream.average_rate

    @property
    def size(self) -> tuple[int, int]:
        """Width and height of the frames, in pixels."""
        return self._stream.codec_context.width, self._stream.codec_context.height

    @property
    def frames(self) -> int | None:
        """The number of frames the file records; None when it records none."""
        return self._stream.frames or None

    def rgb_frames(self) -> Iterator[np.ndarray]:
        """Every frame in order, as (H, W, 3) uint8 RGB."""
        decoded = self._container.decode(self._stream)
        while True:
            try:
                frame = next(decoded)
                yield frame.to_ndarray(format="rgb24")
            except StopIteration:
                return
            except (self._av.error.FFmpegError, ValueError) as error:
                raise FercacheError(f"{self.path}: could not decode ({error})") from error

    def sound(self, sample_rate: int) -> tuple[np.ndarray, float] | None:
        """The first audio stream, down-mixed and resampled by FFmpeg's resampler to mono
        float32 at `sample_rate`, and the seconds from the video stream's start to its first
        sample; None when the file has no audio stream."""
        if not self._container.streams.audio:
            return None
        av = self._av
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        pieces, first = [], None
        try:
            for frame in self._container.decode(self._container.streams.audio[0]):
                if first is None:
                    first = frame.time or 0.0
                pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        except (av.error.FFmpegError, ValueError) as error:
            why = first_line(error)
            raise FercacheError(f"{self.path}: unreadable ({why}); check or replace it") from error
        start = self._stream.start_time
        video_start = float(start * self._stream.time_base) if start else 0.0
        samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
        return samples, (first or 0.0) - video_start


@contextmanager
def open_video(path: Path, hint: str = INSTALL_HINT) -> Iterator[Video]:
    """The video stream of the file `path`, open while the context lasts."""
    av = _pyav(hint)
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise FercacheError(f"{path}: empty file, not a video")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, ValueError) as error:
        # FFmpeg's reason alone: its errno and the path it appends repeat what the line says
        why = getattr(error, "strerror", None) or first_line(error)
        raise FercacheError(f"{path}: unreadable video ({why})") from error
    with container:
        yield Video(Path(path), container, av)


def frame_rate(path: Path) -> float:
    """Frames per second of the video file `path`; 0.0 when it records none."""
    with open_video(path) as video:
        return video.fps


def write_drawn_copy(source: Path, target: Path, draw: Callable[[int, Image.Image], None]) -> None:
    """Write to `target` an MP4 (H.264) of `source`'s frames, each drawn on by
    `draw(frame number from 1, RGB image)`; width and height are cut to even numbers."""
    av = _pyav()
    try:
        with open_video(source) as video, av.open(str(target), "w", format="mp4") as out:
            encoded = out.add_stream("libx264", rate=video.rate or 25)
            width, height = video.size
            encoded.width, encoded.height = width // 2 * 2, height // 2 * 2
            encoded.pix_fmt = "yuv420p"
            for number, frame in enumerate(video.rgb_frames(), start=1):
                image = Image.fromarray(frame)
                draw(number, image)
                image = image.crop((0, 0, encoded.width, encoded.height))
                for packet in encoded.encode(av.VideoFrame.from_image(image)):
                    out.mux(packet)
            for packet in encoded.encode():
                out.mux(packet)
    except av.error.FFmpegError as error:
        why = first_line(error)
        raise FercacheError(f"could not write a drawn copy of {source} ({why})") from error


def write_video_with_sound(
    path: Path,
    fps: float | Fraction,
    frames: Iterable[np.ndarray],
    sound: np.ndarray | None,
    sample_rate: int,
) -> None:
    """Write `frames` ((H, W, 3) uint8 RGB, H and W even) at `fps` as H.264 and `sound`
    (channels, samples) in [-1, 1] at `sample_rate` as 16-bit PCM (None: no audio stream;
    mono for one channel, stereo for two). In a MOV or MKV file the decoded sound is the
    written one to the last bit."""
    av = _pyav()
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast"}
        if sound is not None:  # every stream is added before the first packet is written
            sound = np.atleast_2d(sound)
            layout = "mono" if len(sound) == 1 else "stereo"
            audio = container.add_stream("pcm_s16le", rate=sample_rate)
            audio.layout = layout
        for number, frame in enumerate(frames):
            if number == 0:
                video.height, video.width = frame.shape[:2]
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
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
