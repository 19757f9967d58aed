import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def copy_with_unreadable_images(src: Path, dst: Path, picks: dict[str, slice]) -> list[Path]:
    """A copy of the dataset ``src`` whose picked files (folder -> slice of its sorted files)
    are broken by ``break_images``; returns the broken files."""
    shutil.copytree(src, dst)
    broken = []
    for folder, pick in picks.items():
        paths = sorted((dst / folder).iterdir())[pick]
        break_images(paths)
        broken += paths
    return broken


class Killed(Exception):
    """A run stopped right after it wrote a checkpoint, as a kill between two leaves it."""


def run_until_first_checkpoint(monkeypatch, module: Any, run: Callable[[], Any]) -> None:
    """Call ``run`` (a training command) with ``module.save_run`` raising ``Killed`` once it has
    written the run's first checkpoint."""
    real = module.save_run

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(module, "save_run", save_then_die)
        with pytest.raises(Killed):
            run()


def assert_same_rows(expected: list[dict], actual: list[dict], keys: tuple[str, ...]) -> None:
    """Per-epoch (or per-evaluation) numbers of two runs equal within 1e-5."""
    for key in keys:
        for row_e, row_a in zip(expected, actual, strict=True):
            assert row_a[key] == pytest.approx(row_e[key], rel=1e-5, abs=1e-7), key


def kill_after_first_checkpoint(argv: list[str], out: Path) -> None:
    """Run ``sgformer ARGV`` in a subprocess and SIGKILL it at a random moment after its first
    checkpoint in ``out`` (maybe while it writes the next one)."""
    proc = subprocess.Popen([sys.executable, "-m", "sgformer", *argv], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 2))
    proc.kill()  # SIGKILL
    proc.wait()


def load_golden(name: str) -> dict:
    """A reference run of the published implementation (docs/design.md, "Reference data");
    a missing file fails, never skips."""
    path = GOLDEN_DIR / name
    assert path.is_file(), f"golden reference missing: {path} (../shared must sit beside the repo)"
    return torch.load(path, map_location="cpu", weights_only=False)


def model_with_golden_weights(reference: dict) -> torch.nn.Module:
    """sgformer_nano with a reference run's weights, in eval mode, on the CPU."""
    model = timm.create_model("sgformer_nano").eval()
    config = reference["config"]
    assert list(config["embed_dims"]) == [f["num_chs"] for f in model.feature_info]
    model.load_state_dict(checkpoint_filter_fn(dict(reference["state_dict"]), model), strict=True)
    return model


@pytest.fixture(scope="session")
def golden() -> dict:
    """The published implementation's float32 reference run."""
    return load_golden("sgformer_tiny_ref.pt")


@pytest.fixture(scope="session")
def reference64() -> dict:
    """The published implementation's float64 reference run and its float32 errors."""
    return load_golden("sgformer_tiny_ref64.pt")


@pytest.fixture(scope="module")
def golden_model(golden: dict) -> torch.nn.Module:
    """sgformer_nano with the reference run's weights, in eval mode, on the CPU."""
    return model_with_golden_weights(golden)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
