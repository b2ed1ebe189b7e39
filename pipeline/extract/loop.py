"""The extraction loop: reader batches through the backbone into work-area parts, compressed into the final file's chunks and written on background threads so the network never waits on compression or the disk."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from pipeline.core.signals import stop_if_terminated
from pipeline.featurefile import chunks
from pipeline.images.listing import Listing
from pipeline.images.decode import iter_batches
from pipeline.extract.workarea import WorkArea


class PartWriter:
    """Compresses finished batches into chunks and writes them to the work area on ``threads``
    threads off the main thread (zlib releases the GIL, so they compress in parallel), so the
    network never waits on compression or the disk. Each batch is one part, named by its
    sequence number; parts are independent, so the order they land in does not matter."""

    def __init__(self, work: WorkArea, listing: Listing, start_seq: int, layout: chunks.Layout, threads: int | None = None):
        self.work = work
        self.listing = listing
        self.seq = start_seq
        self.layout = layout
        n = threads or chunks.threads()
        self.queue: queue.Queue = queue.Queue(maxsize=2 * n)
        self.error: BaseException | None = None
        self.written = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"part-writer-{k}") for k in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            seq, (indices, feats, rejected_indices, reasons, limits) = item
            try:
                self.work.write_part(seq, self.listing, indices, chunks.pack(feats, self.layout), rejected_indices, reasons, limits)
                with self.lock:
                    self.written += len(indices) + len(rejected_indices)
            except BaseException as exc:  # reported by the main thread
                self.error = exc

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((self.seq, item))
        self.seq += 1

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def prefetch_depth(batch_size: int, workers: int) -> int:
    """Batches decoded ahead of the network: at least 2, and enough that every decoding thread
    has 4 images in flight (16 threads and batches of 32: 2; 64 threads: 8)."""
    threads = workers if workers > 0 else chunks.threads()
    return max(2, -(-4 * threads // batch_size))


def _runs(indices: np.ndarray) -> list[np.ndarray]:
    """Split sorted indices into contiguous runs, so a batch never spans a gap and parts never interleave."""
    if len(indices) == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    return np.split(indices, cuts)


def extract_rows(
    listing: Listing,
    todo: np.ndarray,
    work: WorkArea,
    net,
    *,
    input_size: int,
    batch_size: int,
    storage: str,
    resize: str,
    workers: int,
    image_timeout: float,
    progress: bool,
    done: int = 0,
) -> float:
    """Run the network over listing rows ``todo`` into the work area, one part per batch.

    Args:
        listing, todo: the files and which of their rows to extract (sorted).
        work: the work area the parts go to (it may already hold parts: they are kept).
        net: the network, opened (``ResolvedBackbone.open``): uint8 RGB batches in, features of
            ``net.output_shape`` out; ``bench --data-path`` passes a stub replaying real
            features, to measure everything but the network.
        input_size, batch_size, storage, resize, workers, image_timeout: the extraction's settings.
        progress: show a progress bar; ``done`` rows count as already done in it.

    Returns:
        The seconds from the first batch to the last part written.

    Raises:
        PipelineError: a part could not be written.
    """
    from pipeline.core.progress import progress as progress_bar

    dtype = np.dtype(storage)
    writer = PartWriter(work, listing, work.next_seq(), chunks.default_layout(tuple(net.output_shape), dtype.name))
    writer.start()
    n_rejected = 0
    ahead = prefetch_depth(batch_size, workers)
    bar = progress_bar(done + len(todo), "extract", quiet=not progress, initial=done, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        for run in _runs(todo):
            for batch in iter_batches(listing, run, size=input_size, interpolation=resize, batch_size=batch_size, workers=workers,
                                      timeout=image_timeout, prefetch=ahead):  # fmt: skip
                ok = batch.ok
                pixels = batch.pixels if ok.all() else batch.pixels[ok]  # no copy of a whole batch
                feats = net(pixels) if len(pixels) else np.zeros((0, *net.output_shape), np.float32)
                rejected = [r for r, good in zip(batch.reasons, ok) if not good]
                limits = [x for x, good in zip(batch.limits, ok) if not good]
                writer.put((batch.indices[ok], feats, batch.indices[~ok], rejected, limits))  # cast and compressed by the writer threads
                bar.update(len(batch.indices))
                stop_if_terminated()  # a SIGINT/SIGTERM that library code swallowed stops the run here
                if rejected:
                    n_rejected += len(rejected)
                    bar.set_postfix(rejected=n_rejected, refresh=False)
    finally:
        bar.close()
        writer.close()
    return time.perf_counter() - t0
