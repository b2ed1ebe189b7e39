"""Export stage: a ``train`` bundle (lr or svm) and its backbone as one Keras network, raw RGB pixels in and class probabilities (lr) or margins (svm) out, loadable with plain Keras and no pipeline.

The network is, layer by layer, what ``predict`` computes: the backbone's ``preprocess_input``
as stock layers (``caffe``: a channel-mixing Dense that reverses RGB to BGR and subtracts the
ImageNet means, exact in float32; ``tf``: ``Rescaling(1/127.5, -1)``), the backbone at the
bundle's compute precision with the same weights (checked by checksum), the features rounded
to the feature file's storage dtype (a float16 identity layer, as ``predict`` rounds them), and
the classifier as layers (``nets.probe.probe_layers``: pooling, the row scaling, a Dense with
the fitted coefficients). Pixels are float32 in 0..255, resized to the bundle's input side with
the bundle's resize method (``resize`` in the saved metadata); decoding and resizing stay outside
the network: the metadata's ``reader`` is the source of a Pillow-only ``load_pixels`` that decodes
as ``predict`` does (``images.decode.portable_reader``).

A random forest is not a stack of layers and an int8 bundle's network is an OpenVINO model:
both are refused with one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.classical.bundle import check_spec, load_bundle, resolve_bundle_weights
from pipeline.core.guard import refuse_inputs_as_outputs, refuse_replacing_inputs
from pipeline.core import config as settings
from pipeline.core.command import Command
from pipeline.core.config import OneOf, option
from pipeline.core.errors import PipelineError
from pipeline.images.decode import portable_reader
from pipeline.core.outputs import OutputLock, prepare_output_dir, write_json_atomic
from pipeline.core.digests import file_digest
from pipeline.core.outputsets import check_members, publish, settle
from pipeline.nets.probe import probe_layers

#: ``--format``: the Keras file (``model.keras``) or a TensorFlow SavedModel folder (``model.export``, for TF Serving / TFLite converters).
FORMATS = ("keras", "savedmodel")
#: Models export can rebuild as layers.
EXPORTABLE = ("lr", "svm")


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``python -m pipeline export``.

    Attributes:
        model: the bundle written by ``train`` (``lr`` or ``svm``).
        output: the file (``.keras``) or folder (``savedmodel``) to write.
        format: ``keras`` or ``savedmodel``.
        weights: weights to resolve instead of the bundle's name (a model trained on a weights
            FILE needs its path); the checksum must match the bundle's.
        overwrite: replace an existing output.
        command_line: recorded in the metadata.
    """

    model: Path = option(help="model bundle written by train (lr or svm)", positional=True, metavar="MODEL.joblib")
    output: Path = option(Path("model.keras"), "the exported network: a .keras file, or a folder for --format savedmodel", short="-o")
    format: str = option("keras", "keras (one .keras file, loads with keras.saving.load_model) or savedmodel (a TensorFlow SavedModel folder)", rule=OneOf(FORMATS))
    weights: str | None = option(None, "weights to use instead of the bundle's (needed for models trained on a weights FILE); the checksum must match")
    overwrite: bool = option(False, "replace an existing output")
    command_line: str = option("", cli=False)

    def validate(self) -> "ExportConfig":
        """Check every value; return self.

        Raises:
            PipelineError: a bad flag value, a ``.keras`` output not named ``*.keras`` (Keras refuses others).
        """
        settings.validate(self)
        if self.format == "keras" and Path(self.output).suffix != ".keras":
            raise PipelineError(f"{self.output}: a Keras file must end in .keras (or pass --format savedmodel for a folder)")
        return self


def preprocessing_layers(backbone_mode: str) -> list:
    """``keras.applications.<family>.preprocess_input`` as stock float32 layers (see the module doc)."""
    import keras

    from pipeline.backbones.network import BGR_MEANS

    if backbone_mode == "caffe":
        flip = keras.layers.Dense(3, dtype="float32", name="preprocess_caffe")
        flip.build((None, 3))
        flip.set_weights([np.eye(3, dtype=np.float32)[::-1].copy(), -np.asarray(BGR_MEANS, np.float32)])
        flip.trainable = False
        return [flip]
    return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="preprocess_tf")]


def build_export(bundle: dict, weights, *, model_path: Path | str = "the model bundle"):
    """The bundle's whole prediction as one ``keras.Model`` (float32 pixels 0..255 at the input side in; probabilities or margins out).

    Args:
        bundle: from ``classical.bundle.load_bundle`` (checked with ``check_spec``).
        weights: the resolved ``WeightsInfo`` of the bundle's backbone.
        model_path: named in errors.

    Raises:
        PipelineError: a random forest or an int8 bundle (see the module doc), or weights whose
            checksum is not the bundle's.
    """
    import keras

    from pipeline.backbones.network import POLICIES, build, get_spec
    from pipeline.backbones.weights import load_weights

    spec = bundle["feature_spec"]
    if bundle.get("model") not in EXPORTABLE:
        raise PipelineError(f"{model_path}: a {bundle.get('model')} model cannot be exported as layers; export takes {' or '.join(EXPORTABLE)} bundles")
    if bundle["precision"] not in POLICIES:
        raise PipelineError(f"{model_path}: trained on {bundle['precision']} features (an OpenVINO network); export rebuilds TensorFlow precisions only ({', '.join(POLICIES)})")
    size, name = int(spec["input_size"]), spec["backbone"]
    base = build(name, size, bundle["precision"])
    checksum = load_weights(base, weights)
    if checksum != spec["weights_checksum"]:
        raise PipelineError(f"{model_path}: the loaded weights have checksum {checksum[:16]}..., not the model's {str(spec['weights_checksum'])[:16]}...")
    base.trainable = False
    pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
    x = pixels
    for layer in preprocessing_layers(get_spec(name).mode):
        x = layer(x)
    x = base(x, training=False)
    if bundle.get("storage_dtype") == "float16":  # predict rounds features to the file's storage dtype
        x = keras.layers.Activation("linear", dtype="float16", name="storage_float16")(x)
    for layer in probe_layers(bundle["estimator"], spec["pool"], len(bundle["label_names"]), path=str(model_path), name="head", margins=True):
        x = layer(x)
    return keras.Model(pixels, x, name=f"{name}_{bundle['model']}")


def metadata(bundle: dict, config: ExportConfig) -> dict:
    """What a user of the exported file needs besides it: class names, input side, resize method, output kind."""
    spec = bundle["feature_spec"]
    return {
        "label_names": list(bundle["label_names"]),
        "input_size": int(spec["input_size"]),
        "resize": spec["resize"],
        "input": "float32 RGB pixels 0..255, shape (n, input_size, input_size, 3), as `reader`'s load_pixels(path, input_size, resize) gives them "
                 "(EXIF orientation applied, 16-bit grey rescaled, one Pillow resize with `resize`); keras.utils.load_img gives the same pixels "
                 "except for EXIF-rotated and 16-bit images",
        "reader": portable_reader(),
        "output": "class probabilities (softmax)" if bundle["model"] == "lr" else "decision-function margins (not probabilities); argmax is the class",
        "backbone": spec["backbone"],
        "precision": bundle["precision"],
        "model": bundle["model"],
        "source": str(config.model),
        "command_line": config.command_line,
    }


#: A folder holding this file is a TensorFlow SavedModel: the only folder ``--format savedmodel --overwrite`` replaces.
SAVED_MODEL_FILE = "saved_model.pb"


def _check_output(config: ExportConfig, model_path: Path, output: Path) -> None:
    """Refuse, before any work, an output that would destroy an input or something export did not write.

    Never the bundle or the weights file (however spelled), nor a folder holding them; never a
    symbolic link or a path without a name (``.``, ``..``); an existing output only with
    ``--overwrite``, and then only what export writes: a file for ``keras``, a SavedModel
    folder for ``savedmodel`` (any other folder is someone else's, even with ``--overwrite``).
    """
    if output.name in ("", ".", ".."):
        raise PipelineError(f"{output}: names no file or folder of its own; pass the path to write (e.g. -o exported/model)")
    meta_path = output.with_name(output.name + ".json")
    weights = Path(config.weights) if config.weights and Path(config.weights).exists() else None
    inputs = [("the model bundle", model_path)] + ([("the weights file", weights)] if weights else [])
    refuse_inputs_as_outputs([output, meta_path], inputs, "choose another -o")
    for path in (output, meta_path):
        if path.is_symlink():
            raise PipelineError(f"{path}: is a symbolic link; export replaces files, never a link (or what it points at): choose another -o")
        if (path.exists()) and not config.overwrite:
            raise PipelineError(f"{path}: exists; pass --overwrite to replace it")
    if meta_path.is_dir():
        raise PipelineError(f"{meta_path}: is a folder; export writes its metadata there: choose another -o")
    if config.format == "keras" and output.is_dir():
        raise PipelineError(f"{output}: is a folder, not a .keras file; choose another -o")
    if config.format == "savedmodel" and output.exists():
        refuse_replacing_inputs(output, inputs, "export", "choose another -o")
        if not (output.is_dir() and (output / SAVED_MODEL_FILE).is_file()):
            raise PipelineError(f"{output}: exists and is not a SavedModel folder; export replaces only a SavedModel (even with --overwrite): choose another -o")
    settle(output.parent, output.name)  # a set a killed export left half moved is finished first, then checked
    check_members(output.parent, output.name, (output.name, meta_path.name), _folders(config, output))  # a FIFO, a device, a read-only file


def _folders(config: ExportConfig, output: Path) -> tuple[str, ...]:
    """The members of export's set that are folders: the SavedModel."""
    return (output.name,) if config.format == "savedmodel" else ()


def run(config: ExportConfig) -> Path:
    """``python -m pipeline export``: write the bundle's network (and ``OUTPUT.json`` beside it, the metadata).

    Returns:
        The written path.

    Raises:
        PipelineError: bad settings, a bundle that is missing or not ours or not exportable,
            an output that ``_check_output`` refuses (an input, a folder holding one, a link,
            an existing output without ``--overwrite``, a folder that is not a SavedModel),
            weights that cannot be resolved or do not match the bundle.
    """
    config.validate()
    model_path, output = Path(config.model), Path(config.output)
    _check_output(config, model_path, output)
    meta_path = output.with_name(output.name + ".json")
    bundle = load_bundle(model_path)
    check_spec(model_path, bundle)
    with OutputLock(prepare_output_dir(output.parent) / output.name):  # one export per output; checked again under the lock
        _check_output(config, model_path, output)
        info = resolve_bundle_weights(model_path, bundle, config.weights, progress=True)
        network = build_export(bundle, info, model_path=model_path)
        # the network and its metadata published as one set: a failure leaves the previous pair whole, never a new network with old metadata
        with publish(output.parent, output.name, (output.name, meta_path.name), lock=output.name, folders=_folders(config, output)) as stage:
            if config.format == "keras":
                network.save(stage.path(output.name))
            else:
                network.export(str(stage.path(output.name)), format="tf_saved_model", verbose=False)
            saved = stage.path(output.name) / SAVED_MODEL_FILE if config.format == "savedmodel" else stage.path(output.name)
            # the pair is moved into place by two renames: a consumer can tell a network from its own metadata (a kill between them)
            write_json_atomic(stage.path(meta_path.name), {**metadata(bundle, config), "network_file": saved.relative_to(stage.path(output.name).parent).as_posix(),
                                                           "network_sha256": file_digest(saved)})  # fmt: skip
    print(f"exported {model_path} -> {output} ({config.format}; {metadata(bundle, config)['output']}; metadata in {meta_path.name})", file=sys.stderr)
    return output


COMMAND = Command("export", ExportConfig, run, "one portable network (backbone + classifier) from a trained lr or svm bundle")
