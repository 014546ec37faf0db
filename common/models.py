"""The paper's networks (docs/protocol.md, "Networks") with one initialisation rule ("Initialisation").

Every Conv2d and Linear weight is drawn He-normal scaled by ``init_scale``:
``std = init_scale * sqrt(2 / fan_in)``, ``fan_in = C_in * kh * kw`` (or ``in_features``); biases
are 0 and BatchNorm starts at weight 1, bias 0. ``first_layer_std`` replaces the std of the first
layer only (the 2-layer CNN fits random labels only with a tiny first layer: docs/protocol.md).
``seed`` draws the init from its own generator, so it never shares randomness with the data
order or the labels; ``seed=None`` uses torch's global generator.

Every model names its first layer and its classification head through the class attributes
``FIRST`` and ``HEAD`` (module paths), used by :func:`first_layer`, :func:`classifier` and
:func:`replace_classifier`. Inputs are ``(B, 3, 32, 32) float32`` images (``(B, d_in)`` for the
fully connected net); outputs are ``(B, num_classes)`` logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def he_std(layer: nn.Module, init_scale: float = 1.0) -> float:
    """``init_scale * sqrt(2 / fan_in)`` for a Conv2d or Linear layer."""
    fan_in = layer.weight[0].numel()
    return init_scale * math.sqrt(2.0 / fan_in)


@torch.no_grad()
def init_layer(layer: nn.Module, std: float, generator: Optional[torch.Generator] = None) -> None:
    """Weight ~ N(0, std^2) elementwise, bias = 0 (in place)."""
    layer.weight.normal_(0.0, std, generator=generator)
    if layer.bias is not None:
        layer.bias.zero_()


def _init_model(
    model: nn.Module, init_scale: float, first_layer_std: Optional[float], seed: Optional[int]
) -> nn.Module:
    model.init_scale = init_scale
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    first = first_layer(model)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            std = first_layer_std if (mod is first and first_layer_std is not None) else he_std(mod, init_scale)
            init_layer(mod, std, gen)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return model


class VGG16(nn.Module):
    """VGG16 for CIFAR (docs/protocol.md): 13 conv3x3 (padding 1) + ReLU, max-pool after each of the
    5 blocks, no BatchNorm, flatten ``(B, 512*late_width, 1, 1)`` -> ``Linear(512*late_width, K)``.
    ``width`` scales every conv; ``late_width`` scales blocks 4 and 5 ."""

    FIRST, HEAD = "features.0", "head"
    BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, num_classes=10, width=1.0, late_width=1.0):
        super().__init__()
        layers, c_in = [], 3
        for b, block in enumerate(self.BLOCKS):
            for c in block:
                c_out = max(1, round(c * width * (late_width if b >= 3 else 1.0)))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class _PreActBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(torch.relu(self.bn2(o)))
        return o + sc


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016): stem conv
    ``stem_kernel`` x ``stem_kernel`` (padding ``stem_kernel // 2``, so 32x32 stays 32x32), three
    groups of ``(depth-4)/6`` blocks with ``16k, 32k, 64k`` channels (stride 2 at groups 2 and 3),
    BN-ReLU-global average pool-Linear."""

    FIRST, HEAD = "stem", "head"

    def __init__(self, depth=28, widen=4, num_classes=10, stem_kernel=5, stem_width=16):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(3, stem_width, stem_kernel, 1, stem_kernel // 2, bias=False)
        blocks, c_in = [], stem_width
        for g, c in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(n):
                blocks.append(_PreActBlock(c_in, c, 2 if (g > 0 and i == 0) else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        o = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(o.mean(dim=(2, 3)))


class TwoLayerCNN(nn.Module):
    """Conv(3->filters, kernel, no padding) -> ReLU -> flatten -> Linear(hidden) -> ReLU ->
    Linear(K) ( Fig. 4 caption: "256 filters followed by 64 fully-connected nodes")."""

    FIRST, HEAD = "conv", "head"

    def __init__(self, filters=256, kernel=3, hidden=64, num_classes=10, image_size=32):
        super().__init__()
        side = image_size - kernel + 1
        self.conv = nn.Conv2d(3, filters, kernel)
        self.fc = nn.Linear(filters * side * side, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        o = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(o)))


class TwoLayerFC(nn.Module):
    """Linear(d_in, h1) -> ReLU -> Linear(h1, h2) -> ReLU -> Linear(h2, K)."""

    FIRST, HEAD = "fc1", "head"

    def __init__(self, d_in, h1, h2, num_classes=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.head = nn.Linear(h2, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def vgg16(num_classes=10, width=1.0, late_width=1.0, init_scale=1.0, first_layer_std=None, seed=None):
    """VGG16-CIFAR; 14,719,818 parameters at the defaults."""
    return _init_model(VGG16(num_classes, width, late_width), init_scale, first_layer_std, seed)


def wrn(
    depth=28, widen=4, num_classes=10, stem_kernel=5, stem_width=16, init_scale=1.0, first_layer_std=None, seed=None
):
    """Pre-activation WRN-depth-widen; about 5.85 M parameters for WRN-28-4 with a 5x5 stem."""
    return _init_model(
        WideResNet(depth, widen, num_classes, stem_kernel, stem_width), init_scale, first_layer_std, seed
    )


def two_layer_cnn(filters=256, kernel=3, hidden=64, num_classes=10, init_scale=1.0, first_layer_std=None, seed=None):
    """The paper's 2-layer CNN; 14,753,482 parameters at the defaults."""
    return _init_model(TwoLayerCNN(filters, kernel, hidden, num_classes), init_scale, first_layer_std, seed)


def two_layer_fc(d_in, h1, h2, num_classes=10, init_scale=1.0, first_layer_std=None, seed=None):
    """Fully connected net with two hidden layers (Fig. 4 left, Fig. 20)."""
    return _init_model(TwoLayerFC(d_in, h1, h2, num_classes), init_scale, first_layer_std, seed)


def first_layer(model: nn.Module) -> nn.Module:
    """The first Conv2d/Linear layer (the one the paper's alignment results are about)."""
    return model.get_submodule(type(model).FIRST)


def classifier(model: nn.Module) -> nn.Linear:
    """The classification head, ``Linear(features, K)``."""
    return model.get_submodule(type(model).HEAD)


@torch.no_grad()
def replace_classifier(model: nn.Module, num_classes: int, seed: Optional[int] = None) -> nn.Module:
    """Swap in a fresh head with ``num_classes`` outputs, initialised by the model's rule
    (He-normal x ``model.init_scale``, bias 0). Returns the model (changed in place)."""
    old = classifier(model)
    new = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    init_layer(new, he_std(new, getattr(model, "init_scale", 1.0)), gen)
    setattr(model, type(model).HEAD, new)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


BUILDERS = {"vgg16": vgg16, "wrn": wrn, "two_layer_cnn": two_layer_cnn, "two_layer_fc": two_layer_fc}


class ModelSpec:
    """A network as data: a builder name from :data:`BUILDERS` and its keyword arguments (seed
    included). ``build()`` makes it; ``key()`` is what the run cache keys on, so a run's model is
    built from exactly the values in its key."""

    def __init__(self, builder: str, **kwargs):
        if builder not in BUILDERS:
            raise ValueError(f"unknown builder {builder!r}; one of {sorted(BUILDERS)}")
        self.builder, self.kwargs = builder, kwargs

    def build(self) -> nn.Module:
        return BUILDERS[self.builder](**self.kwargs)

    def key(self) -> dict:
        return {"builder": self.builder, **self.kwargs}

    def replace(self, **changes) -> ModelSpec:
        """The same spec with some arguments changed (e.g. another seed)."""
        return ModelSpec(self.builder, **{**self.kwargs, **changes})

    def __repr__(self):
        return f"ModelSpec({self.builder!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()) + ")"


def spec(builder: str, **kwargs) -> ModelSpec:
    """Shorthand for :class:`ModelSpec`."""
    return ModelSpec(builder, **kwargs)
