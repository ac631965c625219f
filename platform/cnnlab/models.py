"""The model zoo: the classic CNN families by name (timm, torchvision where timm lacks one), any timm
name besides, with an activation swap that reaches every family and a stem for 32 px inputs."""

from __future__ import annotations

import re
from functools import partial

import timm
import torch
import torchvision
from timm.layers import activations as timm_acts
from timm.layers import create_act_layer
from timm.models import register_model
from torch import nn
from torchvision.models.googlenet import BasicConv2d

from cnnlab import UserError, did_you_mean
from cnnlab.papers import AlexNetPaper, GoogLeNetPaper, auxiliary_heads

# name: (family, native input px, paper ImageNet top-1 %, where the paper says so and its test protocol:
#       10-crop, one crop, or dense evaluation; `model.tta: ten_crop` tests on the 10-crop protocol)
CLASSIC = {
    "alexnet": (
        "AlexNet",
        224,
        None,
        "torchvision's one-tower variant (64/192/384/256/256, no LRN); see alexnet_paper",
    ),
    "alexnet_paper": ("AlexNet", 224, 59.3, "Krizhevsky et al. 2012, Table 2: 1 CNN, 40.7% top-1 error (10-crop)"),
    "vgg11": ("VGG", 224, 70.4, "Simonyan & Zisserman 2015, Table 3: config A, 29.6% error (dense, one scale)"),
    "vgg13": ("VGG", 224, 71.3, "Simonyan & Zisserman 2015, Table 3: config B, 28.7% error (dense, one scale)"),
    "vgg16": (
        "VGG",
        224,
        74.4,
        "Simonyan & Zisserman 2015, Table 3: config D, S=[256;512], 25.6% error (dense, one scale)",
    ),
    "vgg19": (
        "VGG",
        224,
        74.5,
        "Simonyan & Zisserman 2015, Table 3: config E, S=[256;512], 25.5% error (dense, one scale)",
    ),
    "vgg11_bn": ("VGG", 224, None, "BN variant postdates the paper"),
    "vgg13_bn": ("VGG", 224, None, "BN variant postdates the paper"),
    "vgg16_bn": ("VGG", 224, None, "BN variant postdates the paper"),
    "vgg19_bn": ("VGG", 224, None, "BN variant postdates the paper"),
    "googlenet": ("GoogLeNet", 224, None, "torchvision's variant (batch norm, 3x3 for 5x5); see googlenet_paper"),
    "googlenet_paper": (
        "GoogLeNet",
        224,
        None,
        "Szegedy et al. 2015, Table 4: top-5 only (89.9%, 1 model, 1 crop); Table 1: 6.8M weights, biases not counted",
    ),
    "resnet18": ("ResNet", 224, 72.1, "He et al. 2016, Table 2: 27.88% error (10-crop)"),
    "resnet34": ("ResNet", 224, 75.0, "He et al. 2016, Table 2: 25.03% error (10-crop)"),
    "resnet50": ("ResNet", 224, 77.2, "He et al. 2016, Table 3: 22.85% error (10-crop)"),
    "resnet101": ("ResNet", 224, 78.3, "He et al. 2016, Table 3: 21.75% error (10-crop)"),
    "resnet152": ("ResNet", 224, 78.6, "He et al. 2016, Table 3: 21.43% error (10-crop)"),
    "densenet121": ("DenseNet", 224, 75.0, "Huang et al. 2017, Table 3: 25.02% error (1 crop)"),
    "densenet169": ("DenseNet", 224, 76.2, "Huang et al. 2017, Table 3: 23.80% error (1 crop)"),
    "densenet201": ("DenseNet", 224, 77.4, "Huang et al. 2017, Table 3: 22.58% error (1 crop)"),
    "inception_v4": ("Inception-v4", 299, 80.0, "Szegedy et al. 2017, Table 2: 20.0% error (1 crop)"),
    "inception_resnet_v2": ("Inception-ResNet-v2", 299, 80.1, "Szegedy et al. 2017, Table 2: 19.9% error (1 crop)"),
}
SMALL_INPUT_FAMILIES = "resnet*, densenet*, vgg*, alexnet, googlenet (and their _paper variants)"
NO_DROP_PATH = (
    "set drop_path_rate to 0 (every timm model that has stochastic depth takes it: resnet*, convnext*, "
    "efficientnet*, vit* ...)."
)
MIN_INPUT = {"inception_v4": 75, "inception_resnet_v2": 75, "alexnet": 63, "alexnet_paper": 63}

# Hidden-unit activations (not the sigmoid/tanh gates of attention blocks), torch's and timm's own.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.PReLU,
    nn.Hardswish,
    *(
        getattr(timm_acts, name)
        for name in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish", "PReLU")
        if hasattr(timm_acts, name)
    ),
)
ACT_CHOICES = ("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "prelu", "hard_swish")
ACT_CHOICES += ("sigmoid", "tanh")  # the saturating ones, whose vanishing gradients made ReLU the default


def family_of(name: str) -> str:
    """'resnet' for resnet50, 'vgg' for vgg16_bn, 'alexnet' for alexnet_paper ...: the family a stem adaptation
    is written for."""
    match = re.match(r"(resnet|densenet|vgg)\d+(_bn)?$|(alexnet|googlenet)(_paper)?$", name)
    return (match.group(1) or match.group(3)) if match else name


def create_model(
    name: str,
    num_classes: int = 1000,
    act: str | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    small_input: bool = False,
    pretrained: bool = False,
    model_args: dict | None = None,
) -> nn.Module:
    """Build any zoo model through timm's factory; `drop_rate=None` keeps the family's own dropout (AlexNet 0.5,
    GoogLeNet 0.2); `model_args` go to the architecture's own constructor (e.g. DenseNet's growth_rate and
    block_config)."""
    _check_known(name)
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate or None,  # unset for the families without stochastic depth
            **(model_args or {}),
        )
    except TypeError as err:
        if "drop_path_rate" in str(err):
            raise UserError(f"model='{name}' has no stochastic depth: {NO_DROP_PATH}") from None
        if "unexpected keyword" in str(err):
            raise UserError(f"model.model_args: model='{name}' {str(err).split(' ', 1)[-1]}.") from None
        raise
    except (OSError, RuntimeError) as err:  # the hub unreachable (huggingface_hub's and urllib's errors are OSErrors)
        if not pretrained:
            raise
        raise hub_error(name, err) from None
    if small_input:
        _small_input_stem(name, model)
    if act is not None:
        swap_activation(model, act)
    return model


def hub_error(name: str, err: Exception) -> UserError:
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    where = f"https://huggingface.co/{config.hf_hub_id}" if config and config.hf_hub_id else config and config.url
    return UserError(
        f"model.pretrained=true fetches the weights of model='{name}' from {where or 'the timm hub'}, which is not reachable here "
        f"({str(err).splitlines()[0][:120]}). Download the weights on a connected machine and set "
        "model.pretrained to the local file (.safetensors, .pth or .bin)."
    )


def swap_activation(model: nn.Module, act: str) -> nn.Module:
    """Replace every hidden activation module with `act` (timm's names: relu, gelu, silu, mish ...)."""
    try:
        create_act_layer(act)
    except KeyError:
        raise UserError(f"act='{act}' is not a known activation. Choices: {', '.join(ACT_CHOICES)}.") from None
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, ACTIVATIONS):
                setattr(parent, child_name, create_act_layer(act, inplace=True))
    return model


def _check_known(name: str) -> None:
    if not timm.is_model(name):
        hint = did_you_mean(name, {*CLASSIC, *timm.list_models()})
        raise UserError(f"model='{name}' is not a known model.{hint} `cnnlab zoo` lists the architectures.")


# ---- the networks timm lacks, registered in timm's registry with a pretrained_cfg ----------------------------
# torchvision's AlexNet and GoogLeNet (their weights and transforms), and papers.py's: so every network comes
# from the one timm.create_model call, and its preprocessing from timm's resolve_model_data_config.


def _torchvision_cfg(name: str, first_conv: str, classifier: str) -> dict:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    size = transforms.crop_size[0]
    return {
        "url": weights.url,
        "input_size": (3, size, size),
        "crop_pct": round(size / transforms.resize_size[0], 4),
        "interpolation": transforms.interpolation.value,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "first_conv": first_conv,
        "classifier": classifier,
    }


def _paper_cfg(first_conv: str, classifier: str) -> dict:
    return {
        "url": "",
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "first_conv": first_conv,
        "classifier": classifier,
    }


default_cfgs = {  # timm's name for the pretrained_cfg of each entrypoint a module registers
    "alexnet": _torchvision_cfg("alexnet", "features.0", "classifier.6"),
    "googlenet": _torchvision_cfg("googlenet", "conv1.conv", "fc"),
    "alexnet_paper": _paper_cfg("features.0", "classifier.6"),
    "googlenet_paper": _paper_cfg("conv1.0", "fc"),
}


def _register(name: str, build) -> None:
    """Register `build(pretrained, **constructor keywords)` in timm's registry as `name`, its network carrying the
    pretrained_cfg of `default_cfgs` as timm's own do; timm's factory options are dropped, `drop_rate` becomes
    the constructors' `dropout`."""
    from timm.models import get_pretrained_cfg

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        for option in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(option, None)
        if "drop_rate" in kwargs:
            kwargs["dropout"] = kwargs.pop("drop_rate")
        model = build(pretrained, **kwargs)
        model.pretrained_cfg = get_pretrained_cfg(name).to_dict()
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    register_model(entrypoint)


def _paper(name: str, network: type[nn.Module]):
    def build(pretrained: bool, **kwargs) -> nn.Module:
        if pretrained:
            raise UserError(
                f"model='{name}' has no weights: set pretrained to false (it is built as its paper describes)."
            )
        return network(**kwargs)

    return build


def _torchvision_model(name: str, pretrained: bool, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=not pretrained)
    model = getattr(torchvision.models, name)(
        weights="DEFAULT" if pretrained else None, num_classes=1000 if pretrained else num_classes, **kwargs
    )
    if pretrained and num_classes != 1000:
        head = model.fc if name == "googlenet" else model.classifier[-1]
        new = nn.Linear(head.in_features, num_classes)
        if name == "googlenet":
            model.fc = new
        else:
            model.classifier[-1] = new
    if name == "googlenet":
        # torchvision's GoogLeNet applies relu functionally; a module makes it swappable like every other family.
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if isinstance(child, BasicConv2d):
                    setattr(parent, child_name, nn.Sequential(child.conv, child.bn, nn.ReLU(inplace=True)))
    if in_chans != 3:
        first = model.features[0] if name == "alexnet" else model.conv1[0]
        replacement = nn.Conv2d(
            in_chans, first.out_channels, first.kernel_size, first.stride, first.padding, bias=first.bias is not None
        )
        if name == "alexnet":
            model.features[0] = replacement
        else:
            model.conv1[0] = replacement
    return model


for _name, _build in {
    "alexnet": partial(_torchvision_model, "alexnet"),
    "googlenet": partial(_torchvision_model, "googlenet"),
    "alexnet_paper": _paper("alexnet_paper", AlexNetPaper),
    "googlenet_paper": _paper("googlenet_paper", GoogLeNetPaper),
}.items():
    _register(_name, _build)


# Each family's small-input stem: the first conv, replaced by a 3x3 stride-1 one (pretrained 7x7 weights do not
# fit it), and the early poolings it drops.
STEMS = {
    "resnet": ("conv1", ["maxpool"]),
    "densenet": ("features.conv0", ["features.pool0"]),
    "alexnet": ("features.0", []),
    "googlenet": ("conv1.0", ["maxpool1", "maxpool2"]),
}


def new_layers(model: nn.Module, name: str, small_input: bool) -> dict[str, str]:
    """The layers trained weights may not fit (name: why), the classifier first."""
    head = classifier_of(model)
    layers = {next(n for n, m in model.named_modules() if m is head): f"the classifier for {head.out_features} classes"}
    if small_input and family_of(name) in STEMS:
        layers[STEMS[family_of(name)][0]] = "the small-input stem"
    for child in auxiliary_heads(model):  # a logged model leaves its training-only classifiers out
        layers[child] = "an auxiliary classifier, which a logged model does not hold"
    return layers


def _conv3x3_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)


def _small_input_stem(name: str, model: nn.Module) -> None:
    """CIFAR-style stem: a stride-1 3x3 first conv and no early pooling, so 32 px keeps spatial detail."""
    family = family_of(name)
    if family == "vgg":
        return  # five 2x2 pools take 32 px to 1x1, and timm's head pools adaptively: nothing to adapt
    if family in STEMS and isinstance(model.get_submodule(STEMS[family][0]), nn.Conv2d):
        conv, pools = STEMS[family]
        model.set_submodule(conv, _conv3x3_like(model.get_submodule(conv)))
        for pool in pools:
            model.set_submodule(pool, nn.Identity())
        return
    need = MIN_INPUT.get(name)
    size = f" It needs inputs of at least {need} px: upscale with data.image_size (e.g. 96)." if need else ""
    raise UserError(
        f"model='{name}' cannot adapt its stem for small inputs (small_input: true).{size} "
        f"Families with a small-input stem: {SMALL_INPUT_FAMILIES}."
    )


def classifier_of(model: nn.Module) -> nn.Module:
    """The final Linear layer (timm's get_classifier, torchvision's fc / classifier[-1])."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.fc if hasattr(model, "fc") else model.classifier[-1]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(name: str, image_size: int | None = None, num_classes: int = 1000, small_input: bool = False) -> dict:
    """Params and multiply-adds of one inference pass (auxiliary classifiers left out), on the meta device (no
    memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = image_size or CLASSIC.get(name, (None, 224))[1]
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, small_input=small_input).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, size, size))
    auxiliary = sum(count_params(m) for m in auxiliary_heads(model).values())
    return {"params": count_params(model) - auxiliary, "gmacs": counter.get_total_flops() / 2e9, "input": size}


def zoo_table() -> list[dict]:
    """One row per classic architecture: params, GMACs at its native size, the paper's top-1. Building every
    network takes half a minute, so `cnnlab zoo` prints the copy shipped in presets/zoo.json (test_models checks
    it against this; `python -m cnnlab.models` writes it anew)."""
    rows = []
    for name, (family, _, top1, source) in CLASSIC.items():
        size = measure(name)
        size["gmacs"] = round(size["gmacs"], 4)
        rows.append({"name": name, "family": family, **size, "paper_top1": top1, "source": source})
    return rows


if __name__ == "__main__":
    import json
    from pathlib import Path

    Path(__file__).with_name("presets").joinpath("zoo.json").write_text(json.dumps(zoo_table(), indent=1) + "\n")
