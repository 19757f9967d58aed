"""Model family behaviour, parametrised over every registered sgformer model."""

import subprocess
import sys

import pytest
import timm
import timm.optim
import torch

import sgformer
from sgformer.benchmark import count_macs

MODELS = timm.list_models("sgformer*")
# docs/design.md "Variants" (paper Table 1 = published implementation); nano is the golden config.
PARAMS = {"sgformer_s": 22_545_981, "sgformer_m": 38_689_316, "sgformer_b": 77_950_293}
GMACS = {"sgformer_s": 4.82, "sgformer_m": 7.47, "sgformer_b": 15.61}
SMALL = (2, 3, 64, 96)


def nano(**kwargs) -> torch.nn.Module:
    return timm.create_model("sgformer_nano", **kwargs)


def test_all_variants_registered() -> None:
    assert MODELS == ["sgformer_b", "sgformer_m", "sgformer_nano", "sgformer_s"]
    for name, top1 in (("sgformer_s", "83.2"), ("sgformer_m", "84.1"), ("sgformer_b", "84.7")):
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert (cfg.crop_pct, cfg.interpolation, cfg.fixed_input_size) == (0.9, "bicubic", False)
        assert top1 in cfg.notes[0] and "2308.12216" in cfg.paper_ids


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name: str, golden: dict) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    expected = PARAMS.get(name) or sum(v.numel() for v in golden["state_dict"].values())
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(GMACS))
def test_gmacs_within_one_percent_of_published(name: str) -> None:
    macs = count_macs(timm.create_model(name).eval(), torch.zeros(1, 3, 224, 224))
    assert macs["total"] / 1e9 == pytest.approx(GMACS[name], rel=0.01)
    assert sum(macs["by_module"].values()) == macs["total"]


@pytest.mark.parametrize("name", MODELS)
def test_feature_info_and_meta_build(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert all(p.is_meta for p in model.parameters())
    dims = sgformer.model.VARIANTS[name]["embed_dims"]
    assert [f["num_chs"] for f in model.feature_info] == list(dims)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in range(4)]
    assert model.num_features == model.head_hidden_size == dims[-1]


def test_kwargs_override_variant() -> None:
    model = timm.create_model(
        "sgformer_s", embed_dims=(32, 64, 96, 128), depths=(2, 2, 2, 1), num_classes=7
    )
    assert [len(s.blocks) for s in model.stages] == [2, 2, 2, 1]
    assert model.head.out_features == 7 and model.stages[2].norm.normalized_shape == (96,)


def test_forward_and_backward_reach_every_parameter() -> None:
    model = nano(num_classes=5).train()
    logits = model(torch.randn(*SMALL))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_grad_checkpointing_same_output_and_gradients() -> None:
    x = torch.randn(*SMALL)
    model = nano(num_classes=3).train()
    reference = model(x)
    reference.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, reference)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def _split_lepe(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout before the LePE linear joined the fused input projections (0.3)."""
    old = {}
    for key, value in state_dict.items():
        owner, fused, tail = key.rsplit(".", 2) if key.count(".") > 1 else ("", "", key)
        if fused not in ("q_lepe", "qkv_lepe"):
            old[key] = value
            continue
        width = state_dict[f"{owner}.{fused}.weight"].shape[1]  # the LePE linear is C -> C
        if value.shape[0] > width:  # without qkv bias, the fused bias is the LePE linear's
            old[f"{owner}.{fused.removesuffix('_lepe')}.{tail}"] = value[:-width]
        old[f"{owner}.lepe_linear.{tail}"] = value[-width:]
    return old


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_checkpoints_with_a_separate_lepe_linear_still_load(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    model = nano(qkv_bias=qkv_bias).eval()
    for name, param in model.named_parameters():  # no zero biases: every row must land right
        torch.nn.init.normal_(param, std=0.02) if "bias" in name else None
    old = _split_lepe(model.state_dict())
    assert "stages.0.blocks.1.attn.lepe_linear.bias" in old
    assert ("stages.0.blocks.1.attn.q.bias" in old) == qkv_bias
    assert ("stages.3.blocks.0.attn.qkv.bias" in old) == qkv_bias
    fresh = nano(qkv_bias=qkv_bias).eval()
    fresh.load_state_dict(sgformer.model.checkpoint_filter_fn(old, fresh), strict=True)
    x = torch.randn(*SMALL)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_intermediates_equal_features_only() -> None:
    x = torch.randn(*SMALL)
    torch.manual_seed(1)
    model = nano().eval()
    torch.manual_seed(1)
    backbone = nano(features_only=True).eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = backbone(x)
        assert backbone.feature_info.channels() == [32, 64, 128, 256]
        torch.testing.assert_close(final, model.forward_features(x))
    assert [f.shape[-2:] for f in intermediates] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for a, b in zip(intermediates, features, strict=True):
        torch.testing.assert_close(a, b)
    assert len(nano(features_only=True, out_indices=(1, 3))(x)) == 2


def test_prune_intermediate_layers_and_stop_early() -> None:
    x = torch.randn(*SMALL)
    model = nano().eval()
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True)[1]
        assert model.prune_intermediate_layers(indices=[1]) == [1]
        pruned = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert len(model.stages) == 2 and isinstance(model.head, torch.nn.Identity)
    torch.testing.assert_close(full[0], early[0])
    torch.testing.assert_close(full[0], pruned[0])


def test_forward_head_and_reset_classifier() -> None:
    model = nano().eval()
    x = torch.randn(*SMALL)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.get_classifier().out_features == 10
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")


def test_optimizer_hooks() -> None:
    model = nano()
    assert model.no_weight_decay() == {"pos_embed"}
    names = dict(model.named_parameters())
    assert "pos_embed" in names
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    # stem, one group per block (downsample joins its stage's first, the norm its last), head
    assert len(groups) == 1 + sum(len(s.blocks) for s in model.stages) + 1
    assert "stages.1.downsample.conv1.weight" in groups[3]
    assert {"stages.1.blocks.1.norm1.weight", "stages.1.norm.weight"} <= set(groups[4])
    assert len(timm.models.group_parameters(model, model.group_matcher(coarse=True))) == 6
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert any(p is names["pos_embed"] for g in no_decay for p in g["params"])


def test_model_import_stays_light() -> None:
    code = (
        "import sys, sgformer.model; "
        "heavy = [m for m in ('sgformer.trainer', 'sgformer.cli', 'sgformer.tasks', "
        "'sgformer.checkpoint', 'sgformer.visualize', 'sgformer.data', 'matplotlib', "
        "'segmentation_models_pytorch', 'pycocotools') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("make_input", "error", "match"),
    [
        (lambda: torch.randn(2, 1, 64, 64), ValueError, "expected 3 input channels, got 1"),
        (lambda: torch.randn(3, 64, 64), ValueError, "4-D .* got rank 3"),
        (lambda: torch.randn(1, 3, 31, 64), ValueError, "at least 32 px, got 31 x 64"),
        (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point.*uint8"),
        (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.bool), TypeError, "x.float"),
        (lambda: torch.zeros(0, 3, 64, 64), ValueError, "empty batch"),
        (lambda: [[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_explained(make_input, error, match: str) -> None:
    model = nano().eval()
    with pytest.raises(error, match=match):
        model(make_input())
    with pytest.raises(error, match=match):
        model.forward_significance(make_input())


def test_unknown_model_lists_family() -> None:
    with pytest.raises(ValueError, match="sgformer_b, sgformer_m, sgformer_nano, sgformer_s"):
        sgformer.create_model("sgformer_xl")
    assert isinstance(sgformer.create_model("sgformer_nano"), sgformer.SGFormer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depths": (3, 2, 2, 1)}, "depth must be even"),
        ({"sr_ratios": (16, 4, 2, 1)}, "sr_ratio=16"),
        ({"significance": "max"}, "significance must be one of"),
        ({"attention": "local"}, "use significance='local'"),
        ({"num_heads": (3, 2, 4, 8)}, "not divisible|even"),
        ({"global_pool": "max"}, "global_pool"),
    ],
)
def test_bad_config_is_explained(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nano(**kwargs)
