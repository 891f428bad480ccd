"""resolve_device: the one place a configured device name becomes a torch.device, with one-line errors."""
import pytest
import torch

from cxr_noisy_student.datasets.errors import ConfigError
from cxr_noisy_student.loops.device import resolve_device


def test_auto_and_plain_names():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:", "cuda:x", "CPU", "cpu:0:1", "", "mps"])
def test_other_names_fail_with_one_line_naming_key_and_value(name):
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    assert str(err.value) == f"run.device {name!r}: not a device; use auto, cpu, cuda or cuda:N"


def test_cuda_without_cuda_fails_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        expected = rf"^detector.device '{name}': CUDA is not available on this machine; use auto or cpu$"
        with pytest.raises(ConfigError, match=expected):
            resolve_device(name, key="detector.device")


def test_cuda_index_beyond_the_machine_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    expected = r"^run.device 'cuda:2': this machine has 2 CUDA device\(s\); use cuda:0 to cuda:1$"
    with pytest.raises(ConfigError, match=expected):
        resolve_device("cuda:2")
