"""The networks as their papers describe them, beside the library versions the zoo builds by default:

- `alexnet_paper` (Krizhevsky et al. 2012, section 3 and Figure 2): 96/256/384/384/256 channels, the two
  GPUs' towers kept as grouped convolutions (conv2, conv4, conv5 see only their own tower), local response
  normalization after conv1 and conv2, overlapping 3x3 stride-2 max pooling, dropout 0.5 in the classifier.
  torchvision's `alexnet` is the one-tower 64/192/384/256/256 variant without LRN.
- `googlenet_paper` (Szegedy et al. 2015, Table 1 and Figure 3): true 5x5 branches, no batch norm, LRN in the
  stem, dropout 0.4 before the classifier, and the two auxiliary classifiers on 4a and 4d whose losses join
  the training loss with weight 0.3. torchvision's `googlenet` has batch norm and a 3x3 where the paper has 5x5.

`model_args` switch the parts a study asks about: `lrn: false` (both), `aux_logits: false` (GoogLeNet).
The auxiliary classifiers exist in training only: in eval mode (evaluation, export, serving) the network
returns the main logits alone, so they never reach a registered model's output.
"""

from __future__ import annotations

import torch
from torch import nn


def paper_lrn() -> nn.LocalResponseNorm:
    """The papers' LRN: k=2, n=5, alpha=1e-4, beta=0.75. torch divides alpha by n, so it is given as n x 1e-4."""
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups), nn.ReLU(inplace=True))


class AlexNetPaper(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, lrn: bool = True, in_chans: int = 3):
        super().__init__()
        norm = paper_lrn if lrn else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, 11, 4, 2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),  # overlapping: window 3, stride 2
            nn.Conv2d(96, 256, 5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1),  # conv3 sees both towers
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)  # 6x6 at 224 px as in the paper; other sizes pooled to it
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1 (Table 1's columns), concatenated."""

    def __init__(self, c_in: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int, pool_proj: int):
        super().__init__()
        self.branch1 = conv(c_in, c1, 1)
        self.branch2 = nn.Sequential(conv(c_in, c3_reduce, 1), conv(c3_reduce, c3, 3, padding=1))
        self.branch3 = nn.Sequential(conv(c_in, c5_reduce, 1), conv(c5_reduce, c5, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(c_in, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class Auxiliary(nn.Module):
    """An auxiliary classifier: 5x5 stride-3 average pool (4x4 at 224 px; other sizes pooled to 4x4), 1x1 conv
    of 128, fully connected 1024, dropout 0.7, the classes."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = conv(c_in, 128, 1)
        self.fc = nn.Sequential(
            nn.Linear(128 * 4 * 4, 1024), nn.ReLU(inplace=True), nn.Dropout(0.7), nn.Linear(1024, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(self.pool(x)), 1))


class GoogLeNetPaper(nn.Module):
    """In training mode with `aux_logits`, returns (logits, aux_4a, aux_4d); the module adds the auxiliary
    losses with weight `aux_weight`. In eval mode, the logits alone."""

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.4,
        aux_logits: bool = True,
        aux_weight: float = 0.3,
        lrn: bool = True,
        in_chans: int = 3,
    ):
        super().__init__()
        norm = paper_lrn if lrn else nn.Identity
        self.aux_weight = aux_weight
        self.conv1 = conv(in_chans, 64, 7, 2, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = norm()
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3, padding=1)
        self.norm2 = norm()
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.aux1 = Auxiliary(512, num_classes) if aux_logits else None
        self.aux2 = Auxiliary(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor):
        x = self.maxpool2(self.norm2(self.conv3(self.conv2(self.norm1(self.maxpool1(self.conv1(x)))))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return (logits, aux1, aux2) if aux1 is not None else logits


def auxiliary_heads(model: nn.Module) -> dict[str, nn.Module]:
    """A network's training-only classifiers by attribute name (googlenet_paper's aux1, aux2; none elsewhere):
    what inference, the zoo's parameter count and a logged model leave out."""
    return {name: child for name, child in model.named_children() if name.startswith("aux") and child is not None}
