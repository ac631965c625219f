"""Vanishing gradients, measured: the gradient norm of the first conv layer over the last layer's, for a deep
plain network (VGG-19 without batch norm) and a residual one (ResNet-18), each with ReLU and with the
saturating sigmoid and tanh (`model.act`), on CIFAR-10 at 32 px: at initialisation and after some SGD steps.

    python benchmarks/gradient_flow.py [--steps 20] [--models vgg19 resnet18] [--data ../shared/data/cifar10]

Prints one row per network and activation: first/last gradient-norm ratio at step 0 and at the last step,
and the training loss there. A ratio far below 1 is the vanishing gradient the activation study shows
(recipes/studies/activations*.yaml: the GradientFlow callback's plots/gradient_flow.png per run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab.cnnlab_model import read_image
from cnnlab.data import DataModule
from cnnlab.module import ClassifierModule


def ratios(model: str, act: str, batches: list, steps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    module = ClassifierModule(model=model, num_classes=10, image_size=32, act=act, small_input=True)
    layers = [m for m in module.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    first = last = loss = 0.0
    for step in range(steps + 1):
        images, labels = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module.raw_logits(images), labels)
        loss.backward()
        ratio = float(layers[0].weight.grad.norm() / layers[-1].weight.grad.norm().clamp(min=1e-30))
        if step == 0:
            first = ratio
        last = ratio
        optimizer.step()
    return first, last, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["vgg19", "resnet18"])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    args = parser.parse_args()
    train = DataModule(args.data, image_size=32, num_workers=0).splits["train"]
    batches = []  # four fixed batches of training images, uint8 N x 3 x 32 x 32
    for start in range(0, 4 * args.batch, args.batch):
        images = np.stack([read_image(train.raw(i))[0] for i in range(start, start + args.batch)])
        labels = torch.tensor(train.labels[start : start + args.batch])
        batches.append((torch.from_numpy(images).permute(0, 3, 1, 2), labels))
    print(f"{'network':<10} {'act':<8} {'first/last grad, step 0':>24} {f'step {args.steps}':>10} {'loss':>7} {'s':>5}")
    for model in args.models:
        for act in ("relu", "sigmoid", "tanh"):
            began = time.perf_counter()
            first, last, loss = ratios(model, act, batches, args.steps)
            print(f"{model:<10} {act:<8} {first:>24.2e} {last:>10.2e} {loss:>7.3f} {time.perf_counter() - began:>5.0f}")


if __name__ == "__main__":
    main()
