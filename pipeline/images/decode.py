"""Image decoding: one file into resized RGB pixels (or a ``RejectedImage`` saying why not), the limits a file can be rejected by, and batches decoded in parallel ahead of the network, each row keeping its listing index."""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.core.errors import PipelineError
from pipeline.images.listing import Listing

# Never let Pillow pad a truncated file with grey: a truncated image is a reject.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: The Pillow formats a file's content may have, whatever its supported extension (Pillow's
#: JPEG opener also reads multi-picture MPO files). Other formats Pillow knows (PostScript,
#: PSD, ICO, ...) are not tried: they are rejected as "not an image".
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
#: Larger files are rejected unread: no image this pipeline can use is anywhere near it.
MAX_FILE_BYTES = 512 * 1024 * 1024


class RejectedImage(Exception):
    """A single file that cannot be used; its message is the reason recorded in ``rejected/reasons``.

    ``limit`` names the limit that caused it (``"image_timeout=60.0"``, ``"max_file_bytes=..."``),
    empty for a rejection of the file's content: a run retries a limit's rejections when that
    limit changes (``limits``), and keeps the others while the file is unchanged.
    """

    def __init__(self, reason: str, limit: str = ""):
        super().__init__(reason)
        self.limit = limit


def limits(image_timeout: float) -> dict[str, str]:
    """The current value of every limit a file can be rejected by, as recorded in ``Reject.limit`` (``name=value``)."""
    return {
        "image_timeout": repr(float(image_timeout)),
        "max_file_bytes": str(MAX_FILE_BYTES),
        "max_image_pixels": str(Image.MAX_IMAGE_PIXELS),
    }


def limit_holds(limit: str, current: dict[str, str]) -> bool:
    """Whether a rejection caused by ``limit`` would happen again under the ``current`` limits (a content rejection, ``""``, always does)."""
    if not limit:
        return True
    name, _, value = limit.partition("=")
    return current.get(name) == value


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: 16-bit grey is rescaled (not clipped); float grey is rounded and clipped to 0..255, as Pillow's own conversion (and so ``keras.utils.load_img``) does, so a float image in 0..1 reads nearly black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def network_image(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """A decoded image as the network takes it: turned by its EXIF orientation, 8-bit RGB (``_to_rgb``), one Pillow resize to ``size``."""
    img = _to_rgb(ImageOps.exif_transpose(img))
    if img.size != (size, size):
        img = img.resize((size, size), getattr(Image.Resampling, interpolation.upper()))
    return img


def portable_reader() -> str:
    """Python source (Pillow and numpy only) of ``load_pixels(path, size, resize)``: the pixels ``load_image`` gives, for code without
    this package (an exported model's metadata holds it). Built from the functions themselves, so it cannot drift from them."""
    import inspect

    opener = '''
def load_pixels(path, size, resize):
    """One image as the (size, size, 3) float32 RGB pixels 0..255 the exported network takes, decoded as `predict` decodes it."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(network_image(img, size, resize), dtype=np.float32)
'''
    return ("import numpy as np\nfrom PIL import Image, ImageOps\n\n\n" + inspect.getsource(_to_rgb) + "\n\n" + inspect.getsource(network_image) + "\n" + opener)


def load_image(path: Path | str, size: int, interpolation: str) -> np.ndarray:
    """Decode one image into a ``(size, size, 3)`` uint8 RGB array.

    The same steps as ``keras.utils.load_img(path, target_size=(size, size),
    interpolation=interpolation)`` (convert to RGB, then one Pillow resize), plus the
    EXIF orientation and 16-bit handling that ``load_img`` lacks (``network_image``;
    ``portable_reader`` gives them as source for code without this package).

    Raises:
        RejectedImage: the file is missing, not a regular file, too large, empty, not an image of a
            supported format (``DECODE_FORMATS``; the extension does not matter), over Pillow's pixel
            limit, of zero size, truncated or corrupt.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise RejectedImage("dangling symbolic link")
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RejectedImage("file vanished before it could be read") from None
    except OSError as exc:
        raise RejectedImage(f"cannot read file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        # A pipe or a device would block or never end: only regular files are read.
        if not stat.S_ISREG(st.st_mode):
            raise RejectedImage("not a regular file (a pipe, device or socket)")
        if st.st_size > MAX_FILE_BYTES:
            raise RejectedImage(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})", f"max_file_bytes={MAX_FILE_BYTES}")
        try:
            data = f.read()
        except OSError as exc:
            raise RejectedImage(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        raise RejectedImage(f"not an image (content is none of {', '.join(DECODE_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"decompression bomb: {exc}", f"max_image_pixels={Image.MAX_IMAGE_PIXELS}") from None
    except Exception as exc:  # Pillow raises many types for hostile headers
        raise RejectedImage(f"corrupt image header: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise RejectedImage(f"zero-size image ({w}x{h})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise RejectedImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds Pillow's limit of {limit}", f"max_image_pixels={limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            arr = np.asarray(network_image(img, size, interpolation), dtype=np.uint8)
    except Exception as exc:
        raise RejectedImage(f"truncated or corrupt image data: {exc}") from None
    if arr.shape != (size, size, 3):
        raise RejectedImage(f"decoded to an unexpected shape {arr.shape}")
    return arr


@dataclass
class Batch:
    """A batch from the reader: pixels of every row (zeros where rejected), the listing
    indices, which rows decoded, the reject reasons (empty string where ok) and the limit
    behind each rejection (``RejectedImage.limit``; empty for the content or where ok)."""

    pixels: np.ndarray
    indices: np.ndarray
    ok: np.ndarray
    reasons: list[str]
    limits: list[str]


def _load_row(path: Path, size: int, interpolation: str) -> tuple[np.ndarray | None, str, str]:
    try:
        return load_image(path, size, interpolation), "", ""
    except RejectedImage as exc:
        return None, str(exc), exc.limit
    except Exception as exc:  # a reader bug must not lose the row either
        return None, f"unexpected error: {exc!r}", ""


def iter_batches(
    listing: Listing,
    indices: np.ndarray,
    *,
    size: int,
    interpolation: str,
    batch_size: int,
    workers: int = 0,
    timeout: float = 60.0,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Decode ``listing`` rows ``indices`` in order, ``batch_size`` at a time.

    Decoding runs on ``workers`` threads (0 = one per core; Pillow releases the GIL while
    decoding and resizing) up to ``prefetch`` batches ahead of the consumer, so the network
    never waits on the disk. Rows keep their listing index, so a rejected file can never
    shift a label. An image that takes longer than ``timeout`` seconds is rejected with
    that reason and the run goes on: its stuck thread is abandoned and the pool replaced
    (a per-image time limit that tf.data's map cannot give).

    Raises:
        PipelineError: ``batch_size`` below 1 (no row would ever be read), ``prefetch`` or ``workers`` below 0.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("prefetch", prefetch, 0), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:  # 0 rows a batch would end the loop at once: every row lost
            raise PipelineError(f"{name} {value!r}: must be a whole number of at least {least}")
    n_workers = workers if workers > 0 else (os.cpu_count() or 1)
    ahead = batch_size * (prefetch + 1)
    root, paths = listing.root, listing.paths
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="decode")
    window: deque = deque()
    todo = iter(np.asarray(indices, dtype=np.int64).tolist())

    def submit(i: int):
        return pool.submit(_load_row, root / paths[i], size, interpolation)

    def fill() -> None:
        while len(window) < ahead:
            i = next(todo, None)
            if i is None:
                return
            window.append((i, submit(i)))

    def replace_pool() -> None:
        # Abandon the pool with the stuck thread; queued work moves to a fresh pool.
        nonlocal pool
        old, pool = pool, ThreadPoolExecutor(n_workers, thread_name_prefix="decode")
        for pos, (i, fut) in enumerate(window):
            if fut.cancel():
                window[pos] = (i, submit(i))
        old.shutdown(wait=False)

    try:
        fill()
        while window:
            k = min(batch_size, len(window))
            pixels = np.zeros((k, size, size, 3), np.uint8)
            idx = np.empty(k, np.int64)
            ok = np.zeros(k, bool)
            reasons = [""] * k
            why = [""] * k
            for j in range(k):
                i, fut = window.popleft()
                idx[j] = i
                try:
                    arr, reason, limit = fut.result(timeout=timeout)
                except FutureTimeout:
                    arr, reason = None, f"decoding took longer than {timeout:g} s (per-image time limit)"
                    limit = f"image_timeout={float(timeout)!r}"
                    replace_pool()
                if arr is None:
                    reasons[j], why[j] = reason, limit
                else:
                    pixels[j] = arr
                    ok[j] = True
                fill()
            yield Batch(pixels, idx, ok, reasons, why)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
