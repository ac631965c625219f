"""Knowledge distillation: the student learns from a frozen teacher's softened predictions."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard_loss (Hinton et al. 2015), where X_T is
    softmax(logits / T); T^2 keeps the soft term's gradients on the hard term's scale."""
    soft = F.kl_div(
        F.log_softmax(student.float() / temperature, -1),
        F.log_softmax(teacher.float() / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard_loss


class Distillation(Callback):
    """Train the student (the recipe's model) against a teacher's softened outputs as well as the labels.

    Args:
        teacher: any model URI of a torch model (`models:/NAME@champion`, `models:/NAME/VERSION`, a run id,
            a logged-model id) or a checkpoint path. It takes the student's images (same size) and normalizes
            them its own way.
        temperature: softens both distributions; 1 is plain softmax.
        alpha: weight of the distillation term; 1 - alpha goes to the recipe's own loss.

    The teacher is frozen, in eval mode, on the student's device and under its precision (it runs inside
    the student's autocast); it is not part of the student, so checkpoints and logged models hold the
    student alone. Under DDP every rank holds its own copy.
    """

    def __init__(self, teacher: str, temperature: float = 4.0, alpha: float = 0.9) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher_uri, self.temperature, self.alpha = teacher, temperature, alpha
        self.teacher = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.teacher is not None:
            return
        from cnnlab import UserError, load

        teacher = load.model(self.teacher_uri, program=True)
        if teacher.module is None:
            raise UserError(
                f"Distillation teacher '{self.teacher_uri}' is a model of format {teacher.meta.get('format')}, not torch: "
                "teach from a torch model (a fit's model, run or checkpoint)."
            )
        if teacher.image_size != pl_module.hparams.image_size:
            raise UserError(
                f"Distillation teacher '{self.teacher_uri}' takes {teacher.image_size} px images; the "
                f"student needs the same input: set data.image_size={teacher.image_size}."
            )
        if len(teacher.classes) != len(pl_module.classes):
            raise UserError(
                f"Distillation teacher '{self.teacher_uri}' knows {len(teacher.classes)} classes, the "
                f"student's data has {len(pl_module.classes)}."
            )
        # The teacher takes 0..255 pixels and normalizes them its own way, as it was trained.
        self.teacher = teacher.module.eval().requires_grad_(False)
        pl_module.loss_hook = partial(self.loss, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.teacher.to(pl_module.device)

    def loss(self, pl_module, x: torch.Tensor, logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # Back to 0..255 pixels (mixup and cutmix included: they commute with the normalization).
            pixels = (x.float() * pl_module.std + pl_module.mean).round().clamp(0, 255).to(torch.uint8)
            teacher_logits = self.teacher(pixels.contiguous())
        loss = distillation_loss(logits, teacher_logits, hard_loss, self.temperature, self.alpha)
        pl_module.log("train/distill_loss", loss, on_step=False, on_epoch=True)
        return loss

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            pl_module.loss_hook = None
