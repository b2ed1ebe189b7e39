"""Ray runner: one extraction's shards as Ray tasks (a GPU each where there are GPUs), retried when a worker dies; the caller says what a task runs.

``extract --ray`` (``pipeline.extract.stage``) decides what needs doing
(``pipeline.extract.plan``), places the shards with ``place`` and hands its config here with
its own ``run`` as the worker: each task calls ``worker(shard_config)`` on one shard file
(``OUT.shard-0000K-of-0000N.h5`` next to ``OUT.h5``). Everything the single-process path
has comes with it per shard: rejects, the lock, incremental updates and resume after a
kill, so a task Ray retries after its worker died carries on from its shard's work area
(``OUT.shard-...h5.partial``).

On a multi-node cluster the data folder and OUT's folder must be shared storage mounted
at the same path on every node and on the driver: the workers read the images and write
the shards there, and the driver lists the images and merges the shards.

Ray is optional (``pip install .[ray]``) and imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.outputs import OutputLock
from pipeline.core.signals import reclaim_sigterm, sigterm_as_interrupt
from pipeline.extract.config import RAY_RETRIES, ExtractConfig
from pipeline.extract.fingerprints import shard_listing, shard_path
from pipeline.extract.workarea import WorkArea
from pipeline.images.listing import Listing

#: How long a retried shard waits when it finds its shard still locked before trying again:
#: after a node dies, its lock on shared storage (NFS) lingers until the server's lease expires.
LOCK_RETRY_SECONDS = 30.0


class ShardError(Exception):
    """A shard task failed with an unexpected (possibly transient) error: Ray retries it.

    User errors (``PipelineError``: bad settings, a locked or unwritable output, a full
    disk) are not retried; they fail the same way every time.
    """


def import_ray():
    """The ``ray`` module; PipelineError naming the optional extra if it is not installed."""
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


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def run_shard(worker: Callable[[object], int], config, threads: int) -> dict:
    """The body of one shard task, run in a Ray worker: ``worker(config)`` on one shard file.

    Args:
        worker: the stage's ``run`` (an int exit status; 130 when interrupted).
        config: the shard's config (``config.output`` is the shard file, ``config.shard`` its index).
        threads: the task's share of the node's cores.

    Returns:
        A summary dict: shard, output (the shard file), code, summary (what the worker printed),
        host, pid, resumed_parts, seconds, and rewritten (whether the shard file was written by this task).

    Raises:
        PipelineError: a user error (not retried).
        ShardError: anything else (retried by Ray), also a shard still locked by another attempt.
    """
    _limit_threads(threads)
    resumed = len(WorkArea(config.output).parts())  # > 0: an earlier attempt was killed
    before = _identity(config.output)
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):  # the driver prints one summary for all shards
            code = worker(config)
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
        "output": config.output,
        "code": code,
        "summary": out.getvalue().strip(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "resumed_parts": resumed,
        "seconds": time.perf_counter() - t0,
        "rewritten": _identity(config.output) != before,  # an up-to-date shard is left as it was
    }


def _locked(output: Path) -> bool:
    try:
        with OutputLock(output):
            return False
    except PipelineError:
        return True


@dataclass(frozen=True)
class Placement:
    """How the shards are placed on the cluster."""

    workers: int  # shard tasks running at once
    shards: int
    num_cpus: int  # per task
    num_gpus: int  # per task (0 or 1)


def place(nodes: list[dict], workers: int | None, shards: int | None) -> Placement:
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
        return Placement(workers, shards or workers, cpus, 1)
    node_cpus = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1]
    if not node_cpus:
        raise PipelineError("the Ray cluster has no CPU or GPU to run tasks on")
    if workers is None:
        workers = len(node_cpus)
        cpus = min(node_cpus)
    else:
        cpus = max(1, min(max(node_cpus), sum(node_cpus) // workers))
    return Placement(workers, shards or workers, cpus, 0)


def alive_nodes(ray) -> list[dict]:
    """The Ray resources (``{"CPU": 8.0, "GPU": 1.0, ...}``) of every alive node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _approx_done(paths: list[Path], finished: dict[int, int], batch_size: int, sizes: list[int]) -> int:
    """Images done so far: exact for finished shards, parts x batch size for running ones."""
    done = 0
    for k, p in enumerate(paths):
        if k in finished:
            done += finished[k]
        else:
            try:
                done += min(sizes[k], batch_size * len(WorkArea(p).parts()))
            except OSError:
                pass
    return done


@contextlib.contextmanager
def cluster(ray, address: str | None) -> Iterator[None]:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local cluster shut down at the end.

    A running ``ray.init`` in this process is reused. Inside the block a SIGTERM stops like
    Ctrl-C (a ``KeyboardInterrupt``): tasks cancelled, work areas kept, our cluster shut down.
    """
    started = False
    try:
        with sigterm_as_interrupt():
            if not ray.is_initialized():
                try:
                    started = _init_ray(ray, address)
                except BaseException:
                    if ray.is_initialized():  # interrupted half-way: stop what was started
                        ray.shutdown()
                    raise
                finally:
                    reclaim_sigterm()  # ray.init installs its own SIGTERM handler (an immediate exit with Ray's dump)
            yield
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), auto, or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PipelineError(f"--address {address}: cannot reach the Ray cluster ({exc.strerror or exc}); is `ray start --head` running there?") from None


#: Free space a local cluster needs in its temporary folder (session files, logs, sockets): with
#: less, Ray's start-up waits 30 s for a file it cannot write and fails with a traceback.
RAY_TMP_BYTES = 64 * 1024**2


def ray_temp_dir() -> Path:
    """Where a local Ray cluster writes its session (``$RAY_TMPDIR``, else ``$TMPDIR``, else /tmp: Ray's own rule on Linux)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp")


def check_ray_temp(need: int = RAY_TMP_BYTES) -> None:
    """Refuse to start a local cluster whose temporary folder is unusable or nearly full: PipelineError naming it, its free space and the way out."""
    folder, how = ray_temp_dir(), "set RAY_TMPDIR (or TMPDIR) to a folder with room"
    try:
        free = shutil.disk_usage(os.path.join(folder, "")).free  # the trailing separator: a file there is "Not a directory"
    except OSError as exc:
        raise PipelineError(f"{folder}: Ray's temporary folder is unusable ({exc.strerror or exc}); {how}") from None
    if free < need:
        raise PipelineError(f"{folder}: Ray's temporary folder has {free / 1024**2:.1f} MiB free, under the {need / 1024**2:.0f} MiB a local cluster needs; {how}")


def _init_ray(ray, address: str | None) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local cluster; True if we started one."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # Ray itself keeps retrying an unreachable address for minutes
    if not address:
        check_ray_temp()
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
    except (OSError, RuntimeError) as exc:  # a temporary folder that filled up meanwhile, a raylet that did not start
        where = f"at {address}" if address else f"locally (temporary folder {ray_temp_dir()})"
        raise PipelineError(f"Ray could not start {where}: {first_line(exc)}") from None


def shard_configs(config: ExtractConfig, p: Placement) -> list[ExtractConfig]:
    """The config of each shard of a ``--ray`` run: a quiet single-process extract of one shard file, on the task's share of the cores.

    Raises:
        PipelineError: a shard's name holds something that is not an HDF5 file (a user's file: ``--overwrite`` names the output, not it).
    """
    for k in range(p.shards):
        path = shard_path(config.output, k, p.shards)
        if os.path.lexists(path) and (not path.is_file() or path.is_symlink() or not h5py.is_hdf5(path)):
            raise PipelineError(f"{path}: exists and is not a feature file; the --ray run writes shard {k} of {config.output} there: move it out")
    return [
        dataclasses.replace(
            config, output=shard_path(config.output, k, p.shards), shards=p.shards, shard=k, ray=False, address=None,
            ray_workers=None, ray_retries=RAY_RETRIES, quiet=True, strict=False, workers=config.workers or p.num_cpus,
        )  # fmt: skip
        for k in range(p.shards)
    ]


def run_shards(ray, worker: Callable[[ExtractConfig], int], config: ExtractConfig, listing: Listing, p: Placement) -> list[dict]:
    """Run ``worker`` on every shard of ``config`` (``shard_configs``) as Ray tasks placed by ``p``; wait for all.

    Args:
        ray: the ``ray`` module, initialised (see ``cluster``).
        worker: the stage's ``run``; importable by the workers (Ray sends it by reference).
        config: the ``--ray`` run's settings: ``ray_retries`` are the attempts after the first
            for a shard whose worker died or failed with an unexpected error (user errors are
            not retried); ``batch_size`` and ``quiet`` set the progress bar.
        listing: the files of the whole run, counted per shard for the progress bar.
        p: the placement (``place``): shards, and resources per task.

    Returns:
        Each shard's ``run_shard`` summary, in shard order.

    Raises:
        PipelineError: some shards still failed after their retries (the others are kept).
        KeyboardInterrupt: the pending tasks were cancelled (they keep their work areas).
    """
    from pipeline.core.progress import progress

    configs, retries, batch_size = shard_configs(config, p), config.ray_retries, config.batch_size
    sizes = [len(shard_listing(listing, p.shards, k)) for k in range(p.shards)]
    task = ray.remote(run_shard).options(
        num_cpus=p.num_cpus,
        num_gpus=p.num_gpus,
        max_retries=retries,  # worker or node died: rerun (the shard resumes from its work area)
        retry_exceptions=[ShardError],
        name="extract_shard",
    )
    paths = [c.output for c in configs]
    pending = {task.remote(worker, c, p.num_cpus): k for k, c in enumerate(configs)}
    results: dict[int, dict] = {}
    failures: list[str] = []
    finished: dict[int, int] = {}
    bar = progress(sum(sizes), "extract (ray)", quiet=config.quiet)
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
                    failures.append(f"shard {k}: {type(exc).__name__} after {retries} retries: {first_line(exc)}")
            bar.n = _approx_done(paths, finished, batch_size, sizes)
            bar.set_postfix(shards=f"{len(finished)}/{len(configs)}", refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: extract keeps its work area
        raise
    finally:
        bar.close()
    if failures:
        raise PipelineError(
            f"{len(failures)} of {len(configs)} shards failed: {'; '.join(failures)}; "
            "the other shards are kept: fix the cause and run the same command again"
        )
    return [results[k] for k in range(len(configs))]
