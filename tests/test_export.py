"""Exported graphs give PyTorch's logits (onnxruntime, torch.export, TorchScript)."""

import re

import pytest
import timm
import torch

import sgformer.export
from conftest import GOLDEN_RTOL
from sgformer.cli import main
from sgformer.export import export_model

# The exported graphs of sgformer_nano are held to the golden tolerance (1e-4); the export
# command's own check allows more for larger models (CHECK_TOLERANCE says why).


def _printed_checks(printed: str) -> dict[str, float]:
    """{'(2, 3, 64, 64)': error} from the export command's 'checked ... at SHAPE' lines."""
    found = re.findall(r"checked onnxruntime at (\([\d, ]+\)): max rel. error (\S+)", printed)
    return {shape: float(error) for shape, error in found}


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("sgformer_nano").eval()


def test_onnx_matches_pytorch_at_two_batch_sizes(tmp_path, capsys) -> None:
    out = tmp_path / "nano.onnx"
    status = main(["export", "--model", "sgformer_nano", "--img-size", "64", str(out)])
    assert status == 0 and out.stat().st_size > 1_000_000  # weights are inside the file
    printed = capsys.readouterr().out
    checks = _printed_checks(printed)
    assert list(checks) == ["(2, 3, 64, 64)", "(3, 3, 64, 64)"]
    assert all(error <= GOLDEN_RTOL for error in checks.values())
    assert "takes (B, 3, H, W) input, B from 1 to 1024, H = W = 64" in printed


@pytest.mark.slow
@pytest.mark.parametrize(("dynamic", "side"), [(False, 64), (True, 128)])
def test_exported_program_matches_pytorch(nano, tmp_path, dynamic, side) -> None:
    result = export_model(
        nano, tmp_path / "nano.pt2", fmt="exported-program", img_size=side, dynamic=dynamic
    )
    assert [c["shape"][0] for c in result["checks"]] == [2, 3]
    assert len({c["shape"][2:] for c in result["checks"]}) == (2 if dynamic else 1)
    assert all(c["error"] <= GOLDEN_RTOL for c in result["checks"])


def test_torchscript_matches_pytorch(nano, tmp_path) -> None:
    result = export_model(nano, tmp_path / "nano.ts", fmt="torchscript", img_size=64)
    assert all(c["error"] <= GOLDEN_RTOL for c in result["checks"])


def test_a_graph_that_differs_from_pytorch_is_reported(nano, tmp_path, monkeypatch) -> None:
    def off_by_a_percent(model, example, path, dynamic):
        return lambda x: model(x).detach().numpy() * 1.01

    monkeypatch.setitem(sgformer.export._EXPORTERS, "torchscript", off_by_a_percent)
    with pytest.raises(
        ValueError, match=r"torchscript graph differs from PyTorch at input \(2,"
    ) as err:
        export_model(nano, tmp_path / "x.ts", fmt="torchscript", img_size=64)
    assert str(err.value).endswith("x.ts is left for inspection, do not deploy it")


def test_onnx_dynamic_height_and_width_matches_pytorch_at_two_sizes(tmp_path, capsys) -> None:
    # One graph for every size in DYNAMIC_SIZE_RANGE: the second check has another height and
    # width (other window and reduction padding, a non-square grid) than the example input.
    out = tmp_path / "nano_dynamic.onnx"
    torch.manual_seed(0)
    args = ["export", "--model", "sgformer_nano", "--dynamic", "--img-size", "128", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    checks = _printed_checks(printed)
    assert list(checks) == ["(2, 3, 128, 128)", "(3, 3, 168, 136)"]
    assert all(error <= GOLDEN_RTOL for error in checks.values())
    assert "takes (B, 3, H, W) input, B from 1 to 1024, H, W from 128 to 4096 px" in printed
    import onnx

    dims = onnx.load(str(out), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]


def test_dynamic_sizes_refused_where_they_cannot_work(nano, tmp_path) -> None:
    with pytest.raises(ValueError, match="torchscript graphs cannot take dynamic height"):
        export_model(nano, tmp_path / "x.ts", fmt="torchscript", dynamic=True, img_size=128)
    with pytest.raises(ValueError, match="example side must be within 128-4096 px.*got 64"):
        export_model(nano, tmp_path / "x.onnx", dynamic=True, img_size=64)
    assert not any(tmp_path.iterdir())


def test_bad_format_and_size(nano, tmp_path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(nano, tmp_path / "x", fmt="tflite")
    with pytest.raises(ValueError, match="img_size must be at least 32, got 16"):
        export_model(nano, tmp_path / "x", img_size=16)
