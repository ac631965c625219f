"""Files from outside are data, never code: a crafted checkpoint runs nothing through any command."""

import os

import pytest
import torch

from conftest import QUICKSTART, cnnlab_here


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(workdir):
    marker = workdir / "code-ran"
    path = workdir / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "extra": Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--config", QUICKSTART, "--model.pretrained={ckpt}", "--trainer.max_epochs=1"],
        ["fit", "--config", QUICKSTART, "--ckpt_path={ckpt}", "--trainer.max_epochs=1"],
        ["test", "--config", QUICKSTART, "--ckpt_path={ckpt}"],
        ["export", "{ckpt}", "--out", "out"],
        ["serve", "{ckpt}", "--port", "1"],
    ],
    ids=["pretrained", "fit --ckpt_path", "test --ckpt_path", "export", "serve"],
)
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(command, crafted, workdir):
    path, marker = crafted
    result = cnnlab_here(*[str(c).format(ckpt=path) for c in command], cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "could run code" in result.stderr and str(path) in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", os.urandom(2048), None], ids=["empty", "random bytes", "truncated"])
def test_a_broken_checkpoint_gets_one_line(content, workdir):
    path = workdir / "broken.ckpt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    result = cnnlab_here("export", path, "--out", "out", cwd=workdir)
    assert result.returncode == 2 and "is not a readable PyTorch checkpoint" in result.stderr, result.stderr
