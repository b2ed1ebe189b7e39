"""Writing an HDF5 output: ``h5_output``, the one way every HDF5 file is written, through a file object that keeps a full disk out of the HDF5 library."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import atomic_output


#: HDF5's environment variables that make it open other files than the ones named (a family or split driver's member
#: files, a merged file's shards from another folder), or in another way than the checks here assume.
HDF5_REDIRECTS = ("HDF5_DRIVER", "HDF5_DRIVER_CONFIG", "HDF5_VDS_PREFIX", "HDF5_EXTFILE_PREFIX")


def check_hdf5_environment() -> None:
    """Refuse, before any work, an environment that makes HDF5 open other files (``HDF5_REDIRECTS``; ``HDF5_DRIVER=sec2``, the default, is fine).

    Raises:
        PipelineError: naming the variable (``HDF5_DRIVER=family`` published a file, then failed reading it back with a traceback).
    """
    for name in HDF5_REDIRECTS:
        value = os.environ.get(name)
        if value and not (name == "HDF5_DRIVER" and value.lower() == "sec2"):
            raise PipelineError(f"{name}={value} is set in the environment: HDF5 would open other files than the ones named "
                                f"(a feature file is one file, its shards beside it); unset {name}")  # fmt: skip


class SurvivingFile:
    """The file object an HDF5 output is written through (h5py's ``fileobj`` driver): ``pwrite``, and after the first
    failed write (a full disk, a file-size limit) the later bytes kept in memory and read back from there.

    So HDF5 never sees a failed write (after one, it cannot close the file: a traceback per open object, then
    a crash at exit). The failure waits in ``error`` for ``check``, outside the library.
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = self.size = 0
        self.error: OSError | None = None
        self.kept: list[tuple[int, bytes]] = []  # (offset, bytes) HDF5 wrote after the failure, in order

    def check(self) -> None:
        """Raise the first failed write's ``OSError``, if any: the writer stops and the file is discarded."""
        if self.error is not None:
            raise self.error

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset + (0 if whence == os.SEEK_SET else self.size if whence == os.SEEK_END else self.pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        try:
            while self.error is None and done < len(view):
                done += os.pwrite(self.fd, view[done:], self.pos + done)  # a short write: the rest fails next
        except OSError as exc:
            self.error = exc
        if done < len(view):
            self.kept.append((self.pos + done, bytes(view[done:])))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def readinto(self, buffer) -> int:
        view, start, got = memoryview(buffer).cast("B"), self.pos, 0
        while got < len(view) and (k := os.preadv(self.fd, [view[got:]], start + got)):
            got += k
        view[got:] = bytes(len(view) - got)  # beyond what reached the disk: zeros, then what was kept
        for offset, data in self.kept:
            lo, hi = max(offset, start), min(offset + len(data), start + len(view))
            if lo < hi:
                view[lo - start : hi - start] = data[lo - offset : hi - offset]
        self.pos += len(view)
        return len(view)

    def read(self, n: int) -> bytes:  # h5py takes an object with read and seek for a file; it reads with readinto
        buffer = bytearray(n)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int) -> int:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:  # growing the file past the limit
            self.error = self.error or exc
        self.kept = [(offset, data[: size - offset]) for offset, data in self.kept if offset < size]
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; ``atomic_output`` fsyncs the file before the rename."""


class H5Output(NamedTuple):
    """What ``h5_output`` yields: the open ``h5py.File``, and ``check`` for a writer of many blocks to call between them."""

    file: object
    check: Callable[[], None]


@contextmanager
def h5_output(output: Path, verify: Callable[[Path], None] | None = None, **options) -> Iterator[H5Output]:
    """Write the HDF5 file ``output`` (``options`` for ``h5py.File``, e.g. ``libver``) through ``atomic_output`` and a ``SurvivingFile``.

    A full disk or a file-size limit at any point (a write, a flush, the close) is one ``PipelineError`` naming
    ``output``; the temporary file is removed, a previous ``output`` left untouched. ``verify(tmp)`` runs on the
    closed file before the rename.

    Raises:
        PipelineError: the disk filled up or the file could not be written.
    """
    import h5py

    with atomic_output(output) as tmp:
        disk = SurvivingFile(tmp)
        try:
            with h5py.File(disk, "w", **options) as db:  # HDF5 sees no failed write: closing cannot fail on a full disk
                yield H5Output(db, disk.check)
            disk.check()
        finally:
            os.close(disk.fd)
        if verify is not None:
            verify(tmp)
