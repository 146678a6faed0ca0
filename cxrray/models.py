"""Model registry: build_model(name, ...) with a Grad-CAM layer per architecture.

Every model is wrapped in `CXRModel`, which takes the pipeline's uint8 [N, 1, S, S] (or
float) images, normalises them with the artifact's `Preprocess` and replicates grey to 3
channels when the backbone expects RGB. The wrapper is what gets saved, so the normalisation
is part of the weights' contract.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cxrray.transforms import Preprocess

log = logging.getLogger(__name__)


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but are not on this machine."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]  # (num_outputs[, in_channels=]) -> backbone emitting logits
    gradcam_layer: str  # attribute path inside the backbone
    head: str  # attribute path of the final classifier (transfer learning trains only this)
    torchvision_weights: str | None = None  # torchvision weights enum name, for ImageNet init
    # True: builder(num_outputs, in_channels=...) takes grey input natively (from-scratch models);
    # False: a 3-channel torchvision model whose first conv is adapted for grey input.
    native_channels: bool = False


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


def _tv(name: str):
    import torchvision.models as tvm

    return getattr(tvm, name)


def _densenet121(n: int) -> nn.Module:
    m = _tv("densenet121")(weights=None)
    m.classifier = nn.Linear(m.classifier.in_features, n)
    return m


def _resnet50(n: int) -> nn.Module:
    m = _tv("resnet50")(weights=None)
    m.fc = nn.Linear(m.fc.in_features, n)
    return m


def _vgg16(n: int) -> nn.Module:
    m = _tv("vgg16")(weights=None)
    m.classifier[6] = nn.Linear(m.classifier[6].in_features, n)
    return m


def _inception_v3(n: int) -> nn.Module:
    # aux_logits stays on so ImageNet weights load and training gets the auxiliary loss;
    # init_weights=False skips torchvision's slow scipy truncnorm init.
    m = _tv("inception_v3")(weights=None, aux_logits=True, init_weights=False)
    m.fc = nn.Linear(m.fc.in_features, n)
    m.AuxLogits.fc = nn.Linear(m.AuxLogits.fc.in_features, n)
    return m


class SmallCNN(nn.Module):
    """A from-scratch baseline like the Kermany student CNNs: 5 conv blocks, global pooling."""

    def __init__(self, num_outputs: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 4, width * 8]
        blocks = []
        for i in range(5):
            blocks += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 4:  # the last block keeps its resolution for a sharper Grad-CAM map
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(chans[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


register(ModelSpec("densenet121", _densenet121, "features", "classifier", "DenseNet121_Weights"))
register(ModelSpec("resnet50", _resnet50, "layer4", "fc", "ResNet50_Weights"))
register(ModelSpec("vgg16", _vgg16, "features.29", "classifier.6", "VGG16_Weights"))
register(ModelSpec("inception_v3", _inception_v3, "Mixed_7c", "fc", "Inception_V3_Weights"))
register(ModelSpec("small_cnn", SmallCNN, "features", "classifier", None, native_channels=True))
# A quarter of the width (0.09 M parameters vs 1.47 M): trains in about a minute on a 2-core CPU at 128 px,
# for CPU-only demos, quick checks and the Grad-CAM pointing-game test.
register(ModelSpec("tiny_cnn", partial(SmallCNN, width=8), "features", "classifier", None,
                   native_channels=True))


class CXRModel(nn.Module):
    """Normalisation + channel handling + backbone. Input uint8 or float in [0,1], [N,1,H,W]."""

    def __init__(self, backbone: nn.Module, pre: Preprocess):
        super().__init__()
        self.backbone = backbone
        self.channels = pre.channels
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        out = self.backbone(x)
        # Inception in training mode returns (logits, aux_logits): keep both for the loss.
        if hasattr(out, "aux_logits"):
            return (out.logits, out.aux_logits) if out.aux_logits is not None else out.logits
        return out


def _adapt_first_conv_to_grey(backbone: nn.Module) -> None:
    """Replace the first 3-channel conv by a 1-channel one whose weights are the sum over RGB,
    which gives the same response to a grey image as the replicated input would."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(1, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.weight.sum(dim=1, keepdim=True))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent = backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return
    raise ValueError("no 3-channel convolution found to adapt")


def imagenet_weights_path(spec: ModelSpec) -> Path | None:
    """Where torchvision would cache this model's ImageNet weights, if they are there."""
    if spec.torchvision_weights is None:
        return None
    import torchvision.models as tvm

    url = getattr(tvm, spec.torchvision_weights).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.exists() else None


def load_pretrained(backbone: nn.Module, spec: ModelSpec, pretrained: str) -> None:
    """Load ImageNet weights from the torch hub cache ("imagenet") or a file; never download."""
    if pretrained == "imagenet":
        path = imagenet_weights_path(spec)
        if path is None:
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights for {spec.name} are not in the torch hub cache ({torch.hub.get_dir()}/checkpoints)"
                " and cxrray never downloads at run time. Copy the torchvision weights file there, pass"
                " pretrained=/path/to/weights.pth, or train from scratch with pretrained=none."
            )
    else:
        path = Path(pretrained)
        if not path.exists():
            raise PretrainedWeightsUnavailable(f"pretrained weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The classifier head has a different number of classes: drop it and keep the rest.
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d pretrained tensors from %s (skipped %d: %s)", len(usable), path, len(skipped), skipped[:4])


def build_model(
    name: str,
    num_outputs: int,
    pre: Preprocess,
    *,
    pretrained: str | None = None,
    freeze_backbone: bool = False,
) -> CXRModel:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    if spec.native_channels:
        backbone = spec.builder(num_outputs, in_channels=pre.channels)
    else:
        backbone = spec.builder(num_outputs)
    if pretrained and pretrained.lower() not in ("none", "false", "scratch"):
        if spec.torchvision_weights is None and pretrained == "imagenet":
            raise PretrainedWeightsUnavailable(f"{name} has no ImageNet weights; train it from scratch")
        load_pretrained(backbone, spec, pretrained)
    if pre.channels == 1 and not spec.native_channels:
        _adapt_first_conv_to_grey(backbone)
    if freeze_backbone:
        head = backbone.get_submodule(spec.head)
        for p in backbone.parameters():
            p.requires_grad = False
        for p in head.parameters():
            p.requires_grad = True
        if name == "inception_v3":
            for p in backbone.AuxLogits.fc.parameters():
                p.requires_grad = True
    return CXRModel(backbone, pre)


def gradcam_layer_path(name: str) -> str:
    """Grad-CAM layer as a path inside CXRModel (stored in the artifact)."""
    return f"backbone.{REGISTRY[name].gradcam_layer}"
