"""bench --data-path: photo-like JPEGs, the replay stub, the end-to-end run (every image once, temporary disk near the final file), the capacity arithmetic, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.bench import datapath
from pipeline.cli import main
from pipeline.images.listing import list_images
from pipeline.featurefile.writer import write_feature_file


def replay_file(path, n=40, row=(1, 1, 16)):
    rng = np.random.default_rng(0)
    feats = (np.maximum(rng.standard_normal((n, *row)), 0) * (rng.random((n, *row)) < 0.2)).astype(np.float32)
    rows = iter([(feats, np.arange(n) % 2, [f"{'ab'[i % 2]}/{i}.png" for i in range(n)], np.ones(n), np.ones(n))])
    write_feature_file(path, row_shape=row, storage="float16", class_names=("a", "b"), rows=rows, rejected=[], attrs={"input_size": 32, "feature_shape": list(row)})
    return path


def test_photos_are_photo_sized_jpegs_and_the_tree_names_them_many_times(tmp_path):
    root = datapath.make_photos(tmp_path / "p", images=10, distinct=3)
    listing = list_images(root)
    assert len(listing) == 10 and listing.class_names == ("a", "b")
    with Image.open(root / listing.paths[0]) as im:
        assert im.format == "JPEG" and im.size == datapath.PHOTO_SIZE
        arr = np.asarray(im.convert("L"), np.float32)
    assert 5 < arr.std() < 120  # neither flat nor white noise
    assert len({(root / p).read_bytes() for p in listing.paths}) == 3 and len({(root / p).stat().st_ino for p in listing.paths}) == 10  # copies, not links


def test_the_stub_replays_real_rows_in_order(tmp_path):
    rows = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 1, 3), np.float32)
    net = datapath.ReplayNet(rows, batch_size=4)
    assert net.output_shape == (1, 1, 3)
    got = np.concatenate([net(np.zeros((4, 8, 8, 3))) for _ in range(3)])[:, 0, 0, 0]
    assert got.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_capacity_is_the_slower_of_the_parallel_stages_and_the_serial_loop():
    # 2 ms of decoding + 0.5 ms of compression per image on 16 cores, 0.1 ms serial: 16 / 2.6 ms.
    c = datapath.capacity(500.0, 2000.0, 1e-4, 20000.0, target=16)
    assert c["stream_images_per_s"] == pytest.approx(16 / 2.6e-3) and c["cap"] == "decode"
    assert c["shares"]["decode"] == pytest.approx(0.8)
    assert c["job_images_per_s"] == pytest.approx(1 / (2.6e-3 / 16 + 1 / 20000))
    slow = datapath.capacity(500.0, 2000.0, 1e-3, 20000.0, target=16)  # 1 ms serial: the loop caps at 1,000 img/s
    assert slow["stream_images_per_s"] == pytest.approx(1000.0) and slow["cap"] == "the main thread's batch loop"


def test_a_small_run_reports_every_figure(tmp_path, capsys):
    replay = replay_file(tmp_path / "replay.h5")
    r = datapath.run(replay, tmp_path / "out", lambda m: None, repeats=1, images=48)
    assert set(r["decode"]) == {str(k) for k in range(1, r["cores"] + 1)}
    assert r["decode"]["1"]["cpu"] > 0 and r["compression"]["per_core"] > 0 and r["compression"]["threads_wall"] > 0
    assert "old_write_feature_file" not in r["compression"]  # no measurement of the writer before pre-compressed chunks
    e = r["end_to_end"]
    assert e["images_per_s"] > 0 and e["assembly_rows_per_s"] > 0
    assert 0 < e["temp_over_final"] <= 1.2  # the parts hold compressed chunks, as the file does
    assert r["capacity"]["stream_images_per_s"] > 0 and r["capacity"]["cap"] in {"decode", "compress", "the main thread's batch loop"}
    assert len(r["layouts"]) == len(datapath.CANDIDATES)
    assert json.loads((tmp_path / "out" / "data_path.json").read_text())["images"] == 48
    md = (tmp_path / "out" / "data_path.md").read_text()
    assert "GPU this data path can feed at 16 cores" in md and md in capsys.readouterr().out


def test_bench_data_path_names_a_missing_replay_file(tmp_path, capsys):
    assert main(["bench", "--data-path", "--replay", str(tmp_path / "none.h5"), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none.h5: feature file does not exist" in err and len(err.strip().splitlines()) == 1
