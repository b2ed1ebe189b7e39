"""The ``data`` command: the default data set, a class-per-folder PNG tree sampled from Fashion-MNIST."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import stat
import sys
from dataclasses import dataclass

import numpy as np

from pipeline.core.command import Command
from pipeline.core.config import MAX_INT, Interval, option
from pipeline.core.digests import file_digest, read_regular
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import OutputLock, dead_marked_folders, new_marked_folder
from pipeline.fashion_mnist import FASHION_CLASSES, IDX_FILES, PER_CLASS_AVAILABLE, load_fashion_mnist

MANIFEST = "MANIFEST.json"
WORK_MARK = ".pipeline-data-build"  # in the data command's own work folders beside the tree
MANIFEST_MAX_BYTES = 1 << 26  # far above the manifest of every image (70,000 names and digests: about 5 MB)
MANIFEST_VERSION = 1
_INDEX_WIDTH = 5  # file names are the index in the idx file, zero-padded: 00042.png


def _normalize(n, split: str, flag: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise PipelineError(f"{flag} must be a positive whole number or None (all), got {n!r}")
    if n > PER_CLASS_AVAILABLE[split]:  # taken as "all", said: the tree holds fewer than asked
        print(f"note: {flag} {n}: Fashion-MNIST has {PER_CLASS_AVAILABLE[split]} {split} images per class; taking all of them", file=sys.stderr)
    return None if n >= PER_CLASS_AVAILABLE[split] else int(n)


def _select(labels: np.ndarray, per_class: int | None, seed: int, split_no: int) -> list[np.ndarray]:
    """Per class, the sorted indices of the chosen images (a seeded, per-split/class RNG)."""
    chosen = []
    for cls in range(len(FASHION_CLASSES)):
        idx = np.flatnonzero(labels == cls)
        if per_class is not None and per_class < len(idx):
            rng = np.random.default_rng([seed, split_no, cls])
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        chosen.append(idx)
    return chosen


def _plan(data: dict, params: dict) -> dict[str, list[np.ndarray]]:
    """Per split, per class, the idx indices a set of ``params`` (per-class counts, seed) takes."""
    return {split: _select(data[split][1], params[f"{split}_per_class"], int(params["seed"] or 0), split_no)
            for split_no, split in enumerate(IDX_FILES)}


def _read_manifest(out_dir: pathlib.Path) -> dict | None:
    """The folder's manifest; None when there is none.

    Raises:
        PipelineError: a manifest that cannot be read or parsed (nothing in the folder is then known to be ours).
    """
    path = out_dir / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        if os.path.islink(path):  # ours is a file it wrote, never a link (to /dev/zero it never ended)
            raise ValueError("not a regular file")
        manifest = json.loads(read_regular(path, MANIFEST_MAX_BYTES))  # a FIFO hung the reader: never read
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable manifest ({getattr(exc, 'strerror', None) or exc}); nothing in {out_dir} is known to be this tool's: "
                            "choose another folder or empty it") from None
    if not isinstance(manifest, dict) or manifest.get("dataset") != "fashion-mnist":
        raise PipelineError(f"{path} is not a Fashion-MNIST manifest; choose another folder")
    broken = _manifest_problem(manifest)
    if broken:  # its file list decides what a rebuild deletes: an edited one is not trusted
        raise PipelineError(f"{path}: damaged manifest ({broken}); nothing in {out_dir} is known to be this tool's: "
                            "choose another folder or empty it")
    return manifest


def _ours(root: pathlib.Path) -> bool:
    """Whether ``root`` holds a data tree this command built (a readable Fashion-MNIST manifest)."""
    try:
        return _read_manifest(root) is not None
    except PipelineError:
        return False


def _whole(value, least: int, most: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least and (most is None or value <= most)


def _manifest_problem(m: dict) -> str | None:
    """What in a manifest is not what this tool writes (None: nothing): settings or counts that are not whole numbers, a
    file list naming another split or class, or an index of no image (a name such as ``../x`` would let a rebuild delete outside)."""
    bad = [k for k in ("train_per_class", "test_per_class", "seed") if m.get(k) is not None and not _whole(m[k], 0 if k == "seed" else 1)]
    counts, files = m.get("counts"), m.get("files")
    if bad or not isinstance(counts, dict) or not all(_whole(counts.get(s), 0) for s in IDX_FILES):
        return f"{bad[0]} is {m[bad[0]]!r}" if bad else f"counts is {counts!r}"
    digests = m.get("digests")
    if digests is not None and (not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
        return "digests is not a map of file names to digests"
    if files is not None and (not isinstance(files, dict) or not set(files) <= set(IDX_FILES)):  # None: an earlier version's, its files follow from its settings
        return "files names other splits than " + ", ".join(IDX_FILES)
    for split, per in (files or {}).items():
        if not isinstance(per, dict) or not set(per) <= set(FASHION_CLASSES):
            return f"files/{split} names other classes than Fashion-MNIST's"
        top = PER_CLASS_AVAILABLE[split] * len(FASHION_CLASSES) - 1
        wrong = next((c for c, indices in per.items() if not isinstance(indices, list) or not all(_whole(i, 0, top) for i in indices)), None)
        if wrong:
            return f"files/{split}/{wrong} holds something else than image indices 0..{top}"
    return None


def _file_names(chosen: dict[str, list[np.ndarray]]) -> dict[str, dict[str, list[int]]]:
    """The manifest's record of the files written: per split and class, the idx indices (file names)."""
    return {split: {cls: [int(i) for i in idx] for cls, idx in zip(FASHION_CLASSES, per, strict=True)}
            for split, per in chosen.items()}


def _manifest_files(manifest: dict) -> set[str]:
    """The paths (relative, POSIX) of every file and folder the manifest says this tool wrote."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return set()
    out = {MANIFEST}
    for split, per in files.items():
        out.add(split)
        for cls, indices in per.items():
            out.add(f"{split}/{cls}")
            out.update(f"{split}/{cls}/{int(i):0{_INDEX_WIDTH}d}.png" for i in indices)
    return out


def _digest(path: pathlib.Path) -> str | None:
    """What the manifest records of a file it wrote: the first 32 hex digits of its sha256; None for what is not a regular file
    (a FIFO is never opened: reading it blocks) or cannot be read, which is then not known to be the tool's."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return file_digest(path)[:32]  # read in blocks (a 6 GB sparse file was a MemoryError), never a FIFO
    except OSError:
        return None


def _foreign(out_dir: pathlib.Path, ours: set[str], digests=None) -> list[str]:
    """Every file or folder under ``out_dir`` not in ``ours``, every link (it writes none; deleting through one reaches elsewhere), and
    every listed file whose bytes are not those the manifest's ``digests`` recorded (a user's own image put in its place, or a file that
    cannot be read or is not a regular file), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        rel = pathlib.Path(dirpath).relative_to(out_dir)
        for name in sorted(dirnames):  # a listed folder is a folder, a listed file a file: a user's file named `bag` is not the class folder
            if (rel / name).as_posix() not in ours or _file_entry((rel / name).as_posix()) or os.path.islink(os.path.join(dirpath, name)):
                found.append((rel / name).as_posix() + "/")
        dirnames[:] = sorted(d for d in dirnames if (rel / d).as_posix() in ours and not _file_entry((rel / d).as_posix())
                             and not os.path.islink(os.path.join(dirpath, d)))  # fmt: skip
        found += [(rel / f).as_posix() for f in sorted(filenames) if (rel / f).as_posix() not in ours or not _file_entry((rel / f).as_posix())
                  or os.path.islink(os.path.join(dirpath, f))
                  or (isinstance(digests, dict) and (rel / f).as_posix() in digests and digests[(rel / f).as_posix()] != _digest(pathlib.Path(dirpath) / f))]  # fmt: skip
    return sorted(found)


def _file_entry(rel: str) -> bool:
    """Whether a manifest entry names a file (the manifest, an image) rather than a folder (a split, a class)."""
    return rel == MANIFEST or rel.endswith(".png")


def _why_rebuild(out_dir: pathlib.Path, existing: dict, params: dict, ours: set[str]) -> str | None:
    """Why the folder built from ``existing`` does not hold the set ``params`` asks for (None: it does)."""
    changed = [f"{k} {existing.get(k)!r} -> {v!r}" for k, v in params.items() if existing.get(k) != v]
    if changed:
        return "settings changed: " + ", ".join(changed)
    missing = sorted(p for p in ours if p != MANIFEST and p.endswith(".png") and not (out_dir / p).is_file())
    if missing:
        return f"{len(missing)} file(s) listed in {MANIFEST} are missing (e.g. {missing[0]})"
    return None


def build_fashion_mnist(out_dir, *, train_per_class=100, test_per_class=50, seed=0,
                        source=None, progress=True) -> dict:
    """Write a class-per-folder PNG tree sampled from Fashion-MNIST.

    Writes ``out_dir/{train,test}/<class>/<index>.png`` (28x28 grayscale; index = position in
    the original idx file, zero-padded to 5 digits) and ``out_dir/MANIFEST.json`` last. If
    out_dir already holds exactly the requested set nothing is done; otherwise the tree is
    rebuilt in a temporary folder beside out_dir and swapped in.

    Args:
        out_dir: destination folder (created; an existing one must be empty or built by this
            function).
        train_per_class: images per class from the training file; None or >= 6000 means all.
        test_per_class: images per class from the test file; None or >= 1000 means all.
        seed: seed of the subset choice (irrelevant when everything is taken).
        source: folder with the four idx .gz files; None uses the Debian package, then Keras.
        progress: show a tqdm bar and a line on stderr.

    Returns:
        {"train": n, "test": m, "source": str, "built": bool, "out_dir": str}; built is False
        when the existing tree already matched.

    Raises:
        PipelineError: bad counts, no usable source, corrupt idx files, or out_dir is a
        non-empty folder that this function did not build.
    """
    out_dir = pathlib.Path(os.path.realpath(pathlib.Path(out_dir).expanduser()))  # a linked root is built where it leads, locked once
    params = {
        "dataset": "fashion-mnist",
        "version": MANIFEST_VERSION,
        "train_per_class": _normalize(train_per_class, "train", "train_per_class"),
        "test_per_class": _normalize(test_per_class, "test", "test_per_class"),
    }
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PipelineError(f"seed must be a non-negative whole number, got {seed!r}")
    all_images = params["train_per_class"] is None and params["test_per_class"] is None
    params["seed"] = None if all_images else int(seed)

    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"{out_dir} exists and is not a folder")
    outer = next((p for p in out_dir.parents if (p / MANIFEST).is_file() and _ours(p)), None)
    if outer is not None:  # its images would be read as images of the outer tree's class folder
        raise PipelineError(f"{out_dir}: is inside the data tree {outer} (its {MANIFEST}); choose a folder outside it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{out_dir.parent}: cannot create the folder ({exc.strerror or exc})") from None
    with OutputLock(out_dir):  # one build per tree: two at once each said "built" with its own counts, and one was wrong
        return _build(out_dir, params, seed, source, progress)


def _build(out_dir: pathlib.Path, params: dict, seed, source, progress: bool) -> dict:
    """``build_fashion_mnist`` under the tree's lock."""
    for left in _left_behind(out_dir, "tmp"):  # a build killed while writing (no other build of this tree runs: the lock)
        shutil.rmtree(left, ignore_errors=True)
    for left in _left_behind(out_dir, "old"):  # a build killed while removing the previous tree: its own files go
        try:
            old_manifest = _read_manifest(left / "tree") if (left / "tree").is_dir() and not (left / "tree").is_symlink() else None
        except PipelineError:
            old_manifest = None  # not known to be ours: left as it is
        if old_manifest is not None:
            _remove_ours(left, _manifest_files(old_manifest), old_manifest.get("digests"))
    existing = _read_manifest(out_dir) if out_dir.is_dir() else None
    if out_dir.is_dir() and existing is None and any(out_dir.iterdir()):
        raise PipelineError(f"{out_dir} is not empty and was not built by this tool (no {MANIFEST}); "
                            "choose another folder or empty it")
    loaded = None
    why = None
    ours: set[str] = set()
    if existing is not None:
        if not isinstance(existing.get("files"), dict):  # an earlier version's manifest: its files follow from its settings
            loaded = load_fashion_mnist(source)
            existing["files"] = _file_names(_plan(loaded[0], existing))
        ours = _manifest_files(existing)
        why = _why_rebuild(out_dir, existing, params, ours)
        foreign = _foreign(out_dir, ours, existing.get("digests") if why is not None else None)  # files are hashed only before a rebuild
        if why is None:
            if progress:
                kept = f"; {len(foreign)} file(s) not written by this tool left as they are (e.g. {foreign[0]})" if foreign else ""
                print(f"fashion-mnist: {out_dir} already holds the requested set "
                      f"({existing['counts']['train']} train, {existing['counts']['test']} test); "
                      f"nothing to do{kept}", file=sys.stderr, flush=True)
            return {"train": existing["counts"]["train"], "test": existing["counts"]["test"],
                    "source": existing.get("source", "?"), "built": False, "out_dir": str(out_dir), "why": None}
        if foreign:
            raise PipelineError(
                f"{out_dir}: holds {len(foreign)} file(s) this tool did not write (e.g. {foreign[0]}: not in its {MANIFEST}, changed since, unreadable, not a regular file, or a link); "
                f"it would rebuild the folder ({why}), which would delete them: move them out of {out_dir} or choose another folder"
            )
        if progress:
            print(f"fashion-mnist: rebuilding {out_dir}: {why}", file=sys.stderr, flush=True)

    _check_writable(out_dir, ours)
    data, source_desc = loaded or load_fashion_mnist(source)
    plan = _plan(data, params | {"seed": int(seed)})
    total = sum(len(i) for chosen in plan.values() for i in chosen)

    from PIL import Image  # noqa: PLC0415
    from pipeline.core.progress import progress as progress_bar

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = _work_folder(out_dir, "tmp")
    tmp = work / "tree"  # the new tree, renamed into place whole
    try:
        per_class: dict[str, dict[str, int]] = {}
        digests: dict[str, str] = {}  # each file as written: a listed file a user changed since is not the tool's to delete
        with progress_bar(total, f"fashion-mnist -> {out_dir.name}", quiet=not progress) as bar:
            for split, chosen in plan.items():
                images, _labels = data[split]
                per_class[split] = {}
                for cls, indices in zip(FASHION_CLASSES, chosen, strict=True):
                    folder = tmp / split / cls
                    folder.mkdir(parents=True)
                    for index in indices:
                        Image.fromarray(images[index]).save(folder / f"{index:0{_INDEX_WIDTH}d}.png")
                        digests[f"{split}/{cls}/{index:0{_INDEX_WIDTH}d}.png"] = _digest(folder / f"{index:0{_INDEX_WIDTH}d}.png")
                        bar.update(1)
                    per_class[split][cls] = int(len(indices))
        counts = {split: sum(per_class[split].values()) for split in per_class}
        manifest = dict(params, source=source_desc, counts=counts, per_class=per_class,
                        classes=list(FASHION_CLASSES), files=_file_names(plan), digests=digests)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            old = _work_folder(out_dir, "old")
            _swap(out_dir, tmp, old)
            _remove_ours(old, ours, existing.get("digests") if existing else None)
        else:
            os.replace(tmp, out_dir)
    except OSError as exc:
        raise PipelineError(f"{out_dir}: could not be written ({exc.strerror or exc}); the previous tree, if any, is as it was") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"fashion-mnist: wrote {counts['train']} train + {counts['test']} test PNGs to "
              f"{out_dir} (from {source_desc})", file=sys.stderr, flush=True)
    return {"train": counts["train"], "test": counts["test"], "source": source_desc,
            "built": True, "out_dir": str(out_dir), "why": why}


def _work_folder(out_dir: pathlib.Path, kind: str) -> pathlib.Path:
    """A new folder ``.ROOT.KIND-PID`` beside the tree (``tmp``: the new tree is written in its ``tree``; ``old``: the previous tree, moved aside to its ``tree`` to be removed),
    marked as the data command's own: only marked folders of dead processes are cleared (``_left_behind``)."""
    return new_marked_folder(out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}", WORK_MARK, "a work folder of `python -m pipeline data`\n")


def _left_behind(out_dir: pathlib.Path, kind: str) -> list[pathlib.Path]:
    """The ``.ROOT.KIND-PID`` folders of this tree that a killed build left: named exactly so (a root named ``d.tmp-b``, or with
    glob brackets, is another tree), of a dead process, a folder (not a link) holding the data command's mark."""
    return dead_marked_folders(out_dir.parent, re.compile(re.escape(f".{out_dir.name}.{kind}-") + r"(\d+)$"), WORK_MARK)


def _check_writable(out_dir: pathlib.Path, ours: set[str]) -> None:
    """Refuse, before any work, a build the file system would stop half-way: a parent folder, the tree, or one of its folders holding
    files to replace, that cannot be written (a read-only tree was a traceback, and left an empty ``.ROOT.old-*`` beside it)."""
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    folders = [parent] + ([out_dir, *sorted({(out_dir / rel).parent for rel in ours})] if out_dir.exists() else [])
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise PipelineError(f"{folder}: is not writable; the data command writes the tree beside {out_dir.name} and swaps it in: "
                                "make it writable or choose another folder")  # fmt: skip


def _swap(out_dir: pathlib.Path, new: pathlib.Path, old: pathlib.Path) -> None:
    """Move the previous tree into ``old/tree`` and the new one into place; a failure puts the previous tree back and removes ``old``."""
    try:
        os.replace(out_dir, old / "tree")
        try:
            os.replace(new, out_dir)
        except OSError:
            os.replace(old / "tree", out_dir)
            raise
    except OSError:
        if not (old / "tree").exists():  # the previous tree is back in place: the empty ``old`` goes
            shutil.rmtree(old, ignore_errors=True)
        raise


def _remove_ours(old: pathlib.Path, ours: set[str], digests: dict | None) -> None:
    """Delete the previous tree (moved to ``old/tree``): only the files its manifest lists, as it wrote them (``digests``, when it
    records them), then the folders left empty.

    Anything else (a file added, or a listed one changed, between the check and the swap: a rebuild writes for minutes) stays
    where it is, and is named.
    """
    tree = old / "tree"
    real_tree = os.path.realpath(tree)
    failed: list[tuple[str, str]] = []
    for rel in sorted(ours, key=lambda r: -r.count("/")):  # files before their folders
        path = tree / rel
        if os.path.realpath(path.parent) != os.path.normpath(os.path.join(real_tree, os.path.dirname(rel))):
            continue  # a folder on the way became a link since the check: never delete through it
        if isinstance(digests, dict) and rel in digests and os.path.lexists(path) and _digest(path) != digests[rel]:
            continue  # changed since the check: the user's now
        if path.is_symlink() or not (path.is_file() if _file_entry(rel) else path.is_dir()):
            continue  # gone, or not what the tool wrote there (a user's file where a class folder was): kept
        try:
            path.unlink() if _file_entry(rel) else path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not path.is_dir():
                failed.append((rel, exc.strerror or str(exc)))
    for folder in (tree, old):
        try:
            if folder == old:
                (old / WORK_MARK).unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            if failed:
                print(f"fashion-mnist: could not remove {len(failed)} of the previous tree's own files (e.g. {failed[0][0]}: {failed[0][1]}); "
                      f"they are left in {tree}", file=sys.stderr, flush=True)  # fmt: skip
            else:
                kept = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if not p.is_dir() or p.is_symlink())
                print(f"fashion-mnist: kept {len(kept)} file(s) this tool did not write, or that changed since it wrote them, in {tree}"
                      + (f" (e.g. {kept[0]})" if kept else ""), file=sys.stderr, flush=True)  # fmt: skip
            return


@dataclass(frozen=True)
class DataConfig:
    """Settings of ``python -m pipeline data``: where the tree goes and how many images of each split and class."""

    out_dir: pathlib.Path = option(help="folder to write (train/ and test/ class trees and MANIFEST.json)", positional=True, metavar="ROOT")
    train_per_class: int = option(100, f"training images per class (at most {PER_CLASS_AVAILABLE['train']})", rule=Interval(int, 1, MAX_INT), metavar="N")
    test_per_class: int = option(50, f"test images per class (at most {PER_CLASS_AVAILABLE['test']})", rule=Interval(int, 1, MAX_INT), metavar="N")
    seed: int = option(0, "seed of the subset", rule=Interval(int, 0, MAX_INT))
    all: bool = option(False, "take every image (60000 + 10000)")
    source: pathlib.Path | None = option(
        None, "folder with the four idx .gz files; none = the Debian package dataset-fashion-mnist, then the Keras download", metavar="DIR"
    )
    quiet: bool = option(False, "no progress output")


def run(config: DataConfig) -> int:
    """Build (or find up to date) the tree of ``config``; print one summary line.

    Returns:
        0 once the tree holds the requested images.

    Raises:
        PipelineError: see ``build_fashion_mnist``.
    """
    result = build_fashion_mnist(
        config.out_dir,
        train_per_class=None if config.all else config.train_per_class,
        test_per_class=None if config.all else config.test_per_class,
        seed=config.seed, source=config.source, progress=not config.quiet,
    )  # fmt: skip
    state = "already up to date" if not result["built"] else f"rebuilt: {result['why']}" if result.get("why") else "built"
    print(f"{result['out_dir']}: {result['train']} train + {result['test']} test images in "
          f"{len(FASHION_CLASSES)} classes ({state}; source {result['source']})")  # fmt: skip
    return 0


COMMAND = Command("data", DataConfig, run, "build the default data set: a class-per-folder PNG tree (train/ and test/) sampled from Fashion-MNIST")
