"""SG-Former inside other libraries: segmentation_models_pytorch's timm encoder."""

import pytest
import segmentation_models_pytorch as smp
import torch

import sgformer  # noqa: F401


@pytest.fixture(scope="module")
def upernet() -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.UPerNet("tu-sgformer_s", encoder_weights=None, classes=150).eval()


@pytest.mark.parametrize("size", [(512, 512), (384, 640)])
def test_smp_upernet_runs_on_sgformer_s(upernet, size) -> None:
    with torch.no_grad():
        out = upernet(torch.randn(1, 3, *size))
    assert out.shape == (1, 150, *size)
    assert torch.isfinite(out).all() and out.std() > 0


def test_smp_fpn_on_nano_trains() -> None:
    net = smp.FPN("tu-sgformer_nano", encoder_weights=None, classes=3)
    x, target = torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    loss = torch.nn.functional.cross_entropy(net(x), target)
    loss.backward()
    encoder_grads = [p.grad for n, p in net.encoder.named_parameters() if "pos_embed" in n]
    assert encoder_grads and encoder_grads[0].abs().sum() > 0
