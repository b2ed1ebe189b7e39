"""Distributed extraction on a local Ray cluster: the merged result equals a single-process run, a killed worker's shard is retried and resumed."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_same_rows, ROOT, make_tree
from pipeline.extraction import distributed
from pipeline.cli import main
from pipeline.extraction.extract import ExtractConfig
from pipeline.core.errors import PipelineError
from pipeline.extraction.merge import shard_path, stale_sources
from pipeline.extraction.store import open_features, verify

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
    assert distributed.run_ray(config(data, out), None, 2) == 0
    summary = capsys.readouterr().out
    assert "extracted 120 images, rejected 1" in summary and "2 shards on 1 host(s)" in summary and "resumed" not in summary
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.h5", "x.shard-00000-of-00002.h5", "x.shard-00001-of-00002.h5"]
    assert verify(out) == [] and stale_sources(out) == []
    assert_same_rows(out, reference)
    with open_features(out) as ff:
        assert ff.attrs["shards"] == 2 and list(ff.attrs["merged_from"]) == ["x.shard-00000-of-00002.h5", "x.shard-00001-of-00002.h5"]
        assert ff.paths[:3] == ["a/000.png", "a/002.png", "a/004.png"]  # shard 0 first: every 2nd file of the sorted listing

    before = out.stat().st_mtime_ns
    assert distributed.run_ray(config(data, out), None, 2) == 0
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
        if len(list(work.glob("part-*.npz"))) >= after_parts and lock.exists():
            pid = int(lock.read_text().strip() or 0)
            if pid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                while os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.01)
                report["pid"] = pid
                report["parts_at_kill"] = len(list(work.glob("part-*.npz")))
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
    assert distributed.run_ray(config(data, out), None, 2) == 0
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
        distributed.run_ray(config(data, tmp_path / "x.h5", shards=2, shard=1))
    with pytest.raises(PipelineError, match=r"--ray-workers 0: must be at least 1"):
        distributed.run_ray(config(data, tmp_path / "x.h5"), None, 0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(PipelineError, match=r"pip install '\.\[ray\]'"):
        distributed.run_ray(config(data, tmp_path / "x.h5"))
    monkeypatch.undo()
    with pytest.raises(PipelineError, match=r"single.h5: exists and it was not made by a sharded extraction; pass --overwrite"):
        distributed.run_ray(config(data, reference))
    with pytest.raises(PipelineError, match=r"data folder does not exist"):
        distributed.run_ray(config(tmp_path / "nope", tmp_path / "x.h5"))


@pytest.mark.parametrize(
    "nodes, workers, shards, expected",
    [
        ([{"CPU": 2.0}], None, None, distributed.Plan(1, 1, 2, 0)),  # one task per node, all its cores
        ([{"CPU": 2.0}], 2, None, distributed.Plan(2, 2, 1, 0)),
        ([{"CPU": 16.0}, {"CPU": 8.0}], None, 6, distributed.Plan(2, 6, 8, 0)),
        ([{"CPU": 16.0}, {"CPU": 8.0}], 3, None, distributed.Plan(3, 3, 8, 0)),
        ([{"CPU": 32.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 64.0}], None, None, distributed.Plan(6, 6, 4, 1)),
    ],
    ids=["local-default", "local-2", "two-nodes", "two-nodes-3", "gpus"],
)
def test_plan(nodes, workers, shards, expected):
    assert distributed.plan(nodes, workers, shards) == expected


def test_a_locked_shard_is_retried_and_a_user_error_is_not(tree, tmp_path, monkeypatch):
    """Inside a task: a shard still locked (a dead node's lingering NFS lock) raises the retried ShardError."""
    from pipeline.core.outputs import OutputLock

    data, reference = tree
    monkeypatch.setattr(distributed, "LOCK_RETRY_SECONDS", 0.0)
    shard = config(data, shard_path(tmp_path / "x.h5", 0, 2), shards=2, shard=0)
    with OutputLock(shard.output):
        with pytest.raises(distributed.ShardError, match=r"shard 0 on .*: .*another run is writing this output"):
            distributed.extract_shard(shard, 1)
    result = distributed.extract_shard(shard, 1)
    assert result["shard"] == 0 and result["code"] == 0 and "extracted 60 images, rejected 1" in result["summary"]
    with pytest.raises(PipelineError, match=r"exists and differs: storage 'float16' -> 'float32'"):
        distributed.extract_shard(config(data, shard.output, shards=2, shard=0, storage="float32"), 1)


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
    assert distributed.run_ray(config(data, out), None, 2) == 0
    (data / "a" / "003.png").unlink()
    write_image(data / "b" / "new.png", seed=99)
    (data / "c").mkdir()
    write_image(data / "c" / "000.png", seed=98)
    capsys.readouterr()
    assert distributed.run_ray(config(data, out)) == 0  # the shard count comes from the existing output
    assert "up to date" not in capsys.readouterr().out
    reference = tmp_path / "single.h5"
    assert main(["extract", str(data), "-o", str(reference), *FAST]) == 0
    assert_same_rows(out, reference)
    assert verify(out) == [] and stale_sources(out) == []
    with open_features(out) as ff:
        assert ff.label_names == ["a", "b", "c"] and len(ff) == 13 and ff.attrs["shards"] == 2
