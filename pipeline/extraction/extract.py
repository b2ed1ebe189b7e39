"""Extract stage: images -> VGG16 bottleneck features -> one HDF5 file, resumable after a kill and safe against bad files."""

from __future__ import annotations

import json
import os
import platform
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.extraction import backbone as bb
from pipeline.core.config import PRECISIONS, RESIZE_METHODS, STORAGE_DTYPES
from pipeline.core.errors import PipelineError
from pipeline.extraction.reader import Listing, iter_batches, list_images
from pipeline.extraction.store import WorkArea, write_feature_file
from pipeline.core.outputs import OutputLock


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``python -m pipeline extract``.

    Attributes:
        data_dir: class-per-folder image tree.
        output: the HDF5 feature file to write.
        input_size: square side the images are resized to (224 gives 7x7x512 features).
        batch_size: images per network call.
        weights: ``imagenet``, ``none`` (explicit random init) or a weights file path.
        precision: compute precision (``auto``, ``float32``, ``bfloat16``, ``float16``).
        storage: dtype of the stored features.
        resize: Pillow/``load_img`` interpolation used for resizing.
        workers: decoding threads (0 = one per core).
        image_timeout: seconds one image may take to decode before it is rejected.
        strict: exit non-zero if any file was rejected.
        overwrite: replace an output (or partial run) made from other images or settings.
        quiet: no progress bar (for batch logs); the summary line is still printed.
        shards, shard: extract only the ``shard``-th of ``shards`` deterministic slices.
        command_line: recorded in the output file.
    """

    data_dir: Path
    output: Path
    input_size: int = 224
    batch_size: int = 32
    weights: str = "imagenet"
    precision: str = "auto"
    storage: str = "float16"
    resize: str = "bilinear"
    workers: int = 0
    image_timeout: float = 60.0
    strict: bool = False
    overwrite: bool = False
    quiet: bool = False
    shards: int = 1
    shard: int = 0
    command_line: str = ""

    def validate(self) -> "ExtractConfig":
        """Check every value; return self. Raises PipelineError naming the bad setting."""
        if self.input_size < 32:
            raise PipelineError(f"--input-size {self.input_size}: VGG16 needs at least 32 pixels")
        if self.batch_size < 1:
            raise PipelineError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.storage not in STORAGE_DTYPES:
            raise PipelineError(f"--storage {self.storage}: choose one of {', '.join(STORAGE_DTYPES)}")
        if self.resize not in RESIZE_METHODS:
            raise PipelineError(f"--resize {self.resize}: choose one of {', '.join(RESIZE_METHODS)}")
        if self.workers < 0:
            raise PipelineError(f"--workers {self.workers}: must be 0 (auto) or more")
        if self.image_timeout <= 0:
            raise PipelineError(f"--image-timeout {self.image_timeout}: must be positive")
        if self.shards < 1 or not 0 <= self.shard < self.shards:
            raise PipelineError(f"--shard {self.shard} of --shards {self.shards}: need 0 <= shard < shards")
        if self.output.suffix.lower() not in (".h5", ".hdf5"):
            raise PipelineError(f"{self.output}: the output must be an HDF5 file ending in .h5 or .hdf5")
        return self


def package_versions() -> dict:
    """Versions of the packages that decide the numbers in a feature file."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "tensorflow-cpu", "keras", "numpy", "h5py", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def shard_listing(listing: Listing, shards: int, shard: int) -> Listing:
    """The ``shard``-th of ``shards`` slices: every ``shards``-th file of the sorted listing.

    Deterministic and stable under reruns; interleaving keeps every class in every shard.
    """
    if shards == 1:
        return listing
    keep = np.arange(shard, len(listing), shards)
    out = listing.select(keep)
    unlisted = tuple(u for i, u in enumerate(listing.unlisted) if i % shards == shard)
    return Listing(out.root, out.class_names, out.paths, out.labels, out.sizes, out.mtimes_ns, unlisted)


def fingerprint(config: ExtractConfig, listing: Listing, weights, precision: str) -> dict:
    """Everything that decides the content of the output: if it is unchanged, so is the file."""
    return {
        "backbone": bb.BACKBONE,
        "layer": bb.LAYER,
        "input_size": config.input_size,
        "resize": config.resize,
        "preprocessing": bb.PREPROCESSING,
        "weights": weights.name,
        "weights_checksum": weights.checksum,
        "precision": precision,
        "storage": config.storage,
        "class_names": list(listing.class_names),
        "n_files": len(listing) + len(listing.unlisted),
        "listing_sha256": listing.digest(),
        "shards": config.shards,
        "shard": config.shard,
    }


def describe_difference(old: dict, new: dict) -> str:
    """One phrase naming what differs between two fingerprints."""
    diffs = []
    for key in new:
        if key in ("listing_sha256", "n_files"):
            continue
        if old.get(key) != new[key]:
            diffs.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    if old.get("listing_sha256") != new["listing_sha256"]:
        diffs.append(f"the images changed ({old.get('n_files')} files before, {new['n_files']} now, or files modified)")
    return "; ".join(diffs) or "nothing"


def _existing_fingerprint(output: Path) -> dict | None:
    import h5py

    try:
        with h5py.File(output, "r") as db:
            if not bool(db.attrs.get("complete", False)):
                return None
            return json.loads(db.attrs["fingerprint"])
    except Exception:
        return None


def _check_output_writable(output: Path) -> None:
    parent = output.parent if str(output.parent) else Path(".")
    if output.exists() and output.is_dir():
        raise PipelineError(f"{output}: is a folder; the output must be a file path ending in .h5")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{parent}: cannot create the output folder: {exc.strerror}") from None
    if not parent.is_dir():
        raise PipelineError(f"{parent}: the output's parent is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{parent}: output folder is not writable")
    if output.exists() and not os.access(output, os.W_OK):
        raise PipelineError(f"{output}: output file is not writable")


class _PartWriter(threading.Thread):
    """Writes finished batches to the work area off the main thread, so the network never waits on the disk."""

    def __init__(self, work: WorkArea, start_seq: int):
        super().__init__(daemon=True, name="part-writer")
        self.work = work
        self.seq = start_seq
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.written = 0

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.work.write_part(self.seq, *item)
                self.seq += 1
                self.written += len(item[0]) + len(item[2])
            except BaseException as exc:  # reported by the main thread
                self.error = exc

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _runs(indices: np.ndarray) -> list[np.ndarray]:
    """Split sorted indices into contiguous runs, so a batch never spans a gap and parts never interleave."""
    if len(indices) == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    return np.split(indices, cuts)


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def _extract_rows(config: ExtractConfig, listing: Listing, todo: np.ndarray, work: WorkArea, weights, precision: str, done: int) -> float:
    """Run the network over listing rows ``todo`` into the work area; returns the seconds
    from the first batch to the last part written (network construction excluded)."""
    from tqdm import tqdm

    net = bb.Backbone(config.input_size, weights, precision, batch_size=config.batch_size)
    if net.weights_checksum != weights.checksum:
        raise PipelineError(f"weights checksum changed while loading ({weights.checksum} -> {net.weights_checksum})")
    storage = np.dtype(config.storage)
    writer = _PartWriter(work, work.next_seq())
    writer.start()
    n_rejected = 0
    bar = tqdm(total=done + len(todo), initial=done, unit="img", desc="extract", disable=config.quiet, smoothing=0.1, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for run in _runs(todo):
            for batch in iter_batches(
                listing, run, size=config.input_size, interpolation=config.resize, batch_size=config.batch_size, workers=config.workers,
                timeout=config.image_timeout,
            ):
                ok = batch.ok
                feats = net(batch.pixels[ok]) if ok.any() else np.zeros((0, *net.output_shape), np.float32)
                rejected = [r for r, good in zip(batch.reasons, ok) if not good]
                writer.put((batch.indices[ok], feats.astype(storage), batch.indices[~ok], rejected))
                bar.update(len(batch.indices))
                if rejected:
                    n_rejected += len(rejected)
                    bar.set_postfix(rejected=n_rejected, refresh=False)
    finally:
        bar.close()
        writer.close()
    return time.perf_counter() - t0


@dataclass
class _Base:
    """What an incremental run keeps of the previous complete output."""

    path: Path
    fingerprint: dict
    keep_rows: np.ndarray  # rows of the old file still valid (ascending)
    keep_index: np.ndarray  # their listing indices
    kept_rejected: list  # (path, reason, size, mtime) of old rejects still valid
    kept_rejected_index: np.ndarray
    old_rows: int

    @property
    def covered(self) -> np.ndarray:
        return np.concatenate([self.keep_index, self.kept_rejected_index]).astype(np.int64)


#: Fingerprint keys that may differ for an incremental update (the images themselves).
_LISTING_KEYS = ("listing_sha256", "n_files", "class_names")


def _plan_incremental(output: Path, old: dict, listing: Listing) -> _Base:
    """Match the old file's rows to the listing by path, size, modification time and class."""
    import h5py

    pos = {p: i for i, p in enumerate(listing.paths)}
    with h5py.File(output, "r") as db:
        names = [os.fsdecode(x) for x in db["label_names"][:]]
        old_paths = [os.fsdecode(x) for x in db["paths"][:]]
        sizes, mtimes, labels = db["file_sizes"][:], db["file_mtimes_ns"][:], db["labels"][:]
        rej = db["rejected"]
        rej_rows = list(zip(
            [os.fsdecode(x) for x in rej["paths"][:]],
            [x.decode("utf-8", "replace") for x in rej["reasons"][:]],
            rej["file_sizes"][:].tolist() if "file_sizes" in rej else [-1] * rej["paths"].shape[0],
            rej["file_mtimes_ns"][:].tolist() if "file_mtimes_ns" in rej else [-1] * rej["paths"].shape[0],
        ))  # fmt: skip

    def same(i: int, size: int, mtime: int) -> bool:
        return int(listing.sizes[i]) == size and int(listing.mtimes_ns[i]) == mtime

    keep_rows, keep_index = [], []
    for r, p in enumerate(old_paths):
        i = pos.get(p)
        if i is not None and same(i, int(sizes[r]), int(mtimes[r])) and listing.class_names[listing.labels[i]] == names[labels[r]]:
            keep_rows.append(r)
            keep_index.append(i)
    kept_rejected, kept_rejected_index = [], []
    for p, reason, size, mtime in rej_rows:
        i = pos.get(p)
        if i is not None and same(i, size, mtime):
            kept_rejected.append((p, reason, size, mtime))
            kept_rejected_index.append(i)
    return _Base(
        output, old, np.asarray(keep_rows, np.int64), np.asarray(keep_index, np.int64),
        kept_rejected, np.asarray(kept_rejected_index, np.int64), len(old_paths),
    )  # fmt: skip


def run(config: ExtractConfig) -> int:
    """Extract features for every image of ``config.data_dir`` into ``config.output``.

    A complete output made with the same settings is brought up to date incrementally:
    rows of unchanged files are kept, new or modified files are extracted and appended,
    rows of removed files are dropped. Any other difference needs ``--overwrite``.

    Returns the exit status: 0 when done (or already up to date), 1 when ``--strict``
    and some file was rejected, 130 when interrupted (the run can be resumed).

    Raises:
        PipelineError: bad settings, a bad data folder, an unwritable output, an output
            made with other settings (without ``--overwrite``), a locked output, a full disk.
    """
    config.validate()
    listing = shard_listing(list_images(config.data_dir), config.shards, config.shard)
    output = config.output
    _check_output_writable(output)
    say = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))
    with OutputLock(output):
        from pipeline.extraction.weights import resolve_weights

        weights = resolve_weights(config.weights, progress=not config.quiet)
        precision = bb.resolve_precision(config.precision)
        fp = fingerprint(config, listing, weights, precision)
        work = WorkArea(output)
        base = None
        if output.exists():
            old = _existing_fingerprint(output)
            if old == fp:
                work.remove()  # left over if a run was killed between rename and clean-up
                print(f"{output}: up to date ({len(listing)} images, nothing changed)")
                return 0
            settings_same = old is not None and all(old.get(k) == v for k, v in fp.items() if k not in _LISTING_KEYS)
            if settings_same and not config.overwrite:
                base = _plan_incremental(output, old, listing)
            elif not config.overwrite:
                why = describe_difference(old, fp) if old else "it is not a complete feature file"
                raise PipelineError(f"{output}: exists and differs: {why}; pass --overwrite to replace it")
        manifest_fp = dict(fp, base=base.fingerprint["listing_sha256"] if base else None)
        if work.exists():
            manifest = work.manifest()
            if manifest != manifest_fp:
                if not config.overwrite and manifest is not None:
                    raise PipelineError(
                        f"{work.path}: an interrupted run with other images or settings ({describe_difference(manifest, fp)}); "
                        "re-run with its settings to resume, or pass --overwrite to start again"
                    )
                work.remove()
        if not work.exists():
            work.start(manifest_fp)
        done = work.done_indices()
        covered = np.union1d(done, base.covered) if base else done
        todo = np.setdiff1d(np.arange(len(listing), dtype=np.int64), covered)
        if base:
            say(
                f"updating {output}: keeping {len(base.keep_rows)} rows, dropping {base.old_rows - len(base.keep_rows)}, "
                f"{len(todo)} new or changed files to extract"
            )
        elif len(done):
            say(f"resuming {output}: {len(done)} of {len(listing)} files already done")
        t0 = time.perf_counter()
        loop_seconds = 0.0
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if threading.current_thread() is threading.main_thread():
                for s in previous:
                    signal.signal(s, _raise_interrupt)
            if len(todo):
                loop_seconds = _extract_rows(config, listing, todo, work, weights, precision, len(covered))
            # Still under the handlers: an interrupt while assembling leaves the work area
            # whole (the temporary file is removed) and says so, like one during extraction.
            n, n_rej = _assemble(config, listing, work, fp, weights, precision, base, loop_seconds, len(todo))
            work.remove()
        except (_Interrupted, KeyboardInterrupt) as exc:
            finished = len(work.done_indices())
            print(
                f"interrupted ({exc or 'SIGINT'}) with {finished} files of this run done; "
                f"run the same command again to resume from {work.path}",
                file=sys.stderr,
            )
            return 130
        finally:
            if threading.current_thread() is threading.main_thread():
                for s, h in previous.items():
                    signal.signal(s, h)
        seconds = time.perf_counter() - t0
    rate = len(todo) / loop_seconds if loop_seconds > 0 else 0.0
    return summarize(output, n, n_rej, f"{len(todo)} processed this run in {seconds:.1f} s ({rate:.1f} img/s)", config.strict)


def summarize(output: Path, n: int, n_rejected: int, detail: str, strict: bool) -> int:
    """Print the one-line end-of-run summary; return the exit status (1 for rejects under --strict)."""
    print(
        f"extracted {n} images, rejected {n_rejected}"
        + (f" (listed in rejected/ of {output})" if n_rejected else "")
        + f"; {detail} -> {output}"
    )
    if strict and n_rejected:
        print(f"error: --strict: {n_rejected} files were rejected (see rejected/ in {output})", file=sys.stderr)
        return 1
    return 0


def _base_rows(base: _Base, listing: Listing, block: int = 1024):
    """The kept rows of the previous output, in their old order, a block at a time."""
    import h5py

    with h5py.File(base.path, "r") as db:
        feats = db["features"]
        rows, index = base.keep_rows, base.keep_index
        for start in range(0, len(rows), block):
            r, i = rows[start : start + block], index[start : start + block]
            lo, hi = int(r[0]), int(r[-1]) + 1
            # Kept rows are mostly dense: one contiguous read, then pick; sparse ones one by one.
            f = feats[lo:hi][r - lo] if hi - lo <= 2 * len(r) else feats[r]
            yield f, listing.labels[i], [listing.paths[k] for k in i.tolist()], listing.sizes[i], listing.mtimes_ns[i]


def _assemble(config, listing: Listing, work: WorkArea, fp: dict, weights, precision: str, base, loop_seconds: float, processed: int):
    parts = work.index()
    rejected: list[tuple[str, str, int, int]] = list(base.kept_rejected) if base else []
    covered = len(base.covered) if base else 0
    for part in parts:
        covered += len(part.indices) + len(part.rejected_indices)
        rejected.extend(
            (listing.paths[i], r, int(listing.sizes[i]), int(listing.mtimes_ns[i]))
            for i, r in zip(part.rejected_indices.tolist(), part.reasons)
        )
    if covered != len(listing):
        raise PipelineError(f"{work.path}: work area covers {covered} of {len(listing)} files; re-run to finish")
    rejected.extend(listing.unlisted)

    def rows():
        if base:
            yield from _base_rows(base, listing)
        for part in parts:  # one part in memory at a time
            idx = part.indices
            yield (
                work.features(part),
                listing.labels[idx],
                [listing.paths[i] for i in idx.tolist()],
                listing.sizes[idx],
                listing.mtimes_ns[idx],
            )

    attrs = {
        "backbone": bb.BACKBONE,
        "layer": bb.LAYER,
        "input_size": config.input_size,
        "feature_shape": list(bb.feature_shape(config.input_size)),
        "preprocessing": bb.PREPROCESSING,
        "resize": config.resize,
        "weights": weights.name,
        "weights_source": weights.source,
        "weights_checksum": weights.checksum,
        "precision": precision,
        "storage_dtype": config.storage,
        "batch_size": config.batch_size,
        "data_dir": str(Path(config.data_dir).resolve()),
        "shards": config.shards,
        "shard": config.shard,
        "versions": json.dumps(package_versions()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": config.command_line,
        "extract_seconds": loop_seconds,
        "images_processed_last_run": processed,
        "incremental": bool(base),
        "rows_kept": len(base.keep_rows) if base else 0,
        "fingerprint": json.dumps(fp, sort_keys=True),
    }
    n = write_feature_file(
        config.output,
        row_shape=bb.feature_shape(config.input_size),
        storage=config.storage,
        class_names=listing.class_names,
        rows=rows(),
        rejected=rejected,
        attrs=attrs,
    )
    return n, len(rejected)
