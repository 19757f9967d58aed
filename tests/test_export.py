"""Exported graphs give PyTorch's logits (onnxruntime, torch.export, TorchScript)."""

import pytest
import timm
import torch

import sgformer  # noqa: F401
from sgformer.cli import main
from sgformer.export import CHECK_TOLERANCE, export_model


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sgformer_nano").eval()


def test_onnx_matches_pytorch_at_two_batch_sizes(tmp_path, capsys) -> None:
    out = tmp_path / "nano.onnx"
    status = main(["export", "--model", "sgformer_nano", "--img-size", "64", str(out)])
    assert status == 0 and out.stat().st_size > 1_000_000  # weights are inside the file
    printed = capsys.readouterr().out
    assert "checked onnxruntime at (2, 3, 64, 64)" in printed
    assert "checked onnxruntime at (3, 3, 64, 64)" in printed


@pytest.mark.slow
def test_exported_program_matches_pytorch(nano, tmp_path) -> None:
    result = export_model(nano, tmp_path / "nano.pt2", fmt="exported-program", img_size=64)
    assert [c["shape"][0] for c in result["checks"]] == [2, 3]
    assert all(c["error"] <= CHECK_TOLERANCE for c in result["checks"])


def test_torchscript_matches_pytorch(nano, tmp_path) -> None:
    result = export_model(nano, tmp_path / "nano.ts", fmt="torchscript", img_size=64)
    assert all(c["error"] <= CHECK_TOLERANCE for c in result["checks"])


def test_dynamic_image_size_is_refused_with_the_reason(tmp_path, capsys) -> None:
    status = main(["export", "--model", "sgformer_nano", "--dynamic", str(tmp_path / "x.onnx")])
    assert status == 2
    assert "dynamic height and width are not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_bad_format_and_size(nano, tmp_path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(nano, tmp_path / "x", fmt="tflite")
    with pytest.raises(ValueError, match="img_size must be at least 32, got 16"):
        export_model(nano, tmp_path / "x", img_size=16)
