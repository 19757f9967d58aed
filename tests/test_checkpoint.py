"""Loading published and own checkpoints through timm, conversion, and bad checkpoints."""

import json

import pytest
import timm
import torch
from safetensors import safe_open

import sgformer  # noqa: F401
from conftest import assert_close_relative
from sgformer.cli import main
from sgformer.convert import METADATA_KEY, convert_checkpoint


def load(path, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        "sgformer_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
    ).eval()


def logits_of(model: torch.nn.Module, golden: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(golden["input"])


def assert_golden_logits(model: torch.nn.Module, golden: dict) -> None:
    assert_close_relative(logits_of(model, golden), golden["logits"])


def published(golden: dict) -> dict:
    return {k: v.clone() for k, v in golden["state_dict"].items()}


def test_training_checkpoint_prefers_ema(tmp_path, golden) -> None:
    stale = {k: torch.zeros_like(v) for k, v in golden["state_dict"].items()}
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"state_dict": stale, "state_dict_ema": published(golden), "epoch": 299, "arch": "x"}, path
    )
    assert_golden_logits(load(path), golden)


@pytest.mark.parametrize("wrap", ["bare", "model", "module"])
def test_other_wrappings(tmp_path, golden, wrap) -> None:
    weights = published(golden)
    if wrap == "model":
        weights = {"model": weights}
    elif wrap == "module":
        weights = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}
    torch.save(weights, tmp_path / "w.pth")
    assert_golden_logits(load(tmp_path / "w.pth"), golden)


def test_own_checkpoint_and_new_head_and_new_size(tmp_path, golden) -> None:
    model = load(_saved(tmp_path, published(golden)))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ours.pth")
    assert_golden_logits(load(tmp_path / "ours.pth"), golden)
    fewer = load(tmp_path / "ours.pth", num_classes=10)
    assert fewer.head.out_features == 10
    torch.testing.assert_close(fewer.stages[3].norm.weight, model.stages[3].norm.weight)
    bigger = load(tmp_path / "ours.pth", img_size=384)
    assert bigger.pos_embed.shape == (1, 96 * 96, 32)


def _saved(tmp_path, weights) -> str:
    path = tmp_path / "published.pth"
    torch.save({"state_dict": weights}, path)
    return str(path)


def test_convert_writes_verified_safetensors(tmp_path, golden, capsys) -> None:
    src = _saved(tmp_path, published(golden))
    dst = tmp_path / "out" / "nano.safetensors"
    assert main(["convert", src, str(dst), "--model", "sgformer_nano"]) == 0
    printed = capsys.readouterr().out
    params = sum(v.numel() for v in golden["state_dict"].values())
    assert f"{params:,} parameters" in printed and "sha256 " in printed
    with safe_open(str(dst), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        assert meta == {"model": "sgformer_nano", "model_kwargs": {}}
    assert_golden_logits(load(dst), golden)
    result = convert_checkpoint(src, tmp_path / "again.safetensors", "sgformer_nano")
    assert result["sha256"] in printed  # reproducible bytes


def test_not_a_checkpoint(tmp_path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load(text)
    assert (
        main(["convert", str(text), str(tmp_path / "o.safetensors"), "--model", "sgformer_s"]) == 2
    )
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("sgformer_s", pretrained=True)


def test_wrong_variant_names_mismatched_keys_with_shapes(tmp_path) -> None:
    other = timm.create_model("sgformer_nano", embed_dims=(48, 64, 128, 256)).state_dict()
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(
        ValueError,
        match=r"shape mismatch .*stem\.conv1\.weight \(checkpoint "
        r"\(48, 3, 3, 3\), model \(32, 3, 3, 3\)\)",
    ):
        load(tmp_path / "other.pth")


def test_missing_unexpected_and_non_finite(tmp_path, golden) -> None:
    weights = published(golden)
    del weights["block2.1.attn.f3.weight"]
    weights["extra.weight"] = torch.zeros(1)
    torch.save(weights, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"1 missing keys: stages\.1\.blocks\.1\.attn\.merge\.2"):
        load(tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"1 unexpected keys: extra\.weight"):
        load(tmp_path / "a.pth")
    weights = published(golden)
    weights["block1.0.attn.q1.weight"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"NaN or Inf values in stages\.0\.blocks\.0\.attn\.qkv"):
        load(tmp_path / "nan.pth")
