"""Writing outputs safely: the one atomic writer (temporary name, fsync, rename), the output lock, output folders and an output file's folder, and what every output records (versions, command line)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import shlex
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError, first_line


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_error(path: Path, exc: OSError) -> PipelineError:
    """The one-line error for a failed write: a full disk (or file-size limit) is named as such."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return PipelineError(f"{path}: no space left (or file size limit reached) while writing: {exc.strerror}")
    return PipelineError(f"{path}: write failed: {exc.strerror or exc}")


#: What a non-regular file is, by its ``stat`` type.
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (links followed); None otherwise.

    Only ``stat`` is called: opening a FIFO would block until a writer comes.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def refuse_special(path: Path, role: str) -> None:
    """Refuse a path that is a FIFO, a device or a socket, before anything opens it (reading or writing one blocks or never ends).

    Raises:
        PipelineError: ``PATH: is a FIFO (named pipe), not a regular file; ROLE must be a file``.
    """
    kind = special_kind(path)
    if kind is not None:
        raise PipelineError(f"{path}: is {kind}, not a regular file; {role} must be a regular file")


def h5_oserror(exc: RuntimeError) -> OSError:
    """The OSError behind an h5py RuntimeError ("... errno = 28, error message = '...'")."""
    m = re.search(r"errno = (\d+), error message = '([^']*)'", str(exc))
    if m:
        return OSError(int(m.group(1)), m.group(2))
    return OSError(0, first_line(exc))


@contextmanager
def atomic_output(output: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``output``; when the block ends, fsync it and rename it
    into place, so readers see the previous file or the new one, never a partial one.

    ``suffix`` ends the temporary name, for writers that pick the format by extension
    (Keras ``.keras``, matplotlib ``.png``).

    Raises:
        PipelineError: the disk filled up or the file could not be written; the temporary
            file is removed and any previous ``output`` is left untouched.
    """
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
        fsync_dir(output.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(output, exc) from None
    except RuntimeError as exc:  # h5py reports failed writes (disk full, EFBIG) as RuntimeError
        tmp.unlink(missing_ok=True)
        if "errno =" not in str(exc):
            raise
        err = disk_error(output, h5_oserror(exc))
        # HDF5 keeps the failed file in its global state and crashes when the library
        # shuts down; the CLI exits without that shutdown when it sees this flag.
        err.hdf5_poisoned = True
        raise err from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clear_left(folder: Path) -> None:
    """Clear what a killed ``atomic_folder`` run left beside ``folder``: its previous folder put back when the kill came between the two
    renames, its marked work folders (``.NAME.tmp-PID``, ``.NAME.old-PID`` with ``.NAME.work-PID``) of dead processes removed."""
    import shutil

    folder = Path(folder)
    for left in left_by_dead_processes(folder.parent, re.compile(re.escape(f".{folder.name}.") + r"(?:old|tmp)-(\d+)$")):
        if not _work_of(folder, left.name.rsplit("-", 1)[1]):
            continue  # not marked as this tool's (a user's folder of that name): left as it is
        if left.name.startswith(f".{folder.name}.old-") and not os.path.lexists(folder):
            os.rename(left, folder)  # killed between the two renames: the previous folder comes back
        else:
            shutil.rmtree(left, ignore_errors=True)
    for mark in left_by_dead_processes(folder.parent, re.compile(re.escape(f".{folder.name}.work-") + r"(\d+)$")):
        if _work_of(folder, mark.name.rsplit("-", 1)[1]):
            mark.unlink()


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``folder``; when the block ends, it replaces ``folder`` as a whole.

    The set of files a stage writes (sub-folders too) is published together: the previous folder is renamed
    aside, the new one renamed into place, then the previous one removed. A failure inside the
    block (a full disk, an interrupt) removes the temporary folder and leaves the previous
    set whole. What a killed run left is cleared first: its temporary folder removed, and its
    previous folder renamed back when the kill came between the two renames (else removed).
    The caller holds ``OutputLock(folder)``.

    Raises:
        PipelineError: the folder could not be written or renamed.
    """
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    clear_left(folder)
    mark = folder.with_name(f".{folder.name}.work-{os.getpid()}")
    for path in (tmp, old):
        if os.path.lexists(path) and not _work_of(folder, str(os.getpid())):
            raise PipelineError(f"{path}: exists and is not this tool's work folder; move it out, or choose another -o folder")
    try:
        mark.write_text(WORK_MARK)  # marks this pid's .tmp- and .old- folders as the tool's, for the run that clears what a kill left
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for top, _, files in os.walk(tmp):  # every file and folder on disk before the rename (a SavedModel has sub-folders)
            for name in files:
                with open(os.path.join(top, name), "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(Path(top))
        if folder.exists() or folder.is_symlink():
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
        if old.is_symlink():
            old.unlink()
        shutil.rmtree(old, ignore_errors=True)
        mark.unlink(missing_ok=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.rename(old, folder)
        mark.unlink(missing_ok=True)
        raise disk_error(folder, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        mark.unlink(missing_ok=True)
        raise


#: What a replaced folder's work mark (``.NAME.work-PID``) holds.
WORK_MARK = "the work folders .NAME.tmp-PID and .NAME.old-PID beside it are the pipeline's (atomic_folder)\n"


def _work_of(folder: Path, pid: str) -> bool:
    """Whether process ``pid``'s ``.tmp-``/``.old-`` folders beside ``folder`` are the tool's: its mark file is there, as written."""
    mark = folder.with_name(f".{folder.name}.work-{pid}")
    try:
        return mark.is_file() and not mark.is_symlink() and mark.stat().st_size == len(WORK_MARK) and mark.read_text() == WORK_MARK
    except OSError:
        return False


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file (JSON, CSV, Markdown) through ``atomic_output``."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")  # a name that is not UTF-8: its own bytes, as predict writes it


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def as_json(obj):
    """``obj`` as it reads back from ``write_json_atomic``'s file (numpy scalars as numbers, tuples as lists, paths as text)."""
    return json.loads(json.dumps(obj, default=_json_default))


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON (numpy scalars and paths allowed) through ``atomic_output``."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def prepare_output_dir(folder: Path, flag: str = "-o") -> Path:
    """Create the output folder ``folder`` if needed and check that it can be written.

    Raises:
        PipelineError: ``folder`` is a file, cannot be created, or is not writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{flag} {folder}: exists and is not a folder (it takes the folder for the output files)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{flag} {folder}: cannot create the output folder: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PipelineError(f"{flag} {folder}: output folder is not writable")
    return folder


def check_output_writable(output: Path) -> None:
    """Make sure ``output`` (a file path) can be written: its folder exists (it is created) and is writable.

    Raises:
        PipelineError: ``output`` is a folder, its parent is not a folder or cannot be
            created, or the folder or an existing file is not writable.
    """
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    if output.exists() and output.is_dir():
        raise PipelineError(f"{output}: is a folder; the output must be a file path ending in .h5")
    refuse_special(output, "the output")
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


#: The packages whose versions decide the numbers in an output.
VERSIONED_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "h5py", "pillow", "scikit-learn", "joblib")


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict:
    """Python's and the installed packages' versions (absent packages are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def command_line(argv) -> str:
    """The command as a user would type it again: ``python -m pipeline ARGS``."""
    return shlex.join(["python", "-m", "pipeline", *map(str, argv or [])])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_processes(folder: Path, pattern: "re.Pattern[str]") -> list[Path]:
    """Entries of ``folder`` whose name matches ``pattern`` (group 1: a pid) and whose process is gone (never this one's, never a live one's)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    matches = [(name, pattern.match(name)) for name in names]
    return [Path(folder) / name for name, m in matches if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))]


def is_marked_folder(path: Path, mark: str) -> bool:
    """Whether ``path`` is a work folder the tool made (``new_marked_folder``): a folder, not a link, holding the file ``mark``."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / mark).is_file() and not (path / mark).is_symlink()


def new_marked_folder(path: Path, mark: str, note: str = "") -> Path:
    """Create the work folder ``path`` (named with this pid) holding ``mark``, so only the tool's own are removed (``dead_marked_folders``)."""
    import shutil

    path = Path(path)
    if is_marked_folder(path, mark):
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    (path / mark).write_text(note)
    return path


def dead_marked_folders(folder: Path, pattern: "re.Pattern[str]", mark: str) -> list[Path]:
    """The work folders in ``folder`` named by ``pattern`` (group 1: a pid) of dead processes, marked as the tool's; a user's folder of such a name is not."""
    return [p for p in left_by_dead_processes(folder, pattern) if is_marked_folder(p, mark)]


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Remove the temporary files ``atomic_output`` left beside ``output`` (``.OUT.tmp-PID[suffix]``) when process PID is gone (a ``kill -9``).

    A temporary of a live process (also a pid reused since) is left alone. Returns what was removed.
    """
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    pattern = re.compile(re.escape(f".{output.name}.tmp-") + r"(\d+)(\..*)?$")
    removed = []
    for path in left_by_dead_processes(parent, pattern):
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
        except OSError:
            pass
    return removed


#: What a lock file holds: the holder's pid and this mark (a user's file of digits is not a lock).
LOCK_MARK = "pipeline-lock"
LOCK_CONTENT = re.compile(rf"\d+ {LOCK_MARK}")


def _not_a_lock(fd: int, info: os.stat_result) -> str | None:
    """Why the open file ``fd`` cannot be a lock file of ours (None: it can): ours hold ``PID pipeline-lock`` or nothing, under one name."""
    if info.st_nlink > 1:
        return f"has {info.st_nlink} names (a hard link)"
    head = os.pread(fd, 64, 0) if info.st_size <= 64 else None
    if head is None or (head and not LOCK_CONTENT.fullmatch(head.decode("ascii", "replace").strip())):  # empty: one being taken now
        return "holds other content than a process id"
    return None


class OutputLock:
    """An exclusive, non-blocking lock on ``OUT.lock``; the OS drops it when the process dies (even ``kill -9``)."""

    def __init__(self, output: Path):
        output = Path(output)
        self.output = output
        self.path = output.with_name(output.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        for _ in range(10):
            refuse_special(self.path, "a lock file")  # opening a FIFO could block; writing into one never ends
            if os.path.islink(self.path):  # the pid would be written into the file it names (a user's file, an input)
                raise PipelineError(f"{self.path}: is a symbolic link; a lock file is never a link (the run would write into what it names): remove it")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise PipelineError(f"{self.path}: cannot create lock file: {exc.strerror}") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # replaced between the check and the open
                os.close(fd)
                raise PipelineError(f"{self.path}: the lock file is not a regular file; remove it")
            problem = _not_a_lock(fd, info)
            if problem:
                os.close(fd)
                raise PipelineError(f"{self.path}: {problem}, not a lock file this tool wrote; taking the lock would overwrite and then delete it: remove it or choose another output")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").split(" ")[0].strip()
                os.close(fd)
                raise PipelineError(
                    f"{self.path}: another run is writing this output{f' (pid {holder})' if holder else ''}; wait for it or stop it"
                ) from None
            # A finishing holder unlinks the lock file: a lock won on an unlinked file is
            # no lock at all, so make sure the path still names the file we locked.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                try:  # the holder's pid, for the message of a second run; a full disk fails here first
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {LOCK_MARK}\n".encode(), 0)
                except OSError as exc:
                    self.__exit__()
                    raise disk_error(self.path, exc) from None
                remove_stale_temporaries(self.output)
                return self
            os.close(fd)
        raise PipelineError(f"{self.path}: could not take the lock (the lock file keeps changing)")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder, however spelled (``//x``, ``..``, symbolic links).

    Compared by device and inode when both exist, else by their fully resolved paths.
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` (existing or not) lies inside ``folder`` or is ``folder``, by resolved paths."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)
