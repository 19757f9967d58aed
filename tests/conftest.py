from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
# SPEC "Reference data": within 1e-4 relative error in float32, measured against the scale of
# each reference tensor (an element-wise rtol alone is meaningless for values near zero).
GOLDEN_RTOL = 1e-4


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=GOLDEN_RTOL, atol=GOLDEN_RTOL * expected.abs().max().item()
    )


@pytest.fixture(scope="session")
def golden() -> dict:
    """The published implementation's reference run (SPEC "Reference data"); never skipped."""
    path = GOLDEN_DIR / "sgformer_tiny_ref.pt"
    assert path.is_file(), f"golden reference missing: {path} (../shared must sit beside the repo)"
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
