"""The published checkpoint layout maps onto ours, name for name and shape for shape.

What the model computes is held to the published implementation's outputs by the accuracy
contract (tests/test_contract.py)."""

import json

import pytest
import timm
import torch

import sgformer  # noqa: F401
from conftest import GOLDEN_DIR
from sgformer.model import checkpoint_filter_fn


@pytest.mark.parametrize("variant", ["sgformer_s", "sgformer_m", "sgformer_b"])
def test_every_published_key_maps_to_same_shape(variant: str) -> None:
    published = json.loads((GOLDEN_DIR / f"official_keys_{variant}.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = {k: torch.zeros(shape) for k, shape in published.items()}
    mapped = checkpoint_filter_fn(state_dict, _ShapeOnly(model))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    # Every published tensor lands somewhere: fused projections hold the values of their parts.
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for v in state_dict.values())


class _ShapeOnly:
    """A meta-device model stand-in: the filter only reads names, shapes and pos_embed_grid."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self.pos_embed_grid = model.pos_embed_grid

    def state_dict(self) -> dict:
        return self._model.state_dict()
