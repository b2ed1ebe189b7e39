"""Fashion-MNIST's arrays, from the four idx files: read and checked, from a folder, the Debian package ``dataset-fashion-mnist``, or Keras' download."""

from __future__ import annotations

import contextlib
import gzip
import pathlib
import socket
import sys
import zlib

import numpy as np

from pipeline.core.errors import PipelineError

FASHION_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # Fashion-MNIST label order

DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
PER_CLASS_AVAILABLE = {"train": 6000, "test": 1000}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_HOW_TO_GET = ("install the Debian package (`apt-get install dataset-fashion-mnist`), pass a "
               "folder holding the four Fashion-MNIST idx .gz files, or use a machine with a "
               "network so Keras can download it")


def read_idx(path) -> np.ndarray:
    """Read one (optionally gzipped) idx file of unsigned bytes.

    Args:
        path: an ``*-idx3-ubyte[.gz]`` (images) or ``*-idx1-ubyte[.gz]`` (labels) file.

    Returns:
        uint8 array of shape (N, rows, cols) for images or (N,) for labels.

    Raises:
        PipelineError: unreadable, not gzip when named .gz, wrong magic number or truncated.
    """
    path = pathlib.Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"cannot read idx file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] not in (1, 3):
        raise PipelineError(
            f"idx file {path} is corrupt: bad magic number {data[:4].hex() or '(empty)'} "
            "(expected 00000801 for labels or 00000803 for images)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"idx file {path} is corrupt: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise PipelineError(
            f"idx file {path} is corrupt: header says {dims} ({expected} bytes) but it holds "
            f"{len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, magic in zip(IDX_FILES[split], (_IMAGES_MAGIC, _LABELS_MAGIC), strict=True):
        path = folder / name
        if not path.is_file() and (folder / name[:-3]).is_file():
            path = folder / name[:-3]  # accept uncompressed copies too
        arr = read_idx(path)
        want_ndim = 3 if magic == _IMAGES_MAGIC else 1
        if arr.ndim != want_ndim:
            raise PipelineError(
                f"idx file {path} is corrupt: its magic number says {arr.ndim}-d data, but "
                f"{'images (magic 00000803)' if want_ndim == 3 else 'labels (magic 00000801)'} "
                "were expected"
            )
        arrays.append((path, arr))
    (ipath, images), (lpath, labels) = arrays
    if images.shape[1:] != (28, 28):
        raise PipelineError(f"idx file {ipath} holds {images.shape[1:]} images, expected 28x28")
    if len(images) != len(labels):
        raise PipelineError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise PipelineError(f"idx file {lpath} is corrupt: label {labels.max()} is not in 0..9")
    return images, labels


def _has_idx_files(folder: pathlib.Path) -> bool:
    return all((folder / n).is_file() or (folder / n[:-3]).is_file()
               for names in IDX_FILES.values() for n in names)


def _load_from_keras() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        import keras  # noqa: PLC0415 - heavy, last resort only
    except ImportError as exc:
        raise PipelineError(f"no Fashion-MNIST source found and keras is unavailable ({exc}); "
                            f"{_HOW_TO_GET}") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20.0)  # the download has no timeout of its own
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints its download messages on stdout
            (xtr, ytr), (xte, yte) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # noqa: BLE001 - get_file raises a bare Exception
        why = str(exc).rsplit(" -- ", 1)[-1].strip() or type(exc).__name__
        raise PipelineError(f"no Fashion-MNIST found: {DEBIAN_DIR} is missing and the Keras "
                            f"download failed ({why}); {_HOW_TO_GET}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return {"train": (np.asarray(xtr, np.uint8), np.asarray(ytr, np.uint8)),
            "test": (np.asarray(xte, np.uint8), np.asarray(yte, np.uint8))}


def load_fashion_mnist(source=None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """Load the Fashion-MNIST arrays.

    Args:
        source: a folder with the four idx .gz files; None tries the Debian package
            ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) then the Keras download.

    Returns:
        ({"train": (images, labels), "test": (images, labels)}, source description).

    Raises:
        PipelineError: the source folder lacks files or holds corrupt ones, or no source works.
    """
    if source is not None:
        folder = pathlib.Path(source).expanduser()
        if not folder.is_dir():
            raise PipelineError(f"Fashion-MNIST source folder {folder} does not exist")
        missing = [n for names in IDX_FILES.values() for n in names
                   if not (folder / n).is_file() and not (folder / n[:-3]).is_file()]
        if missing:
            raise PipelineError(f"Fashion-MNIST source folder {folder} lacks {', '.join(missing)}")
        return {s: load_split(folder, s) for s in IDX_FILES}, f"folder:{folder}"
    if _has_idx_files(DEBIAN_DIR):
        return {s: load_split(DEBIAN_DIR, s) for s in IDX_FILES}, f"debian:{DEBIAN_DIR}"
    return _load_from_keras(), "keras-download"
