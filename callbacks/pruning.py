"""Pruning: gradual magnitude (unstructured) pruning, or channel (structured) pruning into a smaller network."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn


class Pruning(ModelPruning):
    """Prune the recipe's model while it trains, and log `prune/sparsity`, `prune/params`, `prune/gflops`.

    Args:
        mode: `unstructured` zeroes the smallest weights gradually (Zhu & Gupta's cubic schedule from
            `start_epoch` to `end_epoch`) and makes it permanent at the end, so checkpoints and the logged
            model hold plain dense tensors; `structured` removes whole channels before the first epoch
            (torch-pruning's dependency graph), leaving a genuinely smaller dense network that the fit then
            fine-tunes (start from trained weights with `model.pretrained`).
        amount: the final fraction of weights (unstructured) or of channels per layer (structured).
        scope: `global` ranks all layers together; `layer` prunes each layer by `amount`.
        prune_classifier: also prune the last Linear layer (never for structured: the classes stay).

    Only Conv2d/Linear weights are pruned: never norms or biases.
    """

    def __init__(
        self,
        mode: Literal["unstructured", "structured"] = "unstructured",
        amount: float = 0.5,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        scope: Literal["global", "layer"] = "global",
        prune_classifier: bool = True,
    ) -> None:
        if not 0 < amount < 1:
            raise ValueError(f"amount must be in (0, 1), got {amount}")
        if start_epoch < 0 or (end_epoch is not None and end_epoch < start_epoch):
            raise ValueError(f"need 0 <= start_epoch <= end_epoch, got {start_epoch} and {end_epoch}")
        self.mode, self.final, self.start_epoch, self.end_epoch = mode, amount, start_epoch, end_epoch
        self.prune_classifier = prune_classifier and mode == "unstructured"
        super().__init__(
            "l1_unstructured",
            use_global_unstructured=scope == "global",
            amount=self._step_amount,
            parameter_names=["weight"],
            apply_pruning=mode == "unstructured",
            make_pruning_permanent=True,
            use_lottery_ticket_hypothesis=False,
        )
        self.scope = scope

    def target(self, epoch: int) -> float:
        """The sparsity due after `epoch` (cubic: fast at first, gentle near the end)."""
        end = self.end_epoch if self.end_epoch is not None else self.start_epoch
        if epoch < self.start_epoch:
            return 0.0
        progress = min(1.0, (epoch - self.start_epoch + 1) / (end - self.start_epoch + 1))
        return self.final * (1 - (1 - progress) ** 3)

    def _step_amount(self, epoch: int) -> float:
        """The fraction of the still-unpruned weights to prune now, to reach target(epoch)."""
        done, due = self.target(epoch - 1), self.target(epoch)
        return 0.0 if due <= done else 1 - (1 - due) / (1 - done)

    def setup(self, trainer, pl_module, stage: str) -> None:
        from cnnlab.models import classifier_of

        end = self.end_epoch if self.end_epoch is not None else self.start_epoch
        if (
            self.mode == "unstructured"
            and stage == "fit"
            and trainer.max_epochs not in (None, -1)
            and end >= trainer.max_epochs - 1
        ):
            raise ValueError(
                f"Pruning: end_epoch={end} leaves no epoch to fine-tune the fully pruned model in "
                f"trainer.max_epochs={trainer.max_epochs}; end it by epoch {trainer.max_epochs - 2}."
            )
        self.head = classifier_of(pl_module.net)
        if self.mode == "structured" and stage == "fit":
            self._prune_channels(pl_module, self.head)
        super().setup(trainer, pl_module, stage)

    def filter_parameters_to_prune(self, parameters_to_prune=()):
        """Conv2d and Linear weights only (never norms or biases), the classifier where asked."""
        self.prunable = [
            (m, name)
            for m, name in parameters_to_prune
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (self.prune_classifier or m is not self.head)
        ]
        return self.prunable

    def _prune_channels(self, pl_module, head: nn.Module) -> None:
        import torch_pruning as tp

        size = pl_module.hparams.image_size
        before = sum(p.numel() for p in pl_module.net.parameters())
        pruner = tp.pruner.MagnitudePruner(
            pl_module.net,
            torch.zeros(1, 3, size, size),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=self.final,
            global_pruning=self.scope == "global",
            ignored_layers=[head],
        )
        pruner.step()
        self.structured_from = before

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        end = self.end_epoch if self.end_epoch is not None else self.start_epoch
        checkpoint = trainer.checkpoint_callback
        if self.mode == "unstructured" and trainer.current_epoch == end and checkpoint and checkpoint.monitor:
            # The best checkpoint is chosen among fully pruned epochs only: the denser best so far now counts as
            # the worst score (through the checkpoint's own state), so the next validation replaces it in place.
            worst = torch.tensor(float("-inf") if checkpoint.mode == "max" else float("inf"))
            state = checkpoint.state_dict()
            state.update(best_model_score=worst, kth_value=worst)
            if checkpoint.best_model_path:
                state.update(
                    best_k_models={checkpoint.best_model_path: worst}, kth_best_model_path=checkpoint.best_model_path
                )
            checkpoint.load_state_dict(state)
        stats = pruning_stats(pl_module.net, pl_module.hparams.image_size, [m for m, _ in self.prunable])
        pl_module.log_dict({f"prune/{k}": float(v) for k, v in stats.items()}, on_epoch=True)


def pruning_stats(net: nn.Module, image_size: int, prunable: list[nn.Module]) -> dict:
    """Sparsity of the prunable weights, nonzero parameters, dense and effective (zero-skipping) GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    weights = [m.weight for m in prunable]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    density = {m: float((m.weight != 0).float().mean()) for m in prunable}
    counter = FlopCounterMode(display=False)
    device = next(net.parameters()).device
    training = net.training
    with counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    net.train(training)
    by_module = counter.get_flop_counts()
    root = type(net).__name__  # FlopCounterMode names modules ROOTCLASS.path.to.module
    names = {m: f"{root}.{name}" if name else root for name, m in net.named_modules()}
    dense = counter.get_total_flops()
    effective = dense - sum(
        sum(by_module.get(names[m], {}).values()) * (1 - d) for m, d in density.items() if names[m] in by_module
    )
    # While pruning runs, a pruned module's parameter is `weight_orig`; its effective tensor is `weight`.
    tensors = [
        getattr(m, name.removesuffix("_orig")) for m in net.modules() for name, _ in m.named_parameters(recurse=False)
    ]
    return {
        "sparsity": zeros / max(1, total),
        "params": sum(int((t != 0).sum()) for t in tensors),
        "gflops": dense / 2e9,
        "gflops_effective": effective / 2e9,
    }
