"""Output sets published together: the files of one result (a model and its metrics, report and plots) staged beside, committed by one rename, then moved into place under that journal, so a failure at any point leaves the previous set or the new one, never a mix.

A set's files share a folder with other results (``models/lr.*`` beside ``models/svm.*``), so
one folder rename cannot publish them. Instead (``publish``):

1. the stage writes every file of the set into a staging folder ``FOLDER/.NAME.set-PID/``;
   a failure there (an exception, a full disk, a kill) leaves the previous set untouched, and
   the staging folder is removed (by this run, or by the next one when the process is gone);
2. the commit: a manifest (the files to install, the set's members this run did not write,
   to remove) is written into it and the folder is renamed ``FOLDER/.NAME.set`` in one rename;
3. each file is renamed into ``FOLDER`` (the file readers open last), then the journal goes.

A run stopped between 2 and 3 (kill -9) leaves the journal: ``settle`` finishes its renames
(roll forward), under the set's output lock. Writers settle when they take their lock;
readers call ``settle_for(PATH)`` before opening a file of a set, so neither ever trusts a
half-moved set.

Each publication ends by writing the set's receipt, ``FOLDER/.NAME.set.receipt`` (the sha256
of every file it installed). A later publication replaces or removes an existing file of the
set only if it is exactly what the tool wrote there (its bytes match the receipt): a user's
note named ``compare.md``, a model edited by hand, are refused in one line, never replaced
(``check_members``); so are the files of a folder without a receipt (written by hand, or by a
version before receipts): the message says which.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.digests import file_digest
from pipeline.core.outputs import OutputLock, dead_marked_folders, disk_error, fsync_dir, new_marked_folder, special_kind, write_json_atomic

MANIFEST = "manifest.json"
STAGING_MARK = ".pipeline-staging"  # in every staging folder: only marked ones of dead processes are removed
#: How long a reader waits for a writer that is moving a committed set into place.
SETTLE_WAIT_SECONDS = 5.0


def journal_path(folder: Path, name: str) -> Path:
    """The committed, not yet fully moved set ``NAME`` of ``folder``: ``FOLDER/.NAME.set``."""
    return Path(folder) / f".{name}.set"


class Staging:
    """The staging folder of a set being written: ``path(member)`` is where each file goes."""

    def __init__(self, folder: Path, members: tuple[str, ...]):
        self.folder, self.members, self.written = folder, members, []

    def path(self, member: str) -> Path:
        """Where to write ``member`` (one of the set's file names) for this publication."""
        if member not in self.members:  # a programming error, not a user error
            raise ValueError(f"{member!r} is not a member of the set ({', '.join(self.members)})")
        if member not in self.written:
            self.written.append(member)
        return self.folder / member


@contextmanager
def publish(folder: Path, name: str, members: tuple[str, ...] | list[str], *, lock: str, locked: bool = True, folders: tuple[str, ...] = ()) -> Iterator[Staging]:
    """Write the set ``name`` of ``folder`` in a staging folder, then publish it as a whole.

    Args:
        folder: the output folder the set's files live in (beside other sets).
        name: the set's name (``lr``, ``finetune``, ``compare``): names the staging folder and journal.
        members: every file name the set may hold, in the order they are moved into place (the
            file readers open last); members the block does not write are removed at publication
            (they belonged to the previous set).
        lock: the member whose output lock (``core.outputs.OutputLock``) guards the set.
        locked: the caller holds that lock already; False: take it for the block.
        folders: members that are folders (a SavedModel), each replacing the previous one whole.

    Yields:
        ``Staging``: ``stage.path(member)`` is where the block writes each file.

    Raises:
        PipelineError: a file could not be written (the previous set is left whole), or a
            rename of step 3 failed (the journal stays; the next run or reader finishes it).
    """
    folder, members = Path(folder), tuple(members)
    with nullcontext() if locked else OutputLock(folder / lock):
        settle(folder, name, locked=True)  # a set cut short by a kill: finished before it is replaced
        check_members(folder, name, members, folders)  # the stage checked them before its work too; this is the last look before writing
        remove_dead_staging(folder, name)
        staging = folder / f".{name}.set-{os.getpid()}"
        try:
            new_marked_folder(staging, STAGING_MARK)
            stage = Staging(staging, members)
            yield stage
            manifest = {"set": name, "lock": lock, "install": [m for m in members if m in stage.written], "remove": [m for m in members if m not in stage.written],
                        "folders": [m for m in folders if m in stage.written]}  # fmt: skip
            for member in manifest["install"]:
                _fsync_tree(staging / member)  # a writer that wrote nothing fails here
            manifest["digests"] = {m: [file_digest(staging / m), _owner(members)] for m in manifest["install"] if m not in manifest["folders"]}
            with open(staging / MANIFEST, "w") as f:
                f.write(json.dumps(manifest, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(staging)
            check_members(folder, name, members, folders)  # once more at the commit: a file a user put there during the run is never replaced
            os.rename(staging, journal_path(folder, name))  # the commit: the new set is whole from here on
            fsync_dir(folder)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise disk_error(folder / f"{name} output set", exc) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _roll_forward(journal_path(folder, name), manifest)


def settle(folder: Path, name: str, *, locked: bool = False) -> bool:
    """Finish publishing the set ``name`` of ``folder`` if a run stopped while moving it into place; whether there was one.

    Args:
        locked: the caller holds the set's lock; False: take it (waiting up to
            ``SETTLE_WAIT_SECONDS`` for a writer that is moving it now).

    Raises:
        PipelineError: the journal is damaged, its lock is held longer than the wait, or a rename failed.
    """
    journal = journal_path(folder, name)
    if not journal.is_dir():
        return False
    manifest = _manifest(journal)
    if locked:
        _roll_forward(journal, manifest)
        return True
    deadline = time.monotonic() + SETTLE_WAIT_SECONDS
    while True:
        try:
            with OutputLock(Path(folder) / manifest["lock"]):
                if journal.is_dir():
                    _roll_forward(journal, manifest)
            return True
        except PipelineError as exc:
            if "another run is writing" not in str(exc) or time.monotonic() > deadline:
                raise PipelineError(f"{journal}: the output set {name!r} is being published and could not be finished: {exc}") from None
            time.sleep(0.05)
            if not journal.is_dir():  # the writer finished it
                return True


def settle_for(path: Path) -> None:
    """Before reading ``path``: finish any set of its folder that a stopped run left half moved and that holds ``path``.

    Raises:
        PipelineError: as ``settle``.
    """
    path = Path(path)
    folder = path.parent
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".set")]
    except OSError:
        return  # a missing folder: the reader says so itself
    for entry in names:
        journal = folder / entry
        if journal.is_dir():
            manifest = _manifest(journal)
            if path.name in (*manifest["install"], *manifest["remove"]):
                settle(folder, manifest["set"])


@contextmanager
def scratch_folder(parent: Path, name: str) -> Iterator[Path]:
    """A folder ``.NAME.scratch-PID`` in ``parent`` for a run's temporary files, removed when the block ends (and by the next run after a kill -9)."""
    remove_dead_staging(parent, name, "scratch")
    folder = new_marked_folder(Path(parent) / f".{name}.scratch-{os.getpid()}", STAGING_MARK)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_dead_staging(folder: Path, name: str, kind: str = "set") -> list[Path]:
    """Remove the marked work folders ``.NAME.KIND-PID`` (staging ``set``, ``scratch``) whose process is gone (a kill); what was removed."""
    removed = dead_marked_folders(Path(folder), re.compile(re.escape(f".{name}.{kind}-") + r"(\d+)$"), STAGING_MARK)  # only its own: a user's folder of that name stays
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync_tree(path: Path) -> None:
    """Flush a staged file, or every file and folder under a staged folder, to disk."""
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for top, _, files in os.walk(path):
        for file in files:
            with open(os.path.join(top, file), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(top))


def receipt_path(folder: Path, name: str) -> Path:
    """The receipt of set ``name``: the sha256 of each file its last publication installed."""
    return Path(folder) / f".{name}.set.receipt"


def _read_own(path: Path, what: str) -> str | None:
    """The text of a file the tool keeps for itself (a receipt, a journal's manifest); None when there is none.

    Raises:
        PipelineError: the path is a FIFO, a folder, a link or anything but a regular file (reading a FIFO never returns;
            replacing a folder fails half-way through a publication).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PipelineError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else special_kind(path) or "not a regular file"
        raise PipelineError(f"{path}: {what} is {kind}, not a file this tool wrote; remove it and run the stage again")
    try:
        with open(path, "rb") as f:
            return f.read(1 << 24).decode("utf-8", "replace")
    except OSError as exc:
        raise PipelineError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None


def _owner(members) -> str:
    """Which kind of set wrote a file: its full member list (export's ``compare`` + ``compare.json`` is not compare's table)."""
    return ",".join(sorted(members))


def _receipt(folder: Path, name: str) -> dict | None:
    """The files (name -> [sha256, owner]) of the set's receipt; None when there is none or it is not a receipt of this set (then nothing is trusted by it).

    Raises:
        PipelineError: the receipt is not a regular file (``_read_own``).
    """
    text = _read_own(receipt_path(folder, name), "the output set's receipt")
    try:
        data = json.loads(text) if text is not None else None
    except ValueError:
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("set") == name else None
    return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 2} if isinstance(files, dict) else None


def as_written(path: Path, name: str) -> bool:
    """Whether ``path`` holds the bytes the last publication of set ``name`` installed there (its receipt says so): what another stage
    may reuse as that set's result (a hand-edited metrics file is not)."""
    try:
        entry = (_receipt(Path(path).parent, name) or {}).get(Path(path).name)
    except PipelineError:
        return False
    return entry is not None and entry[0] == _digest_or_none(Path(path))


def check_members(folder: Path, name: str, members, folders=()) -> None:
    """Refuse, before any work, a file of the set ``name`` that exists as something a publication must not replace.

    Publishing renames each new file over the old one (and removes the set's files it does not
    write), which replaces whatever has that name: a FIFO, a device or a socket (a user's pipe),
    a symbolic link (the file it names would stay stale beside a new set), a folder (the rename
    fails half-way through the set), a read-only file (the user's way of keeping it), or a file
    the tool did not write there (not in the set's receipt, or changed since: a user's note, a
    hand-edited report). Each is one line naming the path. ``folders``: members that are
    folders (a SavedModel), which may exist as a folder.

    Raises:
        PipelineError: ``PATH: is a FIFO (named pipe); the new output set would replace it: ...``.
    """
    members = tuple(members)
    receipt = _receipt(folder, name)
    for member in members:
        path = Path(folder) / member
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PipelineError(f"{path}: cannot be checked ({exc.strerror or exc}); choose another output folder") from None
        if stat.S_ISDIR(mode) and member in folders:
            continue
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else special_kind(path) if not stat.S_ISREG(mode)
                else "read-only" if not (mode & 0o222 and os.access(path, os.W_OK)) else None)  # fmt: skip
        if kind is None and receipt is None:
            kind = f"not a file this tool wrote here (no usable receipt {receipt_path(folder, name).name}: written by hand, or by a version before receipts)"
        elif kind is None and receipt.get(member) != [_digest_or_none(path), _owner(members)]:
            kind = "not a file this tool wrote here (or it was changed since, or another output of that name wrote it)"
        if kind is not None:
            raise PipelineError(f"{path}: is {kind}; the new output set would replace it: remove it, or choose another output folder")


def _digest_or_none(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def _member_problem(name, set_name: str) -> str | None:
    """Why ``name`` cannot be a file of set ``set_name`` (None: it can): only plain names of the set's own (``SET``, ``SET.suffix``), never a path."""
    if not isinstance(name, str) or not (name == set_name or name.startswith(f"{set_name}.")) or "/" in name or "\0" in name or name in (".", ".."):
        return f"{name!r} is not a file name of set {set_name!r}"
    return None


def _manifest(journal: Path) -> dict:
    """The journal's manifest, checked: a set name matching the journal's, and only the set's own plain file names (a hand-edited
    journal naming ``/home/x`` or ``../x`` must never move or delete it)."""
    try:
        text = _read_own(journal / MANIFEST, "the publish journal's manifest")
        if text is None:
            raise ValueError(f"no {MANIFEST}")
        manifest = json.loads(text)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("set"), str) or journal.name != f".{manifest['set']}.set":
            raise ValueError("no set name, or not this journal's")
        if not all(isinstance(manifest.get(k), list) for k in ("install", "remove")) or not isinstance(manifest.get("lock"), str):
            raise ValueError("fields missing")
        problem = next(filter(None, (_member_problem(n, manifest["set"]) for n in (*manifest["install"], *manifest["remove"], manifest["lock"]))), None)
        if problem:
            raise ValueError(problem)
        folders = manifest.setdefault("folders", [])
        if not isinstance(folders, list) or not all(isinstance(m, str) and m in manifest["install"] for m in folders):
            raise ValueError("'folders' must name members it installs")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{journal}: damaged publish journal ({first_line(exc)}); the files beside it may mix two runs: remove it and run the stage again") from None
    return manifest


def _keep_edited(path: Path, receipt: dict) -> bool:
    """Move a set's file aside (``NAME.edited-TIME``, said on stderr) when it is not what the receipt says the tool wrote (edited by
    hand after a run was killed mid-publication: finishing that run must not destroy the edit); whether it was moved."""
    entry = receipt.get(path.name)
    if not receipt or path.is_symlink() or not path.is_file() or (entry is not None and entry[0] == _digest_or_none(path)):
        return False  # no receipt: nothing is known (a journal of an earlier version), the set's own rule applies
    kept = path.with_name(f"{path.name}.edited-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.rename(path, kept)
    print(f"note: {path} was changed after the run that wrote it was stopped; the edited file is kept as {kept.name}", file=sys.stderr)
    return True


def _roll_forward(journal: Path, manifest: dict) -> None:
    """Step 3: remove the members the new set does not have, move each staged file into place (in order), drop the journal. Idempotent."""
    folder = journal.parent
    try:
        before = _receipt(folder, manifest["set"]) or {}
    except PipelineError:
        before = {}
    try:
        for member in manifest["remove"]:
            old = folder / member
            if (old.is_symlink() or old.is_file()) and not _keep_edited(old, before):
                old.unlink()
        for member in manifest["install"]:
            new, old = journal / member, folder / member
            if os.path.lexists(new):
                if member in manifest["folders"] and old.is_dir() and not old.is_symlink():
                    os.rename(old, journal / f"{member}.replaced")  # a folder member replaces the previous one whole; it goes with the journal
                elif old.is_file() and not old.is_symlink():
                    _keep_edited(old, before)
                os.replace(new, old)
        fsync_dir(folder)
        if isinstance(manifest.get("digests"), dict):  # the receipt: what this publication installed, so the next one knows its own files
            published = {*manifest["install"], *manifest["remove"]}
            others = {k: v for k, v in (_receipt(folder, manifest["set"]) or {}).items() if k not in published}  # a set of another stage of that name
            write_json_atomic(receipt_path(folder, manifest["set"]), {"set": manifest["set"], "files": {**others, **manifest["digests"]}})
        shutil.rmtree(journal)
        fsync_dir(folder)
    except OSError as exc:
        raise PipelineError(f"{journal}: could not move the new {manifest.get('set')!r} files into place ({exc.strerror or exc}); "
                            "they are complete in that folder and the next run finishes it") from None  # fmt: skip
