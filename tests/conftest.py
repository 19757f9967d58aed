from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> dict:
    """The published implementation's reference run (SPEC "Reference data"); never skipped."""
    path = GOLDEN_DIR / "sgformer_tiny_ref.pt"
    assert path.is_file(), f"golden reference missing: {path} (../shared must sit beside the repo)"
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
