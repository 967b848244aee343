"""Models for the examples and benchmarks: a small CNN, CIFAR-style ResNet18/20, VGG16_bn, and
the ImageNet ResNet50 (the paper's distributed benchmark; ``examples/scaling/`` counts its bytes).

The ResNet follows torchvision's BasicBlock (ReLU(inplace=True), ``out += identity``) with the
CIFAR stem (3×3 conv, no max-pool) for 32×32 inputs. ResNet50 follows torchvision's
``resnet50`` (v1.5: the stride on the 3×3 conv of a Bottleneck; 7×7 stem and max-pool).
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv layers and two linear layers for 28×28 single-channel images (~0.4M params)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``: the shortcut is the identity, or a strided 1×1
    projection with BatchNorm (``downsample``) when the body changes the shape."""

    def add_shortcut(self, inplanes: int, out: int, stride: int) -> None:
        """The ReLU and the shortcut, registered after the body's layers: the order in which
        the seeded initialisation draws (and the parameters are listed) stays torchvision's."""
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.body(x)
        out += identity
        return self.relu(out)


class BasicBlock(Residual):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.add_shortcut(inplanes, planes, stride)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(Residual):
    """torchvision's Bottleneck: 1×1 reduce, 3×3 (with the stride), 1×1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.add_shortcut(inplanes, out, stride)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """``layers[i]`` residual blocks (``block``) at width ``width·2^i`` (times the block's
    expansion out), stage i ≥ 1 halving the resolution (stages named ``layer1``, ``layer2``,
    ... as in torchvision), global average pool, linear head. The stem is CIFAR's 3×3 conv, or
    with ``imagenet_stem`` ImageNet's 7×7/2 conv and 3×3/2 max-pool."""

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
        block: type[BasicBlock | Bottleneck] | None = None,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        block = block or BasicBlock
        self.conv1 = (
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            if imagenet_stem
            else nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        inplanes = width
        self.stages: list[str] = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [block(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * block.expansion
            stage += [block(inplanes, planes) for _ in range(blocks - 1)]
            self.stages.append(f"layer{i + 1}")
            self.add_module(self.stages[-1], nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """CIFAR-style ResNet18 (11.2M parameters at width 64)."""
    return ResNet([2, 2, 2, 2], num_classes, width, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """He et al.'s CIFAR ResNet-20: three stages of three BasicBlocks at widths 16/32/64
    (0.27M parameters; 1×1-conv shortcuts where the shape changes)."""
    return ResNet([3, 3, 3], num_classes, 16, in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """torchvision's ResNet50 (25,557,032 parameters at 1000 classes); any input of at least
    32×32 runs (the global pool absorbs the size)."""
    return ResNet([3, 4, 6, 3], num_classes, 64, in_channels, Bottleneck, imagenet_stem=True)


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR-style VGG16 with BatchNorm (one 512→classes linear head)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


#: the deep autoencoder's widths: 8 Linear layers of 30k-314k weights each
AUTOENCODER_WIDTHS = (784, 400, 300, 200, 150, 200, 300, 400, 784)


def autoencoder(widths: tuple[int, ...] = AUTOENCODER_WIDTHS) -> nn.Module:
    """A deep MLP autoencoder (Hinton & Salakhutdinov's kind, as K-FAC's papers benchmark it):
    Linear layers with tanh between them, the last one's output the logits of a Bernoulli per
    pixel (train it with ``binary_cross_entropy_with_logits``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ViT(nn.Module):
    """A small Vision Transformer from torch.nn modules: a patch-embedding convolution, a class
    token and learned positions (bare parameters), pre-LN ``nn.TransformerEncoderLayer``
    blocks, a final LayerNorm and a linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        image: int = 28,
        patch: int = 7,
        width: int = 64,
        layers: int = 2,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.patches = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, 4, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, patches, width)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = self.blocks(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        return self.head(self.norm(h[:, 0]))


MODELS = {
    "cnn": SmallCNN,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vgg16_bn": vgg16_bn,
    "vit": ViT,
}
#: the models that take Fashion-MNIST as it is (28×28, one channel); the others take it padded
#: to 32×32 with 3 channels, as CIFAR-style networks do
NATIVE_28 = ("cnn", "vit")
