"""Any input size: strides, invisible padding, batch independence (docs/any_size.md)."""

import math

import pytest
import timm
import torch

import sgformer.layers.padding
import sgformer.model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sgformer_nano", num_classes=0).eval()


@pytest.mark.parametrize("size", [(97, 131), (320, 480), (33, 250), (800, 1333)])
@pytest.mark.parametrize("batch", [1, 3])
def test_stage_sizes_are_ceil_strides(model, size: tuple[int, int], batch: int) -> None:
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        significance = model.forward_significance(x)
    for i, feature in enumerate(maps):
        stride = 4 * 2**i
        assert feature.shape == (batch, model.feature_info[i]["num_chs"], *_ceil(size, stride))
        assert torch.isfinite(feature).all()
    assert [s.shape[1:] for s in significance] == [m.shape[2:] for m in maps[:3]]


def _ceil(size: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


@pytest.mark.parametrize("size", [(224, 448), (448, 448)])
def test_masked_path_equals_plain_path_without_padding(model, monkeypatch, size) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model.forward_features(x)
        plain_maps = model.forward_significance(x)
        monkeypatch.setattr(sgformer.model, "padding_needed", lambda padding: True)
        masked = model.forward_features(x)
        masked_maps = model.forward_significance(x)
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(masked_maps, plain_maps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(97, 131), (40, 33)])
def test_pad_fill_value_never_reaches_real_positions(model, monkeypatch, size) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        reference = model.forward_intermediates(x, intermediates_only=True)
        reference_maps = model.forward_significance(x, return_parts=True)
        monkeypatch.setattr(sgformer.layers.padding, "PAD_FILL_VALUE", 1e4)
        changed = model.forward_intermediates(x, intermediates_only=True)
        changed_maps = model.forward_significance(x, return_parts=True)
    for a, b in zip(changed, reference, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(changed_maps, reference_maps, strict=True):
        torch.testing.assert_close(a["local"], b["local"])
        assert torch.equal(a["allocation"], b["allocation"])


def test_fill_value_is_actually_written(monkeypatch) -> None:
    """Guards the test above: the monkeypatched fill must reach the padded grid."""
    monkeypatch.setattr(sgformer.layers.padding, "PAD_FILL_VALUE", 7.0)
    padded = sgformer.layers.pad_grid(torch.zeros(1, 2, 3, 1), (1, 2))
    assert padded.shape == (1, 3, 5, 1) and padded[0, 2, 4, 0] == 7.0 and padded[0, 1, 2, 0] == 0


def test_local_significance_sums_to_one_per_window_over_real_tokens(model) -> None:
    x = torch.randn(1, 3, 97, 131)  # stage 1 grid 25 x 33: padded windows everywhere at edges
    with torch.no_grad():
        first = model.forward_significance(x, return_parts=True)[0]
    local = first["local"][0]  # 25 x 33
    H, W = local.shape
    windows = [local[r : r + 7, c : c + 7].sum() for r in range(0, H, 7) for c in range(0, W, 7)]
    torch.testing.assert_close(torch.stack(windows), torch.ones(len(windows)))
    global_part = first["global"][0]  # 25 x 33 of 4 x 5 reduced cells, each 8 x 8 before cropping
    cell_sums = global_part[::8, ::8].sum()
    torch.testing.assert_close(cell_sums, torch.tensor(1.0))


@pytest.mark.parametrize("size", [(97, 131), (64, 64)])
def test_batch_independence(model, size) -> None:
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_position_table_resampled_only_off_native_grid(model) -> None:
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        native = model._embed(x)
        stem, _ = model.stem(x)
    expected = (stem + model.pos_embed).transpose(1, 2).reshape(native.shape)
    torch.testing.assert_close(native, expected, rtol=0, atol=0)


def test_img_size_changes_position_table_and_loads_across_sizes(model) -> None:
    big = timm.create_model("sgformer_nano", num_classes=0, img_size=384)
    assert big.pos_embed.shape == (1, 96 * 96, 32) and big.pos_embed_grid == (96, 96)
    state = sgformer.model.checkpoint_filter_fn(model.state_dict(), big)
    big.load_state_dict(state)
    assert state["pos_embed"].shape == (1, 96 * 96, 32)
