"""The upstream AMI architectures, built so the published state dicts load strictly, then
prepared for fast inference (BatchNorm folded, mixed precision where it is safe).

Builders match ``trapdata/ml/models/{localization,classification}.py`` module for module:
the detector is torchvision's ``fasterrcnn_resnet50_fpn`` (v1) with 2 classes and the
FrozenBatchNorm trunk upstream gets from its ImageNet backbone default (so the keys match);
species models are timm ResNet-50, the moth filter torchvision ResNet-50, the order model
timm ConvNeXt-Tiny and the Turing models a torchvision ResNet-50 trunk with a bias-free head.
Nothing is downloaded: every builder starts from random weights.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from antenna_flows.models.registry import ClassifierSpec, DetectorSpec

BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def build_detector(spec: DetectorSpec) -> FasterRCNN:
    """``fasterrcnn_resnet50_fpn(num_classes=2, box_detections_per_img=...)`` without any download."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return FasterRCNN(
        backbone,
        num_classes=2,
        min_size=spec.min_size,
        max_size=spec.max_size,
        box_detections_per_img=spec.max_detections,
    )


class TuringResNet50(nn.Module):
    """The Turing team's classifier: ResNet-50 without its pooling/fc, average pool, bias-free linear."""

    def __init__(self, num_classes: int):
        super().__init__()
        trunk = resnet50(weights=None)
        self.backbone = nn.Sequential(*list(trunk.children())[:-2])
        self.avgpool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.classifier = nn.Linear(trunk.fc.in_features, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.backbone(x)), 1))


def build_classifier(spec: ClassifierSpec, num_classes: int) -> nn.Module:
    import timm  # noqa: PLC0415 - heavy, and only the classifiers need it

    if spec.architecture == "torchvision_resnet50":
        return resnet50(weights=None, num_classes=num_classes)
    if spec.architecture == "timm_resnet50":
        return timm.create_model("resnet50", pretrained=False, num_classes=num_classes)
    if spec.architecture == "timm_convnext_tiny":
        # upstream asks for "convnext_tiny_in22k", a deprecated alias of this architecture
        return timm.create_model("convnext_tiny", pretrained=False, num_classes=num_classes)
    if spec.architecture == "turing_resnet50":
        return TuringResNet50(num_classes)
    raise ValueError(f"unknown architecture {spec.architecture!r}")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv (in registration order) into that conv.

    Exact in eval mode, and it removes an elementwise pass per conv; on GPU it also keeps
    autocast activations in bf16 (FrozenBatchNorm's fp32 buffers would promote them).
    Only valid for modules whose forward applies the BN right after the conv: the ResNet
    trunks here (torchvision and timm name them conv1/bn1, ..., downsample[0]/[1]).
    """
    children = list(module.named_children())
    for (_, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, BATCH_NORMS) and conv.out_channels == bn.weight.shape[0]:
            conv.weight, conv.bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            setattr(module, bn_name, nn.Identity())
    for _, child in children:
        fold_batchnorm(child)
    return module


def resnet_trunks(model: nn.Module, spec: ClassifierSpec | DetectorSpec) -> list[nn.Module]:
    """The parts of ``model`` that :func:`fold_batchnorm` may rewrite."""
    if isinstance(spec, DetectorSpec):
        return [model.backbone.body]
    if spec.architecture == "timm_convnext_tiny":
        return []  # LayerNorm, nothing to fold
    return [model]


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _to_float32(v)) for k, v in value.items())
    return value


class Autocast(nn.Module):
    """Run ``inner`` under autocast and hand float32 back, so precision-sensitive code after it
    (anchor generation, box decoding, softmax) stays in float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.channels_last = channels_last
        self.out_channels = getattr(inner, "out_channels", None)  # FasterRCNN reads it off the backbone

    def forward(self, *args: Any) -> Any:
        if self.channels_last and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        with torch.autocast(device_type=_device_type(args), dtype=self.dtype):
            return _to_float32(self.inner(*args))


def _device_type(args: Any) -> str:
    """The device type of the first tensor in ``args`` (lists of feature maps included): "cuda"
    in production; "cpu" when a test runs the reduced-precision configuration on a CPU."""
    for value in args:
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if isinstance(v, torch.Tensor)), None)
        elif isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cuda"


def prepare_for_inference(model: nn.Module, spec: ClassifierSpec | DetectorSpec, device: torch.device,
                          dtype: torch.dtype | None, channels_last: bool) -> nn.Module:
    """Fold BatchNorm, move to ``device`` and, when ``dtype`` is set (CUDA only), wrap the heavy
    parts in :class:`Autocast`: the whole classifier; the detector's trunk+FPN, RPN head and box
    head/predictor, leaving anchors, box decoding and NMS in float32 (bf16 box coordinates would
    be quantised to 8 px at 1333 px)."""
    model.eval()
    for trunk in resnet_trunks(model, spec):
        fold_batchnorm(trunk)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dtype is None:
        return model
    if isinstance(spec, DetectorSpec):
        model.backbone = Autocast(model.backbone, dtype, channels_last)
        model.rpn.head = Autocast(model.rpn.head, dtype, channels_last)
        model.roi_heads.box_head = Autocast(model.roi_heads.box_head, dtype, False)
        model.roi_heads.box_predictor = Autocast(model.roi_heads.box_predictor, dtype, False)
        return model
    return Autocast(model, dtype, channels_last).eval()
