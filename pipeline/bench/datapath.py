"""``bench --data-path``: the extraction pipeline end to end with the network replaced by a stub replaying real features, on photo-sized JPEGs: decoding (per core, 1..all cores), compression (per core and on every core), assembly, temporary disk, and the images/s this data path can feed a GPU at 16 cores."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text_atomic
from pipeline.core.outputsets import publish
from pipeline.featurefile import chunks
from pipeline.images.listing import list_images
from pipeline.images.decode import iter_batches
from pipeline.extract.loop import extract_rows
from pipeline.featurefile.store import open_features
from pipeline.featurefile.writer import write_feature_file
from pipeline.extract.workarea import WorkArea

#: The output set this measurement publishes (``core.outputsets``).
FILES = ("data_path.md", "data_path.json")

#: Photo-sized JPEGs: the size of a typical ImageNet/Pascal photo, at a common camera quality.
PHOTO_SIZE = (500, 375)
JPEG_QUALITY = 90
#: Distinct JPEGs generated; the tree holds copies of each (files of their own: the listing keeps one path of a file reached twice), to reach ``IMAGES``.
DISTINCT = 96
IMAGES = 4096
#: The GPU box the capacity is computed for.
TARGET_CORES = 16
GOAL = 5000


def photo(rng: np.random.Generator, size=PHOTO_SIZE):
    """A photo-like RGB image: smooth colour fields, a few hard-edged shapes, fine texture and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(1.2))
    texture = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BILINEAR)
    arr = 0.8 * np.asarray(base, np.float32) + 0.2 * np.asarray(texture, np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_photos(root: Path, images: int = IMAGES, distinct: int = DISTINCT, seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: ``images`` copies of ``distinct`` generated JPEGs (about 50 KB each), two classes."""
    rng = np.random.default_rng(seed)
    src = root.parent / (root.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(distinct):
        f = src / f"{k:04d}.jpg"
        photo(rng).save(f, quality=JPEG_QUALITY)
        files.append(f)
    for i in range(images):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[i % distinct], d / f"{i:06d}.jpg")  # not a hard link: one file under two names is listed once
    return root


class ReplayNet:
    """The network's stand-in: returns real feature rows (cycled) for each batch, in no time."""

    weights_checksum = "replay"

    def __init__(self, rows: np.ndarray, batch_size: int):
        self.rows = np.concatenate([rows] * (1 + -(-batch_size // len(rows)))).astype(np.float32)  # room for any batch
        self.n = len(rows)
        self.output_shape = tuple(rows.shape[1:])
        self.at = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        start = self.at % self.n
        self.at += len(pixels)
        return self.rows[start : start + len(pixels)]  # a view: the stub itself costs nothing


def replay_rows(path: Path, limit: int = 1024) -> tuple[np.ndarray, int]:
    """Up to ``limit`` real feature rows of a feature file, and the input size that made them."""
    with open_features(path) as ff:
        return ff.db["features"][:limit].astype(np.float32), int(ff.attrs.get("input_size", 224))


def _median(values):
    return float(statistics.median(values))


def decode_scaling(listing, size: int, cores: int, per_run: int, repeats: int) -> dict:
    """Decode + resize through the reader with 1..``cores`` threads: images/s of wall time and
    per CPU-second of this process (the per-core rate, fair on a shared machine); medians."""
    out = {}
    for k in range(1, cores + 1):
        n = min(len(listing), per_run * k)
        wall, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            got = sum(int(b.ok.sum()) for b in iter_batches(listing, np.arange(n), size=size, interpolation="bilinear", batch_size=32, workers=k))
            wall.append(got / (time.perf_counter() - t))
            cpu.append(got / (time.process_time() - c))
            if got != n:
                raise PipelineError(f"{listing.root}: {n - got} generated images were rejected")
        out[str(k)] = {"wall": _median(wall), "cpu": _median(cpu)}
    return out


def compression(rows: np.ndarray, cores: int, repeats: int) -> dict:
    """Rows per CPU-second of ``chunks.pack`` (one thread), and rows/s of wall time on ``cores`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    layout = chunks.default_layout(rows.shape[1:], rows.dtype.name)
    batches = [rows[s : s + 32] for s in range(0, len(rows), 32)]
    one, many = [], []
    size = 0
    for _ in range(repeats):
        c = time.thread_time()
        size = sum(chunks.pack(b, layout).nbytes for b in batches)
        one.append(len(rows) / (time.thread_time() - c))
        with ThreadPoolExecutor(cores) as pool:
            t = time.perf_counter()
            list(pool.map(lambda b: chunks.pack(b, layout), batches))
            many.append(len(rows) / (time.perf_counter() - t))
    return {"layout": layout.as_json(), "rows": len(rows), "bytes_per_row": size / len(rows), "per_core": _median(one), "threads": cores, "threads_wall": _median(many)}


#: Layouts compared by ``layouts``: (rows per chunk, gzip level, shuffle).
CANDIDATES = ((16, 1, False), (16, 2, False), (16, 3, False), (16, 4, False), (16, 4, True), (16, 2, True), (8, 2, False), (32, 2, False))


def layouts(rows: np.ndarray, repeats: int) -> list[dict]:
    """Bytes per row and rows per CPU-second of each candidate layout on real rows, interleaved;
    the speed also as a ratio to the default layout's within each repeat (medians)."""
    base = chunks.default_layout(rows.shape[1:], rows.dtype.name)
    found = {c: {"rates": [], "bytes": 0} for c in CANDIDATES}
    ref = []
    for _ in range(repeats):
        for c in (*CANDIDATES, None):
            layout = base if c is None else chunks.Layout(c[0], c[1], c[2], base.dtype, base.row_shape)
            t = time.thread_time()
            size = sum(len(chunks.compress(rows[s : s + layout.rows], layout)) for s in range(0, len(rows) - layout.rows + 1, layout.rows))
            rate = (len(rows) // layout.rows * layout.rows) / (time.thread_time() - t)
            if c is None:
                ref.append(rate)
            else:
                found[c]["rates"].append(rate)
                found[c]["bytes"] = size / (len(rows) // layout.rows * layout.rows)
    return [
        {"rows": c[0], "level": c[1], "shuffle": c[2], "bytes_per_row": v["bytes"], "rows_per_cpu_s": _median(v["rates"]),
         "x_default": _median([a / b for a, b in zip(v["rates"], ref)])}  # fmt: skip
        for c, v in found.items()
    ]


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def assemble(listing, work: WorkArea, out: Path, row_shape, storage: str) -> int:
    """The extract stage's assembly: the work area's parts (chunks copied) into one feature file."""
    parts = work.index(listing)

    def rows():
        for part in parts:
            i = part.indices
            yield WorkArea.features(part), listing.labels[i], [listing.paths[k] for k in i.tolist()], *listing.versions(i).T

    return write_feature_file(out, row_shape=row_shape, storage=storage, class_names=listing.class_names, rows=rows(), rejected=[], attrs={})


def end_to_end(listing, rows: np.ndarray, size: int, tmp: Path, cores: int, repeats: int, batch_size: int) -> dict:
    """Decode -> stub network -> compressed parts -> assembled file, ``repeats`` times: images/s,
    the main thread's CPU per image (the serial part), assembly rows/s (wall and CPU), disk."""
    runs, serial, wall, cpu, temp, final = [], [], [], [], 0, 0
    for r in range(repeats):
        out = tmp / f"run{r}.h5"
        work = WorkArea(out)
        work.start({"bench": "data-path"})
        todo = np.arange(len(listing))
        net = ReplayNet(rows, batch_size)
        c = time.thread_time()
        seconds = extract_rows(
            listing, todo, work, net, input_size=size, batch_size=batch_size, storage="float16", resize="bilinear",
            workers=cores, image_timeout=60.0, progress=False,
        )  # fmt: skip
        serial.append((time.thread_time() - c) / len(todo))
        runs.append(len(todo) / seconds)
        temp = _du(work.path)
        t, c = time.perf_counter(), time.process_time()
        n = assemble(listing, work, out, rows.shape[1:], "float16")
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / (time.process_time() - c))
        final = out.stat().st_size
        work.remove()
        with h5py.File(out, "r") as db:
            if db["features"].shape[0] != len(listing) or len({bytes(p) for p in db["paths"][:]}) != len(listing):
                raise PipelineError(f"{out}: the assembled file does not hold every image exactly once")
        out.unlink()
    return {"batch_size": batch_size, "images_per_s": _median(runs), "serial_cpu_seconds_per_image": _median(serial),
            "assembly_rows_per_s": _median(wall), "assembly_rows_per_cpu_s": _median(cpu),
            "temp_bytes_per_image": temp / len(listing), "final_bytes_per_image": final / len(listing), "temp_over_final": temp / final}  # fmt: skip


def capacity(decode_per_core: float, compress_per_core: float, serial: float, assembly: float, target: int = TARGET_CORES) -> dict:
    """Images/s at ``target`` cores: a pipeline whose parallel stages cost ``1/decode + 1/compress``
    core-seconds per image and whose main thread (the batch loop) costs ``serial`` seconds per
    image on a core of its own; it runs at the slower of the two. Assembly follows the stream:
    a job of N images takes N/stream + N/assembly."""
    per_image = 1.0 / decode_per_core + 1.0 / compress_per_core
    parallel = target / (per_image + serial)
    stream = min(parallel, 1.0 / serial) if serial > 0 else parallel
    shares = {"decode": 1.0 / decode_per_core / per_image, "compress": 1.0 / compress_per_core / per_image}
    return {
        "cores": target, "cpu_seconds_per_image": per_image, "serial_seconds_per_image": serial, "stream_images_per_s": stream,
        "job_images_per_s": 1.0 / (1.0 / stream + 1.0 / assembly), "shares": shares,
        "cap": "the main thread's batch loop" if stream < parallel else max(shares, key=shares.get),
    }  # fmt: skip


def markdown(r: dict) -> str:
    d, c, e, g = r["decode"], r["compression"], r["end_to_end"], r["capacity"]
    one = d["1"]
    lines = [
        f"Data path ({r['machine']}, load average {r['load']:.1f} at the start; {r['images']} photo-like {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs "
        f"at quality {JPEG_QUALITY}; the network replaced by real {'x'.join(map(str, r['row_shape']))} features, {r['zeros']:.0%} zeros; "
        f"medians of {r['repeats']}). Per-core rates are per CPU-second of the stage.",
        "",
        "| stage | figure |",
        "|---|---:|",
        f"| decode + resize to {r['input_size']}, per core | {one['cpu']:,.0f} img/s (wall, 1 thread: {one['wall']:,.0f}) |",
        *(f"| decode + resize, {k} threads, wall | {v['wall']:,.0f} img/s ({v['wall'] / one['wall']:.2f}x one thread) |" for k, v in d.items() if k != "1"),
        f"| compression per core (chunks of {c['layout']['rows']} rows, gzip {c['layout']['level']}, shuffle {'on' if c['layout']['shuffle'] else 'off'}) "
        f"| {c['per_core']:,.0f} rows/s, {c['bytes_per_row']:,.0f} B/row ({c['threads']} threads, wall: {c['threads_wall']:,.0f} rows/s) |",
        f"| end to end (decode, stub, compress, parts), {r['cores']} cores, batch {e['batch_size']}, wall | {e['images_per_s']:,.0f} img/s |",
        f"| main thread (the serial batch loop), CPU per image | {e['serial_cpu_seconds_per_image'] * 1e6:,.0f} us |",
        f"| assembly (chunks copied) | {e['assembly_rows_per_s']:,.0f} rows/s wall, {e['assembly_rows_per_cpu_s']:,.0f} rows per CPU-second |",
        f"| temporary disk | {e['temp_bytes_per_image']:,.0f} B/image, {e['temp_over_final']:.2f}x the final file ({e['final_bytes_per_image']:,.0f} B/image) |",
        f"| **GPU this data path can feed at {g['cores']} cores** | **{g['stream_images_per_s']:,.0f} img/s** "
        f"(a whole job, assembly included: {g['job_images_per_s']:,.0f}); capped by {g['cap']}: decoding is "
        f"{g['shares']['decode']:.0%} of the {g['cpu_seconds_per_image'] * 1e3:.2f} CPU-ms per image |",
    ]
    lines += [
        "",
        "Chunk layouts on the same rows (per CPU-second, speed ratio to the default within each repeat):",
        "",
        "| rows per chunk | gzip level | shuffle | bytes/row | rows/s per core | x default |",
        "|---:|---:|---|---:|---:|---:|",
        *(f"| {x['rows']} | {x['level']} | {'on' if x['shuffle'] else 'off'} | {x['bytes_per_row']:,.0f} | {x['rows_per_cpu_s']:,.0f} | {x['x_default']:.2f} |" for x in r["layouts"]),
    ]
    return "\n".join(lines) + "\n"


def run(replay: Path, output: Path, say, repeats: int = 3, images: int = IMAGES, batch_size: int = 32) -> dict:
    """Measure the data path; write ``data_path.json`` and ``data_path.md`` into ``output``; return the figures.

    Raises:
        PipelineError: ``replay`` is not a readable feature file.
    """
    rows, size = replay_rows(replay)
    rows16 = rows.astype(np.float16)
    cores = chunks.threads()
    result = {"machine": f"{os.uname().machine} {cores} cores", "cores": cores, "load": os.getloadavg()[0], "images": images, "repeats": repeats,
              "input_size": size, "row_shape": list(rows.shape[1:]), "replay": str(replay), "zeros": float((rows16 == 0).mean())}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="datapath-"))
    try:
        say(f"data path: generating {min(DISTINCT, images)} photo-like JPEGs ({images} names)")
        listing = list_images(make_photos(tmp / "photos", images, min(DISTINCT, images)))
        say("data path: decoding at 1.." + str(cores) + " cores")
        result["decode"] = decode_scaling(listing, size, cores, 256, repeats)
        say("data path: compression")
        many = np.concatenate([rows16] * max(1, -(-2048 // len(rows16))))[:2048]
        result["compression"] = compression(many, cores, repeats)
        say("data path: chunk layouts")
        result["layouts"] = layouts(rows16, repeats)
        say("data path: end to end, then assembly")
        result["end_to_end"] = end_to_end(listing, rows, size, tmp, cores, repeats, batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    e = result["end_to_end"]
    result["capacity"] = capacity(result["decode"]["1"]["cpu"], result["compression"]["per_core"], e["serial_cpu_seconds_per_image"], e["assembly_rows_per_cpu_s"])
    output.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    with publish(output, "data_path", FILES, lock="data_path.json", locked=False) as stage:  # both new, or both as before
        write_text_atomic(stage.path("data_path.json"), json.dumps(result, indent=1))
        write_text_atomic(stage.path("data_path.md"), md)
    print(md)
    return result


if __name__ == "__main__":
    raise SystemExit("use: python -m pipeline bench --data-path")
