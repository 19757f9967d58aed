"""Classification training, validation, prediction: short runs on tiny generated shapes."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch
import yaml

from conftest import kill_after_first_checkpoint
from sgformer.checkpoint import FORMAT_VERSION, load_run
from sgformer.cli import main
from sgformer.data import write_shapes_dataset
from sgformer.model import create_model
from sgformer.runtime import unwrap_model
from sgformer.tasks import classification
from sgformer.tasks.classification import ClassificationTask

IMG = 32
# Augmentations off, so that runs differ only by what the test changes.
PLAIN = ["--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0", "--color-jitter", "0"]
PLAIN += ["--aa", "none", "--smoothing", "0", "--drop-path", "0"]


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data-dir", str(data), "--model", "sgformer_nano", "--img-size", str(IMG),
        "-b", "8", "--epochs", "3", "--warmup-epochs", "1", "--lr", "2e-3", "--workers", "0",
        "--output", str(out), "--seed", "3", *extra,
    ]  # fmt: skip


def _summary(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(
        root, num_train=32, num_val=16, img_size=IMG, num_dense_train=0, num_dense_val=0
    )
    return root


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """A finished 3-epoch run with EMA (shared by the validate/predict tests)."""
    out = tmp_path_factory.mktemp("run")
    argv = _train_argv(shapes, out, "--model-ema", "--model-ema-decay", "0.9")
    assert main([*argv, "--log", "tensorboard"]) == 0
    return out


def _copy_with_corrupt(shapes: Path, dst: Path) -> Path:
    shutil.copytree(shapes, dst)
    (dst / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (dst / "val" / "star" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    (dst / "val" / "ring" / "empty.png").write_bytes(b"")
    return dst


# ----------------------------------------------------------------------------- recipes


def _settings(given: dict) -> object:
    return ClassificationTask.settings({"data_dir": "data", **given})[0]


def test_recipe_values_and_explicit_flags_win():
    args = _settings({"recipe": "sgformer_m", "epochs": 5, "lr": None})
    assert (args.model, args.drop_path, args.model_ema_decay) == ("sgformer_m", 0.2, 0.99992)
    assert (args.mixup, args.cutmix, args.reprob, args.aa) == (
        0.8,
        1.0,
        0.25,
        "rand-m9-mstd0.5-inc1",
    )
    assert args.epochs == 5 and args.lr == 1e-3 and args.scale_recipe_lr
    fine = _settings({"recipe": "finetune_384", "drop_path": 0.3})
    assert (fine.img_size, fine.lr, fine.weight_decay, fine.drop_path) == (384, 5e-6, 1e-8, 0.3)
    demo = _settings({"recipe": "shapes_demo", "epochs": 2})
    assert demo.model == "sgformer_nano" and demo.img_size == 64 and demo.epochs == 2
    assert not demo.scale_recipe_lr  # the demo's lr is absolute, the paper's scale with batch
    assert not _settings({"recipe": "sgformer_s", "lr": 1e-3}).scale_recipe_lr  # --lr given
    plain = _settings({})
    assert plain.model == "sgformer_s" and plain.mixup == 0.0 and not plain.scale_recipe_lr
    with pytest.raises(ValueError, match="unknown --recipe 'sgformer_xl'"):
        _settings({"recipe": "sgformer_xl"})
    with pytest.raises(ValueError, match="--data-dir is required"):
        ClassificationTask.settings({})


# ----------------------------------------------------------------------------- a short run


def test_train_writes_checkpoints_summary_args_and_curves(trained, shapes):
    rows = _summary(trained)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert float(row["train_loss"]) > 0 and 0 <= float(row["top1"]) <= 100
        assert float(row["top5"]) >= float(row["top1"]) and row["ema_top1"] != ""
        assert float(row["images_per_s"]) > 0 and row["train_skipped"] == "0"
    # per-iteration cosine: the lr falls after warm-up, to near min-lr by the end
    assert float(rows[1]["lr"]) > float(rows[2]["lr"])
    args = yaml.safe_load((trained / "args.yaml").read_text())
    assert args["model"] == "sgformer_nano" and args["num_classes"] == 8
    assert (trained / "curves.png").stat().st_size > 10_000
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))  # --log tensorboard
    ckpt = torch.load(trained / "last.pth", weights_only=True)
    assert (ckpt["format_version"], ckpt["task"]) == (FORMAT_VERSION, "classification")
    for key in ("model", "model_ema", "optimizer", "scheduler", "epoch"):
        assert ckpt["state"][key] is not None, key
    assert ckpt["model_name"] == "sgformer_nano" and ckpt["args"]["epochs"] == 3
    assert ckpt["state"]["epoch"] == 3 and ckpt["model_kwargs"]["num_classes"] == 8
    assert ckpt["data"]["class_names"] == sorted(p.name for p in (shapes / "train").iterdir())
    assert len(ckpt["history"]) == 3 and ckpt["best"]["top1"] >= 0
    best = torch.load(trained / "best.pth", weights_only=True)
    assert best["state"]["metrics"]["top1"] == max(float(r["top1"]) for r in rows)
    assert not list(trained.glob(".*tmp*")), "temp files left behind"


def test_training_learns(shapes, tmp_path):
    """Loss falls on a task with no augmentation noise (the demo checks real accuracy)."""
    out = tmp_path / "run"
    assert main(_train_argv(shapes, out, *PLAIN, "--epochs", "4")) == 0
    losses = [float(r["train_loss"]) for r in _summary(out)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_channels_last_trains_the_same_run(shapes, tmp_path, monkeypatch):
    seen = []
    real = ClassificationTask.train_step

    def spy(task, model, batch):
        stem_weight = next(p for p in model.parameters() if p.ndim == 4)
        seen.append((stem_weight.is_contiguous(memory_format=torch.channels_last), task))
        return real(task, model, batch)

    monkeypatch.setattr(ClassificationTask, "train_step", spy)
    runs = {}
    for flags in ([], ["--channels-last"]):
        out = tmp_path / ("nhwc" if flags else "nchw")
        assert main(_train_argv(shapes, out, *PLAIN, "--epochs", "2", *flags)) == 0
        runs[bool(flags)] = _summary(out)
    steps = len(seen) // 2  # 2 epochs of 4 batches, per run
    assert [weight_nhwc for weight_nhwc, _ in seen] == [False] * steps + [True] * steps
    formats = [task.memory_format for _, task in seen]
    assert formats == [torch.preserve_format] * steps + [torch.channels_last] * steps
    # The same run in another layout: only the convolutions' last bits differ.
    for plain, nhwc in zip(runs[False], runs[True], strict=True):
        for key in ("train_loss", "val_loss"):
            assert float(nhwc[key]) == pytest.approx(float(plain[key]), rel=1e-3), key


def test_tar_datasets_read_like_the_folder(shapes, tmp_path, capsys):
    """--dataset tar: ROOT/<split>.tar of <class>/<image>, or ROOT/<split>/<class>.tar."""
    one_tar, per_class = tmp_path / "one_tar", tmp_path / "per_class"
    for split in ("train", "val"):
        (per_class / split).mkdir(parents=True)
        one_tar.mkdir(exist_ok=True)
        with tarfile.open(one_tar / f"{split}.tar", "w") as whole:
            for folder in sorted((shapes / split).iterdir()):
                with tarfile.open(per_class / split / f"{folder.name}.tar", "w") as part:
                    for image in sorted(folder.iterdir()):
                        whole.add(image, arcname=f"{folder.name}/{image.name}")
                        part.add(image, arcname=image.name)
    runs = {}
    layouts = {
        "folder": ["--data-dir", str(shapes)],
        "one_tar": ["--dataset", "tar", "--data-dir", str(one_tar)],
        "per_class": ["--dataset", "tar", "--data-dir", str(per_class)],
    }
    for name, data in layouts.items():
        out = tmp_path / f"run_{name}"
        argv = _train_argv(shapes, out, *PLAIN, "--epochs", "1", "--val-split", "val")
        assert main([*argv[:1], *data, *argv[3:]]) == 0  # replace --data-dir
        runs[name] = (_summary(out)[0], torch.load(out / "last.pth", weights_only=False))
    folder_row, folder_ckpt = runs["folder"]
    # Same files in the same order as the folder: the same run.
    row, ckpt = runs["one_tar"]
    assert ckpt["data"]["class_names"] == folder_ckpt["data"]["class_names"]
    for key in ("train_loss", "val_loss", "top1"):
        assert float(row[key]) == pytest.approx(float(folder_row[key]), abs=1e-5), key
    # Per-class tars list the images in another order: the run differs, the classes agree.
    row, ckpt = runs["per_class"]
    assert ckpt["data"]["class_names"] == folder_ckpt["data"]["class_names"]
    bad = ["train", "--dataset", "tar", "--data-dir", str(shapes), "--output", str(tmp_path / "x")]
    assert main(bad) != 0
    assert "no 'train' split" in capsys.readouterr().err  # a folder tree is not a tar layout


# ----------------------------------------------------------------------------- resume


class _Killed(Exception):
    pass


def _fail_at_step(monkeypatch, step: int, failure) -> None:
    """Make the ``step``-th training step (from 1) of the next run call ``failure(model)``."""
    real, calls = ClassificationTask.train_step, []

    def train_step(task, model, batch):
        calls.append(1)
        if len(calls) == step:
            failure(model)
        return real(task, model, batch)

    monkeypatch.setattr(ClassificationTask, "train_step", train_step)


def test_resume_repeats_the_uninterrupted_run(shapes, tmp_path, monkeypatch):
    flags = ["--model-ema", "--mixup", "0.5", "--cutmix", "0.5", "--reprob", "0.25"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_train_argv(shapes, full, *flags)) == 0

    def die(model):
        raise _Killed

    # 32 images at batch 8: 4 steps an epoch; killed in the second step of epoch 3.
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 10, die)
        with pytest.raises(_Killed):
            main(_train_argv(shapes, cut, *flags))
    assert len(_summary(cut)) == 2

    assert main(["train", "--resume", str(cut)]) == 0
    a, b = _summary(full), _summary(cut)
    assert len(b) == 3
    for key in ("train_loss", "val_loss", "ema_top1", "lr"):
        for ra, rb in zip(a, b, strict=True):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-5, abs=1e-7), key


def test_sigkill_at_any_point_resumes_from_last_complete_checkpoint(shapes, tmp_path):
    out = tmp_path / "run"
    kill_after_first_checkpoint(_train_argv(shapes, out, "--epochs", "4"), out)
    done = load_run(out).state["epoch"]  # always a complete checkpoint
    assert done in (1, 2, 3, 4)
    if done < 4:
        assert main(["train", "--resume", str(out / "last.pth")]) == 0
    assert [int(r["epoch"]) for r in _summary(out)] == [1, 2, 3, 4]


def test_resume_errors(tmp_path, trained, shapes, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no last.pth" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained)]) == 2
    assert "already finished 3 epochs; pass --epochs" in capsys.readouterr().err
    assert main(_train_argv(shapes, trained)) == 2  # never overwrite a run by accident
    assert f"{trained} already holds a run (last.pth); pass --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- faults


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def poison(model):
        with torch.no_grad():
            unwrap_model(model).head.weight.fill_(float("nan"))

    _fail_at_step(monkeypatch, 5, poison)  # the first step of epoch 2
    assert main(_train_argv(shapes, out)) == 2
    err = capsys.readouterr().err
    assert "loss is nan at iteration 5 (epoch 2, batch 1)" in err
    assert f"last good checkpoint is {out / 'last.pth'}" in err
    ckpt = torch.load(out / "last.pth", weights_only=True)
    state = ckpt["state"]
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["head.weight"]).all()


def test_corrupt_images_are_skipped_and_counted(shapes, tmp_path, caplog):
    data = _copy_with_corrupt(shapes, tmp_path / "data")
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(_train_argv(data, out, "--epochs", "1", "-b", "4")) == 0
    row = _summary(out)[0]
    # 33 train images, batch 4: the sampler drops 1 at random, so the broken one may be out
    assert row["train_skipped"] in ("0", "1") and row["val_skipped"] == "2"
    assert "truncated.jpg" in caplog.text and "empty.png" in caplog.text
    result = tmp_path / "val.json"
    argv = ["validate", "--data-dir", str(data), "--checkpoint", str(out / "last.pth")]
    assert main([*argv, "--results-file", str(result)]) == 0
    metrics = json.loads(result.read_text())
    assert metrics["skipped"] == 2 and metrics["images"] == 16


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        (lambda d: shutil.rmtree(d / "val"), [], "no 'val' or 'validation' split in"),
        (lambda d: (d / "train" / "blob").mkdir(), [], "class folder\\(s\\) with no images in"),
        (lambda d: None, ["--num-classes", "5"], "--num-classes 5 disagrees with the 8 class"),
        (lambda d: None, ["--img-size", "16"], "--img-size 16 is too small"),
        (lambda d: None, ["-b", "64"], "make no full batch of 64"),
        (lambda d: (d / "val" / "crescent").rename(d / "val" / "oval"), [], "classes the model"),
    ],
)
def test_bad_training_input_is_one_line(shapes, tmp_path, capsys, setup, flags, message):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    setup(data)
    assert main(_train_argv(data, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sgformer train: error:")
    assert re.search(message, err[0]), err[0]


def test_empty_split_is_an_error(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    for folder in (data / "val").iterdir():
        shutil.rmtree(folder)
    assert main(_train_argv(data, tmp_path / "run")) == 2
    assert "has no class folders" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validate, predict


def test_validate_writes_results_json(trained, shapes, tmp_path):
    result = tmp_path / "r.json"
    argv = ["validate", "--data-dir", str(shapes), "--split", "val", "--checkpoint"]
    assert main([*argv, str(trained / "best.pth"), "--results-file", str(result)]) == 0
    metrics = json.loads(result.read_text())
    best = torch.load(trained / "best.pth", weights_only=True)["state"]["metrics"]
    assert metrics["model"] == "sgformer_nano" and metrics["img_size"] == IMG
    assert metrics["images"] == 16 and metrics["crop_pct"] == 0.9
    # the same eval transform as training's validation gives the same numbers
    assert metrics["top1"] == pytest.approx(best["top1"]) and metrics["loss"] == pytest.approx(
        best["val_loss"], rel=1e-5
    )
    ema = tmp_path / "ema.json"
    assert main([*argv, str(trained / "last.pth"), "--use-ema", "--results-file", str(ema)]) == 0
    assert json.loads(ema.read_text())["top1"] == pytest.approx(
        float(_summary(trained)[-1]["ema_top1"])
    )


def test_validate_rejects_a_checkpoint_of_another_model(trained, shapes, capsys):
    argv = ["validate", "--data-dir", str(shapes), "--checkpoint", str(trained / "last.pth")]
    assert main([*argv, "--model", "sgformer_s"]) == 2
    assert "is a checkpoint of sgformer_nano, not sgformer_s" in capsys.readouterr().err


def test_initial_checkpoint_of_another_variant_names_keys(trained, shapes, tmp_path, capsys):
    weights = torch.load(trained / "last.pth", weights_only=True)["state"]["model"]
    torch.save(weights, tmp_path / "nano.pth")
    argv = _train_argv(shapes, tmp_path / "run", "--initial-checkpoint", str(tmp_path / "nano.pth"))
    assert main([*[a if a != "sgformer_nano" else "sgformer_s" for a in argv]]) == 2
    assert "shape mismatch in" in capsys.readouterr().err


def test_predict_names_classes_and_skips_unreadable(trained, shapes, tmp_path, capsys):
    images = sorted((shapes / "val" / "star").glob("*.png"))[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    argv = ["predict", *map(str, images), str(bad), "--checkpoint", str(trained / "last.pth")]
    assert main([*argv, "--topk", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in out["predictions"]] == [str(p) for p in images]
    assert out["skipped"] == [str(bad)]
    classes = set(p.name for p in (shapes / "train").iterdir())
    for item in out["predictions"]:
        assert len(item["topk"]) == 3 and {t["class"] for t in item["topk"]} <= classes
        probs = [t["prob"] for t in item["topk"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert main(["predict", str(bad), "--checkpoint", str(trained / "last.pth")]) == 2


def test_predict_uses_imagenet_names_for_1000_class_weights(tmp_path, shapes):
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(create_model("sgformer_nano").state_dict(), weights)
    image = next((shapes / "val" / "ring").glob("*.png"))
    predictions, _ = classification.predict([image], weights, model_name="sgformer_nano", topk=2)
    imagenet = timm.data.ImageNetInfo()
    top = predictions[0]["topk"][0]
    assert top["class"] == imagenet.index_to_description(top["index"])


# ----------------------------------------------------------------------------- distributed


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(shapes, tmp_path):
    def run(out: Path, batch: str, launcher: list[str]) -> str:
        argv = [*_train_argv(shapes, out, *PLAIN, "--epochs", "2"), "-b", batch]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    single = run(tmp_path / "one", "8", [sys.executable, "-m", "sgformer"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    log = run(tmp_path / "two", "4", [*torchrun, "2", "-m", "sgformer"])
    assert "parameters identical on all 2 ranks" in log
    assert "2 processes, global batch 8" in log
    assert "parameters identical" not in single
    for a, b in zip(_summary(tmp_path / "one"), _summary(tmp_path / "two"), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)
        assert a["top1"] == b["top1"]
    assert not list((tmp_path / "two").glob(".*tmp*"))


def test_compiled_training_step_follows_the_eager_run(shapes, tmp_path):
    # torch.compile (default mode) on the CPU: same losses as the eager run up to rounding, and
    # the checkpoint holds plain parameter names (the compiled module shares them).
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main([*_train_argv(shapes, eager), "--epochs", "1"]) == 0
    assert main([*_train_argv(shapes, compiled), "--epochs", "1", "--compile"]) == 0
    run = load_run(compiled / "last.pth")
    assert run.args["compile"] == "default"
    assert not any(key.startswith("_orig_mod") for key in run.state["model"])
    (eager_row,), (compiled_row,) = _summary(eager), _summary(compiled)
    for key in ("train_loss", "val_loss"):
        assert float(compiled_row[key]) == pytest.approx(float(eager_row[key]), rel=1e-3), key


def test_compile_mode_is_checked(shapes, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*_train_argv(shapes, tmp_path / "run"), "--compile", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
