"""Pre-compressed feature chunks: the chunk layout of the ``features`` dataset (rows per chunk, gzip level, shuffle), compressing blocks of rows into HDF5 gzip chunks off the HDF5 library (zlib releases the GIL, so threads compress in parallel), and writing such chunks into a dataset with no recompression.

A chunk compressed here is byte for byte what HDF5's own deflate filter (and shuffle filter,
when the layout has it) would store, so ``Dataset.id.write_direct_chunk`` turns it into a
standard gzip-filtered dataset that plain h5py reads with no plugin.
"""

from __future__ import annotations

import collections
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

#: Rows per chunk aim at this many uncompressed bytes (a power of two of rows, at most ``MAX_ROWS``).
TARGET_CHUNK_BYTES = 1 << 20
#: At most this many rows per chunk, so a batch of 32 (or any multiple) fills whole chunks.
MAX_ROWS = 16
#: gzip level of new files (chosen by measurement: docs/results.md, "Feature storage").
LEVEL = 2
#: HDF5's shuffle filter before gzip in new files (off: measured larger and slower on these features).
SHUFFLE = False


@dataclass(frozen=True)
class Layout:
    """How ``features`` is chunked and filtered: ``rows`` rows of ``row_shape`` (``dtype``) per
    chunk, gzip at ``level``, after HDF5's byte shuffle when ``shuffle``."""

    rows: int
    level: int
    shuffle: bool
    dtype: str
    row_shape: tuple[int, ...]

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def h5_options(self) -> dict:
        """Keyword arguments of ``create_dataset`` giving this layout."""
        return {"chunks": self.chunk_shape, "compression": "gzip", "compression_opts": self.level, "shuffle": self.shuffle}

    def as_json(self) -> dict:
        return {"rows": self.rows, "level": self.level, "shuffle": self.shuffle, "dtype": self.dtype, "row_shape": list(self.row_shape)}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(int(d["rows"]), int(d["level"]), bool(d["shuffle"]), str(d["dtype"]), tuple(int(x) for x in d["row_shape"]))


def default_layout(row_shape: tuple[int, ...], dtype: str) -> Layout:
    """The layout of new files: the largest power of two of rows (at most ``MAX_ROWS``) within ``TARGET_CHUNK_BYTES``."""
    row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    rows = 1
    while rows * 2 <= MAX_ROWS and rows * 2 * row_bytes <= TARGET_CHUNK_BYTES:
        rows *= 2
    return Layout(rows, LEVEL, SHUFFLE, np.dtype(dtype).name, tuple(int(x) for x in row_shape))


def layout_of(ds) -> Layout | None:
    """The layout of an h5py dataset when its chunks can be copied as they are: chunked one
    block of whole rows at a time, gzip alone or shuffle + gzip; else None (read it as values)."""
    try:
        if ds.is_virtual or ds.chunks is None or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]) or ds.compression != "gzip":
            return None
        filters = ds.id.get_create_plist().get_nfilters()
        if filters != 1 + bool(ds.shuffle):
            return None  # another filter too (fletcher32, scaleoffset...)
        return Layout(int(ds.chunks[0]), int(ds.compression_opts), bool(ds.shuffle), ds.dtype.name, tuple(int(x) for x in ds.shape[1:]))
    except Exception:
        return None


def compress(block: np.ndarray, layout: Layout) -> bytes:
    """One chunk: ``block`` (at most ``layout.rows`` rows, padded with zeros to a whole chunk), as HDF5 stores it."""
    block = np.ascontiguousarray(block, dtype=layout.dtype)
    if len(block) < layout.rows:
        block = np.concatenate([block, np.zeros((layout.rows - len(block), *layout.row_shape), layout.dtype)])
    raw = block.view(np.uint8).reshape(-1)
    if layout.shuffle:
        raw = raw.reshape(-1, block.dtype.itemsize).T.copy()
    return zlib.compress(raw.data, layout.level)


def decompress(data: bytes, layout: Layout, rows: int | None = None) -> np.ndarray:
    """The first ``rows`` (default all) rows of a chunk made by ``compress`` or by HDF5."""
    raw = np.frombuffer(zlib.decompress(data), np.uint8)
    itemsize = np.dtype(layout.dtype).itemsize
    if layout.shuffle:
        raw = raw.reshape(itemsize, -1).T.copy().reshape(-1)
    out = raw.view(layout.dtype).reshape(layout.chunk_shape)
    return out[: layout.rows if rows is None else rows]


@dataclass
class Packed:
    """Rows held as compressed chunks of ``layout``: ``counts[k]`` rows in ``chunks[k]`` (only the
    last may be short); ``finite`` says whether every value was finite when compressed."""

    layout: Layout
    chunks: list[bytes]
    counts: list[int]
    finite: bool = True
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(len(c) for c in self.chunks)

    def __len__(self) -> int:
        return int(sum(self.counts))

    def array(self) -> np.ndarray:
        """Every row, decompressed."""
        if not self.chunks:
            return np.zeros((0, *self.layout.row_shape), self.layout.dtype)
        return np.concatenate([decompress(c, self.layout, k) for c, k in zip(self.chunks, self.counts)])


def pack(features: np.ndarray, layout: Layout) -> Packed:
    """``features`` cut into chunks of ``layout.rows`` rows and compressed (the last chunk may be short)."""
    features = np.asarray(features)
    with np.errstate(over="ignore"):  # an overflow becomes inf, recorded in ``finite``
        f = features.astype(layout.dtype, copy=False)
    cuts = range(0, len(f), layout.rows)
    return Packed(layout, [compress(f[s : s + layout.rows], layout) for s in cuts], [min(layout.rows, len(f) - s) for s in cuts], all_finite(f))


#: Exponent bits of IEEE floats: all set means inf or NaN.
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(f: np.ndarray) -> bool:
    """Whether every value is finite; for float16 and float32 by their exponent bits (numpy's
    ``isfinite`` on float16 costs more than compressing the rows)."""
    if f.dtype in _EXPONENT and f.flags.c_contiguous:
        uint, mask = _EXPONENT[f.dtype]
        return not bool(np.any((f.view(uint) & uint(mask)) == uint(mask)))
    return bool(np.all(np.isfinite(f)))


def threads() -> int:
    """Compression threads: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _take(columns: tuple, start: int, count: int) -> tuple:
    return tuple(c[start : start + count] for c in columns)


class _Waiting:
    """Rows waiting to fill a chunk (features with their columns), first in, first out."""

    def __init__(self):
        self.blocks: list[tuple] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, features: np.ndarray, columns: tuple) -> None:
        self.blocks.append((features, columns))
        self.n += len(features)

    def take(self, k: int) -> tuple[np.ndarray, tuple]:
        feats = np.concatenate([f for f, _ in self.blocks]) if len(self.blocks) > 1 else self.blocks[0][0]
        columns = tuple(np.concatenate(c) for c in zip(*(m for _, m in self.blocks)))
        rest = len(feats) - k
        self.blocks = [(feats[k:], _take(columns, k, rest))] if rest else []
        self.n = rest
        return feats[:k], _take(columns, 0, k)


class ChunkSink:
    """Writes whole chunks into an h5py dataset of ``layout``, slot after slot: compressed ones
    as they are (``write_direct_chunk``), rows compressed on a thread pool first. ``put`` takes
    blocks of any size and holds rows back until a chunk's worth has gathered; ``finish`` queues
    the rest, ``close`` sets the dataset's length to the rows written."""

    def __init__(self, ds, layout: Layout, workers: int | None = None):
        self.ds = ds
        self.layout = layout
        self.slots = 0
        self.rows = 0
        self.waiting = _Waiting()
        self.pool = ThreadPoolExecutor(max_workers=workers or threads(), thread_name_prefix="compress")
        self.window: collections.deque = collections.deque()
        self.limit = 4 * (workers or threads())
        self.copied = 0  # chunks written as they came, without recompression

    @property
    def taken(self) -> int:
        """Rows taken so far: queued as chunks, or waiting to fill one."""
        return self.rows + len(self.waiting)

    def put(self, features, columns: tuple) -> list[tuple]:
        """Take a block of rows, ``features`` (an array, or a ``Packed`` of any layout) with their ``columns``
        (arrays of one value per row, carried along); return the columns of the rows queued now, in order.

        Whole chunks of this layout are queued as they are; every other row waits until a chunk's worth
        has gathered, then is compressed on the pool. So rows keep their order, except that rows
        waiting for a chunk are stored after the whole chunks that came meanwhile.
        """
        rows = self.layout.rows
        if isinstance(features, Packed) and features.layout == self.layout:
            queued, start = [], 0
            for data, count in zip(features.chunks, features.counts):
                part = _take(columns, start, count)
                if count == rows:
                    self.put_compressed(data, count)
                    queued.append(part)
                else:  # a short chunk joins the rows waiting for a chunk
                    self.waiting.add(decompress(data, self.layout, count), part)
                start += count
        else:
            values = features.array() if isinstance(features, Packed) else features
            with np.errstate(over="ignore"):  # an overflow of the storage dtype becomes inf (refused by the caller's check)
                self.waiting.add(np.asarray(values).astype(self.layout.dtype, copy=False), columns)
            queued = []
        while len(self.waiting) >= rows:
            block, part = self.waiting.take(rows)
            self.put_rows(block)
            queued.append(part)
        return queued

    def finish(self) -> list[tuple]:
        """Queue the rows still waiting as a short last chunk; return their columns."""
        if not len(self.waiting):
            return []
        block, part = self.waiting.take(len(self.waiting))
        self.put_rows(block)
        return [part]

    def put_compressed(self, data: bytes, rows: int) -> None:
        done: Future = Future()
        done.set_result(data)
        self.copied += 1
        self._queue(done, rows)

    def put_rows(self, block: np.ndarray) -> None:
        self._queue(self.pool.submit(compress, block, self.layout), len(block))

    def _queue(self, future: Future, rows: int) -> None:
        if self.rows % self.layout.rows:
            raise ValueError("a short chunk can only be the last one")
        self.window.append((self.slots, future))
        self.slots += 1
        self.rows += rows
        while len(self.window) > self.limit or (self.window and self.window[0][1].done()):
            self._write(*self.window.popleft())

    def _write(self, slot: int, future: Future) -> None:
        end = (slot + 1) * self.layout.rows
        if self.ds.shape[0] < end:
            self.ds.resize(max(end, 2 * self.ds.shape[0]), axis=0)
        self.ds.id.write_direct_chunk((slot * self.layout.rows,) + (0,) * len(self.layout.row_shape), future.result())

    def close(self) -> None:
        try:
            while self.window:
                self._write(*self.window.popleft())
            self.ds.resize(self.rows, axis=0)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Give up (the file is being discarded): stop the pool without writing what is left."""
        self.window.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _chunk_problem(raw: bytes, layout: Layout, rows: int) -> str | None:
    """Why one stored chunk cannot be trusted (None: it decompresses to a whole chunk of finite values)."""
    try:
        block = decompress(raw, layout, rows)
    except (zlib.error, ValueError) as exc:
        return f"does not decompress ({exc})"
    return None if all_finite(np.ascontiguousarray(block)) else "holds non-finite values"


def damaged_rows(ds, workers: int | None = None) -> list[tuple[int, int, str]]:
    """The rows of an h5py ``features`` dataset that cannot be trusted, as ``(start, stop, why)`` per chunk.

    Every chunk is read as stored and decompressed (zlib checks its own checksum) on a thread
    pool, and its values checked to be finite: a chunk damaged on disk, or rewritten by another
    tool, is found before its bytes are copied into a new file or its rows called up to date.
    A dataset of another layout (virtual, other filters) is read as values instead.
    """
    n = int(ds.shape[0])
    layout = layout_of(ds)
    if layout is None:
        step = int(ds.chunks[0]) if ds.chunks else 256
        out = []
        for s in range(0, n, step):
            try:
                block = np.asarray(ds[s : s + step])
            except OSError as exc:
                out.append((s, min(n, s + step), f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"))
                continue
            if not all_finite(np.ascontiguousarray(block)):
                out.append((s, min(n, s + step), "holds non-finite values"))
        return out
    found: list[tuple[int, int, str]] = []
    window: collections.deque = collections.deque()
    limit = 4 * (workers or threads())

    def drain(keep: int) -> None:
        while len(window) > keep:
            start, stop, future = window.popleft()
            why = future.result()
            if why:
                found.append((start, stop, why))

    with ThreadPoolExecutor(max_workers=workers or threads(), thread_name_prefix="check") as pool:
        for start in range(0, n, layout.rows):
            stop = min(n, start + layout.rows)
            try:
                mask, raw = ds.id.read_direct_chunk((start,) + (0,) * (len(ds.shape) - 1))
            except (OSError, KeyError, ValueError) as exc:
                found.append((start, stop, f"unreadable ({exc})"))
                continue
            if mask:  # a filter was skipped for this chunk: HDF5 reads it as values
                try:
                    finite = all_finite(np.ascontiguousarray(ds[start:stop]))
                except OSError as exc:
                    found.append((start, stop, f"unreadable ({exc})"))
                    continue
                if not finite:
                    found.append((start, stop, "holds non-finite values"))
                continue
            window.append((start, stop, pool.submit(_chunk_problem, raw, layout, stop - start)))
            drain(limit)
        drain(0)
    return sorted(found)
