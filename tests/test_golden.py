"""Equivalence with the published implementation, on its own reference data."""

import json

import pytest
import timm
import torch

import sgformer  # noqa: F401
from conftest import GOLDEN_DIR, assert_close_relative
from sgformer.model import checkpoint_filter_fn


def test_logits_match_reference(golden: dict, golden_model: torch.nn.Module) -> None:
    with torch.no_grad():
        logits = golden_model(golden["input"])
    assert_close_relative(logits, golden["logits"])


def test_bfloat16_autocast_stays_near_reference(
    golden: dict, golden_model: torch.nn.Module
) -> None:
    # bfloat16 keeps 8 significant bits; the measured error is 0.6 % of the logits' norm.
    # Autocast takes the faster forms whose float32 rounding differs (layers.autocast_on_cpu).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = golden_model(golden["input"])
    assert logits.dtype == torch.bfloat16
    reference = golden["logits"]
    error = (logits.float() - reference).norm() / reference.norm()
    assert error < 0.02
    assert torch.equal(logits.float().argmax(1), reference.argmax(1))


def test_stage_features_match_reference(golden: dict, golden_model: torch.nn.Module) -> None:
    with torch.no_grad():
        features = golden_model.forward_intermediates(golden["input"], intermediates_only=True)
    assert len(features) == len(golden["stage_features"]) == 4
    for ours, reference in zip(features, golden["stage_features"], strict=True):
        if reference.ndim == 3:  # stage 4 is stored as tokens (B, N, C)
            ours = ours.flatten(2).transpose(1, 2)
        assert_close_relative(ours, reference)


def test_significance_matches_reference(golden: dict, golden_model: torch.nn.Module) -> None:
    maps = golden_model.forward_significance(golden["input"])
    assert len(maps) == len(golden["significance"]) == 3
    for ours, reference in zip(maps, golden["significance"], strict=True):
        assert_close_relative(ours.flatten(1), reference)


@pytest.mark.parametrize("variant", ["sgformer_s", "sgformer_m", "sgformer_b"])
def test_every_published_key_maps_to_same_shape(variant: str) -> None:
    published = json.loads((GOLDEN_DIR / f"official_keys_{variant}.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = {k: torch.zeros(shape) for k, shape in published.items()}
    mapped = checkpoint_filter_fn(state_dict, _ShapeOnly(model))
    assert len(mapped) == len(published) == len(ours)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours


class _ShapeOnly:
    """A meta-device model stand-in: the filter only reads names, shapes and pos_embed_grid."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self.pos_embed_grid = model.pos_embed_grid

    def state_dict(self) -> dict:
        return self._model.state_dict()
