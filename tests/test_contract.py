"""The accuracy contract against the published implementation's float64 run.

``../shared/golden/sgformer_tiny_ref64.pt`` holds the published code's outputs computed in
float64 (logits, stage features, significance maps, the gradient of ``logits.square().mean()``
with respect to the input and the norm of all parameter gradients), and how far the published
code run in float32 lands from them (``published_float32_error``, max |a - b| / max |b|).

- float64: every path equals the reference within ``FLOAT64_RTOL``, forward and backward.
- float32: every tensor's error is at most ``FLOAT32_ERROR_FACTOR`` times the published float32
  code's own error. Bit-exact float32 rounding is not asked: the significance sort turns any
  rounding change into another order of nearly tied tokens.
- bfloat16 autocast: within the error the eager bfloat16 path had when the contract was set.
"""

import copy

import pytest
import torch

import sgformer  # noqa: F401
from conftest import model_with_golden_weights

FLOAT64_RTOL = 1e-10
FLOAT32_ERROR_FACTOR = 2.0
# Errors of the eager bfloat16 autocast path against the float64 reference at commit b073e65,
# before the contract replaced bit-exact float32 equivalence (rounded up in the second digit).
# bfloat16 keeps 8 bits, and any change in the order of operations moves these errors by up to
# a quarter either way (another token order in the significance sort), so the bound is 1.5x.
BFLOAT16_ERRORS_B073E65 = {
    "logits": 6.2e-3,
    "input_grad": 3.2e-2,
    "param_grad_norm": 3.6e-4,
    "stage1": 9.6e-3,
    "stage2": 1.5e-2,
    "stage3": 1.5e-2,
    "stage4": 1.6e-2,
    "significance0": 5.8e-3,
    "significance1": 5.7e-3,
    "significance2": 5.6e-3,
}
BFLOAT16_ERROR_FACTOR = 1.5
PADDED_SIZE = (97, 131)  # pads for the 7x7 windows and every reduction


@pytest.fixture(scope="module")
def model32(reference64: dict) -> torch.nn.Module:
    return model_with_golden_weights(reference64)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, the measure of ``published_float32_error``."""
    actual = actual.detach().to("cpu", torch.float64)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def run_model(
    model: torch.nn.Module, image: torch.Tensor, autocast: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor the reference holds, from ``model`` on ``image`` (its dtype).

    The gradients are those of ``logits.square().mean()``, in the model's current mode.
    """
    model.zero_grad(set_to_none=True)
    image = image.clone().requires_grad_()
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(image)
    # The loss in the model's dtype (float32 for bfloat16 autocast outputs).
    logits.to(image.dtype).square().mean().backward()
    out = {
        "input_grad": image.grad,
        "param_grad_norm": torch.stack([p.grad.double().square().sum() for p in model.parameters()])
        .sum()
        .sqrt(),
    }
    with torch.no_grad(), torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
        out["logits"] = model(image)
        features = model.forward_intermediates(image, intermediates_only=True)
        maps = model.forward_significance(image)
    for i, feature in enumerate(features):
        out[f"stage{i + 1}"] = feature
    for i, significance in enumerate(maps):
        out[f"significance{i}"] = significance.flatten(1)
    return out


def reference_tensors(reference: dict) -> dict[str, torch.Tensor]:
    tensors = {key: reference[key] for key in ("logits", "input_grad", "param_grad_norm")}
    for i, feature in enumerate(reference["stage_features"]):
        if feature.ndim == 3:  # stage 4 is stored as tokens (B, N, C)
            B, N, C = feature.shape
            side = int(N**0.5)
            feature = feature.transpose(1, 2).reshape(B, C, side, side)  # B, C, H, W
        tensors[f"stage{i + 1}"] = feature
    for i, significance in enumerate(reference["significance"]):
        tensors[f"significance{i}"] = significance
    return tensors


def errors_against(ours: dict, expected: dict) -> dict[str, float]:
    assert ours.keys() == expected.keys()
    return {key: relative_error(ours[key], expected[key]) for key in expected}


def over_bounds(errors: dict[str, float], bounds: dict[str, float], factor: float) -> dict:
    """The tensors whose error passes ``factor`` times their bound, as readable lines."""
    assert errors.keys() == bounds.keys()
    return {
        key: f"{errors[key]:.3g} > {factor} x {bounds[key]:.3g}"
        for key in errors
        if errors[key] > factor * bounds[key]
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_float64_equals_published_float64(reference64, model32, mode: str) -> None:
    model = copy.deepcopy(model32).double().train(mode == "train")
    ours = run_model(model, reference64["input"].double())
    errors = errors_against(ours, reference_tensors(reference64))
    assert max(errors.values()) <= FLOAT64_RTOL, errors


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_float32_error_within_twice_published(reference64, model32, mode: str) -> None:
    model32.train(mode == "train")
    try:
        ours = run_model(model32, reference64["input"])
    finally:
        model32.eval()
    errors = errors_against(ours, reference_tensors(reference64))
    over = over_bounds(errors, reference64["published_float32_error"], FLOAT32_ERROR_FACTOR)
    assert not over, over


def test_bfloat16_autocast_within_the_eager_bfloat16_error(reference64, model32) -> None:
    ours = run_model(model32, reference64["input"], autocast=True)
    assert ours["logits"].dtype == torch.bfloat16
    errors = errors_against(ours, reference_tensors(reference64))
    over = over_bounds(errors, BFLOAT16_ERRORS_B073E65, BFLOAT16_ERROR_FACTOR)
    assert not over, over


def test_padded_size_float32_within_contract_of_float64(reference64, model32) -> None:
    # No published output exists off 224 x 224 (the published code cannot run there); our
    # float64 run, held to the published float64 one above, is the reference.
    image = torch.randn(2, 3, *PADDED_SIZE)
    for mode in ("eval", "train"):
        model32.train(mode == "train")
        model64 = copy.deepcopy(model32).double()
        try:
            expected = run_model(model64, image.double())
            ours = run_model(model32, image)
        finally:
            model32.eval()
        errors = errors_against(ours, expected)
        bounds = reference64["published_float32_error"]
        over = over_bounds(errors, bounds, FLOAT32_ERROR_FACTOR)
        assert not over, (mode, over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_contract_holds_on_cuda(reference64, model32, dtype: torch.dtype) -> None:
    # TF32 matrix products keep 10 mantissa bits: the float32 contract is a float32 claim.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = copy.deepcopy(model32).to("cuda", dtype)
        ours = run_model(model, reference64["input"].to("cuda", dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    errors = errors_against(ours, reference_tensors(reference64))
    if dtype == torch.float64:
        assert max(errors.values()) <= FLOAT64_RTOL, errors
        return
    over = over_bounds(errors, reference64["published_float32_error"], FLOAT32_ERROR_FACTOR)
    assert not over, over
