"""timm's own model tests (tests/test_models.py of the installed timm release) on sgformer_*.

`make` unpacks that release's sdist into .venv/timm-sdist. TorchScript and FX tracing are out
of scope (the significance sort and any-size padding are data-dependent Python control flow).
"""

import subprocess
import sys
from pathlib import Path

import timm

TIMM_SDIST = Path(__file__).resolve().parents[1] / ".venv" / "timm-sdist"
SELECTION = "sgformer and not torchscript and not fx"


def test_timm_model_suite_passes_for_sgformer() -> None:
    suite = TIMM_SDIST / "tests" / "test_models.py"
    assert suite.is_file(), f"timm's test suite is missing at {suite}: run `make test` to fetch it"
    assert (TIMM_SDIST / "PKG-INFO").read_text().count(f"Version: {timm.__version__}") == 1
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sgformer",
         "-o", "addopts=", "-W", "ignore", "-k", SELECTION, str(suite)],
        cwd=TIMM_SDIST, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-4000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 4 * len(timm.list_models("sgformer*")), summary
