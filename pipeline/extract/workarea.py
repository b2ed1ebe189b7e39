"""The work area ``OUT.h5.partial/``: one small file per finished batch, written atomically, each naming the files (path and version) it holds, so a resumed run keeps every finished row whose image is unchanged; features are held as the compressed chunks the final file will copy."""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import disk_error, special_kind
from pipeline.extract.fingerprints import describe_difference, same_settings, settings_key
from pipeline.featurefile import chunks
from pipeline.images.listing import Listing


#: A part file: this magic, the head's length (8 bytes, little endian), the head (JSON), the features' bytes.
MAGIC = b"PFPART1\n"
#: Every name the tool writes in a work area: its record, parts (also of earlier versions) and their temporaries.
OWN_NAMES = re.compile(r"manifest\.json(\.tmp)?|part-\d+\.\w+|\.part-\d+\.tmp")


def _own(entry: os.DirEntry) -> bool:
    return bool(OWN_NAMES.fullmatch(entry.name)) and entry.is_file(follow_symlinks=False)


def _read_part(part: Path, features: bool = True) -> tuple[dict, bytes]:
    """A part's head (its files: paths, versions; rejections; how its chunks are cut) and, with ``features``, the chunks' bytes."""
    with open(part, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{part}: not a part file")
        size = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(size))
        return head, (f.read() if features else b"")


def _part_sound(part: Path) -> bool:
    """Whether a part's chunks are whole: their sizes add up to its bytes and each one decompresses to a full chunk of its layout."""
    try:
        head, data = _read_part(part)
        sizes, counts = [int(k) for k in head["chunk_bytes"]], [int(k) for k in head["chunk_rows"]]
        layout = chunks.Layout.from_json(head["layout"])
        if sum(sizes) != len(data) or len(sizes) != len(counts) or sum(counts) != len(head["paths"]):
            return False
        start = 0
        for size, rows in zip(sizes, counts):
            chunks.decompress(data[start : start + size], layout, rows)
            start += size
        return True
    except Exception:  # unreadable, truncated, another version's part, a chunk that does not decompress
        return False


@dataclass(frozen=True)
class PartInfo:
    """One finished batch, mapped onto the current listing: which listing rows it extracted
    (``indices``, with ``rows`` the matching rows of its features) and which it rejected, why,
    and under which limit."""

    path: Path
    indices: np.ndarray
    rows: np.ndarray
    rejected_indices: np.ndarray
    reasons: list[str]
    limits: list[str]

    @property
    def first(self) -> int:
        return int(min(self.indices.min(initial=1 << 62), self.rejected_indices.min(initial=1 << 62)))


class WorkArea:
    """``OUT.h5.partial/``: one small file per finished batch, written atomically.

    A run killed at any moment leaves only whole parts behind (a part is written to a
    temporary name and renamed). Each part records the path and version (size, mtime,
    inode, ctime) of every file it holds, so the next run maps it onto the listing of that
    moment: rows of files that were changed, moved or deleted since are left out (and
    extracted again), whatever else changed in the folder. ``manifest.json`` holds the
    fingerprint of the settings and images the run started with, and each part the key of
    the settings it was made with (``settings``): a part of other settings never counts.
    """

    def __init__(self, output: Path, settings: str | None = None):
        self.path = output.with_name(output.name + ".partial")
        self.settings = settings

    def check(self) -> None:
        """Refuse a work area that is not a plain folder holding only what the tool writes (nothing there is fine).

        A link (its target would be written, then kept or reused), a file or a FIFO in its
        place, or a folder holding anything else (removing it would delete that) is refused.

        Raises:
            PipelineError: one line naming the path, and for a folder its first foreign entry.
        """
        try:
            mode = os.lstat(self.path).st_mode
        except (FileNotFoundError, NotADirectoryError):  # nothing there (a parent that is no folder: the output's checks say so)
            return
        except OSError as exc:
            raise PipelineError(f"{self.path}: the work area cannot be read ({exc.strerror})") from None
        own = "; extract keeps its work area in a folder of its own, made and removed by itself"
        if stat.S_ISLNK(mode):
            raise PipelineError(f"{self.path}: the work area is a symbolic link (to {os.readlink(self.path)}){own}: remove the link")
        if not stat.S_ISDIR(mode):
            raise PipelineError(f"{self.path}: the work area is {special_kind(self.path) or 'a file'}, not a folder{own}: move it away")
        foreign = sorted(e.name for e in os.scandir(self.path) if not _own(e))
        if foreign:
            raise PipelineError(f"{self.path}: the work area holds {foreign[0]!r}, which extract did not write{own}: move it away")

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def exists(self) -> bool:
        return self.path.exists()

    def manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def start(self, fingerprint: dict) -> None:
        """Create an empty work area for ``fingerprint`` (the caller removed any old one)."""
        self.set_manifest(fingerprint)

    def set_manifest(self, fingerprint: dict) -> None:
        """Record ``fingerprint`` as the run's (atomically); the parts already there are kept."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.manifest_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            os.replace(tmp, self.manifest_path)
        except OSError as exc:
            raise disk_error(self.path, exc) from None

    def resume(self, manifest: dict, fingerprint: dict, overwrite: bool) -> "WorkArea":
        """Make the work area this run's: its finished parts kept while they still hold, else started afresh; returns self.

        ``manifest`` is what this run records (``fingerprint``, the settings and images, and
        what else it depends on). An area left with the same settings but other images (or
        another previous output) keeps the finished parts of files that are unchanged, as an
        update's kept rows do; one of other settings is removed with ``overwrite`` (or when
        its manifest is unreadable, or when it holds no part: a run that failed before its
        first batch).

        Raises:
            PipelineError: an interrupted run with other settings, and ``overwrite`` is not set.
        """
        found = self.manifest() if self.exists() else manifest
        if found != manifest:
            if not self.parts():  # a run that processed no image left nothing to keep: never a reason to refuse
                self.remove()
            elif found is not None and same_settings(found, fingerprint):
                self.set_manifest(manifest)
            elif overwrite or found is None:  # no record: its parts' settings are unknown
                self.remove()
            else:
                raise PipelineError(
                    f"{self.path}: an interrupted run with other settings ({describe_difference(found, fingerprint)}); "
                    "re-run with its settings to resume, or pass --overwrite to start again"
                )
        if not self.parts():  # never parts without this run's record
            self.start(manifest)
        self.settings = settings_key(fingerprint)
        self.drop_damaged()
        return self

    def drop_damaged(self) -> list[Path]:
        """Delete every part whose features cannot be trusted (a chunk that does not decompress to a whole chunk,
        chunk sizes that do not add up): its rows are extracted again, never copied into the output. Returns them."""
        bad = [part for part in self.parts() if not _part_sound(part)]
        for part in bad:
            part.unlink(missing_ok=True)
        return bad

    def remove(self) -> None:
        """Delete the tool's files, then the folder if that empties it (never a link's target, never a file the tool did not write)."""
        if self.path.is_symlink() or not self.path.is_dir():
            return
        for entry in os.scandir(self.path):
            if _own(entry):
                Path(entry.path).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass

    def parts(self) -> list[Path]:
        """Every part file, in the order written (also one that ``index`` will find unreadable)."""
        return sorted(self.path.glob("part-*"), key=lambda p: p.stem)

    def write_part(
        self,
        seq: int,
        listing: Listing,
        indices: np.ndarray,
        features: chunks.Packed,
        rejected_indices: np.ndarray,
        reasons: list[str],
        limits: list[str],
    ) -> None:
        """Atomically store one batch: row ``k`` of ``features`` (compressed chunks, ``chunks.pack``: the
        part holds them as they are, and the final file copies them) belongs to listing row
        ``indices[k]``; rejected rows with their reasons and limits."""
        name = self.path / f"part-{seq:09d}.part"
        tmp = self.path / f".part-{seq:09d}.tmp"
        idx = np.asarray(indices, np.int64)
        rej = np.asarray(rejected_indices, np.int64)
        head = {
            "paths": [listing.paths[i] for i in idx.tolist()],
            "versions": listing.versions(idx).tolist(),
            "rejected_paths": [listing.paths[i] for i in rej.tolist()],
            "rejected_versions": listing.versions(rej).tolist(),
            "reasons": list(reasons),
            "limits": list(limits),
            "settings": self.settings,
        }
        head.update(layout=features.layout.as_json(), chunk_bytes=[len(c) for c in features.chunks], chunk_rows=list(features.counts), finite=features.finite)
        data = b"".join(features.chunks)
        encoded = json.dumps(head).encode()  # names not valid UTF-8 as surrogate escapes, which JSON keeps
        try:
            with open(tmp, "wb") as f:
                # One head and one blob: reading a part back costs one open and two reads, so
                # assembly runs at disk speed.
                f.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise disk_error(name, exc) from None

    def next_seq(self) -> int:
        parts = self.parts()
        return int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def index(self, listing: Listing, keep_rejected: Callable[[str], bool] = lambda limit: True, exclude: np.ndarray | None = None) -> list[PartInfo]:
        """The finished parts mapped onto ``listing``, in listing order, without their features.

        A row counts only if its file is still listed with the same version; a rejection also
        only if ``keep_rejected(limit)``; rows in ``exclude`` (already accounted for) and rows
        of an earlier part are left out. A part that cannot be read (damage from outside: only
        whole parts are ever renamed into place; or one of another version of the pipeline),
        or was made with other settings than ``self.settings``, is deleted: its rows are extracted again.
        """
        taken = np.zeros(len(listing), bool)
        if exclude is not None and len(exclude):
            taken[np.asarray(exclude, np.int64)] = True
        infos = []
        for part in self.parts():
            try:
                head, _ = _read_part(part, features=False)
                if head.get("settings") != self.settings:
                    raise ValueError("made with other settings")
                idx, ok = listing.match(head["paths"], np.asarray(head["versions"], np.int64).reshape(-1, 4))
                ridx, rok = listing.match(head["rejected_paths"], np.asarray(head["rejected_versions"], np.int64).reshape(-1, 4))
                reasons, limits = [str(r) for r in head["reasons"]], [str(x) for x in head["limits"]]
            except Exception:
                part.unlink(missing_ok=True)
                continue
            rok &= np.fromiter((keep_rejected(x) for x in limits), bool, len(limits))
            for sel, where in ((ok, idx), (rok, ridx)):
                for k in np.flatnonzero(sel):  # never twice: a file is in one part, and not in ``exclude``
                    if taken[where[k]]:
                        sel[k] = False
                    taken[where[k]] = True
            keep_r = np.flatnonzero(rok)
            infos.append(
                PartInfo(part, idx[ok], np.flatnonzero(ok), ridx[rok], [reasons[k] for k in keep_r], [limits[k] for k in keep_r])
            )
        infos.sort(key=lambda p: p.first)
        return infos

    def done_indices(self, listing: Listing, keep_rejected: Callable[[str], bool] = lambda limit: True, exclude: np.ndarray | None = None) -> np.ndarray:
        """Listing indices covered by finished parts (extracted or rejected), as ``index`` maps them."""
        infos = self.index(listing, keep_rejected, exclude)
        return np.unique(np.concatenate([np.zeros(0, np.int64)] + [np.concatenate([p.indices, p.rejected_indices]) for p in infos]))

    @staticmethod
    def features(part: PartInfo) -> "np.ndarray | chunks.Packed":
        """The part's rows that still count: its compressed chunks as they are when they all do, else those rows decompressed."""
        head, data = _read_part(part.path)
        sizes = head["chunk_bytes"]
        ends = np.cumsum(sizes).tolist()
        packed = chunks.Packed(chunks.Layout.from_json(head["layout"]), [data[e - k : e] for e, k in zip(ends, sizes)], head["chunk_rows"], bool(head["finite"]))
        return packed if len(part.rows) == len(packed) else packed.array()[part.rows]
