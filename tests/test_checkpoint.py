"""Loading the model to compress: state_dicts, checkpoint dicts, pickled modules, TorchScript."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from mbz.checkpoint import LoadedModel, load_model, load_run, save_checkpoint
from mbz.errors import MbzError
from mbz.models import ARCH_NAME, TORCHVISION_ARCH, ArchConfig, cifar_mobilenet_v2


def trained(width_mult: float = 0.25, seed: int = 0, build=cifar_mobilenet_v2) -> nn.Module:
    """A small model with non-default batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build(num_classes=10, width_mult=width_mult)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(loaded: LoadedModel, original: nn.Module, batch: torch.Tensor) -> None:
    assert not loaded.module.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(batch), original(batch), rtol=0, atol=0)


def saved(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_bare_state_dict_with_its_arch(tmp_path, model, batch):
    loaded = load_model(saved(tmp_path / "m.pt", model.state_dict()), arch="cifar")
    assert_same_outputs(loaded, model, batch)
    assert loaded.arch == ArchConfig(width_mult=0.25)
    assert loaded.extra == {}


def test_bare_state_dict_without_arch_is_refused_naming_the_choices(tmp_path, model):
    path = saved(tmp_path / "m.pt", {"model_state_dict": model.state_dict(), "epoch": 1})
    with pytest.raises(MbzError, match=r"width 0\.25, 10 classes.*does not record") as error:
        load_model(path)
    assert "--arch" in str(error.value)
    assert "--arch cifar (mbz's CIFAR-10" in str(error.value)
    assert "or torchvision (torchvision.models.mobilenet_v2 as is" in str(error.value)


def test_torchvision_state_dict_with_its_arch_is_torchvisions_network(tmp_path, batch):
    original = trained(width_mult=0.5, seed=5, build=mobilenet_v2)
    loaded = load_model(saved(tmp_path / "tv.pt", original.state_dict()), arch="torchvision")
    assert loaded.arch == ArchConfig(TORCHVISION_ARCH, 10, 0.5)
    assert_same_outputs(loaded, original, batch)
    as_cifar = load_model(tmp_path / "tv.pt", arch="cifar").module
    with torch.no_grad():  # the same weights with the other strides compute something else
        assert not torch.allclose(as_cifar(batch), original(batch), rtol=0.1, atol=0)


def test_arch_must_agree_with_a_recorded_one_and_needs_a_state_dict(tmp_path, model):
    save_checkpoint(tmp_path / "mbz.pt", model, ArchConfig(width_mult=0.25))
    assert load_model(tmp_path / "mbz.pt", arch="cifar").arch.name == ARCH_NAME
    with pytest.raises(MbzError, match=r"records the architecture 'mobilenet_v2_cifar'"):
        load_model(tmp_path / "mbz.pt", arch="torchvision")
    with pytest.raises(MbzError, match=r"unknown --arch 'resnet': choose cifar"):
        load_model(tmp_path / "mbz.pt", arch="resnet")
    whole = saved(tmp_path / "whole.pt", model)
    with pytest.raises(MbzError, match=r"holds a whole module.*drop --arch"):
        load_model(whole, trust_pickle=True, arch="cifar")


@pytest.mark.parametrize("key", ["state_dict", "model", "net", "model_state_dict"])
def test_checkpoint_dict_keys(tmp_path, model, batch, key):
    checkpoint = {key: model.state_dict(), "epoch": 7, "acc": 91.5, "optimizer": {"lr": 0.1}}
    loaded = load_model(str(saved(tmp_path / "m.pth", checkpoint)), arch="cifar")
    assert_same_outputs(loaded, model, batch)
    assert loaded.extra == {"epoch": 7, "acc": 91.5, "optimizer": {"lr": 0.1}}


def test_checkpoint_dict_keeps_only_plain_extra_fields(tmp_path, model, batch):
    checkpoint = {"model": "mobilenet_v2", "net": model.state_dict(), "moments": torch.ones(3)}
    loaded = load_model(saved(tmp_path / "m.pth", checkpoint), arch="cifar")
    assert_same_outputs(loaded, model, batch)
    assert loaded.extra == {"model": "mobilenet_v2"}


def test_ddp_prefix_is_stripped(tmp_path, model, batch):
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    loaded = load_model(saved(tmp_path / "ddp.pt", {"state_dict": state_dict}), arch="cifar")
    assert_same_outputs(loaded, model, batch)


def test_missing_batch_counters_are_tolerated(tmp_path, model, batch):
    state_dict = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    loaded = load_model(saved(tmp_path / "m.pt", state_dict), arch="cifar")
    assert_same_outputs(loaded, model, batch)


def test_mbz_checkpoint_records_arch(tmp_path, batch):
    model = trained(width_mult=0.35)
    arch = ArchConfig(width_mult=0.35, dropout=0.1)
    save_checkpoint(tmp_path / "mbz.pt", model, arch, epoch=3, history=[0.5, 0.75])
    loaded = load_model(tmp_path / "mbz.pt")
    assert loaded.arch == arch
    assert loaded.extra == {"epoch": 3, "history": [0.5, 0.75]}
    assert_same_outputs(loaded, model, batch)


def test_save_checkpoint_reserves_state_dict(tmp_path, model):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, ArchConfig(), state_dict={})


def test_recorded_arch_must_fit_the_weights(tmp_path, model):
    checkpoint = {"state_dict": model.state_dict(), "arch": ArchConfig(width_mult=0.5).to_dict()}
    with pytest.raises(MbzError, match=r"do not fit the architecture it records \(width 0\.5"):
        load_model(saved(tmp_path / "m.pt", checkpoint))


def test_torchvision_layout_width_is_inferred(tmp_path, batch):
    model = trained(width_mult=0.5, seed=3)
    loaded = load_model(saved(tmp_path / "tv.pt", model.state_dict()), arch="cifar")
    assert loaded.arch == ArchConfig(width_mult=0.5)
    assert_same_outputs(loaded, model, batch)


def test_pickled_module_needs_trust(tmp_path, model, batch):
    path = saved(tmp_path / "whole.pt", model)
    with pytest.raises(MbzError, match=r"pickled Python objects.*runs code.*--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.arch is None
    assert_same_outputs(loaded, model, batch)


def test_pickled_module_in_checkpoint_dict(tmp_path, model, batch):
    path = saved(tmp_path / "whole.pt", {"model": model, "epoch": 2})
    with pytest.raises(MbzError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.extra == {"epoch": 2}
    assert_same_outputs(loaded, model, batch)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript(tmp_path, model, batch):
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    loaded = load_model(tmp_path / "scripted.pt")
    assert isinstance(loaded.module, torch.jit.ScriptModule) and loaded.arch is None
    assert_same_outputs(loaded, model, batch)


def test_pickled_module_of_a_missing_module_says_how_to_fix(tmp_path):
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import netdef\n"
        f"torch.save(netdef.Net(), {str(tmp_path / 'net.pt')!r})\n"
    )
    (tmp_path / "netdef.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def forward(self, x):\n        return x\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(MbzError, match=r"module 'netdef'.*PYTHONPATH.*state_dict") as error:
        load_model(tmp_path / "net.pt", trust_pickle=True)
    assert "pass a file written by torch.save" not in str(error.value)


def test_load_run_reads_a_train_checkpoint_once_and_refuses_others(tmp_path, model, batch):
    run = {"recipe": {"epochs": 3}, "epoch": 2, "history": [{"loss": 1.0}], "optimizer": {}}
    save_checkpoint(tmp_path / "run.pt", model, ArchConfig(width_mult=0.25), **run)
    saved_run = load_run(tmp_path / "run.pt")
    assert (saved_run.recipe, saved_run.epoch) == ({"epochs": 3}, 2)
    assert saved_run.history == [{"loss": 1.0}]
    assert_same_outputs(saved_run.loaded, model, batch)
    save_checkpoint(tmp_path / "weights.pt", model, ArchConfig(width_mult=0.25))
    with pytest.raises(MbzError, match="not written by mbz train"):
        load_run(tmp_path / "weights.pt")


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MbzError, match=r"could not read .*garbage.pt as a PyTorch checkpoint"):
        load_model(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("hello world")
    with pytest.raises(MbzError, match=r"not written by torch.save"):
        load_model(text)
    with pytest.raises(MbzError, match=r"model file .*nope.pt not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(MbzError, match="not found"):
        load_model(tmp_path)


def test_truncated_checkpoint(tmp_path, model):
    data = saved(tmp_path / "m.pt", model.state_dict()).read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MbzError, match=r"could not read .*cut.pt as a PyTorch checkpoint"):
        load_model(tmp_path / "cut.pt")


def test_other_network_is_refused(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    other(torch.zeros(1, 3, 32, 32))
    with pytest.raises(MbzError, match=r"not a MobileNet-v2.*--trust-pickle"):
        load_model(saved(tmp_path / "other.pt", other.state_dict()))
    widened = cifar_mobilenet_v2(width_mult=0.25, num_classes=10).state_dict()
    widened["features.1.conv.0.0.weight"] = torch.zeros(8, 1, 5, 5)
    with pytest.raises(MbzError, match=r"features\.1\.conv\.0\.0\.weight: shape.*--trust-pickle"):
        load_model(saved(tmp_path / "odd.pt", widened))


def test_checkpoint_without_weights(tmp_path):
    with pytest.raises(MbzError, match=r"dict with keys 'epoch'; expected a state_dict"):
        load_model(saved(tmp_path / "m.pt", {"epoch": 1}))
    with pytest.raises(MbzError, match="holds a list"):
        load_model(saved(tmp_path / "l.pt", [1, 2]))


def test_sizes_and_hash(tmp_path, model):
    path = saved(tmp_path / "m.pt", model.state_dict())
    loaded = load_model(path, arch="cifar")
    floats = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    assert loaded.fp32_bytes == 4 * sum(t.numel() for t in floats)
    assert loaded.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
