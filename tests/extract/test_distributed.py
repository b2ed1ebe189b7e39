"""Distributed extraction on a local Ray cluster: the merged result equals a single-process run, a killed worker's shard is retried and resumed."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_rows, ROOT, make_tree
from pipeline.extract import distributed
from pipeline.extract import stage as extract
from pipeline.cli import main
from pipeline.extract.config import ExtractConfig
from pipeline.core.errors import PipelineError
from pipeline.images.listing import list_images
from pipeline.extract.fingerprints import shard_of, shard_path
from pipeline.featurefile.store import open_features
from pipeline.featurefile.checks import stale_sources, verify
from shard_data import without_sharding

FAST = ["--weights", "none", "--input-size", "32", "--batch-size", "4", "--quiet"]


def config(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data_dir=data, output=out, input_size=32, batch_size=4, weights="none", quiet=True, **kw)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster with 2 CPUs for the whole module (starting one takes ~10 s)."""
    import ray  # installed by `make setup` (extra "ray"); missing, this fails loudly

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=80 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 40 images and a broken file, with the single-process reference file."""
    root = tmp_path_factory.mktemp("dist")
    data = make_tree(root / "data", classes=("a", "b", "c"), per_class=40, size=(12, 12))
    (data / "b" / "bad.png").write_bytes(b"")
    reference = root / "single.h5"
    assert main(["extract", str(data), "-o", str(reference), *FAST]) == 0
    return data, reference


@pytest.mark.slow
def test_ray_run_equals_the_single_process_run(cluster, tree, tmp_path, capsys):
    data, reference = tree
    out = tmp_path / "out" / "x.h5"
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    summary = capsys.readouterr().out
    assert "extracted 120 images, rejected 1" in summary and "2 shards on 1 host(s)" in summary and "resumed" not in summary
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.h5", "x.shard-00000-of-00002.h5", "x.shard-00001-of-00002.h5"]
    assert verify(out) == [] and stale_sources(out) == []
    assert_same_rows(out, reference)
    with open_features(out) as ff:
        assert ff.attrs["shards"] == 2 and list(ff.attrs["merged_from"]) == ["x.shard-00000-of-00002.h5", "x.shard-00001-of-00002.h5"]
        # shard 0 first: the files whose path hashes to shard 0, in the order of the sorted listing
        shard0 = [p for p in list_images(data).paths if shard_of(p, 2) == 0 and p != "b/bad.png"]
        assert 0 < len(shard0) < 120 and ff.paths[: len(shard0)] == shard0

    before = out.stat().st_mtime_ns
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    assert "up to date (121 images in 2 shards" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == before

    # A single-process extract over the merged output is refused, not silently redone.
    assert main(["extract", str(data), "-o", str(out), *FAST]) == 2
    assert "shards 2 -> 1" in capsys.readouterr().err


def _kill_mid_shard(out: Path, shard: int, shards: int, after_parts: int, report: dict) -> None:
    """SIGKILL the worker extracting ``shard`` once it has written ``after_parts`` parts (its pid is in the shard's lock)."""
    path = shard_path(out, shard, shards)
    work, lock = path.with_name(path.name + ".partial"), path.with_name(path.name + ".lock")
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list(work.glob("part-*.part"))) >= after_parts and lock.exists():
            pid = int((lock.read_text().split() or ["0"])[0])
            if pid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                while os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.01)
                report["pid"] = pid
                report["parts_at_kill"] = len(list(work.glob("part-*.part")))
                report["finished_before_kill"] = path.exists()
                return
        time.sleep(0.005)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_gives_the_same_file(cluster, tree, tmp_path, capsys):
    data, reference = tree
    out = tmp_path / "x.h5"
    report: dict = {}
    killer = threading.Thread(target=_kill_mid_shard, args=(out, 1, 2, 2, report), daemon=True)
    killer.start()
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    killer.join(timeout=5)
    assert report.get("pid"), "the worker was never killed"
    assert not report["finished_before_kill"], report  # killed mid-shard, after some parts
    assert "shard(s) 1 resumed after an interruption" in capsys.readouterr().out
    assert verify(out) == []
    assert_same_rows(out, reference)
    assert not shard_path(out, 1, 2).with_name("x.shard-00001-of-00002.h5.partial").exists()


def test_refusals_before_any_cluster_work(tree, tmp_path, monkeypatch):
    data, reference = tree
    with pytest.raises(PipelineError, match=r"--shard 1: --ray runs every shard; leave --shard out"):
        extract.run(config(data, tmp_path / "x.h5", shards=2, shard=1, ray=True))
    with pytest.raises(PipelineError, match=r"--ray-workers 0: must be at least 1"):
        extract.run(config(data, tmp_path / "x.h5", ray=True, ray_workers=0))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(PipelineError, match=r"pip install '\.\[ray\]'"):
        extract.run(config(data, tmp_path / "x.h5", ray=True))
    monkeypatch.undo()
    with pytest.raises(PipelineError, match=r"single.h5: exists and it was not made by a sharded extraction; pass --overwrite"):
        extract.run(config(data, reference, ray=True))
    with pytest.raises(PipelineError, match=r"data folder does not exist"):
        extract.run(config(tmp_path / "nope", tmp_path / "x.h5", ray=True))
    for flags in ({"address": "auto"}, {"ray_workers": 2}, {"ray_retries": 5}):  # Ray's flags without --ray
        with pytest.raises(PipelineError, match=r"--address, --ray-workers and --ray-retries only apply with --ray"):
            extract.run(config(data, tmp_path / "x.h5", **flags))
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    "nodes, workers, shards, expected",
    [
        ([{"CPU": 2.0}], None, None, distributed.Placement(1, 1, 2, 0)),  # one task per node, all its cores
        ([{"CPU": 2.0}], 2, None, distributed.Placement(2, 2, 1, 0)),
        ([{"CPU": 16.0}, {"CPU": 8.0}], None, 6, distributed.Placement(2, 6, 8, 0)),
        ([{"CPU": 16.0}, {"CPU": 8.0}], 3, None, distributed.Placement(3, 3, 8, 0)),
        ([{"CPU": 32.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 64.0}], None, None, distributed.Placement(6, 6, 4, 1)),
    ],
    ids=["local-default", "local-2", "two-nodes", "two-nodes-3", "gpus"],
)
def test_plan(nodes, workers, shards, expected):
    assert distributed.place(nodes, workers, shards) == expected


def test_a_locked_shard_is_retried_and_a_user_error_is_not(tree, tmp_path, monkeypatch):
    """Inside a task: a shard still locked (a dead node's lingering NFS lock) raises the retried ShardError."""
    from pipeline.core.outputs import OutputLock

    data, reference = tree
    monkeypatch.setattr(distributed, "LOCK_RETRY_SECONDS", 0.0)
    shard = config(data, shard_path(tmp_path / "x.h5", 0, 2), shards=2, shard=0)
    with OutputLock(shard.output):
        with pytest.raises(distributed.ShardError, match=r"shard 0 on .*: .*another run is writing this output"):
            distributed.run_shard(extract.run, shard, 1)
    result = distributed.run_shard(extract.run, shard, 1)
    n0 = sum(shard_of(p, 2) == 0 for p in list_images(data).paths) - (shard_of("b/bad.png", 2) == 0)
    assert result["shard"] == 0 and result["code"] == 0 and result["rewritten"]
    assert f"extracted {n0} images, rejected {int(shard_of('b/bad.png', 2) == 0)}" in result["summary"]
    assert not distributed.run_shard(extract.run, shard, 1)["rewritten"]  # up to date: left as it was
    with pytest.raises(PipelineError, match=r"exists and differs: storage 'float16' -> 'float32'"):
        distributed.run_shard(extract.run, config(data, shard.output, shards=2, shard=0, storage="float32"), 1)


def test_an_unreachable_address_fails_fast():
    import ray

    t0 = time.time()
    with pytest.raises(PipelineError, match=r"--address 127.0.0.1:9: cannot reach the Ray cluster"):
        distributed._init_ray(ray, "127.0.0.1:9")
    with pytest.raises(PipelineError, match=r"--address nohost: expected HOST:PORT"):
        distributed._init_ray(ray, "nohost")
    assert time.time() - t0 < 15


@pytest.mark.slow
def test_a_changed_folder_is_updated_and_merged_again(cluster, tmp_path, capsys):
    from conftest import write_image

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=6, size=(12, 12))
    out = tmp_path / "x.h5"
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    (data / "a" / "003.png").unlink()
    write_image(data / "b" / "new.png", seed=99)
    (data / "c").mkdir()
    write_image(data / "c" / "000.png", seed=98)
    capsys.readouterr()
    assert extract.run(config(data, out, ray=True)) == 0  # the shard count comes from the existing output
    assert "up to date" not in capsys.readouterr().out
    reference = tmp_path / "single.h5"
    assert main(["extract", str(data), "-o", str(reference), *FAST]) == 0
    assert_same_rows(out, reference)
    assert verify(out) == [] and stale_sources(out) == []
    with open_features(out) as ff:
        assert ff.label_names == ["a", "b", "c"] and len(ff) == 13 and ff.attrs["shards"] == 2


def _name_in_shard(shard: int, shards: int, stem: str, cls: str) -> str:
    """The first ``cls/STEM-i.png`` whose path hashes to ``shard``."""
    return next(f"{cls}/{stem}-{i}.png" for i in range(1000) if shard_of(f"{cls}/{stem}-{i}.png", shards) == shard)


def _identity(path: Path) -> tuple[int, str]:
    """Which file this is: a rewrite is a new file renamed into place, created at another time.
    (Not the modification time: merging opens the shards through the virtual datasets, which touches it.)"""
    return path.stat().st_ino, str(_attr(path, "created"))


@pytest.mark.slow
def test_adding_one_percent_of_the_images_re_extracts_only_those(cluster, tmp_path, capsys):
    """The issue's done-when: 200 images, then 2 more; `extract --ray` extracts the 2 new ones
    only (one in each shard: files stay in their shard), and the result equals a fresh single run."""
    from conftest import assert_recomputed_close, by_path, write_image

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=100, size=(12, 12))
    out = tmp_path / "x.h5"
    shards = [shard_path(out, k, 2) for k in range(2)]
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    first = {p: json.loads(_attr(p, "fingerprint")) for p in shards}
    added = [_name_in_shard(0, 2, "new", "a"), _name_in_shard(1, 2, "new", "b")]
    for seed, rel in enumerate(added):
        write_image(data / rel, size=(12, 12), seed=1000 + seed)
    capsys.readouterr()
    assert extract.run(config(data, out, ray=True, ray_workers=2)) == 0
    assert "extracted 202 images, rejected 0; 2 shards" in capsys.readouterr().out
    for p in shards:
        with open_features(p) as ff:
            assert ff.attrs["images_processed_last_run"] == 1 and ff.attrs["incremental"], p
            assert json.loads(ff.attrs["fingerprint"])["sharding"] == first[p]["sharding"] == "path-hash"
    assert sum(_attr(p, "images_processed_last_run") for p in shards) == len(added)
    with open_features(out) as ff:
        assert ff.attrs["images_processed_last_run"] == 2 and ff.attrs["rows_kept"] == 200 and len(ff) == 202

    reference = tmp_path / "single.h5"
    assert main(["extract", str(data), "-o", str(reference), *FAST]) == 0
    rows, rejected = by_path(out)
    ref_rows, ref_rejected = by_path(reference)
    assert sorted(rows) == sorted(ref_rows) and rejected == ref_rejected  # paths exact
    for p, (label, feats) in ref_rows.items():
        assert rows[p][0] == label, p
        assert_recomputed_close(rows[p][1], feats, err_msg=p)
    assert verify(out) == [] and stale_sources(out) == []

    # One more image, in shard 1: shard 0 extracts nothing, but is rewritten with its rows copied
    # bit for bit, to record the new state of the whole folder (merge refuses shards of two states).
    kept = by_path(shards[0])
    write_image(data / _name_in_shard(1, 2, "later", "a"), size=(12, 12), seed=2000)
    assert extract.run(config(data, out, ray=True)) == 0
    assert _attr(shards[0], "images_processed_last_run") == 0 and _attr(shards[0], "rows_kept") == len(kept[0])
    rows = by_path(shards[0])
    assert rows[1] == kept[1] and sorted(rows[0]) == sorted(kept[0])
    for p, (label, feats) in kept[0].items():
        np.testing.assert_array_equal(rows[0][p][1], feats)
    fps = [json.loads(_attr(p, "fingerprint")) for p in shards]
    assert fps[0]["whole_listing_sha256"] == fps[1]["whole_listing_sha256"] and fps[0]["whole_n_files"] == 203
    assert _attr(shards[1], "images_processed_last_run") == 1
    with open_features(out) as ff:
        assert ff.attrs["images_processed_last_run"] == 1 and ff.attrs["rows_kept"] == 202 and len(ff) == 203


def _attr(path: Path, name: str):
    import h5py

    with h5py.File(path, "r") as db:
        return db.attrs[name]


def test_a_merged_output_of_another_sharding_differs_in_it(tree, tmp_path):
    """A merged file without `sharding` in its fingerprint is not updated in place: `extract --ray`
    names the difference and asks for --overwrite."""
    data, reference = tree
    out = tmp_path / "x.h5"
    shards = [shard_path(out, k, 2) for k in range(2)]
    for k, p in enumerate(shards):
        assert main(["extract", str(data), "-o", str(p), *FAST, "--shards", "2", "--shard", str(k)]) == 0
    assert main(["merge", str(out), *map(str, shards)]) == 0
    without_sharding(out)
    before = _identity(out)
    with pytest.raises(PipelineError, match=r"x.h5: exists and differs: sharding None -> 'path-hash'; pass --overwrite to replace it$"):
        extract.run(config(data, out, ray=True))
    assert _identity(out) == before


def test_a_ray_temporary_folder_that_is_full_or_unusable_is_one_line_before_ray_starts(tree, tmp_path, monkeypatch, capsys):
    """Issue #22: `extract --ray` with TMPDIR on a full disk waited 30 s, then gave Ray's traceback."""
    import shutil
    from collections import namedtuple

    import ray

    data, _ = tree
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever this module started

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "file" / "sub"))
    assert main(["extract", str(data), "-o", str(tmp_path / "x.h5"), *FAST, "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'file' / 'sub'}: Ray's temporary folder is unusable" in err
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(PipelineError, match=rf"{tmp_path}: Ray's temporary folder has 0\.0 MiB free, under the 64 MiB a local cluster needs; set RAY_TMPDIR"):
        extract.run(config(data, tmp_path / "x.h5", ray=True))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.lock").exists()


@pytest.mark.slow
def test_sigterm_to_a_ray_run_is_the_interrupted_message_not_rays_dump(tmp_path):
    """Issue #22: Ray replaced the SIGTERM handler installed before ray.init: its native dump, exit 1/15/143."""
    import subprocess

    data = make_tree(tmp_path / "data", classes=("a", "b"), per_class=150, size=(12, 12))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "pipeline", "extract", str(data), "-o", str(tmp_path / "x.h5"), *FAST[:-1], "--ray", "--ray-workers", "1", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # "ray: 1 node(s), ..." once the cluster is up and the tasks are placed
        lines.append(line)
        if line.startswith("ray: "):
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "interrupted; finished shards are kept and running ones resume" in err and "Traceback" not in err, err


def test_a_users_file_at_a_shard_name_is_never_replaced_even_with_overwrite(tmp_path):
    """Tenth pass (#22): `extract --ray --overwrite -o r.h5` replaced a user's notes at r.shard-00001-of-00002.h5, a name they never gave."""
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.distributed import Placement, shard_configs
    from pipeline.extract.fingerprints import shard_path

    config = ExtractConfig(data_dir=tmp_path, output=tmp_path / "r.h5", ray=True, overwrite=True)
    notes = shard_path(tmp_path / "r.h5", 1, 2)
    notes.write_text("my notes")
    with pytest.raises(PipelineError, match=r"r\.shard-00001-of-00002\.h5: exists and is not a feature file; the --ray run writes shard 1 of"):
        shard_configs(config, Placement(workers=2, shards=2, num_cpus=1, num_gpus=0))
    assert notes.read_text() == "my notes"
    notes.unlink()
    assert [c.output for c in shard_configs(config, Placement(workers=2, shards=2, num_cpus=1, num_gpus=0))] == [shard_path(tmp_path / "r.h5", k, 2) for k in range(2)]
