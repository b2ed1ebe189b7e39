"""The compute engines behind ``--precision``: TensorFlow for the float precisions, OpenVINO for ``int8`` (the same Keras backbone converted in process, quantized by NNCF on a seeded calibration sample, cached by key); ``open_backbone`` picks one.

An int8 model is identified by its key: a sha256 of the recipe, the backbone, the input
size, the resize method, the weights checksum and the calibration sample (seed, count and
each sampled file's path, size and modification time). The quantized model is written once
to ``<cache>/int8/<key>/`` (``model.xml``, ``model.bin``, ``info.json``) and every later run
with that key (a rerun, an incremental update, ``predict`` with a bundle trained on those
features) loads the same file, so it computes the same features. A model that is not in
the cache can only be made where its calibration images are: ``extract`` makes it;
``predict`` says how to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core.digests import file_digest
from pipeline.core.errors import PipelineError, first_line
from pipeline.backbones import network as bb
from pipeline.backbones.registry import BACKBONE, feature_shape, get_spec

INT8 = "int8"
#: Images in an int8 calibration sample (fewer when fewer images are extracted).
CALIBRATION_IMAGES = 128
#: Seed of the calibration sample.
CALIBRATION_SEED = 0
#: Images per calibration call (NNCF collects its statistics over such batches).
CALIBRATION_BATCH = 16
#: How an int8 model is made; part of its key (changing it makes new models). The text names
#: VGG16, the first backbone; the backbone is a field of the key of its own, so the text stays
#: as it was and VGG16 models keep their keys.
RECIPE = (
    "openvino.convert_model(tf.function(uint8 NHWC -> preprocess_input -> VGG16 base)); "
    "nncf.quantize(preset=PERFORMANCE, fast bias correction); CPU plugin, inference_precision f32"
)
#: The install hint of the one-line error when the int8 extra is missing.
INSTALL_HINT = "run `make setup`, or `pip install -e '.[int8]'` (OpenVINO and NNCF)"
#: The OpenVINO CPU plugin's setting: layers NNCF left in floating point run in float32
#: on every CPU (the plugin would pick bfloat16 on one with AVX512-BF16 or AMX).
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def open_backbone(
    input_size: int, weights, precision: str, *, batch_size: int = 32, calibration: "Calibration | None" = None, progress: bool = False,
    backbone: str | None = None,
):
    """The network for ``precision``: ``backbone.Backbone`` (TensorFlow) or ``Int8Backbone`` (OpenVINO).

    Args:
        input_size, weights, batch_size: as for ``backbone.Backbone``.
        backbone: the network (``backbone.BACKBONES``); default: the one ``weights`` are for.
        precision: a resolved precision (``float32``, ``bfloat16``, ``float16`` or ``int8``).
        calibration: for ``int8``, the model to use (``sample_calibration``
            or ``Calibration.known``).
        progress: say on stderr when an int8 model is being calibrated.

    Raises:
        PipelineError: ``int8`` without a calibration, without the int8 extra, or with a
            model that is neither cached nor can be made here.
    """
    name = backbone or weights.backbone
    if name != weights.backbone:
        raise PipelineError(f"weights for {weights.backbone} cannot be loaded into {name}")
    if precision != INT8:
        return bb.Backbone(input_size, weights, precision, batch_size=batch_size, backbone=name)
    if calibration is None:
        raise PipelineError("--precision int8 needs a calibration (the int8 model to use)")
    return Int8Backbone(input_size, weights, calibration, batch_size=batch_size, progress=progress)


@contextmanager
def _vendor_telemetry_off():
    # OpenVINO's converter and NNCF send usage telemetry unless they believe they run in CI
    # (or the user opted out in ~/intel). This pipeline runs offline and sends nothing.
    saved = {k: os.environ.get(k) for k in ("CI", "NNCF_CI")}
    os.environ.update(CI="true", NNCF_CI="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def require_int8():
    """Import OpenVINO and NNCF; returns ``(openvino, nncf)``.

    Raises:
        PipelineError: one line, when the int8 extra is not installed.
    """
    try:
        with _vendor_telemetry_off():
            import nncf
            import openvino
    except ImportError as exc:
        raise PipelineError(f"--precision int8 needs the int8 extra, which is not installed ({exc}): {INSTALL_HINT}") from None
    return openvino, nncf


def int8_versions() -> dict:
    """The installed OpenVINO and NNCF versions (recorded with every int8 model)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("openvino", "nncf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class Calibration:
    """Which int8 model to use and, when known, the images it is (or was) calibrated on.

    ``key`` names the model in the cache. ``root`` and ``paths`` (relative to ``root``)
    are the calibration sample; they are empty when only the key is known (the model of an
    existing output or of a model bundle), so the model must already be in the cache.
    """

    key: str
    digest: str | None = None
    images: int = 0
    seed: int = CALIBRATION_SEED
    root: Path | None = None
    paths: tuple[str, ...] = ()
    resize: str = "bilinear"

    @classmethod
    def known(cls, key: str) -> "Calibration":
        """The model ``key`` of an existing output or bundle (its sample is not at hand)."""
        return cls(key=str(key))


def model_key(*, digest: str, input_size: int, resize: str, weights_checksum: str, backbone: str = BACKBONE) -> str:
    """The cache key of the int8 model of ``backbone`` calibrated on the sample ``digest`` for these settings."""
    spec = get_spec(backbone)
    what = {
        "recipe": RECIPE, "backbone": spec.name, "layer": spec.layer, "preprocessing": spec.preprocessing,
        "input_size": int(input_size), "resize": resize, "weights_checksum": weights_checksum, "calibration": digest,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def sample_calibration(
    listing, *, input_size: int, resize: str, weights_checksum: str, images: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED,
    backbone: str = BACKBONE,
) -> Calibration:
    """A seeded sample of ``listing``'s files (``images`` of them, or all if fewer) and the key of its model.

    The same files (same paths, sizes and modification times) with the same settings give
    the same key, so an extraction of the same images reuses the cached model.
    """
    n = len(listing)
    k = min(int(images), n)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    h = hashlib.sha256(f"int8 calibration sample: seed {seed}, {k} images\n".encode())
    for i in pick.tolist():
        h.update(os.fsencode(listing.paths[i]) + f"\0{int(listing.sizes[i])}:{int(listing.mtimes_ns[i])}\n".encode())
    digest = h.hexdigest()
    key = model_key(digest=digest, input_size=input_size, resize=resize, weights_checksum=weights_checksum, backbone=backbone)
    return Calibration(key, digest, k, seed, Path(listing.root), tuple(listing.paths[i] for i in pick.tolist()), resize)


def models_dir() -> Path:
    """Where int8 models are cached: ``int8/`` in the pipeline cache (``$PIPELINE_CACHE``, else ``~/.cache/transfer-pipeline``)."""
    from pipeline.backbones.weights import cache_dir

    return cache_dir() / "int8"


def model_dir(key: str) -> Path:
    """The cache folder of the int8 model ``key``."""
    return models_dir() / key


#: The files of a cached model OpenVINO reads, with the ``info.json`` field holding each one's sha256.
MODEL_FILES = {"model.xml": "xml_sha256", "model.bin": "bin_sha256"}


def read_model_info(key: str) -> dict | None:
    """The ``info.json`` of the cached model ``key``, checked against its files; None if it is not cached.

    Raises:
        PipelineError: the cached model is corrupt (another key, or a file OpenVINO reads changed since it was made).
    """
    folder = model_dir(key)
    try:
        info = json.loads((folder / "info.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}/info.json: unreadable ({exc}); delete {folder} to calibrate again") from None
    if not isinstance(info, dict) or info.get("key") != key:
        raise PipelineError(f"{folder}: not the int8 model {key[:16]}... (info.json); delete it to calibrate again")
    for name, field in MODEL_FILES.items():  # every file OpenVINO will read, checked before it reads it
        if not isinstance(info.get(field), str):
            raise PipelineError(f"{folder}: made by an earlier version of the pipeline (info.json has no checksum of {name}); delete {folder} to calibrate again")
        try:
            actual = file_digest(folder / name)
        except OSError as exc:
            raise PipelineError(f"{folder}/{name}: unreadable ({exc.strerror or exc}); delete {folder} to calibrate again") from None
        if actual != info[field]:
            raise PipelineError(f"{folder}/{name}: checksum {actual[:16]}... differs from its info.json's; delete {folder} to calibrate again")
    return info


def missing_model_message(key: str) -> str:
    """How to get the int8 model ``key`` that is not in the cache."""
    return (
        f"int8 model {key[:16]}... is not in {models_dir()}: it is made when images are extracted with --precision int8; "
        f"extract the same images again with --precision int8 into a new file (the same images and settings give the same model), "
        f"or copy the folder {key} from the machine that made it"
    )


def _load_calibration_pixels(calibration: Calibration, input_size: int, resize: str) -> np.ndarray:
    from pipeline.images.decode import load_image, RejectedImage

    rows = []
    for p in calibration.paths:
        try:
            rows.append(load_image(Path(calibration.root) / p, input_size, resize))
        except RejectedImage:  # a broken image is rejected by the extraction itself; calibration skips it
            continue
    if not rows:
        raise PipelineError(f"{calibration.root}: none of the {len(calibration.paths)} calibration images could be read")
    return np.stack(rows)


def quantize(calibration: Calibration, weights, *, input_size: int, folder: Path, progress: bool = False) -> dict:
    """Convert the Keras backbone of ``weights`` (``weights.backbone``) with them to OpenVINO, quantize it on ``calibration``'s images, write it to ``folder``.

    Returns:
        The model's info (also written as ``folder/info.json``).

    Raises:
        PipelineError: the int8 extra is missing, the calibration has no images at hand,
            none of them can be read, or the weights changed while loading.
    """
    ov, nncf = require_int8()
    if not calibration.paths:
        raise PipelineError(missing_model_message(calibration.key))
    import tensorflow as tf

    from pipeline.backbones.weights import load_weights

    t0 = time.perf_counter()
    pixels = _load_calibration_pixels(calibration, input_size, calibration.resize)
    backbone = weights.backbone
    model = bb.build(backbone, input_size, "float32")
    checksum = load_weights(model, weights)
    if checksum != weights.checksum:
        raise PipelineError(f"weights checksum changed while loading ({weights.checksum} -> {checksum})")

    def forward(p):
        return model(bb.preprocess(p, backbone), training=False)

    spec = tf.TensorSpec([None, input_size, input_size, 3], tf.uint8)
    batches = [pixels[i : i + CALIBRATION_BATCH] for i in range(0, len(pixels), CALIBRATION_BATCH)]
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    # NNCF draws progress bars on standard output, where extract prints its summary.
    with _vendor_telemetry_off(), contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
        nncf.set_log_level(logging.WARNING)
        try:
            ov_model = ov.convert_model(tf.function(forward, input_signature=[spec]))
            quantized = nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(batches), preset=nncf.QuantizationPreset.PERFORMANCE)
        finally:
            nncf.set_log_level(level)
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, folder / "model.xml", compress_to_fp16=False)
    info = {
        "format": "transfer-pipeline-int8-model",
        "key": calibration.key,
        "recipe": RECIPE,
        "backbone": backbone,
        "layer": get_spec(backbone).layer,
        "input_size": int(input_size),
        "resize": calibration.resize,
        "weights": weights.name,
        "weights_checksum": weights.checksum,
        "calibration_sha256": calibration.digest,
        "calibration_images": len(calibration.paths),
        "calibration_images_read": int(len(pixels)),
        "calibration_seed": calibration.seed,
        "calibration_seconds": round(time.perf_counter() - t0, 2),
        "versions": int8_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{field: file_digest(folder / name) for name, field in MODEL_FILES.items()},
    }
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    return info


def install_model(folder: Path, key: str) -> bool:
    """Move a model written by ``quantize`` into the cache as ``key``; False (and ``folder`` removed) if one is there already."""
    target = model_dir(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(folder, target)  # one rename: readers see no model or a whole one
        return True
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(folder, ignore_errors=True)  # another process made the same model first
        return False


def ensure_model(calibration: Calibration, weights, *, input_size: int, progress: bool = False) -> dict:
    """The info of the cached model ``calibration.key``, calibrating it first if it is not cached.

    Raises:
        PipelineError: the model is not cached and its calibration images are not at hand
            (``missing_model_message``), or as for ``quantize`` and ``read_model_info``.
    """
    info = read_model_info(calibration.key)
    if info is not None:
        return info
    if not calibration.paths:
        raise PipelineError(missing_model_message(calibration.key))
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{calibration.key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"int8: calibrating on {len(calibration.paths)} images (once; cached in {model_dir(calibration.key)})", file=sys.stderr)
    try:
        quantize(calibration, weights, input_size=input_size, folder=tmp, progress=progress)
        install_model(tmp, calibration.key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_model_info(calibration.key)


class Int8Backbone:
    """The int8 backbone on OpenVINO: uint8 RGB batches in, float32 features out, like ``backbone.Backbone``.

    The preprocessing is part of the converted graph. ``key`` names the model; the weights
    it was made from must be the resolved ``weights``.
    """

    precision = INT8

    def __init__(self, input_size: int, weights, calibration: Calibration, batch_size: int = 32, progress: bool = False):
        ov, _ = require_int8()
        info = ensure_model(calibration, weights, input_size=input_size, progress=progress)
        if info.get("backbone", BACKBONE) != weights.backbone:
            raise PipelineError(f"{model_dir(calibration.key)}: an int8 model of {info.get('backbone')}, not {weights.backbone}")
        if int(info["input_size"]) != int(input_size):
            raise PipelineError(f"{model_dir(calibration.key)}: an int8 model for input size {info['input_size']}, not {input_size}")
        if info["weights_checksum"] != weights.checksum:
            raise PipelineError(f"{model_dir(calibration.key)}: made from weights with checksum {info['weights_checksum'][:16]}..., not {weights.checksum[:16]}...")
        self.key = calibration.key
        self.info = info
        self.input_size = input_size
        self.batch_size = batch_size
        self.weights_checksum = info["weights_checksum"]
        self.backbone = weights.backbone
        self.output_shape = feature_shape(input_size, weights.backbone)
        core = ov.Core()
        try:
            self._compiled = core.compile_model(core.read_model(model_dir(self.key) / "model.xml"), "CPU", COMPILE_CONFIG)
        except (RuntimeError, OSError) as exc:  # a file changed after its check: never a traceback
            raise PipelineError(f"{model_dir(self.key)}: OpenVINO cannot load the model ({first_line(exc)}); delete it to calibrate again") from None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Features (n, h, w, channels) as float32 for uint8 RGB pixels (n, size, size, 3)."""
        n = len(pixels)
        if n == 0:
            return np.zeros((0, *self.output_shape), np.float32)
        out = [np.asarray(self._compiled(np.ascontiguousarray(pixels[i : i + self.batch_size]))[0], np.float32) for i in range(0, n, self.batch_size)]
        return np.concatenate(out)

    def kernels(self) -> dict[str, int]:
        """How many convolutions run on each CPU kernel (``brgconv_avx512_I8``, ``jit_avx2_I8``, ...): which instructions the int8 model really uses here."""
        counts: dict[str, int] = {}
        for op in self._compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) == "Convolution":
                kind = info["primitiveType"].astype(str)
                counts[kind] = counts.get(kind, 0) + 1
        return counts


def quantization_attrs(fp: dict) -> dict:
    """The feature file attributes of an int8 output with fingerprint ``fp`` (``{}`` for another precision).

    ``quantization``: JSON of the model's info (key, calibration sample sha256 and size,
    seed, recipe, OpenVINO and NNCF versions, calibration seconds).
    """
    key = fp.get("calibration") if fp.get("precision") == INT8 else None
    if not key:
        return {}
    info = read_model_info(key)
    if info is None:  # an update that only dropped rows never needed the model
        info = {"key": key, "note": f"not in {models_dir()} when this file was written"}
    return {"quantization": json.dumps(info, sort_keys=True)}
