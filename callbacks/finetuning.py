"""Fine-tuning in two phases, on Lightning's BaseFinetuning: the new layers first, then every layer."""

from __future__ import annotations

from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info

from cnnlab import UserError


class FreezeBackbone(BaseFinetuning):
    """Train the new layers of a model started from `model.pretrained` (its classifier, a small-input stem)
    with the pretrained ones frozen, weights and BatchNorm statistics alike, for `epochs` epochs; then
    train every layer, the pretrained ones at `backbone_lr` times the optimizer's LR (its schedule included).

    The pretrained layers stay in the optimizer while frozen (they get no gradient, so no update and no
    weight decay), so the LR schedule, checkpoints and resuming see one set of parameter groups. Under DDP
    use `trainer.strategy: ddp_find_unused_parameters_true`: frozen layers have no gradient to reduce.
    """

    def __init__(self, epochs: int = 1, backbone_lr: float = 0.1) -> None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if not 0 < backbone_lr <= 1:
            raise ValueError(f"backbone_lr must be in (0, 1], got {backbone_lr}")
        super().__init__()
        self.epochs, self.backbone_lr = epochs, backbone_lr

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not pl_module.new_layers:
            raise UserError(
                "cnnlab.callbacks.FreezeBackbone fine-tunes pretrained weights, but model.pretrained is not set "
                "(or every layer loaded as it was): set model.pretrained, or remove the callback."
            )
        pl_module.backbone_lr = self.backbone_lr  # read by configure_optimizers, which runs after this hook

    def backbone(self, pl_module) -> list:
        """The pretrained layers: every module with parameters of its own outside the new layers."""
        new = pl_module.new_layers
        return [
            module
            for name, module in pl_module.net.named_modules()
            if next(module.parameters(recurse=False), None) is not None
            and not any(name == layer or name.startswith(layer + ".") for layer in new)
        ]

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        self.freeze_before_training(pl_module)  # after the optimizer took every parameter in its groups

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(self.backbone(pl_module), train_bn=False)

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        backbone = self.backbone(pl_module)
        if epoch >= self.epochs and not all(p.requires_grad for m in backbone for p in m.parameters()):
            self.make_trainable(backbone)
            rank_zero_info(
                f"cnnlab: epoch {epoch}: the pretrained layers train from now on, at {self.backbone_lr:g} x the LR"
            )
