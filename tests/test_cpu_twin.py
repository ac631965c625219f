"""A fit's model holds its program and the program's ONNX twin: which one runs where, and when the twin is left out."""

import numpy as np
import pytest
import torch

from cnnlab import cnnlab_model, tracking
from cnnlab.cnnlab_model import engine_of

TWIN = {"runtime": "torch", "cpu_network": "cpu.onnx"}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 3)

    def forward(self, images):
        x = self.conv(images.float() / 255).mean((2, 3))
        return self.head(x)


@pytest.mark.parametrize(
    "meta, asked, want",
    [
        (TWIN, {}, "onnxruntime"),  # the default on a CPU
        (TWIN, {"device": "cuda"}, "torch"),
        (TWIN, {"program": True}, "torch"),  # distillation, fine-tuning, exports, explanations
        (TWIN, {"runtime": "openvino"}, "openvino"),
        (TWIN, {"runtime": "torch"}, "torch"),
        ({"runtime": "torch"}, {}, "torch"),  # logged before twins, or left without one
        ({"runtime": "onnx"}, {}, "onnxruntime"),
    ],
)
def test_a_program_with_a_twin_runs_the_twin_on_a_cpu_only(meta, asked, want):
    assert engine_of(meta, **asked) == want


def test_without_onnxruntime_the_program_runs(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    assert engine_of(TWIN) == "torch"


def test_a_program_without_a_twin_cannot_run_on_openvino():
    with pytest.raises(ValueError, match="a torch network cannot run on openvino"):
        engine_of({"runtime": "torch"}, "openvino")


@pytest.fixture
def program():
    example = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    return torch.export.export(Tiny().eval(), (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


def test_the_twin_gives_the_programs_answers(program, tmp_path):
    path = tracking.cpu_twin(program, {"image_size": 8, "crop_pct": 1.0}, tmp_path / "cpu.onnx", [])
    assert path == tmp_path / "cpu.onnx" and path.stat().st_size > 0
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    with torch.inference_mode():
        ours = program.module()(torch.from_numpy(x)).numpy()
    assert np.abs(cnnlab_model.load_onnx(path, 1, "cpu")[0](x) - ours).max() < 1e-5


def test_a_twin_that_answers_otherwise_is_left_out_and_said(program, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cnnlab_model, "load_onnx", lambda path, threads, device: (lambda x: np.zeros((len(x), 3)), 0))
    assert tracking.cpu_twin(program, {"image_size": 8, "crop_pct": 1.0}, tmp_path / "cpu.onnx", []) is None
    assert not (tmp_path / "cpu.onnx").exists()
    assert "no ONNX twin for CPUs: its logits differ from the program's" in capsys.readouterr().out
