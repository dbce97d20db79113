"""Model registry: shapes for every arch, the Opacus fix-up for ResNet/DenseNet, clear errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision.models._api as tv_api
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcxr.models import (
    MODELS,
    PretrainedWeightsUnavailable,
    _gray_conv,
    build_model,
    count_parameters,
    make_dp_safe,
    num_classes_for,
)

TORCHVISION_ARCHS = ("resnet50", "densenet121")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_registered_arch_gives_logits_for_gray_images(arch):
    model = build_model(arch, 14).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 14)
    assert torch.isfinite(out).all()


def test_registry_holds_the_paper_models_and_smallcnn_is_small():
    assert {"smallcnn", "resnet50", "densenet121"} <= set(MODELS)
    small = build_model("smallcnn", num_classes_for("pneumonia"))
    assert count_parameters(small) < 500_000
    assert small(torch.randn(3, 1, 128, 128)).shape == (3, 1)
    assert num_classes_for("multilabel") == 14
    with pytest.raises(ValueError, match="multilabel"):
        num_classes_for("binary")


def test_unknown_arch_error_lists_the_registry():
    with pytest.raises(ValueError) as info:
        build_model("vgg16", 14)
    for name in MODELS:
        assert name in str(info.value)
    assert "vgg16" in str(info.value)


def test_gray_first_conv_equals_repeating_the_gray_channel():
    rgb = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    gray = _gray_conv(rgb)
    x = torch.randn(2, 1, 20, 20)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def test_plain_resnet50_is_not_opacus_compatible():
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(build_model("resnet50", 14), strict=True)


def _one_dp_step(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 1, 32, 32, generator=gen), torch.ones(4, 14))
    loader = DataLoader(data, batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    model.train()
    steps = 0
    for x, y in loader:
        if len(x) == 0:  # Poisson sampling may draw an empty batch; try the next one
            continue
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()
        steps += 1
        break
    assert steps == 1
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_dp_safe_torchvision_models_validate_and_take_a_real_dp_step(arch):
    model = build_model(arch, 14, dp_safe=True)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    _one_dp_step(model)


def test_batchnorm_fix_alone_is_not_enough_for_resnet50():
    # Why make_dp_safe also removes in-place ops (DESIGN.md): GroupNorm alone still fails.
    model = ModuleValidator.fix(build_model("resnet50", 14))
    with pytest.raises(RuntimeError, match="modified inplace"):
        _one_dp_step(model)


def test_make_dp_safe_keeps_the_original_and_the_state_dict_keys():
    plain = build_model("resnet50", 1)
    safe = make_dp_safe(plain)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())  # original untouched
    conv_keys = {k for k in plain.state_dict() if "conv" in k or k.startswith("fc.")}
    assert conv_keys <= set(safe.state_dict())


def test_smallcnn_dp_safe_validates():
    assert ModuleValidator.validate(build_model("smallcnn", 14, dp_safe=True), strict=True) == []


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_pretrained_without_network_raises_a_clear_error(arch, monkeypatch, tmp_path):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_model(arch, 14, pretrained=True)
    message = str(info.value)
    assert "network" in message
    assert str(tmp_path) in message and "checkpoints" in message  # where to pre-seed the cache
    assert "pretrained: false" in message


def test_smallcnn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="pretrained"):
        build_model("smallcnn", 14, pretrained=True)
