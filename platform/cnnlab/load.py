"""Any model URI as a loaded `Network`: a model artifact through the store, a Lightning checkpoint through the
LightningModule it was saved from (the one place a checkpoint becomes a servable network)."""

from __future__ import annotations

from pathlib import Path

from cnnlab import UserError, store
from cnnlab.cnnlab_model import Network, torch_predict
from cnnlab.module import ClassifierModule


def model(
    uri: str,
    threads: int | None = None,
    device: str = "cpu",
    runtime: str | None = None,
    unflatten: bool = False,
    program: bool = False,
) -> Network:
    """The model a URI names (see store.URI_FORMS), on its own runtime or on `runtime` (`unflatten`, `program`:
    see cnnlab_model.load_network)."""
    ref = store.resolve(uri)
    if ref.kind != "checkpoint":
        return store.load(ref, threads, device, runtime, unflatten, program)
    if runtime:
        raise UserError(f"'{uri}' is a checkpoint, which runs on torch: export it to run it on {runtime}.")
    network = from_checkpoint(Path(ref.artifact), device)
    network.source = uri
    return network


def from_checkpoint(path: Path, device: str = "cpu") -> Network:
    """A Lightning checkpoint as a torch-runtime Network (its recorded classes, input size and crop)."""
    saved = store.read_checkpoint(path)
    if "state_dict" not in saved or "hyper_parameters" not in saved:
        raise UserError(f"checkpoint '{path}' is not a cnnlab fit's checkpoint (no state_dict and hyper_parameters).")
    try:
        module = ClassifierModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, pretrained=False)
    except Exception as err:
        raise UserError(
            f"checkpoint '{path}' does not make a cnnlab model ({str(err).splitlines()[0][:200]}). Pass "
            "the best.ckpt or last.ckpt of a cnnlab fit."
        ) from None
    module = module.eval().to(device)
    return Network(
        torch_predict(module, device),
        store.checkpoint_meta(saved),
        module=module,
        params=sum(p.numel() for p in module.parameters()),
    )
