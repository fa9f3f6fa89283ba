"""Four published ConvNets built in plain PyTorch (random weights), and their ONNX export.

ResNet-18, the GoogLeNet stem with inception 3a/3b and a softmax head, VGG-11 with BatchNorm and
AlexNet conv1-conv2 as published (LRN after ReLU, grouped conv2, a BatchNormalization that no
conv precedes so the exporter cannot fold it). Used by bench/networks.py, the tests and the README
walkthrough; torchvision is not needed.
"""

from __future__ import annotations

import io

import torch
from torch import nn


def _conv_bn(c: int, k: int, f: int, s: int = 1, p: int = 0, eps: float = 1e-5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c, k, f, s, p, bias=False), nn.BatchNorm2d(k, eps=eps), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with a residual (1x1 stride-2 projection when the shape changes)."""

    def __init__(self, c: int, k: int, s: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, k, 3, s, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(k)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(k, k, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(k)
        self.downsample = None
        if s != 1 or c != k:
            self.downsample = nn.Sequential(nn.Conv2d(c, k, 1, s, bias=False), nn.BatchNorm2d(k))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (c, k, s) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c, k, s), BasicBlock(k, k, 1)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Inception(nn.Module):
    """GoogLeNet's block: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated."""

    def __init__(self, c, k1, r3, k3, r5, k5, kp):
        super().__init__()
        self.branch1 = _conv_bn(c, k1, 1, eps=1e-3)
        self.branch2 = nn.Sequential(
            _conv_bn(c, r3, 1, eps=1e-3), _conv_bn(r3, k3, 3, p=1, eps=1e-3)
        )
        self.branch3 = nn.Sequential(
            _conv_bn(c, r5, 1, eps=1e-3), _conv_bn(r5, k5, 5, p=2, eps=1e-3)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=True), _conv_bn(c, kp, 1, eps=1e-3)
        )

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNetStem(nn.Module):
    """GoogLeNet up to inception 3b, then global average pool, fc and softmax."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = _conv_bn(3, 64, 7, 2, 3, eps=1e-3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = _conv_bn(64, 64, 1, eps=1e-3)
        self.conv3 = _conv_bn(64, 192, 3, p=1, eps=1e-3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(480, classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.inception3b(self.inception3a(x))
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return torch.softmax(self.fc(x), dim=1)


def vgg11_bn(classes: int = 1000, hidden: int = 4096) -> nn.Sequential:
    """VGG-11 with BatchNorm for 64x64 input (five pools leave 2x2x512); hidden: FC width."""
    layers: list[nn.Module] = []
    c = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(512 * 2 * 2, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, classes),
    )


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.LocalResponseNorm):
    """nn.LocalResponseNorm exported as one ONNX LRN node (the stock one is decomposed)."""

    def forward(self, x):
        return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)


def alexnet_conv12() -> nn.Sequential:
    """AlexNet conv1-conv2 as published: LRN after ReLU, conv2 in two groups; then a lone BN."""
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4),
        nn.ReLU(inplace=True),
        LRN(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2),
        nn.ReLU(inplace=True),
        LRN(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.BatchNorm2d(256),
    )


NETWORKS = {
    # name: (builder, input side, batch sizes to time)
    "resnet18": (ResNet18, 224, (1, 8)),
    "googlenet-3b": (GoogLeNetStem, 224, (1, 8)),
    "vgg11-bn": (vgg11_bn, 64, (1, 32)),
    "alexnet-conv12": (alexnet_conv12, 227, (1, 16)),
}


def build(name: str, seed: int = 0, **sizes) -> nn.Module:
    """Return network `name` in eval mode with random weights and non-trivial BN statistics.

    sizes go to its builder (vgg11-bn: classes, hidden).
    """
    torch.manual_seed(seed)
    net = NETWORKS[name][0](**sizes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # fresh BN is the identity: make it do something
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.eval()


def to_onnx(net: nn.Module, side: int, *, dynamic_batch: bool = True, opset: int = 17) -> bytes:
    """Export with the TorchScript exporter (the dynamo one needs onnxscript); return the bytes."""
    buf = io.BytesIO()
    axes = {"image": {0: "N"}, "out": {0: "N"}} if dynamic_batch else None
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, side, side),),
        buf,
        input_names=["image"],
        output_names=["out"],
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
    )
    return buf.getvalue()
