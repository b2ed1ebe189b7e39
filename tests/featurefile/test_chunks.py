"""Pre-compressed chunks: byte for byte HDF5's own gzip (and shuffle) chunks; a file assembled from them reads, through plain h5py, exactly as one written the old way; work-area parts hold them; kept rows are copied bit for bit; a file of the earlier chunk layout is refused in one line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.featurefile import chunks
from pipeline.featurefile.kept import find_kept, kept_blocks
from pipeline.images.listing import list_images
from pipeline.featurefile.writer import write_feature_file
from pipeline.extract.workarea import WorkArea
from conftest import make_tree

ROW = (7, 7, 8)  # not 512 channels: nothing may assume them


def sparse_features(n: int, seed: int = 0, row=ROW) -> np.ndarray:
    """ReLU-like rows: about 90% zeros, like real VGG16 block5_pool features."""
    rng = np.random.default_rng(seed)
    return (np.maximum(rng.standard_normal((n, *row)), 0) * (rng.random((n, *row)) < 0.2) * 7).astype(np.float16)


def meta(n: int, start: int = 0):
    labels = (np.arange(start, start + n) % 2).astype(np.int64)
    return labels, [f"{'ab'[i % 2]}/{i:04d}.png" for i in range(start, start + n)], np.full(n, 10), np.arange(start, start + n)


def write_old_way(path, feats):
    """The layout before pre-compressed chunks: gzip 4 + shuffle, ~1 MiB chunks, through h5py's filters."""
    with h5py.File(path, "w") as db:
        db.create_dataset("features", data=feats, chunks=(20, *feats.shape[1:]), compression="gzip", compression_opts=4, shuffle=True)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_chunk_is_what_hdf5_stores(tmp_path, shuffle):
    feats = sparse_features(40)
    layout = chunks.Layout(8, 3, shuffle, "float16", ROW)
    with h5py.File(tmp_path / "x.h5", "w") as db:
        ds = db.create_dataset("features", data=feats, **layout.h5_options())
        assert chunks.layout_of(ds) == layout
        for k in range(5):
            mask, raw = ds.id.read_direct_chunk((8 * k, 0, 0, 0))
            assert mask == 0
            assert chunks.compress(feats[8 * k : 8 * k + 8], layout) == raw  # the same bytes
            np.testing.assert_array_equal(chunks.decompress(raw, layout).view(np.uint16), feats[8 * k : 8 * k + 8].view(np.uint16))


def test_default_layout_fits_batches_and_any_row_size():
    small, vgg, wide = (chunks.default_layout(s, "float16") for s in ((1, 1, 512), (7, 7, 512), (7, 7, 2048)))
    assert small.rows == chunks.MAX_ROWS and 32 % small.rows == 0  # a batch of 32 fills whole chunks
    assert vgg.rows * 7 * 7 * 512 * 2 <= chunks.TARGET_CHUNK_BYTES and vgg.rows >= 8
    assert wide.rows < vgg.rows and wide.rows * 7 * 7 * 2048 * 2 <= chunks.TARGET_CHUNK_BYTES
    assert (vgg.level, vgg.shuffle) == (chunks.LEVEL, chunks.SHUFFLE)
    assert chunks.Layout.from_json(vgg.as_json()) == vgg


def test_a_file_assembled_from_precompressed_chunks_reads_like_one_written_the_old_way(tmp_path):
    n = 101  # not a multiple of the chunk rows: a short last chunk
    feats = sparse_features(n, seed=1)
    layout = chunks.default_layout(ROW, "float16")
    # Whole batches of pre-compressed chunks, then a short batch (a part with a rejected file) and plain rows.
    cuts = [0, 32, 64, 77, 96, n]

    def rows():
        for s, e in zip(cuts, cuts[1:]):
            block = chunks.pack(feats[s:e], layout) if e - s != 19 else feats[s:e]
            yield (block, *meta(e - s, s))

    new, old = tmp_path / "new.h5", tmp_path / "old.h5"
    assert write_feature_file(new, row_shape=ROW, storage="float16", class_names=("a", "b"), rows=rows(), rejected=[], attrs={}) == n
    write_old_way(old, feats)
    _, paths, _, _ = meta(n)
    with h5py.File(new, "r") as a, h5py.File(old, "r") as b:
        fa, fb = a["features"], b["features"]
        assert fa.compression == "gzip" and fa.compression_opts == chunks.LEVEL and fa.shuffle == chunks.SHUFFLE
        assert fa.chunks == layout.chunk_shape and fa.shape == fb.shape == (n, *ROW)
        row_of = {p.decode(): k for k, p in enumerate(a["paths"][:])}
        assert sorted(row_of) == sorted(paths)  # every row exactly once
        order = np.asarray([row_of[p] for p in paths])
        np.testing.assert_array_equal(fa[:][order].view(np.uint16), fb[:].view(np.uint16))  # bit for bit
        np.testing.assert_array_equal(a["file_mtimes_ns"][:][order], np.arange(n))  # columns follow their rows
        assert order[:64].tolist() == list(range(64))  # aligned whole chunks keep their place
        for k in (0, 17, 100):  # single rows and slices, as train reads them
            np.testing.assert_array_equal(fa[row_of[paths[k]]], fb[k])


def test_non_finite_precompressed_rows_are_refused(tmp_path):
    layout = chunks.default_layout(ROW, "float16")
    feats = sparse_features(16).astype(np.float32)
    feats[3, 0, 0, 0] = 1e6  # overflows float16
    packed = chunks.pack(feats, layout)
    assert not packed.finite
    with pytest.raises(PipelineError, match=r"x\.h5: non-finite features \(overflow of the float16 storage\?\) in rows 0\.\.16"):
        write_feature_file(tmp_path / "x.h5", row_shape=ROW, storage="float16", class_names=("a", "b"), rows=iter([(packed, *meta(16))]), rejected=[], attrs={})
    assert not (tmp_path / "x.h5").exists()


def test_parts_hold_compressed_chunks(tmp_path):
    listing = list_images(make_tree(tmp_path / "data", per_class=20, size=(6, 6)))
    work = WorkArea(tmp_path / "x.h5")
    work.start({"k": 1})
    layout = chunks.default_layout(ROW, "float16")
    feats = sparse_features(20, seed=3)
    work.write_part(0, listing, np.arange(20), chunks.pack(feats, layout), np.zeros(0, np.int64), [], [])
    [packed_part] = work.index(listing)
    got = WorkArea.features(packed_part)
    assert isinstance(got, chunks.Packed) and got.layout == layout and got.counts == [layout.rows, 20 - layout.rows]
    np.testing.assert_array_equal(got.array().view(np.uint16), feats.view(np.uint16))
    assert (tmp_path / "x.h5.partial" / "part-000000000.part").stat().st_size < feats.nbytes / 2  # compressed on disk
    (listing.root / listing.paths[5]).write_bytes(b"changed")  # one of the part's files changed: the others still count
    changed = list_images(listing.root)
    part = work.index(changed)[0]
    assert 5 not in part.indices.tolist() and len(part.indices) == 19
    np.testing.assert_array_equal(WorkArea.features(part), np.delete(feats, 5, axis=0))


def test_kept_rows_are_copied_bit_for_bit(tmp_path):
    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=30, size=(6, 6))
    listing = list_images(data)
    n = len(listing)
    feats = sparse_features(n, seed=4)
    path = tmp_path / "old.h5"
    rows = iter([(feats, listing.labels, list(listing.paths), *listing.versions(np.arange(n)).T)])
    write_feature_file(path, row_shape=ROW, storage="float16", class_names=listing.class_names, rows=rows, rejected=[], attrs={})
    (data / "a" / "003.png").unlink()  # one row of the first chunk dropped
    after = list_images(data)
    blocks = list(kept_blocks(find_kept(path, after), after))
    packed = [b for b in blocks if isinstance(b.features, chunks.Packed)]
    assert sum(len(b.features) for b in packed) >= n - 2 * chunks.default_layout(ROW, "float16").rows
    out = tmp_path / "new.h5"
    write_feature_file(out, row_shape=ROW, storage="float16", class_names=after.class_names, rows=iter(blocks), rejected=[], attrs={})
    expected = {p: feats[k] for k, p in enumerate(listing.paths) if p != "a/003.png"}
    with h5py.File(out, "r") as db:
        got = dict(zip([p.decode() for p in db["paths"][:]], db["features"][:]))
        assert chunks.layout_of(db["features"]) == chunks.default_layout(ROW, "float16")
    assert set(got) == set(expected)
    for p, f in expected.items():
        np.testing.assert_array_equal(got[p].view(np.uint16), f.view(np.uint16), err_msg=p)


def test_a_file_of_the_earlier_chunk_layout_is_refused_in_one_line(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.core.errors import PipelineError
    from pipeline.featurefile.store import open_features
    from pipeline.featurefile.checks import verify

    data = make_tree(tmp_path / "data", per_class=12, size=(8, 8))
    out = tmp_path / "x.h5"
    fast = ["--weights", "none", "--input-size", "32", "--batch-size", "8", "--quiet"]
    assert main(["extract", str(data), "-o", str(out), *fast]) == 0
    with h5py.File(out, "r+") as db:  # the layout files had before pre-compressed chunks (an earlier version)
        feats = db["features"][:]
        del db["features"]
        db.create_dataset("features", data=feats, maxshape=(None, *feats.shape[1:]), chunks=(20, *feats.shape[1:]), compression="gzip", compression_opts=4, shuffle=True)
    why = "written by another version of the pipeline (features stored in chunks of 20 rows, gzip 4 + shuffle, not the 16 rows, gzip 2 of this version)"
    assert verify(out) == [f"{out}: {why}; extract it again"]
    with pytest.raises(PipelineError) as exc:
        open_features(out)
    assert str(exc.value) == f"{out}: {why}; extract it again"
    capsys.readouterr()
    assert main(["extract", str(data), "-o", str(out), *fast]) == 2
    assert capsys.readouterr().err == f"error: {out}: exists and it was {why}; pass --overwrite to replace it\n"
    assert main(["extract", str(data), "-o", str(out), *fast, "--overwrite"]) == 0
    assert verify(out) == []
