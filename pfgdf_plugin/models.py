"""Models to compress, built by name.

Registered names: ``vgg16_bn``, ``resnet20``, ``resnet56`` (CIFAR-style, for
32x32 inputs), ``lenet300`` and ``lenet5``. Any torchvision classification
model also works by name (``"resnet18"`` or, to be explicit, ``"tv:resnet18"``), and
so does any timm model as ``"timm/NAME"`` (with timm installed: ``pip install
'pfgdf-plugin[timm]'``; see :mod:`pfgdf_plugin.timm_models`), freshly initialised, or with
starting weights through :func:`build_pretrained` (torchvision's or timm's pretrained weights
from the local cache, or a state dict file; see :mod:`pfgdf_plugin.weights`).

Every model traces with ``torch.fx.symbolic_trace`` and builds a Torch-Pruning
dependency graph: forward passes use modules and plain tensor arithmetic only.

Models follow the data: ``image_size`` (and ``in_channels``) size the input layers of the
registered models (LeNet-300-100 at 28x28 has 784 inputs). :func:`input_size_problem` says,
before anything is built, whether a registered model can take a given image side, and
:func:`check_input` runs one example through a built model, turning a shape mismatch into a
:class:`~pfgdf_plugin.errors.ConfigError` naming the model and the size.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import ConfigError
from .methods.dbp.blocks import register_block_type
from .registry import Registry, UnknownNameError
from .timm_models import build_timm_model, is_timm_name, timm_pretrained
from .weights import PRETRAINED_KWARGS, is_weights_name, load_weights

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "LeNet300",
    "LeNet5",
    "VGG",
    "build_model",
    "build_pretrained",
    "check_input",
    "input_size_problem",
    "torchvision_model_names",
]

MODELS: Registry = Registry("model")
logger = logging.getLogger(__name__)

VGG16_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M"]


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_common(num_classes: object, in_channels: object, width: object) -> None:
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- input sizes

# The smallest square input side each registered model can take: VGG-16's five 2x2 poolings
# need 32, LeNet-5's two 5x5 convolutions and poolings need 16; the others take any side.
MIN_IMAGE_SIZE = {"vgg16_bn": 32, "lenet5": 16, "resnet20": 1, "resnet56": 1, "lenet300": 1}


def input_size_problem(name: str, image_size: object) -> Optional[str]:
    """Why registered model ``name`` cannot take ``image_size`` x ``image_size`` inputs, or ``None``.

    Torchvision models (and unknown names) are not judged here: :func:`check_input` runs an
    example through the built model instead.

    Example:
        >>> input_size_problem("lenet5", 12)
        'model lenet5 needs data.image_size >= 16, got 12'
        >>> input_size_problem("lenet300", 28) is None
        True
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        return f"model {name} needs data.image_size to be a positive int, got {image_size!r}"
    least = MIN_IMAGE_SIZE.get(name)
    if least is not None and image_size < least:
        return f"model {name} needs data.image_size >= {least}, got {image_size}"
    return None


def _check_image_size(name: str, image_size: object) -> None:
    problem = input_size_problem(name, image_size)
    if problem is not None:
        raise ValueError(problem)


def check_input(model: nn.Module, name: str, example: torch.Tensor) -> None:
    """Run ``example`` through ``model`` once (no gradients); a shape it cannot take is a ConfigError.

    The model's train/eval mode and weights are left as they were (the forward pass runs in
    eval mode, so BatchNorm statistics do not move).

    Raises:
        ConfigError: the model rejects the input; the message names the model and the input shape.

    Example:
        >>> check_input(build_model("lenet300", in_channels=1, image_size=28), "lenet300",
        ...             torch.zeros(1, 1, 28, 28))
        >>> check_input(build_model("lenet300", in_channels=1), "lenet300", torch.zeros(1, 1, 28, 28))
        Traceback (most recent call last):
        ...
        pfgdf_plugin.errors.ConfigError: model: model.name 'lenet300' cannot take inputs of shape (1, 28, 28) ...
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, IndexError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shape = tuple(example.shape[1:])
        raise ConfigError([f"model.name {name!r} cannot take inputs of shape {shape} (data.image_size="
                           f"{shape[-1]}, {shape[0]} channel(s)): {detail}; choose another data.image_size "
                           "or model"], "model") from None
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm: conv stack, global pooling, one Linear.

    For 32x32 inputs the stack ends at 1x1, so the pooling is an identity
    and the head is the usual ``Linear(c_last, num_classes)``; other input
    sizes work too.

    Example:
        >>> VGG(VGG16_CFG, width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = _scaled(int(v), width)
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs (about 15M parameters at width 1).

    Example:
        >>> vgg16_bn(width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_image_size("vgg16_bn", image_size)
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection.

    The shortcut is an identity (an empty ``nn.Sequential``) when shapes
    match, else a 1x1 conv + BN projection (option B).

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


def _cifar_block_removable(m: BasicBlock) -> bool:
    """No shortcut projection and stride 1: ``nn.Identity`` can stand in for the block."""
    return len(m.shortcut) == 0 and tuple(m.conv1.stride) == (1, 1)


def _torchvision_block_removable(m: nn.Module) -> bool:
    """A torchvision ``BasicBlock``/``Bottleneck`` without downsampling keeps its input shape."""
    return m.downsample is None and m.stride == 1


# The residual blocks DBP may remove whole (pfgdf_plugin.methods.dbp.find_blocks). torchvision's are
# named, so registering them does not import torchvision.
register_block_type(BasicBlock, _cifar_block_removable)
register_block_type("torchvision.models.resnet:BasicBlock", _torchvision_block_removable)
register_block_type("torchvision.models.resnet:Bottleneck", _torchvision_block_removable)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016): 3 stages of ``n`` BasicBlocks.

    Depth is ``6 * n + 2``; stage widths are 16/32/64 times ``width``.

    Example:
        >>> CifarResNet(3, width=0.5)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self._in = c1
        self.layer1 = self._stage(c1, n, 1)
        self.layer2 = self._stage(c2, n, 2)
        self.layer3 = self._stage(c3, n, 2)
        del self._in
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        _kaiming_init(self)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self._in, planes, s))
            self._in = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage).

    Example:
        >>> resnet20()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    _check_image_size("resnet20", image_size)
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels, width=width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage).

    Example:
        >>> resnet56(width=0.25)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    _check_image_size("resnet56", image_size)
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- LeNets


class LeNet300(nn.Module):
    """LeNet-300-100: a three-layer perceptron on flattened images.

    Example:
        >>> LeNet300(in_features=1 * 28 * 28)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        h1, h2 = _scaled(300, width), _scaled(100, width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, h1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 conv + max-pool stages and three Linear layers.

    Example:
        >>> LeNet5(in_channels=1)(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> None:
        super().__init__()
        _check_image_size("lenet5", image_size)
        c1, c2 = _scaled(6, width), _scaled(16, width)
        f1, f2 = _scaled(120, width), _scaled(84, width)
        side = ((image_size - 4) // 2 - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@MODELS.register("lenet300")
def lenet300(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> LeNet300:
    """LeNet-300-100 for ``in_channels`` x ``image_size`` x ``image_size`` inputs.

    Example:
        >>> lenet300(in_channels=1)(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_image_size("lenet300", image_size)
    return LeNet300(in_channels * image_size * image_size, num_classes=num_classes, width=width)


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> LeNet5:
    """LeNet-5 for 32x32 inputs (any side >= 16 works).

    Example:
        >>> lenet5(in_channels=1)(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_image_size("lenet5", image_size)
    return LeNet5(num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)


# --------------------------------------------------------------------------- torchvision


def torchvision_model_names() -> List[str]:
    """Names of torchvision's classification models.

    Example:
        >>> "resnet18" in torchvision_model_names()
        True
    """
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                break
            new = nn.Conv2d(
                in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, new)
            return
    raise ValueError(f"in_channels={in_channels} is not supported for torchvision model {name!r}: "
                     f"no plain first Conv2d to replace")


def _torchvision_model(name: str, num_classes: int, in_channels: int, width: float, **kwargs: Any) -> nn.Module:
    import torchvision

    if width != 1.0:
        raise ValueError(f"width must be 1.0 for torchvision model {name!r}, got {width!r}")
    kwargs.pop("image_size", None)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    return model


# --------------------------------------------------------------------------- public API


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: A registered name (``MODELS.names()``), a torchvision
            classification model name (``"resnet18"``), ``"tv:NAME"`` to
            pick torchvision's model even where a registered name matches, or
            ``"timm/NAME"`` for ``timm.create_model(NAME, ...)``.
        num_classes: Output classes.
        in_channels: Input channels; for torchvision models other than 3, the
            first conv is replaced by one with ``in_channels`` inputs (timm
            builds its models with ``in_chans``).
        width: Channel multiplier of registered models (each layer keeps at
            least one channel); must be 1.0 for torchvision and timm models.
        **kwargs: Extra arguments: ``image_size`` (default 32; sets the input
            size of ``lenet300``/``lenet5`` and is checked against
            :data:`MIN_IMAGE_SIZE` for every registered model; torchvision
            models take any size their layers allow, see :func:`check_input`);
            ``weights``: starting weights, as in :func:`build_pretrained`
            (its notes, such as a replaced head, go to this module's logger);
            anything else goes to the torchvision constructor or ``timm.create_model``.

    Returns:
        The model, freshly initialised.

    Raises:
        UnknownNameError: The name is neither registered nor a torchvision
            classification model; the message lists the registered names. For
            ``timm/NAME``: an unknown timm model (similar names listed), or timm
            not installed (the message says ``pip install 'pfgdf-plugin[timm]'``).
        ValueError: An argument is out of range.
        TypeError: An unexpected keyword argument for a registered model.
        DataNotFoundError, ConfigError: ``weights`` cannot be loaded (see :func:`build_pretrained`).

    Example:
        >>> m = build_model("resnet20", num_classes=10, width=0.5)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    weights = kwargs.pop("weights", None)
    if weights is not None:
        model, notes = build_pretrained(name, weights, num_classes, in_channels, width, **kwargs)
        for note in notes:
            logger.info(note)
        return model
    _check_common(num_classes, in_channels, width)
    if is_timm_name(name):
        return build_timm_model(name, num_classes, in_channels, width, **kwargs)
    if name.startswith("tv:"):
        tv_name = name[3:]
    elif name in MODELS:
        builder = MODELS.get(name)
        extra = set(kwargs) - {"image_size"}
        if extra:
            raise TypeError(f"unexpected keyword argument(s) for model {name!r}: {', '.join(sorted(extra))}")
        return builder(num_classes=num_classes, in_channels=in_channels, width=float(width), **kwargs)
    else:
        tv_name = name
    tv_names = torchvision_model_names()
    if tv_name not in tv_names:
        known = ", ".join(MODELS.names())
        raise UnknownNameError(
            f"unknown model {name!r}; known: {known}; any torchvision classification model name also "
            f"works (e.g. resnet18 or tv:resnet18)"
        )
    return _torchvision_model(tv_name, num_classes, in_channels, width, **kwargs)


def build_pretrained(
    name: str,
    weights: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    **kwargs: Any,
) -> Tuple[nn.Module, List[str]]:
    """Build model ``name`` for the data and give it starting ``weights``; nothing is downloaded.

    Args:
        name: as in :func:`build_model`.
        weights: a torchvision weights name of a torchvision model (``DEFAULT``,
            ``IMAGENET1K_V1``, ``ResNet18_Weights.IMAGENET1K_V1``), read from
            ``$TORCH_HOME/hub/checkpoints/`` with ``weights_only=True``; ``DEFAULT`` of a
            ``timm/NAME`` model, read by timm from its Hugging Face hub cache (see
            :func:`pfgdf_plugin.timm_models.timm_pretrained`: timm replaces the head and
            adapts the first convolution); or a path to a state dict file (any model). For the
            other weights, a classifier head sized for another number of classes than
            ``num_classes`` (and a first convolution for another ``in_channels``) is kept as
            built; every other layer takes the file's tensors.
        num_classes, in_channels, width, **kwargs: as in :func:`build_model`.

    Returns:
        The model and the notes for the log (a layer kept as built, with the shapes).

    Raises:
        DataNotFoundError: the weights file is not there; for a weights name, one line saying
            which file to put into which folder.
        ConfigError: a weights name the model does not have (the known ones listed), a weights
            name for a registered model, an unreadable file, or a file for another architecture
            (the first missing/unexpected keys and mismatching shapes named).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(build_model("lenet300", num_classes=100, image_size=8).state_dict(), path)
        >>> model, notes = build_pretrained("lenet300", path, num_classes=10, image_size=8)
        >>> notes[0].endswith("the rest loaded")
        True
    """
    if not isinstance(weights, str) or not weights:
        raise ConfigError([f"model.weights must be a weights name or a file path, got {weights!r}"], "model")
    bare = name[3:] if name.startswith("tv:") else name
    named = is_weights_name(weights)
    if named and is_timm_name(name):
        _check_common(num_classes, in_channels, width)
        return timm_pretrained(name, weights, num_classes, in_channels, width, **kwargs)
    if named and (name in MODELS and not name.startswith("tv:")):
        raise ConfigError([f"model.weights {weights!r}: weights names are for torchvision models; model "
                           f"{name!r} takes a path to a state_dict file"], "model")
    if named and bare in PRETRAINED_KWARGS:
        kwargs = {**PRETRAINED_KWARGS[bare], **kwargs}
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)
    return model, load_weights(model, name, weights)


# the wide models (pfgdf_plugin/zoo_wide.py) register themselves here
from . import zoo_wide  # noqa: E402,F401
