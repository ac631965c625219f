"""The zoo: every family builds, trains a step, matches the papers' sizes and swaps every activation."""

import pytest
import torch
import torch.nn.functional as F

from cnnlab import UserError
from cnnlab.models import ACTIVATIONS, create_model, measure, zoo_table

# family representative -> (input px, small_input)
FAMILIES = {
    "alexnet": (32, True),
    "alexnet_paper": (32, True),
    "vgg11_bn": (32, True),
    "googlenet": (32, True),
    "googlenet_paper": (32, True),
    "resnet18": (32, True),
    "densenet121": (32, True),
    "inception_v4": (75, False),
    "inception_resnet_v2": (75, False),
}
PAPER_PARAMS = {
    "alexnet": 61.1e6,  # torchvision's
    "alexnet_paper": 60e6,  # "60 million parameters" (section 1)
    "vgg16": 138.4e6,
    "googlenet": 6.6e6,  # torchvision's
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
    outputs = out if isinstance(out, tuple) else (out,)  # with auxiliary classifiers in training
    assert all(o.shape == (2, 10) for o in outputs)
    sum(o.logsumexp(1).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("act", ["mish", "sigmoid", "tanh"])
@pytest.mark.parametrize("name", FAMILIES)
def test_act_swaps_every_activation_of_every_family(name, act, monkeypatch):
    size, small = FAMILIES[name]
    before = sum(isinstance(m, ACTIVATIONS) for m in create_model(name, 10, small_input=small).modules())
    model = create_model(name, 10, small_input=small, act=act)
    wanted = type(create_model("resnet18", 10, act=act).act1)
    swapped = [m for m in model.modules() if type(m) is wanted]
    others = [m for m in model.modules() if isinstance(m, ACTIVATIONS) and type(m) is not wanted]
    assert before > 0 and len(swapped) == before and not others
    out = model(torch.randn(2, 3, size, size))  # and it trains: a gradient reaches every parameter
    sum(o.logsumexp(1).mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()

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


def test_googlenet_paper_counts_table_1s_weights_and_alexnet_paper_has_its_channels():
    googlenet = create_model("googlenet_paper", model_args={"aux_logits": False})
    weights = sum(p.numel() for n, p in googlenet.named_parameters() if n.endswith("weight"))
    assert weights / 1024 / 1000 == pytest.approx(6.8, abs=0.05)  # Table 1 counts weights, K = 1024
    assert googlenet.inception3a.branch3[1][0].kernel_size == (5, 5)  # true 5x5 (torchvision's is 3x3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in googlenet.modules())
    alexnet = create_model("alexnet_paper")
    convs = [m for m in alexnet.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256] and [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in alexnet.modules()) == 2
    assert not any(
        isinstance(m, torch.nn.LocalResponseNorm)
        for m in create_model("alexnet_paper", model_args={"lrn": False}).modules()
    )


def test_auxiliary_losses_join_the_training_loss_with_weight_0_3_and_vanish_in_eval():
    from cnnlab.module import ClassifierModule

    module = ClassifierModule("googlenet_paper", num_classes=10, small_input=True, image_size=32)
    images, targets = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    fixed = [torch.randn(4, 10) for _ in range(3)]

    class Fixed(torch.nn.Module):
        aux_weight = 0.3

        def forward(self, x):
            return tuple(fixed)

    module.net = Fixed()
    module.log = lambda *args, **kwargs: None
    expected = F.cross_entropy(fixed[0], targets) + 0.3 * (
        F.cross_entropy(fixed[1], targets) + F.cross_entropy(fixed[2], targets)
    )
    assert torch.allclose(module.training_step((images, targets), 0), expected)
    net = create_model("googlenet_paper", num_classes=10, small_input=True)
    assert len(net.train()(torch.randn(2, 3, 32, 32))) == 3
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # what evaluation and export see
    assert create_model("googlenet_paper", 10, small_input=True, model_args={"aux_logits": False})(
        torch.randn(2, 3, 32, 32)
    ).shape == (2, 10)


@pytest.mark.slow
def test_a_googlenet_paper_fit_logs_its_auxiliary_loss_and_a_model_without_them(workdir):
    import numpy as np

    from cnnlab import store
    from cnnlab.cli import main
    from cnnlab.models import new_layers
    from cnnlab.module import ClassifierModule
    from cnnlab.pretrained import load_into
    from conftest import QUICKSTART, mlflow_client, only_run

    short = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]
    short += ["--data.num_workers=0"]  # in this process: no loader worker, which would be a fork of a test process
    main(["fit", "--config", str(QUICKSTART), "--model.model=googlenet_paper", "--trainer.max_epochs=1", *short])
    run = only_run(mlflow_client())
    assert run.data.metrics["train/aux_loss"] > 0 and "test/acc" in run.data.metrics
    logged = store.load(f"runs:/{run.info.run_id}/model", program=True)  # the torch program, not its CPU twin
    assert logged.predict(np.zeros((3, 3, 16, 16), np.uint8)).shape == (3, 10)
    assert logged.params < 7.1e6  # the main network alone: the auxiliary classifiers' 6.4M are not in it
    fresh = ClassifierModule("googlenet_paper", num_classes=10, small_input=True, image_size=16)
    load_into(
        fresh.net,
        f"runs:/{run.info.run_id}/model",
        "googlenet_paper",
        new_layers(fresh.net, "googlenet_paper", True),
        [str(i) for i in range(10)],
    )
    assert torch.equal(
        fresh.net.inception3a.branch3[1][0].weight, logged.module.state_dict()["net.inception3a.branch3.1.0.weight"]
    )
