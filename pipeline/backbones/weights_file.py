"""VGG16 conv-base weight tensors: the layer table, the tensor checksum, and reading or writing a weights file (the Keras legacy layout and this pipeline's converted one)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import tempfile
from contextlib import contextmanager
from typing import Iterator

import h5py
import numpy as np

from pipeline.core.errors import PipelineError, first_line
from pipeline.backbones.registry import CONV_LAYERS, KERNEL_SHAPES
from pipeline.core.h5output import h5_output

#: The ``format`` attribute of a converted file: ``/<layer>/kernel`` and ``/<layer>/bias``
#: datasets. Files written today also carry the ``layer_names``/``weight_names`` attributes of
#: Keras's legacy h5 weights layout (so plain ``keras.applications.VGG16(weights=PATH)`` loads
#: them); the addition keeps the format, so earlier versions of the pipeline still read them.
CONVERTED_FORMAT = "transfer-pipeline/vgg16-conv-base/1"


def checksum_tensors(tensors: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 over the float32 little-endian kernel then bias of each layer of CONV_LAYERS, in order."""
    digest = hashlib.sha256()
    for name in CONV_LAYERS:
        kernel, bias = tensors[name]
        digest.update(np.ascontiguousarray(kernel, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(bias, dtype="<f4").tobytes())
    return digest.hexdigest()


def model_tensors(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (kernel, bias)}`` of a Keras VGG16 conv base; PipelineError if a layer is missing or not a Conv2D."""
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
    return checksum_tensors(model_tensors(model))


@contextmanager
def keras_h5_name(path) -> Iterator[pathlib.Path]:
    """``path`` under a name Keras loads: itself when it ends in ``.h5``/``.hdf5``, else a temporary link that does (Keras picks the loader by suffix)."""
    path = pathlib.Path(path)
    if path.name.lower().endswith((".h5", ".hdf5")):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        target = pathlib.Path(tmp) / "weights.h5"
        os.symlink(path.resolve(), target)
        yield target


def load_conv_base(model, path) -> tuple[str, str | None]:
    """Load the 13 conv layers of the weights file ``path`` (either layout) into the VGG16 conv base ``model``.

    Returns:
        The model's tensor checksum after loading, and the file's own recorded
        ``tensor_sha256`` (converted layout; None for a Keras file).

    Raises:
        PipelineError: the file is unreadable or lacks a layer, the model is not a VGG16 conv
            base, or a tensor does not fit its layer.
    """
    layout, tensors, attrs = read_tensors(path)
    model_tensors(model)  # clear error if the model is not a VGG16 conv base
    if layout == "converted":
        for name in CONV_LAYERS:
            try:
                model.get_layer(name).set_weights(list(tensors[name]))
            except ValueError as exc:
                raise PipelineError(f"weights file {path} does not fit layer {name}: {exc}") from None
    else:
        with keras_h5_name(path) as target:
            try:
                model.load_weights(str(target), by_name=True)
            except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/OSError/KeyError
                raise PipelineError(f"weights file {path} does not load into the VGG16 conv base: {first_line(exc)}") from None
    return tensor_checksum(model), attrs.get("tensor_sha256") if layout == "converted" else None



# --------------------------------------------------------------------------- HDF5 reading and writing


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


def check_shapes(path, name: str, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Refuse a kernel or bias whose shape is not the VGG16 conv base's for layer ``name``."""
    want = KERNEL_SHAPES[name]
    if tuple(kernel.shape) != want or tuple(bias.shape) != (want[3],):
        raise PipelineError(
            f"weights file {path}: layer {name} has kernel {tuple(kernel.shape)} and bias "
            f"{tuple(bias.shape)}, but the VGG16 conv base needs {want} and ({want[3]},)"
        )


def read_tensors(path) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Read the 13 conv layers from a weights file.

    Returns (layout, tensors, attrs): layout is "converted" (this module's layout, with or
    without the Keras attributes) or "keras-legacy" (a Keras ``..._notop.h5`` file with
    ``layer_names``).
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
                check_shapes(path, name, *tensors[name])
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
            check_shapes(path, name, *tensors[name])
    return layout, tensors, attrs


def write_converted(dest: pathlib.Path, tensors, source: str) -> str:
    """Write ``tensors`` atomically to ``dest`` in the converted layout; returns their checksum.

    The file is Keras's own legacy h5 weights layout (what Keras 3 ``save_weights("x.h5")``
    writes): a ``layer_names`` attribute listing the 13 conv layers, and per layer a group with
    a ``weight_names`` attribute (``kernel``, ``bias``) and those two float32 datasets. So
    ``keras.applications.VGG16(include_top=False, weights=dest)`` and ``load_weights`` of any
    Keras read it; the attributes ``format``, ``source`` and ``tensor_sha256`` are ours.
    """
    checksum = checksum_tensors(tensors)
    with h5_output(dest) as (fh, _):  # a full disk: one line, the previous file kept (core/h5output.py)
        fh.attrs["format"] = CONVERTED_FORMAT
        fh.attrs["source"] = source
        fh.attrs["tensor_sha256"] = checksum
        fh.attrs["layout"] = ("Keras legacy h5 weights: layer_names, /<layer>/kernel float32 HWIO, "
                              "/<layer>/bias float32")
        fh.attrs["layer_names"] = np.array([name.encode("utf8") for name in CONV_LAYERS])
        fh.attrs["backend"] = b"tensorflow"
        # Keras 2 converts the kernels of files from Keras 1 (no keras_version attribute).
        fh.attrs["keras_version"] = _keras_version().encode("utf8")
        for name in CONV_LAYERS:
            kernel, bias = tensors[name]
            group = fh.create_group(name)
            group.attrs["weight_names"] = np.array([b"kernel", b"bias"])
            group.create_dataset("kernel", data=np.ascontiguousarray(kernel, dtype="<f4"))
            group.create_dataset("bias", data=np.ascontiguousarray(bias, dtype="<f4"))
    return checksum


def _keras_version() -> str:
    try:
        return importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError("writing a Keras weights file needs the keras package "
                            "(`make setup` installs it)") from None


def keras_loadable(path) -> bool:
    """Whether the HDF5 file at ``path`` has the ``layer_names`` attribute Keras's legacy loader needs (at its root)."""
    try:
        with h5py.File(path, "r") as fh:
            return bool(_attr_list(fh, "layer_names"))
    except OSError as exc:
        raise PipelineError(f"weights file {path} is not a readable HDF5 file ({exc})") from None


def upgrade_converted(path) -> bool:
    """Rewrite a converted file written before the Keras attributes so plain Keras loads it.

    The tensors are copied bit for bit; the file is replaced atomically only after its
    tensors were checked against its own recorded ``tensor_sha256``, and read back after.

    Args:
        path: a weights file.

    Returns:
        True if the file was rewritten, False if it already had the Keras attributes or is
        not a converted file (a Keras file or a user's file in another layout is left alone).

    Raises:
        PipelineError: the file is unreadable, or its tensors do not match its recorded
            checksum (corrupt: delete it and run ``python -m pipeline weights``).
    """
    path = pathlib.Path(path)
    layout, tensors, attrs = read_tensors(path)
    if layout != "converted" or keras_loadable(path):
        return False
    checksum = checksum_tensors(tensors)
    if checksum != attrs.get("tensor_sha256"):
        raise PipelineError(
            f"converted weights file {path} is corrupt (tensor checksum {checksum[:16]}... is not "
            f"its recorded {str(attrs.get('tensor_sha256'))[:16]}...): delete it and run "
            "`python -m pipeline weights` to rebuild it"
        )
    write_converted(path, tensors, str(attrs.get("source", "unknown")))
    _layout, back, _attrs = read_tensors(path)
    if checksum_tensors(back) != checksum or not keras_loadable(path):
        raise PipelineError(f"rewriting {path} did not give a Keras-loadable file with the same tensors; "
                            "delete it and run `python -m pipeline weights`")
    return True
