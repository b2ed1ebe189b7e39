"""Distributed extraction: the shards of one extraction as Ray tasks (a GPU each where there are GPUs), retried, then merged.

``python -m pipeline extract DATA -o OUT.h5 --ray [--address ADDR] [--ray-workers N]``
splits the sorted listing into N shards (every N-th file, as ``--shards N --shard K``),
runs each as a Ray task that calls ``pipeline.extraction.extract.run`` on
``OUT.shard-0000K-of-0000N.h5`` next to ``OUT.h5``, and merges the shards into ``OUT.h5``
(``pipeline.extraction.merge``). Everything the single-process path has comes with it per shard:
rejects, the lock, incremental updates and resume after a kill, so a task Ray retries
after its worker died carries on from its shard's work area (``OUT.shard-...h5.partial``).

On a multi-node cluster the data folder and OUT's folder must be shared storage mounted
at the same path on every node and on the driver: the workers read the images and write
the shards there, and the driver lists the images and merges the shards.

Ray is optional (``pip install .[ray]``) and imported only here, only when used.
"""

from __future__ import annotations

import dataclasses

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.extraction.extract import ExtractConfig
from pipeline.core.errors import PipelineError
from pipeline.extraction.extract import summarize
from pipeline.extraction.merge import merge_locked, merged_fingerprint, shard_path, stale_sources

#: Default retries of a shard whose worker died or failed with an unexpected error.
DEFAULT_RETRIES = 3
#: How long a retried shard waits when it finds its shard still locked before trying again:
#: after a node dies, its lock on shared storage (NFS) lingers until the server's lease expires.
LOCK_RETRY_SECONDS = 30.0


class ShardError(Exception):
    """A shard task failed with an unexpected (possibly transient) error: Ray retries it.

    User errors (``PipelineError``: bad settings, a locked or unwritable output, a full
    disk) are not retried; they fail the same way every time.
    """


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PipelineError("--ray needs Ray, an optional extra: pip install '.[ray]' (make setup installs it)") from None
    return ray


def _limit_threads(threads: int) -> None:
    """Keep a task to its share of the node's cores (several tasks share a node)."""
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # TensorFlow already started in this (reused) worker process: it keeps its first setting


def extract_shard(config: ExtractConfig, threads: int) -> dict:
    """The body of one shard task, run in a Ray worker: ``extract.run`` on one shard file.

    Returns a summary dict; raises ``PipelineError`` for user errors (not retried) and
    ``ShardError`` for anything else (retried by Ray).
    """
    from pipeline.extraction import extract
    from pipeline.extraction.store import WorkArea

    _limit_threads(threads)
    resumed = len(WorkArea(config.output).parts())  # > 0: an earlier attempt was killed
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):  # the driver prints one summary for all shards
            code = extract.run(config)
    except PipelineError as exc:
        if _locked(config.output):
            # Another attempt holds the shard: a dead node's lingering lock, or a slow earlier attempt.
            # Never write beside it; wait, then let Ray retry.
            time.sleep(LOCK_RETRY_SECONDS)
            raise ShardError(f"shard {config.shard} on {socket.gethostname()}: {exc}") from None
        raise
    except Exception as exc:
        raise ShardError(f"shard {config.shard} on {socket.gethostname()}: {type(exc).__name__}: {exc}") from None
    if code == 130:  # SIGTERM (node drained, task cancelled): the work area is kept
        raise ShardError(f"shard {config.shard} on {socket.gethostname()} was interrupted")
    return {
        "shard": config.shard,
        "code": code,
        "summary": out.getvalue().strip(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "resumed_parts": resumed,
        "seconds": time.perf_counter() - t0,
    }


def _locked(output: Path) -> bool:
    from pipeline.core.outputs import OutputLock

    try:
        with OutputLock(output):
            return False
    except PipelineError:
        return True


@dataclass(frozen=True)
class Plan:
    """How the shards are laid out on the cluster."""

    workers: int  # shard tasks running at once
    shards: int
    num_cpus: int  # per task
    num_gpus: int  # per task (0 or 1)


def plan(nodes: list[dict], workers: int | None, shards: int | None) -> Plan:
    """Choose tasks' resources from the alive nodes' Ray resources.

    With GPUs: one GPU per task, the GPU nodes' CPUs split evenly among their GPUs, one
    task per GPU by default. Without: by default one task per node using all its CPUs
    (TensorFlow already spreads one network call over every core); ``workers`` tasks
    share the cluster's CPUs evenly otherwise. ``shards`` defaults to ``workers``.
    """
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    if gpu_nodes:
        n_gpus = sum(int(r["GPU"]) for r in gpu_nodes)
        cpus = max(1, min(int(r.get("CPU", 1)) // int(r["GPU"]) for r in gpu_nodes))
        workers = workers or n_gpus
        return Plan(workers, shards or workers, cpus, 1)
    node_cpus = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1]
    if not node_cpus:
        raise PipelineError("the Ray cluster has no CPU or GPU to run tasks on")
    if workers is None:
        workers = len(node_cpus)
        cpus = min(node_cpus)
    else:
        cpus = max(1, min(max(node_cpus), sum(node_cpus) // workers))
    return Plan(workers, shards or workers, cpus, 0)


def _expected_fingerprint(config: ExtractConfig, listing, shards: int, weights, precision: str) -> dict:
    from pipeline.extraction.extract import fingerprint, shard_listing

    fps = [
        fingerprint(dataclasses.replace(config, shards=shards, shard=k), shard_listing(listing, shards, k), weights, precision)
        for k in range(shards)
    ]
    return merged_fingerprint(fps)


def _read_existing(output: Path) -> tuple[dict | None, int | None, bool]:
    """(fingerprint, shard count, is a merged file) of a complete existing output."""
    import json

    import h5py

    try:
        with h5py.File(output, "r") as db:
            if not bool(db.attrs.get("complete", False)):
                return None, None, False
            fp = json.loads(db.attrs["fingerprint"])
            return fp, int(fp.get("shards", 1)), "merged_from" in db.attrs
    except Exception:
        return None, None, False


def _approx_done(paths: list[Path], finished: dict[int, int], batch_size: int, sizes: list[int]) -> int:
    """Images done so far: exact for finished shards, parts x batch size for running ones."""
    done = 0
    for k, p in enumerate(paths):
        if k in finished:
            done += finished[k]
        else:
            work = p.with_name(p.name + ".partial")
            try:
                done += min(sizes[k], batch_size * sum(1 for _ in work.glob("part-*.npz")))
            except OSError:
                pass
    return done


def run_ray(config: ExtractConfig, address: str | None = None, workers: int | None = None, *, retries: int = DEFAULT_RETRIES) -> int:
    """Extract ``config.data_dir`` into ``config.output`` with shard tasks on a Ray cluster, then merge.

    Args:
        config: the extraction settings; ``config.shards`` > 1 sets the number of shards
            (default: the existing merged output's, else one per worker); ``config.shard``
            must be 0.
        address: a Ray cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``);
            default ``$RAY_ADDRESS``, else a local cluster over this machine's CPUs and
            GPUs, shut down at the end. A running ``ray.init`` in this process is reused.
        workers: shard tasks at once (default: one per GPU, else one per node).
        retries: attempts after the first for a shard whose worker died or failed with
            an unexpected error (user errors are not retried).

    Returns:
        0 when done or up to date, 1 with ``config.strict`` and rejects, 130 when
        interrupted (run again to resume: finished shards are kept, running ones resume).

    Raises:
        PipelineError: Ray missing, bad settings or data folder, an output made with other
            settings (without ``overwrite``), a shard still failing after its retries.
    """
    from pipeline.extraction.extract import _check_output_writable, describe_difference
    from pipeline.extraction.reader import list_images
    from pipeline.core.outputs import OutputLock
    from pipeline.extraction.weights import resolve_weights

    config.validate()
    if config.shard != 0:
        raise PipelineError(f"--shard {config.shard}: --ray runs every shard; leave --shard out")
    if workers is not None and workers < 1:
        raise PipelineError(f"--ray-workers {workers}: must be at least 1")
    if retries < 0:
        raise PipelineError(f"--ray-retries {retries}: must be 0 or more")
    ray = _import_ray()
    # Workers may run elsewhere and in another folder: send absolute paths.
    config = dataclasses.replace(config, data_dir=Path(os.path.abspath(config.data_dir)), output=Path(os.path.abspath(config.output)))
    output = config.output
    say = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))
    listing = list_images(config.data_dir)  # a bad data folder fails here, before any cluster starts
    _check_output_writable(output)
    with OutputLock(output):
        old, old_shards, old_merged = _read_existing(output) if output.exists() else (None, None, False)
        requested_shards = config.shards if config.shards > 1 else (old_shards if old_merged else None)
        weights = resolve_weights(config.weights, progress=not config.quiet)
        if old is not None and requested_shards:
            # "auto" precision is resolved on the workers (they may have GPUs the driver lacks): take the file's.
            precision = old.get("precision") if config.precision == "auto" else config.precision
            expected = _expected_fingerprint(config, listing, requested_shards, weights, precision)
            if old == expected and old_merged and not stale_sources(output):
                print(f"{output}: up to date ({len(listing)} images in {requested_shards} shards, nothing changed)")
                return 0
            same_settings = all(old.get(k) == v for k, v in expected.items() if k not in ("listing_sha256", "n_files", "class_names"))
            if not config.overwrite and not (old_merged and same_settings):
                why = describe_difference(old, expected)
                raise PipelineError(f"{output}: exists and differs: {why}; pass --overwrite to replace it")
        elif output.exists() and not config.overwrite:
            why = "it is not a complete feature file" if old is None else "it was not made by a sharded extraction"
            raise PipelineError(f"{output}: exists and {why}; pass --overwrite to replace it")

        started = False
        previous = signal.getsignal(signal.SIGTERM)
        in_main = threading.current_thread() is threading.main_thread()
        try:
            if in_main:  # a SIGTERM stops like Ctrl-C: tasks cancelled, work areas kept, our cluster shut down
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            if not ray.is_initialized():
                started = _init_ray(ray, address)
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            p = plan(nodes, workers, requested_shards)
            say(
                f"ray: {len(nodes)} node(s), {p.shards} shards, {p.workers} at once, "
                f"{'1 GPU + ' if p.num_gpus else ''}{p.num_cpus} CPU(s) per task"
            )
            results = _run_shards(ray, config, listing, p, retries)
        except KeyboardInterrupt:
            print(
                f"interrupted; finished shards are kept and running ones resume: run the same command again to finish {output}",
                file=sys.stderr,
            )
            return 130
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            if started:
                ray.shutdown()
        paths = [shard_path(output, k, p.shards) for k in range(p.shards)]
        t0 = time.perf_counter()
        n, n_rej = merge_locked(output, paths, overwrite=True, command_line=config.command_line)
        merge_seconds = time.perf_counter() - t0
    resumed = [r["shard"] for r in results if r["resumed_parts"]]
    wall = max((r["seconds"] for r in results), default=0.0)
    detail = (
        f"{p.shards} shard{'s' if p.shards > 1 else ''} on {len({r['host'] for r in results})} host(s), longest {wall:.1f} s"
        + (f", shard(s) {', '.join(map(str, resumed))} resumed after an interruption" if resumed else "")
        + f"; merged in {merge_seconds:.1f} s"
    )
    return summarize(output, n, n_rej, detail, config.strict)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), auto, or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PipelineError(f"--address {address}: cannot reach the Ray cluster ({exc.strerror or exc}); is `ray start --head` running there?") from None


def _init_ray(ray, address: str | None) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local cluster; True if we started one."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # Ray itself keeps retrying an unreachable address for minutes
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            return False
        # Workers of a local cluster import this package from the same place as the driver.
        root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
        ray.init(
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            # Tasks pass only small summaries: a small object store saves shared memory.
            object_store_memory=128 * 1024**2,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}},
        )
        return True
    except ConnectionError as exc:
        raise PipelineError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _run_shards(ray, config: ExtractConfig, listing, p: Plan, retries: int) -> list[dict]:
    from tqdm import tqdm

    from pipeline.extraction.extract import shard_listing

    task = ray.remote(extract_shard).options(
        num_cpus=p.num_cpus,
        num_gpus=p.num_gpus,
        max_retries=retries,  # worker or node died: rerun (the shard resumes from its work area)
        retry_exceptions=[ShardError],
        name="extract_shard",
    )
    paths = [shard_path(config.output, k, p.shards) for k in range(p.shards)]
    sizes = [len(shard_listing(listing, p.shards, k)) for k in range(p.shards)]
    pending = {}
    for k in range(p.shards):
        shard_config = dataclasses.replace(
            config, output=paths[k], shards=p.shards, shard=k, quiet=True, strict=False, workers=config.workers or p.num_cpus
        )
        pending[task.remote(shard_config, p.num_cpus)] = k
    results: dict[int, dict] = {}
    failures: list[str] = []
    finished: dict[int, int] = {}
    bar = tqdm(total=len(listing), unit="img", desc="extract (ray)", disable=config.quiet, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                k = pending.pop(ref)
                finished[k] = sizes[k]
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause
                    if isinstance(cause, PipelineError):
                        failures.append(f"shard {k}: {cause}")
                    else:
                        failures.append(f"shard {k}: {cause} (after {retries} retries)")
                except ray.exceptions.RayError as exc:  # worker or node died on every attempt
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    failures.append(f"shard {k}: {type(exc).__name__} after {retries} retries: {first}")
            bar.n = _approx_done(paths, finished, config.batch_size, sizes)
            bar.set_postfix(shards=f"{len(finished)}/{p.shards}", refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: extract keeps its work area
        raise
    finally:
        bar.close()
    if failures:
        raise PipelineError(
            f"{len(failures)} of {p.shards} shards failed: {'; '.join(failures)}; "
            "the other shards are kept: fix the cause and run the same command again"
        )
    return [results[k] for k in range(p.shards)]
