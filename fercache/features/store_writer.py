"""The background store writer of `extract`: rows assembled per video as the batches deliver
them, on a thread of its own, and each finished video's store written atomically
(`fercache.features.store`) while the next batches compute.
"""

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.features.frames import VideoJob
from fercache.features.store import Provenance, write_store

WRITE_QUEUE_BATCHES = 8


@dataclass
class _VideoRows:
    """A video's rows as batches deliver them; complete when every frame is accounted for."""

    job: VideoJob
    start: int
    features: np.ndarray
    logits: np.ndarray | None
    ok: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0

    @property
    def complete(self) -> bool:
        return self.seen == len(self.job.frames)

    def take(self, dataset_index: int, features: np.ndarray, logits: np.ndarray | None) -> None:
        row = dataset_index - self.start
        self.features[row] = features
        if logits is not None:
            self.logits[row] = logits
        self.ok[row] = True
        self.seen += 1

    def fail(self, dataset_index: int, reason: str) -> None:
        self.failed.append((int(self.job.frames[dataset_index - self.start]), reason))
        self.seen += 1


class StoreWriter:
    """Assembles rows per video on a background thread and writes each finished store.

    Rows arrive as (dataset index, features, logits) batches plus failures; the thread keeps
    the GPU/CPU compute path free of HDF5 and file-system work. An error on the thread is
    re-raised in the caller at the next `put` or at `close`.
    """

    def __init__(
        self,
        jobs: list[VideoJob],
        out: Path,
        provenance: Provenance,
        on_video_done=lambda job: None,
    ) -> None:
        self.jobs, self.out, self.provenance = jobs, out, provenance
        self.on_video_done = on_video_done
        self.starts = np.cumsum([0] + [len(job.frames) for job in jobs])
        self.pending: dict[int, _VideoRows] = {}
        self.failed: list[str] = []
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="fercache-store-writer")
        self.thread.start()

    def put(self, index: np.ndarray, features: np.ndarray, logits, failed) -> None:
        self._raise_if_failed()
        self.queue.put((index, features, logits, failed))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()
        unfinished = [rows.job.video for rows in self.pending.values()]
        if unfinished:
            raise RuntimeError(f"frames of {unfinished} never reached the writer")

    def abort(self) -> None:
        """Stop the thread without writing anything more (the caller is failing)."""
        self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._add(*item)
                except BaseException as error:  # handed to the main thread, never lost
                    self.error = error

    def _add(self, index: np.ndarray, features: np.ndarray, logits, failed) -> None:
        for row, dataset_index in enumerate(index.tolist()):
            self._rows_of(dataset_index).take(
                dataset_index, features[row], logits[row] if logits is not None else None
            )
        for dataset_index, reason in failed:
            self._rows_of(dataset_index).fail(dataset_index, reason)
            self.failed.append(reason)
        for video_index in [v for v, rows in self.pending.items() if rows.complete]:
            self._write(self.pending.pop(video_index))

    def _rows_of(self, dataset_index: int) -> _VideoRows:
        video_index = int(np.searchsorted(self.starts, dataset_index, side="right")) - 1
        if video_index not in self.pending:
            job = self.jobs[video_index]
            self.pending[video_index] = _VideoRows(
                job=job,
                start=int(self.starts[video_index]),
                features=np.empty((len(job.frames), self.provenance.feature_dim), np.float32),
                logits=(
                    np.empty((len(job.frames), self.provenance.num_classes), np.float32)
                    if self.provenance.num_classes
                    else None
                ),
                ok=np.zeros(len(job.frames), bool),
            )
        return self.pending[video_index]

    def _write(self, rows: _VideoRows) -> None:
        keep = rows.ok
        write_store(
            self.out,
            rows.job.video,
            frames=rows.job.frames[keep],
            features=rows.features[keep],
            logits=rows.logits[keep] if rows.logits is not None else None,
            provenance=self.provenance,
            skipped=rows.failed,
        )
        self.on_video_done(rows.job)
