"""The work area ``OUT.h5.partial/``: one small file per finished batch, written atomically, each naming the files (path and version) it holds, so a resumed run keeps every finished row whose image is unchanged; features are held as the compressed chunks the final file will copy."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.outputs import disk_error
from pipeline.extraction import chunks
from pipeline.extraction.reader import Listing


def _encoded(paths: list[str]) -> np.ndarray:
    """Paths as a bytes array (``np.load`` reads it back without pickle)."""
    return np.asarray([os.fsencode(p) for p in paths], dtype=bytes) if paths else np.zeros(0, "S1")


def _features_fields(features) -> dict:
    """The part's arrays holding its features: compressed chunks (bytes, sizes, rows, layout) or plain rows."""
    if not isinstance(features, chunks.Packed):
        return {"features": features}
    return {
        "chunk_data": np.frombuffer(b"".join(features.chunks), np.uint8),
        "chunk_bytes": np.asarray([len(c) for c in features.chunks], np.int64),
        "chunk_rows": np.asarray(features.counts, np.int64),
        "layout": np.asarray(json.dumps(features.layout.as_json())),
        "finite": np.asarray(features.finite),
    }


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
    fingerprint of the settings and images the run started with.
    """

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".partial")

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

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.npz"))

    def write_part(
        self,
        seq: int,
        listing: Listing,
        indices: np.ndarray,
        features: "np.ndarray | chunks.Packed",
        rejected_indices: np.ndarray,
        reasons: list[str],
        limits: list[str],
    ) -> None:
        """Atomically store one batch: ``features[k]`` belongs to listing row ``indices[k]``; rejected rows with their reasons and limits.

        ``features`` is best given as compressed chunks (``chunks.pack``): the part holds them
        as they are, and the final file copies them. Plain rows are stored as they are too.
        """
        name = self.path / f"part-{seq:09d}.npz"
        tmp = self.path / f".part-{seq:09d}.tmp.npz"
        idx = np.asarray(indices, np.int64)
        rej = np.asarray(rejected_indices, np.int64)
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    indices=idx,
                    **_features_fields(features),
                    paths=_encoded([listing.paths[i] for i in idx.tolist()]),
                    versions=listing.versions(idx),
                    rejected_indices=rej,
                    rejected_paths=_encoded([listing.paths[i] for i in rej.tolist()]),
                    rejected_versions=listing.versions(rej),
                    reasons=np.asarray(reasons, dtype=object).astype("U") if reasons else np.zeros(0, "U1"),
                    limits=np.asarray(limits, dtype=object).astype("U") if limits else np.zeros(0, "U1"),
                )
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
        whole parts are ever renamed into place) or that predates this layout is deleted, so
        its rows are extracted again.
        """
        pos = {p: i for i, p in enumerate(listing.paths)}
        taken = np.zeros(len(listing), bool)
        if exclude is not None and len(exclude):
            taken[np.asarray(exclude, np.int64)] = True

        def mapped(paths: np.ndarray, versions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx = np.asarray([pos.get(os.fsdecode(bytes(p)), -1) for p in paths.tolist()], np.int64)
            ok = idx >= 0
            if ok.any():
                ok[ok] = (listing.versions(idx[ok]) == versions[ok]).all(axis=1)
            return idx, ok

        infos = []
        for part in self.parts():
            try:
                with np.load(part) as z:
                    paths, versions, rpaths, rversions = z["paths"], z["versions"], z["rejected_paths"], z["rejected_versions"]
                    reasons, limits = [str(r) for r in z["reasons"].tolist()], [str(x) for x in z["limits"].tolist()]
            except Exception:
                part.unlink(missing_ok=True)
                continue
            idx, ok = mapped(paths, versions)
            ridx, rok = mapped(rpaths, rversions)
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
        """The part's rows that still count: its compressed chunks as they are when they all do,
        else those rows decompressed (parts of plain rows, from before compressed parts, are read too)."""
        with np.load(part.path) as z:
            if "features" in z:
                feats = z["features"]
            else:
                sizes = z["chunk_bytes"]
                data = z["chunk_data"].tobytes()
                ends = np.cumsum(sizes).tolist()
                packed = chunks.Packed(
                    chunks.Layout.from_json(json.loads(str(z["layout"]))),
                    [data[e - k : e] for e, k in zip(ends, sizes.tolist())],
                    z["chunk_rows"].tolist(),
                    bool(z["finite"]),
                )
                if len(part.rows) == len(packed):
                    return packed
                feats = packed.array()
        return feats if len(part.rows) == len(feats) else feats[part.rows]
