"""Checkpoints that survive faults: every file is written beside its target and renamed over it (a full disk or a
kill leaves the previous file whole and no partial file under a real name), and `last.ckpt` holds the latest
state every epoch (and every N steps when asked), whatever the monitored metric did."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cnnlab import UserError


def size(count: float) -> str:
    return f"{count / 1e6:,.1f} MB"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temporary file in its own folder (so on its own filesystem), flushed and
    fsynced, then renamed over the target; remote paths (s3://, ...) go through Lightning's own writer. A write
    that fails (no space, no permission) removes its temporary file and ends the fit in one line."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        needed, free = buffer.tell(), shutil.disk_usage(path.parent).free
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if needed > free:
                raise OSError(28, "No space left on device")
            with open(temporary, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a power cut
            finally:
                os.close(folder)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            kept = sorted(p.name for p in path.parent.glob("*.ckpt"))
            raise UserError(
                f"cannot write checkpoint {path}: {err.strerror} ({size(needed)} needed, {size(free)} free in "
                f"{path.parent}); kept {', '.join(kept) or 'no earlier checkpoint'} as they were. Free space (or "
                "set trainer.default_root_dir elsewhere), then resume with --ckpt_path last."
            ) from None


class LastCheckpoint(Checkpoint):
    """`last.ckpt` beside the best checkpoint at the end of every training epoch (after its validation, and after
    the best checkpoint's own update, as Lightning runs checkpoint callbacks last), and every `every_n_steps`
    optimizer steps when given: the whole state, to resume from where a fit stopped."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.step = 0  # the optimizer step last saved by every_n_steps
        self.saved: str | None = None  # the file written when a signal stopped the fit

    def path(self, trainer) -> Path | None:
        checkpoint = trainer.checkpoint_callback
        return Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None

    def save(self, trainer) -> None:
        if (path := self.path(trainer)) is not None and not trainer.sanity_checking and not trainer.fast_dev_run:
            trainer.save_checkpoint(path, weights_only=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self.step:
            self.step = step  # once per optimizer step, however many batches it accumulates
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """SIGTERM (what schedulers send) or Ctrl-C during a fit: save where it stands, so it resumes there."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == "fit":
            self.save(trainer)
            self.saved = str(self.path(trainer))
