"""The image listing: every candidate file of a class-per-folder tree with its label and version (size, mtime, inode, ctime), each file once, matched against stored rows by path and version; files that can never be rows are reject records."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.guard import SPLIT_NAMES

#: Accepted extensions (any case). The content decides how a file is decoded, not its name:
#: a PNG saved as ``.jpg`` is read like ``keras.utils.load_img`` and Pillow read it.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: The version of a file that is not known (a listing made from bare paths, as ``predict``'s): it matches no stored row.
UNKNOWN = -1


class Reject(NamedTuple):
    """One file that was not extracted: its path (relative to the data folder), why, its version
    (-1: unknown) and the limit behind it (``name=value``; "" for its content)."""

    path: str
    reason: str
    size: int
    mtime_ns: int
    inode: int = UNKNOWN
    ctime_ns: int = UNKNOWN
    limit: str = ""


@dataclass(frozen=True)
class Listing:
    """Every candidate file under a data folder, in the order rows are written.

    ``paths`` are POSIX paths relative to ``root`` (sorted by class, then path);
    ``labels[i]`` indexes ``class_names``; ``sizes``/``mtimes_ns``/``inodes``/``ctimes_ns``
    identify the file version so a later run can tell what changed (a file replaced by
    ``cp -p``, ``rsync -a`` or ``tar``, which keep the size and modification time, gets
    another inode or change time); a listing made from bare paths has unknown inodes and
    change times. ``skipped`` holds the files that can never be rows (an unsupported
    extension, outside a class folder, a second path to a file already listed) and the
    linked sub-folders not followed (into a class folder, a loop) or unreadable folders, as
    reject records: they are never decoded.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    skipped: tuple[Reject, ...] = ()
    inodes: np.ndarray | None = None
    ctimes_ns: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("inodes", "ctimes_ns"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.full(len(self.paths), UNKNOWN, np.int64))

    def __len__(self) -> int:
        return len(self.paths)

    def versions(self, indices) -> np.ndarray:
        """``(k, 4)`` int64: size, mtime_ns, inode and ctime_ns of the given rows."""
        idx = np.asarray(indices, dtype=np.int64)
        return np.stack([self.sizes[idx], self.mtimes_ns[idx], self.inodes[idx], self.ctimes_ns[idx]], axis=1).astype(np.int64)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    def match(self, paths: list[str], versions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where stored rows of ``paths`` (with their ``(k, 4)`` ``versions``) stand in this listing.

        Returns:
            ``(indices, same)``: each path's listing index (-1: not listed), and whether the
            listed file is still the stored version (size, mtime_ns, inode and ctime_ns all equal).
        """
        idx = np.asarray([self._positions.get(p, -1) for p in paths], np.int64)
        same = idx >= 0
        if same.any():
            same[same] = (self.versions(idx[same]) == np.asarray(versions, np.int64).reshape(-1, 4)[same]).all(axis=1)
        return idx, same

    def digest(self) -> str:
        """sha256 of the class names and the (path, label, size, mtime, inode, ctime) of every file, including the skipped ones."""
        h = hashlib.sha256()
        h.update(b"\0".join(os.fsencode(c) for c in self.class_names))
        rows = zip(self.paths, self.labels.tolist(), self.sizes.tolist(), self.mtimes_ns.tolist(), self.inodes.tolist(), self.ctimes_ns.tolist())
        for p, lab, s, m, i, c in rows:
            h.update(os.fsencode(p) + b"\0" + f"{lab}:{s}:{m}:{i}:{c}\n".encode())
        for p, _, s, m, i, c, _ in self.skipped:
            h.update(b"U" + os.fsencode(p) + f"\0{s}:{m}:{i}:{c}\n".encode())
        return h.hexdigest()

    def content_digest(self) -> str:
        """``core.digests.tree_digest`` of the listed files (paths, labels and bytes): what compare keys a network row to."""
        from pipeline.core.digests import tree_digest

        return tree_digest(self.root, self.paths, self.labels)

    def select(self, indices: np.ndarray) -> "Listing":
        """A listing of the given rows only (same classes, same root, same skipped files)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Listing(
            self.root,
            self.class_names,
            tuple(self.paths[i] for i in idx.tolist()),
            self.labels[idx],
            self.sizes[idx],
            self.mtimes_ns[idx],
            self.skipped,
            self.inodes[idx],
            self.ctimes_ns[idx],
        )


def _stat(path: Path) -> tuple[int, int, int, int]:
    """The version of a file: size, mtime_ns, inode and ctime_ns (of the link itself when it dangles)."""
    return _identify(path)[0]


def _identify(path: Path) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The version of a file (size, mtime_ns, inode, ctime_ns) and its identity (device, inode), of the link itself when it dangles."""
    try:
        st = path.stat()
    except OSError:  # dangling link or vanished file: decoding will reject it with its reason
        st = path.lstat()
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns), (st.st_dev, st.st_ino)


def _once(entries: list, classes: list[str], skipped: list) -> list:
    """The entries to list: each file (device and inode) once, the others reject records naming it.

    Two entries reach one file through a symbolic link or a hard link. Listed twice, the image
    would be a duplicated row, or one image under two labels (a link in class ``a`` to a file of
    class ``b``). The entry listed is the first in listing order that is not a symbolic link
    (the file where it lives: its label), else the first link; each other entry is a record
    saying which path holds the image.
    """
    first: dict[tuple[int, int], int] = {}
    for i, (_, _, link, _, identity) in enumerate(entries):
        j = first.get(identity)
        if j is None or (entries[j][2] and not link):
            first[identity] = i
    kept = []
    for i, (label, rel, link, version, identity) in enumerate(entries):
        j = first[identity]
        if j == i:
            kept.append(entries[i])
            continue
        other_label, other = entries[j][0], entries[j][1]
        where = "" if other_label == label else f" of class {classes[other_label]}"
        skipped.append(Reject(rel, f"same file as {other}{where} ({'a symbolic link' if link else 'a hard link'}): each image is listed once", *version))
    return kept




def _split_folders(root: Path, classes: list[str]) -> None:
    """Refuse a data folder whose sub-folders are split names (``train``, ``test``, ...): taken as classes, every image would get its split as its label."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if len(splits) >= 2 or (splits and len(splits) == len(classes)):
        train = next((c for c in splits if c.lower() == "train"), splits[0])
        test = next((c for c in splits if c.lower() == "test"), None)
        raise PipelineError(
            f"{root}: its sub-folder{'s' if len(splits) > 1 else ''} {', '.join(splits)} {'are split names' if len(splits) > 1 else 'is a split name'}, "
            "not classes (one sub-folder per class is expected): "
            f"point at {root / train} for the training split" + (f" and at {root / test} for the test split" if test else "")
        )


def _class_folders(root: Path, classes: list[str]) -> dict[str, str]:
    """The resolved path of every class folder; refuses a class folder that resolves into another (or the data folder): its images would be listed under two labels."""
    real = {c: os.path.realpath(root / c) for c in classes}
    top = os.path.realpath(root)
    for c in classes:
        r = real[c]
        if _inside(top, r):
            raise PipelineError(f"{root / c}: class folder is a link to {r}, which holds the data folder itself; remove the link")
        for other in classes:
            if other != c and _inside(r, real[other]) and (root / c).is_symlink():
                raise PipelineError(
                    f"{root / c}: class folder is a link to {r}, inside class folder {root / other}; its images would be listed "
                    f"under two labels: remove the link (or make {c} a folder of its own)"
                )
    return real


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether a folder entry is (or links to) a folder; a link to itself (ELOOP) is not: a file that decoding rejects with its reason."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(root: Path, folder: Path, chain: tuple[str, ...], classes: dict[str, str], own: str, files: list, skipped: list, followed: dict[str, str]) -> None:
    """Every file below ``folder`` (sorted: a folder's files, then its sub-folders), following linked sub-folders.

    A linked sub-folder is followed unless it leads into a class folder (its images are
    listed there: never twice, never under another label) or into a folder being walked (a
    loop): then it is a reject record with its reason, so every entry of the tree is a row
    or a reject.
    """
    try:
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:  # its files can be neither rows nor rejects one by one: the folder is the reject
        skipped.append(Reject(folder.relative_to(root).as_posix() + "/", f"unreadable folder ({exc.strerror or exc})", *_stat(folder)))
        return
    subs = []
    for e in entries:
        full = Path(e.path)
        if not _is_dir(e):
            files.append((full, e.is_symlink()))
            continue
        if e.is_symlink():
            real = os.path.realpath(full)
            rel = full.relative_to(root).as_posix()
            inside = next((c for c, r in classes.items() if _inside(real, r)), None)
            before = next((v for r, v in followed.items() if _inside(real, r)), None)
            if any(_inside(c, real) for c in chain):
                why = f"link loop: a link to {real}, which holds this folder"
            elif inside is not None:
                why = f"link to a folder of {'this class folder' if classes[inside] == own else f'class folder {inside}'} ({real}): its images are listed there, not twice"
            elif before is not None:
                why = f"link to {real}, already listed through {before}: its images are listed once"
            else:
                followed[real] = rel
                subs.append((full, chain + (real,)))
                continue
            skipped.append(Reject(rel, why, *_stat(full)))
        else:
            subs.append((full, chain + (os.path.realpath(full),)))
    for sub, sub_chain in subs:
        _walk(root, sub, sub_chain, classes, own, files, skipped, followed)


def list_images(data_dir: Path | str) -> Listing:
    """List the images of a class-per-folder tree.

    Classes are the sub-folders of ``data_dir`` sorted by name; each class takes every
    file below its folder (recursively). Hidden files and folders (names starting with a dot)
    are ignored. Links: a class folder may link anywhere but into another class folder or
    the data folder (refused); a linked sub-folder is followed, unless it leads into a class
    folder or makes a loop: then it is a reject record saying so. So every file is a row
    or a reject record, once.

    Raises:
        PipelineError: the folder is missing or not a folder, has no class sub-folders,
            has only one class, its sub-folders are split names (``train``, ``test``, ...),
            a class folder links to another, a class folder holds no image files (or only
            links to images listed elsewhere), or there are no images.
    """
    root = Path(data_dir)
    if not root.exists():
        raise PipelineError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise PipelineError(f"{root}: not a folder (expected one sub-folder per class)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if _is_dir(e) and not e.name.startswith(".")]
    skipped = [Reject(e.name, "not inside a class folder", *_stat(Path(e.path))) for e in entries if not e.name.startswith(".") and not _is_dir(e)]
    _split_folders(root, classes)
    if not classes:
        raise PipelineError(f"{root}: no class sub-folders (expected one sub-folder per class, e.g. {root}/cats/*.jpg)")
    if len(classes) < 2:
        raise PipelineError(f"{root}: only one class folder ({classes[0]}); classification needs at least two")
    real = _class_folders(root, classes)
    followed: dict[str, str] = {}  # resolved folder of each linked sub-folder followed -> its path in the listing

    entries: list[tuple[int, str, bool, tuple[int, int, int, int], tuple[int, int]]] = []  # label, path, is a link, version, file identity
    for label, name in enumerate(classes):
        class_files: list[tuple[Path, bool]] = []
        _walk(root, root / name, (real[name],), real, real[name], class_files, skipped, followed)
        for full, link in class_files:
            rel = full.relative_to(root).as_posix()
            version, identity = _identify(full)
            if Path(full.name).suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(Reject(rel, f"unsupported file type '{Path(full.name).suffix or '(no extension)'}'", *version))
                continue
            entries.append((label, rel, link, version, identity))
    kept = _once(entries, classes, skipped)

    paths: list[str] = []
    labels: list[int] = []
    versions: list[tuple[int, int, int, int]] = []
    for label, rel, _, version, _ in kept:
        paths.append(rel)
        labels.append(label)
        versions.append(version)
    found = np.bincount(np.asarray(labels, np.int64), minlength=len(classes))
    for label, name in enumerate(classes):
        if found[label] == 0:
            linked = sum(1 for e in entries if e[0] == label)
            raise PipelineError(
                f"{root / name}: class folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images"
                if not linked else
                f"{root / name}: class folder has no image of its own: its {linked} image file(s) are links or hard links to images "
                "listed under other paths; remove it or add images"
            )
    sizes, mtimes, inodes, ctimes = (list(col) for col in zip(*versions)) if versions else ([], [], [], [])
    return Listing(
        root,
        tuple(classes),
        tuple(paths),
        np.asarray(labels, dtype=np.int32),
        np.asarray(sizes, dtype=np.int64),
        np.asarray(mtimes, dtype=np.int64),
        tuple(skipped),
        np.asarray(inodes, dtype=np.int64),
        np.asarray(ctimes, dtype=np.int64),
    )


