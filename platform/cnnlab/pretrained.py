"""Starting from trained weights (`model.pretrained`): where they come from, how they load, and the
preprocessing they expect.

`model.pretrained` is one of
    true                 the architecture's weights from the timm / torchvision hub (needs the network)
    a file or URL        .safetensors, .pth, .pt or .bin: a timm or torchvision state dict (also wrapped in
                         `state_dict` / `model`, or saved from DataParallel), fetched once into torch's hub cache
    a model URI          any cnnlab model or checkpoint (`models:/NAME@ALIAS`, a run id, a .ckpt ...)

Every tensor of the network must load with its own shape, except the new layers: the classifier when the
class count (or, for a cnnlab model, the class list) differs, and the small-input stem that replaces a
7x7 stride-2 one. Those start untrained, and are what `cnnlab.callbacks.FreezeBackbone` trains first.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from cnnlab import UserError

WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")
PREPROCESSING = {"mean": "model", "std": "model", "image_size": "data", "crop_pct": "data", "interpolation": "data"}


def is_weights_file(spec: str) -> bool:
    return Path(spec.split("?")[0]).suffix in WEIGHT_FILES


@functools.lru_cache(maxsize=2)
def read(spec: str) -> tuple[dict, dict, list[str] | None]:
    """(state dict of the network, the preprocessing its weights expect, their classes where known)."""
    if is_weights_file(spec):
        return unwrap(read_file(fetch(spec) if "://" in spec else Path(spec), spec)), {}, None
    from cnnlab import store

    ref = store.resolve(spec)
    if ref.kind == "checkpoint":  # read as data: the network's tensors and what its hyperparameters record
        saved = store.read_checkpoint(ref.artifact, f"model.pretrained='{spec}'")
        state, meta = saved.get("state_dict") or {}, store.checkpoint_meta(saved)
    else:
        network = store.load(ref, program=True)
        if network.module is None or network.runtime != "torch":
            raise UserError(
                f"model.pretrained='{spec}' is a model of format {network.meta.get('format')}, not torch: start "
                "from a torch model (a fit's model, run or checkpoint), or a weights file."
            )
        state, meta = network.module.state_dict(), network.meta
    state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    wanted = {k: meta.get(k) for k in PREPROCESSING}
    return state, {k: v for k, v in wanted.items() if v is not None}, list(meta["classes"])


def fetch(url: str) -> Path:
    """A weights URL downloaded once into torch's hub cache."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?")[0]).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as err:
            raise UserError(
                f"model.pretrained='{url}' could not be downloaded ({str(err).splitlines()[0][:160]}). Without a "
                "network, download it elsewhere and set model.pretrained to the local file."
            ) from None
    return path


def read_file(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise UserError(f"model.pretrained='{spec}': no such file. Pass a weights file, a model URI, or true.")
    from timm.models import load_state_dict

    try:  # timm's loader: safetensors or torch (tensors and plain data only), `state_dict` / `model` unwrapped
        return load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:
        raise UserError(
            f"model.pretrained='{spec}' is not a readable weights file ({str(err).splitlines()[0][:160]}); only "
            "tensors and plain data load (no pickled code). Pass a .safetensors file or a state dict."
        ) from None


def unwrap(state) -> dict:
    """The state dict inside a saved dict (`state_dict`, `model`, ...), without a prefix every key shares."""
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "net.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_into(net: nn.Module, spec: str, name: str, new_layers: dict[str, str], classes: list[str]) -> list[str]:
    """Copy the weights of `spec` into `net`. `new_layers` (layer name: why it may be new) may keep their fresh
    initialisation where the weights do not fit them; any other mismatch is an error naming the layer.
    Returns the layers that start untrained."""
    state, _, source_classes = read(spec)
    head = next(iter(new_layers))  # the classifier comes first
    if source_classes is not None:  # a cnnlab model: its channel counts (a pruned one is smaller) win
        match_shapes(net, {k: v for k, v in state.items() if not _within(k, new_layers)})
        if source_classes != list(classes):
            state = {k: v for k, v in state.items() if not _within(k, (head,))}
    fresh, load, missing = set(), {}, []
    for key, tensor in net.state_dict().items():
        layer = _within(key, new_layers)
        if key in state and state[key].shape == tensor.shape:
            load[key] = state[key]
        elif layer:
            fresh.add(layer)
        elif key in state:
            raise UserError(
                f"model.pretrained='{spec}': layer {key} is {tuple(state[key].shape)} in the weights but "
                f"{tuple(tensor.shape)} in model='{name}'. They are weights of another architecture or "
                "configuration: check model.model and model.small_input."
            )
        else:
            missing.append(key)
    if missing:
        raise UserError(
            f"model.pretrained='{spec}' lacks {len(missing)} of the {len(load) + len(missing)} tensors of "
            f"model='{name}' (first: {', '.join(missing[:3])}; the file's keys begin {', '.join(list(state)[:3])}). "
            "Pass weights of the same architecture."
        )
    net.load_state_dict(load, strict=False)
    untrained = [f"{layer} ({new_layers[layer]})" for layer in new_layers if layer in fresh]
    rank_zero_info(
        f"cnnlab: {len(load)} tensors loaded from {spec}"
        + (f"; new, untrained: {', '.join(untrained)}" if untrained else "")
    )
    return [layer for layer in new_layers if layer in fresh]


def _within(key: str, layers) -> str:
    """The layer of `layers` that the tensor `key` belongs to, or ''."""
    return next((layer for layer in layers if key.startswith(layer + ".")), "")


def preprocessing(name: str, pretrained: bool | str) -> dict:
    """Mean, std, image_size, crop_pct and interpolation the weights were trained with: a cnnlab model's own;
    for hub weights or a weights file, the architecture's pretrained_cfg (timm's resolve_model_data_config)."""
    if isinstance(pretrained, str) and not is_weights_file(pretrained):
        return read(pretrained)[1]
    from timm.data import resolve_model_data_config

    from cnnlab.models import create_model

    with torch.device("meta"):
        config = resolve_model_data_config(create_model(name))
    return {
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "image_size": config["input_size"][-1],
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
    }


def follow_weights(config) -> None:
    """Fill the preprocessing keys a recipe leaves unset (null) from what `model.pretrained` expects; warn once
    where the recipe sets others."""
    model, data = config.model, config.data
    if not model.pretrained:
        return
    sections = {"model": model, "data": data}
    differ = []
    for key, value in preprocessing(model.model, model.pretrained).items():
        node = sections[PREPROCESSING[key]]
        if node[key] is None:
            node[key] = value
        elif not _same(node[key], value):
            differ.append(f"{PREPROCESSING[key]}.{key}={node[key]} (the weights': {value})")
    if differ:
        rank_zero_warn(
            f"cnnlab: model.pretrained={model.pretrained} was trained with other preprocessing than the recipe "
            f"sets: {'; '.join(differ)}. Remove those keys to follow the weights."
        )


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-4 for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) < 1e-4
    return a == b


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def match_shapes(module: nn.Module, state: dict) -> None:
    """Resize parameters and buffers to a state dict's shapes (a channel-pruned net is smaller than its recipe)."""
    for key, tensor in state.items():
        path, _, attr = key.rpartition(".")
        try:
            owner = module.get_submodule(path)
        except AttributeError:
            continue
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        if isinstance(current, nn.Parameter):
            setattr(owner, attr, nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
        else:
            owner.register_buffer(attr, torch.empty_like(tensor))
        if attr == "weight" and isinstance(owner, nn.Conv2d):
            owner.out_channels, owner.in_channels = tensor.shape[0], tensor.shape[1] * owner.groups
        elif attr == "weight" and isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = tensor.shape
        elif attr == "weight" and isinstance(owner, BATCH_NORMS):
            owner.num_features = tensor.shape[0]
