"""Model registry (smallcnn, resnet50, densenet121) for 1-channel X-rays, and the DP-SGD fix-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck

ModelFactory = Callable[[int, bool], nn.Module]

MODELS: dict[str, ModelFactory] = {}

NUM_CLASSES = {"multilabel": 14, "pneumonia": 1}


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but could not be fetched or read from the hub cache."""


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Add a factory `(num_classes, pretrained) -> nn.Module` to MODELS under `name`."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        return factory

    return add


def num_classes_for(task: str) -> int:
    """Output width for a task: 14 findings (multilabel) or 1 logit (pneumonia)."""
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(NUM_CLASSES)}")
    return NUM_CLASSES[task]


def build_model(
    arch: str, num_classes: int, pretrained: bool = False, dp_safe: bool = False
) -> nn.Module:
    """Build a registered model taking (B, 1, H, W) images and giving (B, num_classes) logits."""
    if arch not in MODELS:
        raise ValueError(
            f"unknown model.arch {arch!r}; expected one of the registered models {sorted(MODELS)}"
        )
    if num_classes < 1:
        raise ValueError(f"expected num_classes >= 1, found {num_classes}")
    model = MODELS[arch](num_classes, pretrained)
    return make_dp_safe(model) if dp_safe else model


# --- smallcnn -------------------------------------------------------------------------------


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Stride-2 stem, then conv blocks 16-32-64-128 (two 3x3 convs + pool each), GAP, linear."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=False),
        )
        blocks = [_conv_block(a, b) for a, b in zip((widths[0], *widths), widths, strict=False)]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register("smallcnn")
def _smallcnn(num_classes: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError(
            "model.arch 'smallcnn' has no pretrained weights; expected model.pretrained: false"
        )
    return SmallCNN(num_classes)


# --- torchvision models ---------------------------------------------------------------------
# Gray input: the first convolution is replaced by a 1-channel one whose kernel is the sum of
# the 3 RGB kernels. conv(repeat(x, 3), W) == conv(x, W.sum(1)), so ImageNet weights behave
# exactly as if the gray channel were repeated, at a third of the first layer's cost and
# without a wrapper module (state_dict keys stay torchvision's).


def _gray_conv(conv: nn.Conv2d) -> nn.Conv2d:
    gray = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            gray.bias.copy_(conv.bias)  # type: ignore[union-attr]
    return gray


def _imagenet(builder: Callable[..., nn.Module], weights: Any, arch: str) -> nn.Module:
    """torchvision `builder(weights=weights)`, turning a failed download into a clear error."""
    try:
        return builder(weights=weights)
    except OSError as exc:  # URLError, socket and file errors are all OSErrors
        cache = torch.hub.get_dir()
        filename = weights.url.rsplit("/", 1)[-1]
        raise PretrainedWeightsUnavailable(
            f"model.pretrained: true for {arch!r} needs the ImageNet weights {weights}, which "
            f"could not be loaded ({type(exc).__name__}: {exc}). Fetching them needs network "
            f"access. On a machine without network, pre-seed the torch hub cache: download "
            f"{weights.url} elsewhere and copy it to {cache}/checkpoints/{filename} (the cache "
            f"follows $TORCH_HOME), or set model.pretrained: false."
        ) from exc


@register("resnet50")
def _resnet50(num_classes: int, pretrained: bool) -> nn.Module:
    weights = tvm.ResNet50_Weights.IMAGENET1K_V2 if pretrained else None
    model: Any = _imagenet(tvm.resnet50, weights, "resnet50")
    model.conv1 = _gray_conv(model.conv1)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@register("densenet121")
def _densenet121(num_classes: int, pretrained: bool) -> nn.Module:
    weights = tvm.DenseNet121_Weights.IMAGENET1K_V1 if pretrained else None
    model: Any = _imagenet(tvm.densenet121, weights, "densenet121")
    model.features.conv0 = _gray_conv(model.features.conv0)
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


# --- DP-SGD compatibility -------------------------------------------------------------------
# Opacus computes per-sample gradients with backward hooks; a hooked module's output that is
# then modified in place fails with "Output 0 of BackwardHookFunction is a view and is being
# modified inplace". torchvision's residual blocks (`out += identity`), DenseNet.forward
# (`F.relu(features, inplace=True)`) and every nn.ReLU(inplace=True) do exactly that. The
# subclasses below differ from torchvision's only in using out-of-place ops; instances are
# re-classed in place, so parameters and state_dict keys are unchanged.


class _DPSafeBasicBlock(BasicBlock):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _DPSafeBottleneck(Bottleneck):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _DPSafeDenseNet(DenseNet):
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=False)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


_DP_SAFE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    BasicBlock: _DPSafeBasicBlock,
    Bottleneck: _DPSafeBottleneck,
    DenseNet: _DPSafeDenseNet,
}


def make_dp_safe(model: nn.Module) -> nn.Module:
    """A copy of `model` that Opacus can train: GroupNorm for BatchNorm, no in-place ops."""
    fixed = ModuleValidator.fix(model)  # returns a deep copy with BatchNorm -> GroupNorm
    for module in fixed.modules():
        if isinstance(module, nn.ReLU | nn.ReLU6 | nn.LeakyReLU | nn.ELU | nn.Hardtanh):
            module.inplace = False
        safe = _DP_SAFE_CLASSES.get(type(module))
        if safe is not None:
            module.__class__ = safe
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(
            f"{type(model).__name__} is still not Opacus-compatible after make_dp_safe: {errors}"
        )
    return fixed


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
