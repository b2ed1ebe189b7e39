"""Shard identity: which shard a file belongs to, where a shard is written, and the fingerprints that tell whether an output (one shard, a whole run, a merge) is up to date.

A file's shard is a hash of its path relative to the data folder, modulo the number of
shards. It depends on nothing else, so adding or removing images never moves another
image to another shard: after adding 1% of the images, each shard of an ``extract
--ray`` rerun extracts only its own new images, as a single-process update does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.images.listing import Listing
from pipeline.backbones.resolved import ResolvedBackbone

#: How files are assigned to shards; recorded in the fingerprint of every sharded output.
SHARDING = "path-hash"
#: Fingerprint keys that may differ for an incremental update (the images themselves, and
#: where they are: rows are matched by relative path and file version, not by folder).
LISTING_KEYS = ("listing_sha256", "n_files", "class_names", "data_dir", "whole_listing_sha256", "whole_n_files")
#: Digests, never shown one by one in a difference: "the images changed" says it.
_DIGEST_KEYS = ("listing_sha256", "n_files", "whole_listing_sha256", "whole_n_files")
#: Fingerprint keys that differ from shard to shard of one run; every other key must match.
SHARD_LOCAL_KEYS = ("listing_sha256", "n_files", "shard")


def shard_of(path: str, shards: int) -> int:
    """The shard (0-based) of the file at ``path`` (relative to the data folder) among ``shards``.

    blake2b of the path's bytes, modulo ``shards``: stable across runs, machines and
    Python versions, independent of the other files, and even across shards and classes.
    """
    digest = hashlib.blake2b(os.fsencode(path), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def shard_listing(listing: Listing, shards: int, shard: int) -> Listing:
    """The files of ``listing`` that belong to shard ``shard`` of ``shards``, in listing order.

    The files the listing skipped (``listing.skipped``) are assigned the same way, so each
    is rejected in exactly one shard.
    """
    if shards == 1:
        return listing
    keep = np.flatnonzero(np.fromiter((shard_of(p, shards) == shard for p in listing.paths), bool, len(listing)))
    return dataclasses.replace(listing.select(keep), skipped=tuple(r for r in listing.skipped if shard_of(r.path, shards) == shard))


def shard_path(output: Path, shard: int, shards: int) -> Path:
    """Where shard ``shard`` of ``shards`` of ``output`` is written: ``OUT.shard-00003-of-00008.h5``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.shard-{shard:05d}-of-{shards:05d}{output.suffix}")


def fingerprint(
    listing: Listing, backbone: ResolvedBackbone, *, resize: str, storage: str, shards: int, shard: int, whole: Listing | None = None,
) -> dict:
    """Everything that decides the content of an extraction's output: if it is unchanged, so is the file.

    Args:
        listing: the files of this output (one shard's, when sharded).
        backbone: the resolved network: its name, feature layer, preprocessing, input size,
            weights and precision are recorded (an int8 run adds its model's key, ``calibration``).
        resize, storage, shards, shard: the extraction's settings.
        whole: the listing of the whole data folder ``listing`` is a shard of (default ``listing``).

    Returns:
        A JSON-ready dict with the data folder (``data_dir``, fully resolved); a sharded one
        (``shards`` > 1) also records ``sharding`` and the digest and file count of the whole
        listing (``whole_listing_sha256``, ``whole_n_files``), which every shard of one
        extraction shares: ``merge`` refuses shards of other folders or other listings.
    """
    net, weights = backbone.spec, backbone.weights
    fp = {
        "backbone": net.name,
        "layer": net.layer,
        "input_size": backbone.input_size,
        "resize": resize,
        "preprocessing": net.preprocessing,
        "weights": weights.name,
        "weights_checksum": weights.checksum,
        "precision": backbone.precision,
        "storage": storage,
        "class_names": list(listing.class_names),
        "n_files": len(listing) + len(listing.skipped),
        "listing_sha256": listing.digest(),
        "shards": shards,
        "shard": shard,
        "data_dir": os.path.realpath(listing.root),
    }
    if shards > 1:
        whole = listing if whole is None else whole
        fp["sharding"] = SHARDING
        fp["whole_listing_sha256"] = whole.digest()
        fp["whole_n_files"] = len(whole) + len(whole.skipped)
    return fp


def merged_fingerprint(shard_fingerprints: list[dict]) -> dict:
    """The fingerprint of the merge of shards with these fingerprints (in shard order).

    The shards' common settings, plus ``n_files`` (their sum) and ``listing_sha256`` (a
    digest of the shards' listing digests): it changes whenever any shard's images do,
    so ``extract --ray`` can tell an up-to-date merged output without opening a shard.
    """
    first = shard_fingerprints[0]
    h = hashlib.sha256(b"merged shards\n")
    for fp in shard_fingerprints:
        h.update(f"{fp['shard']}:{fp['listing_sha256']}\n".encode())
    out = {k: v for k, v in first.items() if k not in SHARD_LOCAL_KEYS}
    out["n_files"] = int(sum(fp["n_files"] for fp in shard_fingerprints))
    out["listing_sha256"] = h.hexdigest()
    return out


def _whole_listing(fp: dict) -> tuple:
    """The digest and file count of the whole data folder a fingerprint was made from (a shard's records its folder's)."""
    if int(fp.get("shards", 1) or 1) > 1 and "whole_listing_sha256" in fp:
        return fp["whole_listing_sha256"], fp.get("whole_n_files")
    return fp.get("listing_sha256"), fp.get("n_files")


def describe_difference(old: dict, new: dict) -> str:
    """One phrase naming what differs between two fingerprints.

    When the sharding differs (``--shards``, ``--shard``), each file holds other images by
    design: "the images changed" is said only when the whole data folder did.
    """
    resharded = any(old.get(k) != new.get(k) for k in ("shards", "shard"))
    hidden = _DIGEST_KEYS + (("sharding",) if resharded else ())
    diffs = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in new.items() if key not in hidden and old.get(key) != value]
    if resharded:
        (before, n_before), (now, n_now) = _whole_listing(old), _whole_listing(new)
        if before != now:
            diffs.append(f"the images changed ({n_before} files before, {n_now} now, or files modified)")
    elif old.get("listing_sha256") != new["listing_sha256"]:
        diffs.append(f"the images changed ({old.get('n_files')} files before, {new['n_files']} now, or files modified)")
    return "; ".join(diffs) or "nothing"


def same_settings(old: dict | None, new: dict) -> bool:
    """Whether ``old`` differs from ``new`` only in the images (an incremental update can bring it up to date)."""
    return old is not None and all(old.get(k) == v for k, v in new.items() if k not in LISTING_KEYS)


def settings_key(fp: dict) -> str:
    """A digest of a fingerprint's settings (all but the images): equal for two fingerprints exactly when ``same_settings``."""
    return hashlib.sha256(json.dumps({k: v for k, v in fp.items() if k not in LISTING_KEYS}, sort_keys=True).encode()).hexdigest()
