"""Loading published and own checkpoints through timm, conversion, and bad checkpoints."""

import errno
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import sgformer  # noqa: F401
from conftest import assert_close_relative
from sgformer.checkpoint import (
    FORMAT_VERSION,
    LEGACY_FORMAT,
    TASK_COMMANDS,
    CheckpointWriteError,
    Run,
    load_run,
    save_checkpoint,
)
from sgformer.cli import main
from sgformer.convert import METADATA_KEY, convert_checkpoint
from sgformer.data import write_shapes_dataset
from sgformer.tasks.detection import build_detector, detector_from_checkpoint
from sgformer.tasks.segmentation import build_segmentation_model, segmenter_from_checkpoint


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


# ---------------------------------------------------------------------------------------------
# Run checkpoints (sgformer.checkpoint): one format, atomic writes, safe loads, legacy files.

# The schemas this project's trainers wrote before checkpoints had a format version, key for
# key in the order they wrote them (checked against files written by that code, commit b073e65).
LEGACY_KEYS = {
    "classification": (
        "model", "model_ema", "optimizer", "scheduler", "scaler", "epoch", "model_name",
        "model_kwargs", "class_names", "args", "history", "best", "metrics",
    ),
    "detection": (
        "task", "model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "model_name",
        "model_kwargs", "num_classes", "category_ids", "class_names", "args", "history", "best",
        "metrics",
    ),
    "segmentation": (
        "model", "optimizer", "scheduler", "scaler", "iteration", "task", "model_name",
        "model_kwargs", "class_names", "args", "history", "best", "metrics",
    ),
}  # fmt: skip


NEWER_FLAGS = ("log",)  # flags added since format 1: legacy runs resume with their defaults


def legacy_checkpoint(checkpoint: dict) -> dict:
    """A current-format checkpoint rewritten in the schema its task's trainer used before."""
    flat = {**checkpoint, **checkpoint["state"], **checkpoint["data"]}
    flat["args"] = {k: v for k, v in checkpoint["args"].items() if k not in NEWER_FLAGS}
    return {key: flat.get(key) for key in LEGACY_KEYS[checkpoint["task"]]}


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A finished one-epoch classification run (with EMA) on tiny shapes."""
    root = tmp_path_factory.mktemp("cls")
    write_shapes_dataset(
        root / "data", num_train=16, num_val=8, img_size=32, num_dense_train=0, num_dense_val=0
    )
    argv = ["train", "--data-dir", str(root / "data"), "--model", "sgformer_nano"]
    argv += ["--img-size", "32", "-b", "8", "--epochs", "1", "--workers", "0", "--seed", "1"]
    assert main([*argv, "--model-ema", "--output", str(root / "run")]) == 0
    return root


def _run_dict(task: str, model: torch.nn.Module, model_kwargs: dict, **data) -> dict:
    return Run(
        task=task,
        model_name="sgformer_nano",
        model_kwargs=model_kwargs,
        args={"num_classes": 3},
        state={"model": model.state_dict(), "iteration": 2, "epoch": 1},
        history=[{"iteration": 2}],
        best={"iteration": 2},
        data=data,
    ).to_dict()


def test_atomic_write_keeps_the_last_complete_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def fills_the_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", fills_the_disk)
    message = f"cannot write checkpoint {path}: the disk is full; the last complete checkpoint"
    with pytest.raises(CheckpointWriteError, match=re.escape(message)) as raised:
        save_checkpoint(path, {"epoch": 2})
    assert "\n" not in str(raised.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind

    def cannot_rename(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", cannot_rename)
    with pytest.raises(CheckpointWriteError, match="Permission denied; the last complete"):
        save_checkpoint(path, {"epoch": 3})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_an_output_that_cannot_be_a_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint exists there"):
        save_checkpoint(blocker / "run" / "last.pth", {"epoch": 1})


def test_training_stops_with_one_line_when_the_disk_fills(
    classifier_run, tmp_path, monkeypatch, capsys
):
    """A disk that fills during epoch 2's checkpoint: exit 2, epoch 1's checkpoint intact."""
    out = tmp_path / "run"
    argv = ["train", "--data-dir", str(classifier_run / "data"), "--model", "sgformer_nano"]
    argv += ["--img-size", "32", "-b", "8", "--epochs", "2", "--workers", "0"]
    real_save = torch.save

    def full_on_epoch_two(obj, f):
        if obj.get("state", {}).get("epoch") == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", full_on_epoch_two)
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("sgformer train: error: cannot write checkpoint") and "disk is full" in err
    )
    assert err.endswith(f"the last complete checkpoint {out / 'last.pth'} is intact")
    assert load_run(out).state["epoch"] == 1


class _RunsCode:
    """Unpickling this object calls ``open(marker, "w")``: a file that would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(classifier_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": _RunsCode(marker)}, "model_name": "sgformer_nano"}, evil)
    with pytest.raises(ValueError, match="could run code when loaded; refused"):
        load_run(evil)
    data = str(classifier_run / "data")
    commands = [
        ["validate", "--data-dir", data, "--checkpoint", str(evil)],
        ["predict", data, "--checkpoint", str(evil)],
        ["train", "--resume", str(evil)],
        ["segment", "val", "--checkpoint", str(evil)],
        ["segment", "predict", data, "--checkpoint", str(evil)],
        ["detect", "val", "--checkpoint", str(evil)],
        ["detect", "predict", data, "--checkpoint", str(evil)],
        ["convert", str(evil), str(tmp_path / "o.safetensors"), "--model", "sgformer_nano"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "could run code when loaded; refused" in err and err.count("\n") == 1, argv
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is dangerous: this runs its code
    assert marker.exists()


def test_a_checkpoint_of_another_task_is_a_one_line_error(classifier_run, tmp_path, capsys):
    classifier = classifier_run / "run" / "last.pth"
    model = timm.create_model("sgformer_nano", num_classes=3)
    segmenter = tmp_path / "segmenter.pth"
    torch.save(_run_dict("segmentation", model, {"decoder": "upernet"}), segmenter)
    data = str(classifier_run / "data")
    cls, det, seg = "classification", "detection", "segmentation"
    cases = [
        (["segment", "val", "--checkpoint", str(classifier)], cls, seg),
        (["detect", "val", "--checkpoint", str(classifier)], cls, det),
        (["detect", "train", "--resume", str(classifier)], cls, det),
        (["validate", "--data-dir", data, "--checkpoint", str(segmenter)], seg, cls),
        (["predict", data, "--checkpoint", str(segmenter)], seg, cls),
        (["train", "--resume", str(segmenter)], seg, cls),
    ]
    for argv, held, wanted in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"is a {held} checkpoint of sgformer_nano, not a {wanted} one; use it with" in err
        assert TASK_COMMANDS[held] in err and err.count("\n") == 1, argv


def test_newer_format_and_weights_are_not_runs(tmp_path):
    model = timm.create_model("sgformer_nano", num_classes=3)
    future = {**_run_dict("classification", model, {}), "format_version": FORMAT_VERSION + 1}
    torch.save(future, tmp_path / "future.pth")
    with pytest.raises(ValueError, match=f"format {FORMAT_VERSION + 1}; .*update sgformer"):
        load_run(tmp_path / "future.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="holds model weights, not a training checkpoint"):
        load_run(tmp_path / "bare.pth")
    with pytest.raises(FileNotFoundError, match="no last.pth in"):
        load_run(tmp_path)


def test_current_format_round_trips(classifier_run):
    written = torch.load(classifier_run / "run" / "last.pth", weights_only=True)
    assert set(written) == {
        "format_version", "task", "model_name", "model_kwargs", "args", "state", "history",
        "best", "data",
    }  # fmt: skip
    run = load_run(classifier_run / "run")
    assert run.format_version == FORMAT_VERSION and run.to_dict().keys() == written.keys()
    assert run.task == "classification" and run.state["epoch"] == 1 and len(run.history) == 1
    assert run.data["class_names"] == sorted(
        p.name for p in (classifier_run / "data/train").iterdir()
    )
    assert run.weights(use_ema=True) is run.state["model_ema"]


def test_legacy_classification_checkpoint_validates_predicts_and_resumes(
    classifier_run, tmp_path, capsys
):
    current = torch.load(classifier_run / "run" / "last.pth", weights_only=True)
    legacy_run = tmp_path / "legacy"
    legacy_run.mkdir()
    torch.save(legacy_checkpoint(current), legacy_run / "last.pth")
    run = load_run(legacy_run, "classification")
    assert run.format_version == LEGACY_FORMAT and run.state["epoch"] == 1
    assert run.data["class_names"] == current["data"]["class_names"]
    for key, value in current["state"]["model"].items():
        torch.testing.assert_close(run.weights()[key], value)
    data = classifier_run / "data"
    results = tmp_path / "val.json"
    argv = ["validate", "--data-dir", str(data), "--checkpoint", str(legacy_run / "last.pth")]
    assert main([*argv, "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["top1"] == pytest.approx(current["best"]["top1"])
    capsys.readouterr()
    assert main(["predict", str(data / "val"), "--checkpoint", str(legacy_run / "last.pth")]) == 0
    assert capsys.readouterr().out.count("\n") == 8
    assert main(["train", "--resume", str(legacy_run), "--epochs", "2"]) == 0
    resumed = load_run(legacy_run)  # the resumed run writes the current format
    assert resumed.format_version == FORMAT_VERSION and resumed.state["epoch"] == 2
    assert resumed.history[0] == current["history"][0] and len(resumed.history) == 2


@pytest.mark.parametrize("with_task", [True, False])
def test_legacy_segmentation_checkpoint_loads(tmp_path, with_task):
    model = build_segmentation_model("sgformer_nano", "upernet", 3, decoder_channels=32)
    kwargs = {"decoder": "upernet", "num_classes": 3, "decoder_channels": 32}
    current = _run_dict("segmentation", model, kwargs, class_names=["a", "b", "c"])
    legacy = legacy_checkpoint(current)
    if not with_task:  # the oldest files: recognised by their iteration and decoder
        del legacy["task"]
    torch.save(legacy, tmp_path / "seg.pth")
    loaded, run = segmenter_from_checkpoint(tmp_path / "seg.pth")
    assert (run.task, run.format_version, run.state["iteration"]) == ("segmentation", 1, 2)
    assert run.data["class_names"] == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_legacy_detection_checkpoint_loads(tmp_path):
    kwargs = {"mask": True, "out_channels": 32, "box_head_dim": 64, "mask_head_dim": 32}
    model = build_detector("sgformer_nano", 2, **kwargs)
    names = {"num_classes": 2, "category_ids": [1, 2], "class_names": ["a", "b"]}
    current = _run_dict("detection", model, kwargs, **names)
    torch.save(legacy_checkpoint(current), tmp_path / "det.pth")
    loaded, run = detector_from_checkpoint(tmp_path / "det.pth")
    assert (run.task, run.format_version, run.data["category_ids"]) == ("detection", 1, [1, 2])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_run_checkpoint_loads_as_pretrained_weights(tmp_path, golden) -> None:
    # A run checkpoint of this project (sgformer.checkpoint) keeps the weights in its state.
    weights = load(_saved(tmp_path, published(golden))).state_dict()
    run = {"format_version": 2, "task": "classification", "state": {"model": weights}}
    torch.save(run, tmp_path / "run.pth")
    assert_golden_logits(load(tmp_path / "run.pth"), golden)
