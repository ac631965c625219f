"""The zoo: every family builds, trains a step, matches the papers' sizes and swaps every activation."""

import pytest
import torch
import torch.nn.functional as F

from cnnlab import UserError
from cnnlab.models import ACTIVATIONS, create_model, measure, zoo_table

# family representative -> (input px, small_input)
FAMILIES = {
    "alexnet": (32, True),
    "vgg11_bn": (32, True),
    "googlenet": (32, True),
    "resnet18": (32, True),
    "densenet121": (32, True),
    "inception_v4": (75, False),
    "inception_resnet_v2": (75, False),
}
PAPER_PARAMS = {
    "alexnet": 61.1e6,
    "vgg16": 138.4e6,
    "googlenet": 6.6e6,
    "resnet50": 25.6e6,
    "densenet121": 8.0e6,
    "inception_v4": 42.7e6,
    "inception_resnet_v2": 55.8e6,
}


def test_the_zoo_table_shipped_with_the_package_is_what_the_code_computes():
    import json
    from importlib.resources import files

    shipped = json.loads((files("cnnlab") / "presets" / "zoo.json").read_text())
    assert shipped == zoo_table(), "the zoo changed: rewrite its table with `python -m cnnlab.models`"


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_param_counts_match_the_papers(name):
    assert measure(name)["params"] == pytest.approx(PAPER_PARAMS[name], rel=0.02)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_a_step_at_a_small_input(name):
    size, small = FAMILIES[name]
    model = create_model(name, num_classes=10, small_input=small)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("act", ["gelu", "mish"])
@pytest.mark.parametrize("name", FAMILIES)
def test_act_swaps_every_activation_of_every_family(name, act, monkeypatch):
    size, small = FAMILIES[name]
    before = sum(isinstance(m, ACTIVATIONS) for m in create_model(name, 10, small_input=small).modules())
    model = create_model(name, 10, small_input=small, act=act).eval()
    wanted = type(create_model("resnet18", 10, act=act).act1)
    acts = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    assert before > 0 and len(acts) == before and all(type(m) is wanted for m in acts)

    def forbidden(*args, **kwargs):
        raise AssertionError("a functional relu survived the swap")

    for fn in ("relu", "relu_"):
        monkeypatch.setattr(F, fn, forbidden)
        monkeypatch.setattr(torch, fn, forbidden)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))


def test_unknown_model_names_close_matches():
    with pytest.raises(UserError, match="resnet50"):
        create_model("resnet5")


def test_inception_has_no_small_input_stem_and_says_what_works():
    with pytest.raises(UserError, match=r"at least 75 px.*resnet\*"):
        create_model("inception_v4", small_input=True)


def test_stochastic_depth_only_where_the_family_has_it():
    assert create_model("resnet18", drop_path_rate=0.1) is not None
    with pytest.raises(UserError, match="drop_path_rate"):
        create_model("vgg11", drop_path_rate=0.1)


def test_model_args_reach_the_constructor_and_a_wrong_one_is_named():
    small = create_model("densenet121", num_classes=10, model_args={"growth_rate": 12, "block_config": [4, 4, 4]})
    assert small.features.denseblock1.denselayer1.conv2.out_channels == 12
    with pytest.raises(UserError, match="model.model_args: model='resnet18'"):
        create_model("resnet18", model_args={"growth_rate": 12})
