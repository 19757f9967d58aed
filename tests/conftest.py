from pathlib import Path

import pytest
import timm
import torch

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.model import checkpoint_filter_fn

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
# docs/design.md, "Reference data": within 1e-4 relative error in float32, measured against
# the scale of each reference tensor (an element-wise rtol alone is meaningless near zero).
GOLDEN_RTOL = 1e-4


def assert_close_relative(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = GOLDEN_RTOL
) -> None:
    """``actual`` (on any device) within ``rtol`` of ``expected``, relative to its scale."""
    torch.testing.assert_close(
        actual.to(expected.device), expected, rtol=rtol, atol=rtol * expected.abs().max().item()
    )


# What a broken download or a full disk leaves instead of an image; every task must skip, count
# and name such files, in training and in evaluation alike.
UNREADABLE_IMAGES = (
    b"\x89PNG\r\n\x1a\n not an image",  # corrupt: a PNG signature, then garbage
    b"\xff\xd8\xff\xe0" + b"\0" * 20,  # truncated: a JPEG that stops after its header
    b"",  # zero bytes
)


def break_images(paths: list[Path]) -> None:
    """Overwrite each file with the next kind of unreadable image (cycling)."""
    for i, path in enumerate(paths):
        path.write_bytes(UNREADABLE_IMAGES[i % len(UNREADABLE_IMAGES)])


@pytest.fixture(scope="session")
def golden() -> dict:
    """The published implementation's reference run (docs/design.md, "Reference data");
    never skipped."""
    path = GOLDEN_DIR / "sgformer_tiny_ref.pt"
    assert path.is_file(), f"golden reference missing: {path} (../shared must sit beside the repo)"
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def golden_model(golden: dict) -> torch.nn.Module:
    """sgformer_nano with the reference run's weights, in eval mode, on the CPU."""
    model = timm.create_model("sgformer_nano").eval()
    config = golden["config"]
    assert list(config["embed_dims"]) == [f["num_chs"] for f in model.feature_info]
    model.load_state_dict(checkpoint_filter_fn(dict(golden["state_dict"]), model), strict=True)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
