"""create_classifier: one channel, noise settings, initialisation from a local state dict."""
import logging

import pytest
import timm
import torch

from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.teacher_student.models import TINY_LADDER, count_parameters, create_classifier


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_ladder_grows_and_runs_on_one_channel():
    sizes = []
    for name in TINY_LADDER:
        model = create_classifier(name, 3, drop_path_rate=0.1).eval()
        assert any(type(m).__name__ == "DropPath" for m in model.modules()), f"{name} lacks stochastic depth"
        with torch.no_grad():
            out = model(torch.randn(2, 1, 64, 64))
        assert out.shape == (2, 3), name
        sizes.append(count_parameters(model))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_noise_reaches_the_model():
    model = create_classifier("test_efficientnet", 2, drop_rate=0.3, drop_path_rate=0.2)
    assert model.drop_rate == 0.3
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0  # stochastic depth is wired into the blocks


def test_model_without_stochastic_depth_is_built_without_it(caplog):
    with caplog.at_level(logging.WARNING, logger="cxr_noisy_student.teacher_student.models"):
        model = create_classifier("dla46x_c", 2, drop_rate=0.2, drop_path_rate=0.1)
    assert "does not support drop_path_rate" in caplog.text
    assert model.head_drop.p == 0.2  # the noise the model does support is kept
    with pytest.raises(TypeError):  # the reason for the fallback: timm passes the kwarg through
        timm.create_model("dla46x_c", drop_path_rate=0.1)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="unknown timm model 'effcientnet_b0' \\(did you mean 'efficientnet_b0'"):
        create_classifier("effcientnet_b0", 2)
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier("test_efficientnet", 0)


def test_local_state_dict_from_rgb_model_with_another_head(tmp_path, caplog):
    torch.manual_seed(0)
    rgb = timm.create_model("test_efficientnet", num_classes=10)  # 3 channels, 10 classes: the ImageNet-like case
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="cxr_noisy_student.teacher_student.models"):
        model = create_classifier("test_efficientnet", 2, pretrained=str(path))
    assert torch.allclose(model.conv_stem.weight, rgb.conv_stem.weight.sum(dim=1, keepdim=True))
    rgb_state = rgb.state_dict()
    body = [k for k in model.state_dict() if not k.startswith(("conv_stem.", "classifier."))]
    assert body and all(torch.equal(model.state_dict()[k], rgb_state[k]) for k in body)
    assert "skipped for shape" in caplog.text and "classifier.weight" in caplog.text
    assert model.classifier.weight.shape == (2, rgb.classifier.in_features)


def test_bad_weights_path_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        create_classifier("test_efficientnet", 2, pretrained=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="junk.pt: unreadable pretrained weights file") as err:
        create_classifier("test_efficientnet", 2, pretrained=str(junk))
    assert "\n" not in str(err.value)
    alien = tmp_path / "alien.pt"
    torch.save({"encoder.layer0.weight": torch.zeros(3)}, alien)
    with pytest.raises(DataError, match="none of its 1 tensor names belong to this model"):
        create_classifier("test_efficientnet", 2, pretrained=str(alien))


def test_partly_matching_state_dict_loads_with_a_warning(tmp_path, caplog):
    other = tmp_path / "resnet.pt"
    torch.save(timm.create_model("test_resnet").state_dict(), other)  # shares a few names (bn1) only
    with caplog.at_level(logging.INFO, logger="cxr_noisy_student.teacher_student.models"):
        create_classifier("test_efficientnet", 2, pretrained=str(other))
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "unexpected" in caplog.text
