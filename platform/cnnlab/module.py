"""ClassifierModule: one LightningModule for every zoo model, taking uint8 images straight from the loader."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.cli import LRSchedulerTypeUnion, OptimizerCallable
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from cnnlab import UserError
from cnnlab.calibration import Reliability
from cnnlab.data import DEFAULT_IMAGE_SIZE, limited
from cnnlab.models import MIN_INPUT, SMALL_INPUT_FAMILIES, create_model, new_layers
from cnnlab.pretrained import load_into, match_shapes, preprocessing

# A scheduler class_path: torch's, cnnlab.schedules' or timm's (timm.scheduler.CosineLRScheduler ...)
SchedulerCallable = Callable[[torch.optim.Optimizer], LRSchedulerTypeUnion | TimmScheduler]


class ClassifierModule(L.LightningModule):
    """Single-label image classifier around any zoo model.

    Args:
        model: a zoo name (`cnnlab zoo`) or any timm model name.
        classes, num_classes, image_size: come from the data (linked by the CLI).
        act: replace every activation (relu, leaky_relu, elu, gelu, silu, mish, ... and the saturating sigmoid, tanh).
        drop_rate, drop_path_rate: dropout before the classifier; stochastic depth (every timm model with it:
            resnet*, convnext*, efficientnet*, vit* ...).
        small_input: CIFAR-style stem for 32 px inputs.
        model_args: passed to the architecture's constructor (timm's or torchvision's), e.g. DenseNet's
            `{growth_rate: 12, block_config: [16, 16, 16]}`.
        label_smoothing, mixup, cutmix: loss-side regularization (mixup/cutmix alphas; 0 turns them off).
        loss: `cross_entropy`, or `focal` (Lin et al. 2017: (1 - p)^focal_gamma x the cross-entropy, which
            down-weights the easy, frequent examples).
        class_weights: weigh each class's loss: `balanced` (n / (classes x count) over the training split,
            sklearn's rule) or one weight per class. For imbalanced data; see also data.sampler.
        l1: an L1 penalty, l1 x the sum of |w| over the conv and linear weights, added to the training loss.
        pretrained: start from trained weights (fine-tuning, see cnnlab.pretrained): `true` (the timm /
            torchvision hub), a weights file or URL (.safetensors, .pth, .bin), or any cnnlab model URI
            (`models:/NAME@ALIAS`, a run id, a .ckpt ...). A new classifier where the classes differ.
        optimizer: any torch or timm optimizer by class_path; norms and biases get no weight decay. Unset,
            AdamW with torch's defaults. (No default object here: jsonargparse would carry its init_args,
            such as AdamW's weight_decay, into whatever optimizer a recipe picks.)
        lr_scheduler: any torch, timm or cnnlab.schedules scheduler by class_path (`cnnlab.schedules.OneCycle`,
            `cnnlab.schedules.Cosine`, `torch.optim.lr_scheduler.MultiStepLR` ...); a `total_steps` it leaves
            unset is the fit's length in `lr_interval`s. Unset, a constant LR. Logged per step as `lr/GROUP`.
        lr_interval: step the scheduler every optimizer `step` or every `epoch` (a timm scheduler steps as its own
            t_in_epochs says: per epoch, or per update with t_in_epochs false; its t_initial counts those).
        warmup_epochs: linear warmup before the scheduler (torch's LinearLR then the scheduler, SequentialLR).
        lr_monitor: the metric a ReduceLROnPlateau scheduler watches.
        layer_decay: layer-wise LR decay (timm's param_groups_layer_decay): each layer's LR is this factor
            times the next one's, the classifier's the optimizer's own (e.g. 0.75 when fine-tuning).
        mean, std: per-channel normalization, applied on the device to 0..255 pixels. Unset, the
            pretrained weights' own, else ImageNet's.
        channels_last: default on when training on a GPU or in bf16 (bf16 convolutions on a CPU without bf16
            kernels take about 15x longer in the default layout).
        compile: wrap the network in torch.compile (mode `compile_mode`).
        tta: test-time augmentation for `test` and recipe `predict`: `flip` averages each image's probabilities
            with its mirror's; `ten_crop` is the AlexNet/ResNet papers' protocol (the four corner crops and the
            centre crop of the image resized to image_size / crop_pct, and their mirrors: torchvision's
            ten_crop). The logged model still predicts one centre crop.
        calibrate: before a test (and so before the model is logged), fit a temperature on the val split's
            logits (cnnlab.calibration); the network divides its logits by it, so every runtime gives
            calibrated probabilities. Logs test/ece (calibrated) and test/ece_uncalibrated.
        mistakes: after a test, log the gallery of this many test images the model got wrong with the highest
            confidence, each beside its class-activation map (mistakes/*.png and *.csv on the run); 0: none
    """

    def __init__(
        self,
        model: str = "resnet18",
        classes: list[str] | None = None,
        num_classes: int = 10,
        image_size: int | None = None,
        act: str | None = None,
        drop_rate: float | None = None,
        drop_path_rate: float = 0.0,
        small_input: bool = False,
        model_args: dict | None = None,
        pretrained: bool | str = False,
        label_smoothing: float = 0.0,
        loss: Literal["cross_entropy", "focal"] = "cross_entropy",
        focal_gamma: float = 2.0,
        class_weights: Literal["balanced"] | list[float] | None = None,
        l1: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: SchedulerCallable | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        warmup_epochs: float = 0.0,
        lr_monitor: str = "val/loss",
        layer_decay: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        tta: Literal["flip", "ten_crop"] | None = None,
        calibrate: bool = True,
        mistakes: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"], logger=False)
        self.hparams.image_size = image_size or DEFAULT_IMAGE_SIZE
        if classes is not None:
            num_classes = len(classes)
        self.classes = classes or [str(i) for i in range(num_classes)]
        self.net = create_model(
            model,
            num_classes=num_classes,
            act=act,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            small_input=small_input,
            pretrained=pretrained is True,
            model_args=model_args,
        )
        # The layers that start untrained (what FreezeBackbone trains first); every layer without pretrained weights.
        fresh = new_layers(self.net, model, small_input)
        if isinstance(pretrained, str):
            self.new_layers = load_into(self.net, pretrained, model, fresh, self.classes)
        elif pretrained:  # the hub's weights: its ImageNet classifier fits a 1000-class model as it is
            self.new_layers = list(fresh)[1:] if num_classes == 1000 else list(fresh)
        else:
            self.new_layers = []
        self.backbone_lr = 1.0  # the pretrained layers' LR as a fraction of the optimizer's (set by FreezeBackbone)
        if mean is None or std is None:  # recorded as used, so checkpoints and logged models carry them
            wanted = preprocessing(model, pretrained) if pretrained else {}
            self.hparams.mean = mean = tuple(mean or wanted.get("mean", IMAGENET_DEFAULT_MEAN))
            self.hparams.std = std = tuple(std or wanted.get("std", IMAGENET_DEFAULT_STD))
        self.compiled: tuple | None = None
        self.loss_hook = None  # callbacks such as Distillation replace the training loss through this
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup or cutmix
            else None
        )
        if self.mixup and (class_weights or loss != "cross_entropy"):
            raise UserError(
                "model.mixup/model.cutmix train on soft targets: remove model.class_weights and model.loss."
            )
        if isinstance(class_weights, list) and len(class_weights) != num_classes:
            raise UserError(f"model.class_weights has {len(class_weights)} weights for {num_classes} classes.")
        if self.mixup:
            self.loss = SoftTargetCrossEntropy()
        else:
            self.loss = FocalLoss(focal_gamma if loss == "focal" else 0.0, label_smoothing)
        if isinstance(class_weights, list):
            self.loss.weight = torch.tensor(class_weights, dtype=torch.float)
        self.eval_loss = nn.CrossEntropyLoss()
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes >= 5:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val/", compute_groups=False)
        self.test_metrics = MetricCollection(metrics, prefix="test/", compute_groups=False).clone()
        self.temperature = 1.0  # logits / temperature: fitted by `calibrate`, part of the logged network
        self.calibration: dict | None = None  # what `calibrate` found, recorded in the model's cnnlab.json
        self.reliability = nn.ModuleDict({"ece": Reliability(), "ece_uncalibrated": Reliability()})  # test split
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None  # the last test's matrix
        self.test_reliability: dict = {}  # and its reliability tables (cnnlab.calibration.Reliability.table)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0..255 pixels (uint8 or float, N x 3 x H x W) to the network's normalized float input."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (divided by the temperature) of 0..255 images: what the logged model computes."""
        return self.raw_logits(images) / self.temperature

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.run_net(self.normalize(images))

    def run_net(self, x: torch.Tensor) -> torch.Tensor:
        """The network, compiled where `compile` asks for it (self.net itself stays the plain module)."""
        return (self.compiled[0] if self.compiled else self.net)(x)

    def setup(self, stage: str) -> None:
        self._check_input_size()
        on_gpu = isinstance(self.trainer.accelerator, CUDAAccelerator)
        if self.hparams.channels_last is None:
            self.hparams.channels_last = on_gpu or self.trainer.precision.startswith("bf16")
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.mixup or self.hparams.cutmix:
            batch = getattr(self.trainer.datamodule, "batch_size", 2)
            if batch % 2:
                raise UserError(f"data.batch_size={batch} must be even with model.mixup/model.cutmix.")
        if stage == "fit" and self.hparams.class_weights == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            labels = np.asarray(self.trainer.datamodule.splits["train"].labels)
            present = np.unique(labels)
            weights = torch.ones(len(self.classes))
            weights[present] = torch.tensor(compute_class_weight("balanced", classes=present, y=labels)).float()
            self.loss.weight = weights.to(self.device)
        if self.hparams.compile and not self.compiled:
            # In a tuple, not an attribute of its own: a module attribute would enter the state dict twice.
            self.compiled = (torch.compile(self.net, mode=self.hparams.compile_mode),)

    @functools.cached_property
    def flops_per_batch(self) -> int:
        """FLOPs of one training step (forward and backward) on a batch, for ThroughputMonitor's FLOP/s and MFU:
        counted on the meta device (shapes only), when the monitor first asks."""
        import copy

        from lightning.fabric.utilities.throughput import measure_flops

        size, batch = self.hparams.image_size, getattr(self.trainer.datamodule, "batch_size", 1)
        # the monitor asks from under inference_mode: the count needs autograd for the backward pass
        with torch.inference_mode(False), torch.enable_grad():
            net = copy.deepcopy(self.net).to("meta")
            with torch.device("meta"):
                images = torch.empty(batch, 3, size, size)
            return measure_flops(net, lambda: net(images), lambda out: sum(o.sum() for o in _outputs(out)))

    def _check_input_size(self) -> None:
        size, name = self.hparams.image_size, self.hparams.model
        training = self.net.training
        try:
            with torch.inference_mode():
                self.net.eval()(torch.zeros(1, 3, size, size))
        except RuntimeError as err:
            need = f" It needs at least {MIN_INPUT[name]} px." if name in MIN_INPUT else ""
            raise UserError(
                f"model='{name}' cannot take {size}x{size} inputs ({str(err).splitlines()[0]}).{need} "
                f"Raise data.image_size, or for 32 px inputs set model.small_input: true with one of "
                f"{SMALL_INPUT_FAMILIES}."
            ) from None
        finally:
            self.net.train(training)

    def training_step(self, batch, batch_idx):
        if batch is None:  # every image of this batch was bad and skipped
            return None
        images, targets = batch
        x = self.normalize(images)
        soft_targets = None
        if self.mixup:
            x, soft_targets = self.mixup(x, targets)
        logits, *aux = _outputs(self.run_net(x))
        target = targets if soft_targets is None else soft_targets
        loss = self.loss(logits, target)
        if aux:  # auxiliary classifiers (googlenet_paper), in training only
            aux_loss = sum(self.loss(a, target) for a in aux)
            self.log("train/aux_loss", aux_loss, on_step=False, on_epoch=True)
            loss = loss + self.net.aux_weight * aux_loss
        if soft_targets is None:
            self.train_acc(logits, targets)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if self.loss_hook is not None:
            loss = self.loss_hook(x, logits, loss)
        if self.hparams.l1:
            penalty = sum(m.weight.abs().sum() for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            self.log("train/l1_penalty", penalty, on_step=False, on_epoch=True)
            loss = loss + self.hparams.l1 * penalty
        # Not in the progress bar: showing it every step would sync the GPU every step.
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def augmented(self, images: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Log of the probabilities averaged over the test-time views (usable as logits by every metric)."""
        if self.hparams.tta == "ten_crop":
            from torchvision.transforms.v2.functional import ten_crop

            views = ten_crop(images, [self.hparams.image_size] * 2)
        else:
            views = [images, images.flip(-1)]
        t = self.temperature if temperature is None else temperature
        return torch.stack([(self.raw_logits(view).float() / t).softmax(-1) for view in views]).mean(0).log()

    def _evaluate(self, batch, metrics: MetricCollection, stage: str):
        if batch is None:
            return None
        images, targets = batch
        tta = stage == "test" and self.hparams.tta
        raw = self.augmented(images, 1.0) if tta else self.raw_logits(images).float()
        logits = self.augmented(images) if tta else raw / self.temperature
        self.log(f"{stage}/loss", self.eval_loss(logits, targets), prog_bar=stage == "val", sync_dist=True)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=stage == "val")
        if stage == "test":
            for name, seen in (("ece", logits), ("ece_uncalibrated", raw)):
                self.reliability[name].update(seen, targets)
                self.log(f"test/{name}", self.reliability[name])
        return logits

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        logits = self._evaluate(batch, self.test_metrics, "test")
        if logits is not None:
            self.confusion.update(logits, batch[1])

    def on_test_start(self) -> None:
        if self.hparams.calibrate:
            self.calibrate(self.trainer.datamodule)

    @torch.no_grad()
    def calibrate(self, datamodule) -> None:
        """Fit the temperature on the val split's logits (a plain pass, every rank alike), and record it with the
        split's ECE before and after and its confidence curve. Without a val split the temperature stays."""
        from cnnlab.calibration import confidence_curve, fit_temperature

        if "val" not in getattr(datamodule, "splits", {}):
            return
        training, outputs, labels = self.training, [], []
        self.eval()
        for batch in limited(datamodule.val_dataloader(), self.trainer.limit_val_batches):
            if batch is not None:
                outputs.append(self.raw_logits(batch[0].to(self.device)).float().cpu())
                labels.append(batch[1])
        self.train(training)
        if not outputs:
            return
        logits, labels = torch.cat(outputs), torch.cat(labels)
        self.temperature = fit_temperature(logits, labels)
        before, after = Reliability(), Reliability()
        before.update(logits, labels)
        after.update(logits / self.temperature, labels)
        self.calibration = {
            "temperature": round(self.temperature, 6),
            "split": "val",
            "images": len(labels),
            "ece_before": round(float(before.compute()), 6),
            "ece_after": round(float(after.compute()), 6),
            "curve": confidence_curve(logits / self.temperature, labels),
        }

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu()  # collective under DDP: every rank computes
        self.confusion.reset()
        recall = matrix.diag() / matrix.sum(1).clamp(min=1)  # per-class accuracy
        precision = matrix.diag() / matrix.sum(0).clamp(min=1)
        for name, acc, prec in zip(self.classes, recall, precision):
            self.log(f"test/acc_class/{name}", acc.item(), rank_zero_only=True)
            self.log(f"test/precision_class/{name}", prec.item(), rank_zero_only=True)
        self.test_confusion = matrix  # drawn and logged by the tracking callback, with the reliability tables
        self.test_reliability = {name: metric.table() for name, metric in self.reliability.items()}

    def predict_step(self, batch, batch_idx):
        return self.augmented(batch[0]).exp() if self.hparams.tta else self(batch[0]).float().softmax(-1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        match_shapes(self, checkpoint["state_dict"])  # a structurally pruned network keeps its smaller shapes

    def configure_optimizers(self):
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        skip = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else ()
        # Norms, biases and the model's own exceptions get no weight decay, the rest the optimizer's own: timm
        # marks the decayed group with the value given, which is then dropped so the optimizer's default applies.
        if self.hparams.layer_decay:
            if not hasattr(self.net, "group_matcher"):
                raise UserError(
                    f"model.layer_decay needs a timm model that groups its layers; model='{self.hparams.model}' "
                    "does not. Remove model.layer_decay (cnnlab.callbacks.FreezeBackbone's backbone_lr still applies)."
                )
            groups = param_groups_layer_decay(
                self.net, weight_decay=1.0, no_weight_decay_list=skip, layer_decay=self.hparams.layer_decay
            )
        else:
            groups = param_groups_weight_decay(self.net, weight_decay=1.0, no_weight_decay_list=skip)
        if self.backbone_lr != 1.0:  # pretrained layers apart from the new ones, at their own LR
            new = {id(p) for layer in self.new_layers for p in self.net.get_submodule(layer).parameters()}
            groups = [
                {**g, "params": params, "lr_scale": g.get("lr_scale", 1.0) * (1.0 if fresh else self.backbone_lr)}
                for g in groups
                for fresh in (True, False)
                if (params := [p for p in g["params"] if (id(p) in new) == fresh])
            ]
        names = set()
        for group in groups:  # a name per group, for its `lr/NAME` metric
            name = "decay" if group["weight_decay"] else "no_decay"
            if group.get("lr_scale", 1.0) != 1.0:
                name += f"_x{group['lr_scale']:.3g}"
            group["name"] = name if name not in names else f"{name}_{len(names)}"
            names.add(group["name"])
            if group["weight_decay"] == 1.0:
                del group["weight_decay"]
        optimizer = (self.optimizer or torch.optim.AdamW)([g for g in groups if g["params"]])
        for group in optimizer.param_groups:  # a torch optimizer knows no lr_scale: apply it to the group's LR
            group["lr"] *= group.pop("lr_scale", 1.0)
        return {"optimizer": optimizer, "lr_scheduler": self.schedule(optimizer)}

    def schedule(self, optimizer) -> dict:
        """The scheduler config Lightning steps: `lr_scheduler` after `warmup_epochs`, over the fit's length."""
        from torch.optim.lr_scheduler import ConstantLR, LinearLR, OneCycleLR, ReduceLROnPlateau, SequentialLR

        hp, trainer = self.hparams, self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))
        batches = trainer.num_training_batches  # inf where max_steps decided the length without the loader
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else total
        by_step = hp.lr_interval == "step"
        length = total if by_step else max(1, math.ceil(total / per_epoch))
        warmup = max(0, min(round(hp.warmup_epochs * (per_epoch if by_step else 1)), length - 1))
        if self.lr_scheduler is None:
            scheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
        else:
            # jsonargparse gives a class_path as a functools.partial holding every init arg: a total_steps left
            # unset (None) is the fit's. (test_training checks this still holds.)
            unset = getattr(self.lr_scheduler, "keywords", {}).get("total_steps", 0) is None
            scheduler = self.lr_scheduler(optimizer, **({"total_steps": length - warmup} if unset else {}))
        if isinstance(scheduler, TimmScheduler):  # its own warmup (warmup_t) and its own interval
            if warmup:
                raise UserError(
                    "model.warmup_epochs does not combine with a timm scheduler: set it to 0 and give the "
                    "scheduler's own warmup_t (and warmup_lr_init)."
                )
            return {"scheduler": scheduler, "interval": "epoch" if scheduler.t_in_epochs else "step", "name": "lr"}
        if isinstance(scheduler, ReduceLROnPlateau):
            if warmup:
                raise UserError("model.warmup_epochs does not combine with ReduceLROnPlateau: set it to 0.")
            return {"scheduler": scheduler, "interval": "epoch", "monitor": hp.lr_monitor, "name": "lr"}
        if warmup:
            if isinstance(scheduler, OneCycleLR):
                raise UserError("model.warmup_epochs: a one-cycle schedule warms up itself: set it to 0.")
            warm = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
            scheduler = SequentialLR(optimizer, [warm, scheduler], milestones=[warmup])
        return {"scheduler": scheduler, "interval": hp.lr_interval, "name": "lr"}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """timm's schedulers are told the count itself: the epochs done (at an epoch's end) or the updates done."""
        if not isinstance(scheduler, TimmScheduler):
            return super().lr_scheduler_step(scheduler, metric)
        if scheduler.t_in_epochs:
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)
        else:
            scheduler.step_update(num_updates=self.global_step, metric=metric)


class FocalLoss(nn.Module):
    """Softmax focal loss, (1 - p_t)^gamma x the (weighted, smoothed) cross-entropy; gamma 0 is the cross-entropy."""

    def __init__(self, gamma: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.weight: torch.Tensor | None = None  # per class; not a buffer, so checkpoints do not depend on it

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        loss = nn.functional.cross_entropy(
            logits, target, weight=weight, label_smoothing=self.label_smoothing, reduction="none"
        )
        if self.gamma:
            p_true = torch.exp(-nn.functional.cross_entropy(logits.float(), target, reduction="none"))
            loss = (1 - p_true) ** self.gamma * loss
        return loss.sum() / (weight[target].sum() if weight is not None else len(target))


def _outputs(out) -> tuple:
    """A network's outputs as a tuple: (logits,), or (logits, aux, ...) from auxiliary classifiers in training."""
    return out if isinstance(out, tuple) else (out,)
