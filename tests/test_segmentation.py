"""Semantic segmentation: metrics on hand-made predictions, data checks, inference, short runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sgformer
from conftest import (
    assert_same_rows,
    copy_with_unreadable_images,
    kill_after_first_checkpoint,
    run_until_first_checkpoint,
)
from sgformer import trainer
from sgformer.checkpoint import load_backbone_weights, load_run
from sgformer.cli import main
from sgformer.data import write_shapes_dataset
from sgformer.runtime import Distributed
from sgformer.tasks import segmentation as seg

CPU = Distributed(0, 1, 0, torch.device("cpu"))
IMG = 64
NUM_CLASSES = 9  # shapes: background + 8 shapes


def _write_pair(root: Path, split: str, name: str, label: np.ndarray) -> None:
    """An RGB image and its single-channel label PNG in the ADE20K layout."""
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / split / f"{name}.jpg")
    Image.fromarray(label.astype(np.uint8), mode="L").save(
        root / "annotations" / split / f"{name}.png"
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Tiny shapes scenes in the ADE20K layout (label 0 = background, a real class)."""
    root = tmp_path_factory.mktemp("shapes")
    summary = write_shapes_dataset(
        root, num_train=0, num_val=0, num_dense_train=8, num_dense_val=3, dense_img_size=IMG
    )
    return Path(summary["dense"])


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "segment", "train", "--data-root", str(data), "--schedule", "shapes",
        "--no-reduce-zero-label", "--num-classes", str(NUM_CLASSES), "--crop-size", str(IMG),
        "--base-size", str(IMG), "-b", "2", "--iters", "4", "--val-interval", "2",
        "--warmup-iters", "1", "--decoder-channels", "32", "--workers", "0",
        "--output", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(_train_argv(shapes, out, "--aux-head", "--log", "tensorboard")) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Metrics on hand-made predictions.


def _metrics(preds: list[int], target: list[int], num_classes: int = 3) -> dict:
    metrics = seg.SegmentationMetrics(num_classes, seg.IGNORE_INDEX)
    metrics.update(torch.tensor([preds]), torch.tensor([target]))
    return metrics.compute(["a", "b", "c"][:num_classes])


def test_perfect_predictions_score_one():
    target = [0, 0, 1, 1, 2, 2, 2, 0]
    result = _metrics(target, target)
    assert result["mIoU"] == 1.0 and result["aAcc"] == 1.0
    assert result["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_known_error_gives_the_hand_worked_iou():
    # class a: 3 right, 1 missed -> 3 / 4; class b: 4 right, 1 false -> 4 / 5; c absent: no IoU.
    target = [0, 0, 0, 0, 1, 1, 1, 1]
    preds = [0, 0, 0, 1, 1, 1, 1, 1]
    result = _metrics(preds, target)
    assert result["per_class_iou"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.8), "c": None}
    assert result["mIoU"] == pytest.approx((0.75 + 0.8) / 2)
    assert result["aAcc"] == pytest.approx(7 / 8)


def test_ignored_pixels_do_not_count():
    target = [0, 0, 0, 0, 1, 1, 1, 1, 255, 255]
    preds = [0, 0, 0, 1, 1, 1, 1, 1, 2, 0]  # wrong on both ignored pixels
    result = _metrics(preds, target)
    assert result["per_class_iou"]["c"] is None  # a prediction of c on an ignored pixel
    assert result["mIoU"] == pytest.approx(0.775)
    assert result["aAcc"] == pytest.approx(7 / 8)


def test_iou_table_lists_every_class():
    table = seg.format_iou_table(_metrics([0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]))
    lines = table.splitlines()
    assert lines[2].split() == ["a", "75.00"] and lines[4].split() == ["c", "n/a"]
    assert lines[-2].split() == ["mIoU", "77.50"] and lines[-1].split() == ["aAcc", "87.50"]


class Oracle(nn.Module):
    """A 'model' whose logits are the one-hot of input channel 0: predictions known exactly."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        classes = images[:, 0].round().long().clamp(0, 2)  # B, H, W
        return 10.0 * nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float(), None


@pytest.mark.parametrize("mode, flip", [("whole", False), ("slide", False), ("whole", True)])
def test_evaluate_on_known_predictions(mode, flip):
    """Through ``infer`` (rescale to base size, window, upsample) and the rank reduction."""
    label = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [255, 0, 1, 1, 2]])  # 3 x 5
    image = label.clamp(max=2).float()[None].expand(3, -1, -1).clone()
    wrong = label.clone()
    wrong[0, 0] = 1  # truth b where the oracle says a
    batches = [
        trainer.Batch(image[None], label[None]),
        trainer.Batch(image[None], wrong[None], ["unreadable.png"]),
    ]
    options = {"base_size": 3, "mode": mode, "crop_size": 2, "stride": 1, "flip": flip}
    result = seg.evaluate(
        Oracle(),
        batches,
        num_classes=3,
        ignore_index=255,
        dist_info=CPU,
        infer_kwargs=options,
    )
    # a: TP 5 + 4, FP 0 + 1 -> 9/10; b: TP 6 + 6, FN 0 + 1 -> 12/13; c: TP 3 + 3 -> 1;
    # 14 valid pixels per image (one ignored), 27 of 28 right.
    assert result["per_class_iou"]["0"] == pytest.approx(9 / 10)
    assert result["per_class_iou"]["1"] == pytest.approx(12 / 13)
    assert result["per_class_iou"]["2"] == 1.0
    assert result["aAcc"] == pytest.approx(27 / 28)
    assert result["images"] == 2 and result["skipped"] == 1


def test_evaluate_raises_the_first_data_error():
    with pytest.raises(ValueError, match="bad.png holds label value 7"):
        seg.evaluate(
            Oracle(),
            [trainer.Batch(torch.empty(0), torch.empty(0), [], ["bad.png holds label value 7"])],
            num_classes=3,
            ignore_index=255,
            dist_info=CPU,
            infer_kwargs={"base_size": 3},
        )


# ---------------------------------------------------------------------------------------------
# Labels and data layout.


def test_reduce_zero_label_makes_zero_ignored_and_shifts(tmp_path):
    path = tmp_path / "l.png"
    Image.fromarray(np.array([[0, 1, 150, 255]], dtype=np.uint8), mode="L").save(path)
    label = seg.read_label(path, num_classes=150, ignore_index=255, reduce_zero_label=True)
    assert label.tolist() == [[255, 0, 149, 255]]
    plain = seg.read_label(path, num_classes=151, ignore_index=255, reduce_zero_label=False)
    assert plain.tolist() == [[0, 1, 150, 255]]


@pytest.mark.parametrize("reduce_zero_label, value", [(False, 9), (True, 12)])
def test_label_out_of_range_names_file_and_value(tmp_path, reduce_zero_label, value):
    path = tmp_path / "scene_07.png"
    Image.fromarray(np.array([[0, 3, value]], dtype=np.uint8), mode="L").save(path)
    with pytest.raises(ValueError, match=rf"scene_07\.png holds label value {value}\b"):
        seg.read_label(path, num_classes=9, ignore_index=255, reduce_zero_label=reduce_zero_label)


def test_rgb_label_map_is_rejected(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="single-channel"):
        seg.read_label(path, num_classes=9, ignore_index=255, reduce_zero_label=False)


def test_unpaired_files_are_skipped_and_counted(tmp_path, caplog):
    label = np.zeros((8, 8), dtype=np.uint8)
    for name in ("a", "b", "c"):
        _write_pair(tmp_path, "training", name, label)
    (tmp_path / "annotations" / "training" / "b.png").unlink()  # image without annotation
    (tmp_path / "images" / "training" / "c.jpg").unlink()  # annotation without image
    pairs, unpaired = seg.find_pairs(tmp_path, "training")
    assert [p[0].name for p in pairs] == ["a.jpg"] and unpaired == 2
    assert "skipped 2 files without a partner" in caplog.text


def test_missing_split_and_empty_split_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/training"):
        seg.find_pairs(tmp_path, "training")
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image/annotation pairs"):
        seg.find_pairs(tmp_path, "training")


def test_dataset_reports_size_mismatch_and_skips_unreadable(tmp_path):
    _write_pair(tmp_path, "training", "ok", np.ones((10, 12), dtype=np.uint8))
    _write_pair(tmp_path, "training", "small", np.ones((10, 12), dtype=np.uint8))
    Image.new("RGB", (5, 5)).save(tmp_path / "images" / "training" / "small.jpg")
    _write_pair(tmp_path, "training", "zbroken", np.ones((10, 12), dtype=np.uint8))
    (tmp_path / "images" / "training" / "zbroken.jpg").write_bytes(b"not a jpeg")
    pairs, _ = seg.find_pairs(tmp_path, "training")
    dataset = seg.SegmentationDataset(
        pairs, seg.eval_transform, num_classes=3, ignore_index=255, reduce_zero_label=False
    )
    batch = seg.collate_samples([dataset[i] for i in range(3)])
    assert batch.inputs.shape == (1, 3, 10, 12)
    assert batch.skipped == [str(tmp_path / "images" / "training" / "zbroken.jpg")]
    assert len(batch.errors) == 1 and "small.jpg is 5x5" in batch.errors[0]


# ---------------------------------------------------------------------------------------------
# Augmentation, padding and inference on odd sizes.


@pytest.mark.parametrize("size", [(20, 300), (97, 33), (64, 64)])
def test_train_transform_crops_and_pads_with_ignore(size):
    torch.manual_seed(0)
    height, width = size
    label = np.arange(height * width, dtype=np.int64).reshape(height, width) % 5
    image = Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8))
    transform = seg.TrainTransform(crop_size=48, base_size=32)
    for _ in range(5):
        tensor, target = transform(image, label)
        assert tensor.shape == (3, 48, 48) and target.shape == (48, 48)
        assert set(target.unique().tolist()) <= {0, 1, 2, 3, 4, seg.IGNORE_INDEX}
        padded = target == seg.IGNORE_INDEX
        assert (tensor[:, padded] == 0).all()  # pad value 0 of the normalised image


def test_rescaled_size_follows_mmseg_keep_ratio():
    assert seg.rescaled_size(480, 640, 512) == (512, 683)  # short side binds
    assert seg.rescaled_size(100, 1000, 512) == (205, 2048)  # long side binds (4 x 512)


def test_pad_to_multiple_returns_the_padding():
    padded, (pad_h, pad_w) = seg.pad_to_multiple(torch.ones(1, 3, 33, 64), 32)
    assert padded.shape == (1, 3, 64, 64) and (pad_h, pad_w) == (31, 0)
    assert padded[..., 33:, :].abs().sum() == 0


@pytest.fixture(scope="module")
def nano_upernet() -> seg.SegmentationModel:
    torch.manual_seed(0)
    return seg.build_segmentation_model(
        "sgformer_nano", "upernet", 5, decoder_channels=32, aux_head=True, drop_path_rate=0.0
    ).eval()


@pytest.mark.parametrize("size", [(45, 70), (37, 150), (96, 64)])
def test_model_runs_on_any_size_with_aux_head_in_training(nano_upernet, size):
    images = torch.randn(2, 3, *size)
    logits, aux = nano_upernet(images)
    assert logits.shape == (2, 5, *size) and aux is None and torch.isfinite(logits).all()
    nano_upernet.train()
    try:
        logits, aux = nano_upernet(images)
    finally:
        nano_upernet.eval()
    assert aux is not None and aux.shape == logits.shape


def test_fpn_decoder_runs_on_odd_size():
    model = seg.build_segmentation_model("sgformer_nano", "fpn", 4, decoder_channels=64).eval()
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, 50, 41))
    assert logits.shape == (1, 4, 50, 41)
    with pytest.raises(ValueError, match="multiple of 64"):
        seg.build_segmentation_model("sgformer_nano", "fpn", 4, decoder_channels=32)


def test_slide_with_one_window_equals_whole_and_ms_flip_are_probabilities(nano_upernet):
    image = torch.randn(1, 3, 45, 70)
    whole = seg.infer(nano_upernet, image, num_classes=5, base_size=45, mode="whole")
    one_window = seg.infer(
        nano_upernet, image, num_classes=5, base_size=45, mode="slide", crop_size=96
    )
    torch.testing.assert_close(one_window, whole)
    windows = seg.infer(
        nano_upernet, image, num_classes=5, base_size=45, mode="slide", crop_size=32, stride=20
    )
    assert windows.shape == (1, 5, 45, 70) and not torch.allclose(windows, whole)
    ms = seg.infer(
        nano_upernet, image, num_classes=5, base_size=45, scales=seg.MS_RATIOS, flip=True
    )
    assert ms.shape == (1, 5, 45, 70)
    torch.testing.assert_close(ms.sum(dim=1), torch.ones(1, 45, 70))


def test_backbone_checkpoint_loads_into_the_encoder(tmp_path):
    classifier = sgformer.create_model("sgformer_nano", num_classes=8)
    ours = {"model": classifier.state_dict(), "model_name": "sgformer_nano"}  # sgformer train
    for name, content in (("bare", {"state_dict": classifier.state_dict()}), ("ours", ours)):
        torch.save(content, tmp_path / f"{name}.pth")
        model = seg.build_segmentation_model("sgformer_nano", "upernet", 3, decoder_channels=32)
        load_backbone_weights(model.backbone, tmp_path / f"{name}.pth")
        loaded = model.backbone.state_dict()
        for key, value in classifier.state_dict().items():
            if not key.startswith("head."):
                torch.testing.assert_close(loaded[key], value)
    broken = {k: v for k, v in classifier.state_dict().items() if "stages.3" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing .*stages.3"):
        load_backbone_weights(model.backbone, tmp_path / "broken.pth")
    segmenter = {"model": model.state_dict(), "model_name": "sgformer_nano", "task": "segmentation"}
    torch.save(segmenter, tmp_path / "segmenter.pth")
    with pytest.raises(ValueError, match="is a segmentation checkpoint, not classification"):
        load_backbone_weights(model.backbone, tmp_path / "segmenter.pth")


def test_lr_schedule_warms_up_then_decays_linearly():
    assert seg.lr_factor(0, 100, 10, 1.0) == pytest.approx(seg.WARMUP_RATIO)
    assert seg.lr_factor(10, 100, 10, 1.0) == pytest.approx(0.9)
    assert seg.lr_factor(5, 100, 10, 1.0) == pytest.approx(0.95 * (0.5 + 0.5 * 1e-6))
    assert seg.lr_factor(50, 100, 0, 1.0) == pytest.approx(0.5)
    assert seg.lr_factor(100, 100, 0, 0.9) == 0.0


def _settings(given):
    return seg.SegmentationTask.settings(given)[0]


def test_schedules_and_explicit_flags():
    ade = _settings({"data_root": "x"})
    assert (ade.schedule, ade.lr, ade.iters, ade.warmup_iters) == (
        "upernet_160k",
        6e-5,
        160_000,
        1500,
    )
    assert ade.reduce_zero_label and ade.num_classes == 150 and ade.aux_head
    fpn = _settings({"data_root": "x", "decoder": "fpn", "lr": 3e-4})
    assert (fpn.schedule, fpn.lr, fpn.weight_decay, fpn.iters) == ("fpn_80k", 3e-4, 1e-4, 80_000)
    shapes = _settings({})
    assert shapes.schedule == "shapes" and shapes.model == "sgformer_nano"
    assert not shapes.reduce_zero_label and shapes.num_classes == NUM_CLASSES
    with pytest.raises(ValueError, match="unknown --schedule 'x'"):
        _settings({"schedule": "x"})


# ---------------------------------------------------------------------------------------------
# Command line: train, val, predict, resume.


def test_train_val_predict_through_the_cli(trained, shapes, tmp_path, capsys):
    checkpoint = torch.load(trained / "last.pth", weights_only=True)
    assert checkpoint["task"] == "segmentation" and checkpoint["data"]["num_classes"] == NUM_CLASSES
    assert checkpoint["state"]["iteration"] == 4 and len(checkpoint["history"]) == 2
    assert checkpoint["model_kwargs"]["aux_head"] and (trained / "summary.csv").is_file()
    assert checkpoint["state"]["optimizer"]["state"][0]["step"] == 4

    results = tmp_path / "results.json"
    argv = ["segment", "val", "--checkpoint", str(trained), "--results-file", str(results)]
    assert main([*argv, "--mode", "slide", "--crop-size", "48"]) == 0
    stored = json.loads(results.read_text())
    assert 0 <= stored["mIoU"] <= 1 and 0 <= stored["aAcc"] <= 1
    assert stored["images"] == 3 and stored["mode"] == "slide"
    assert len(stored["per_class_iou"]) == NUM_CLASSES
    out = capsys.readouterr().out
    assert "mIoU" in out and "aAcc" in out and out.count("\n") >= NUM_CLASSES + 4

    assert main([*argv, "--ms"]) == 0
    assert json.loads(results.read_text())["scales"] == list(seg.MS_RATIOS)

    predictions = tmp_path / "pred"
    images = shapes / "images" / "validation"
    argv = ["segment", "predict", str(images), "--checkpoint", str(trained)]
    assert main([*argv, "--output", str(predictions)]) == 0
    masks = sorted(predictions.glob("*_mask.png"))
    assert len(masks) == 3 and len(list(predictions.glob("*_overlay.png"))) == 3
    with Image.open(masks[0]) as mask:
        assert mask.mode == "P" and mask.size == (IMG, IMG)
        assert np.asarray(mask).max() < NUM_CLASSES


def test_resume_restores_iteration_and_optimizer(trained, tmp_path):
    resumed = tmp_path / "resumed"
    assert main(["segment", "train", "--resume", str(trained), "--iters", "6",
                 "--output", str(resumed)]) == 0  # fmt: skip
    checkpoint = torch.load(resumed / "last.pth", weights_only=True)
    state = checkpoint["state"]
    assert state["iteration"] == 6 and len(checkpoint["history"]) == 3
    assert state["optimizer"]["state"][0]["step"] == 6
    assert state["scheduler"]["last_epoch"] == 6
    assert [row["iteration"] for row in checkpoint["history"]] == [2, 4, 6]


def test_log_tensorboard_writes_each_evaluation_beside_the_csv(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    assert {"train_loss", "mIoU", "aAcc", "lr", "val_skipped"} <= set(events.Tags()["scalars"])
    history = load_run(trained).history
    for key in ("train_loss", "mIoU"):
        points = events.Scalars(key)
        assert [p.step for p in points] == [row["iteration"] for row in history] == [2, 4]
        assert [p.value for p in points] == pytest.approx([row[key] for row in history], rel=1e-6)


def test_resume_of_a_finished_run_is_an_error(trained, capsys):
    assert main(["segment", "train", "--resume", str(trained)]) == 2
    assert "already finished 4 iterations" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "evaluations"),
    [
        # 8 training images, batch 2: a pass is 4 iterations; checkpoints end passes.
        (["--iters", "8", "--val-interval", "4"], [4, 8]),
        # Checkpoints at 3, 6 and 9 fall inside passes. Two loader processes read ahead; every
        # sample's augmentation has its own seed and the checkpoint holds the generators'
        # states (drop path draws from them), so the resumed run draws what the uninterrupted
        # one drew.
        (
            ["--iters", "9", "--val-interval", "3", "--workers", "2", "--drop-path", "0.2"],
            [3, 6, 9],
        ),
    ],
)
def test_resume_at_a_checkpoint_repeats_the_uninterrupted_run(
    shapes, tmp_path, monkeypatch, flags, evaluations
):
    # The cut run dies right after its first checkpoint, as a kill between two leaves it.
    flags = [*flags, "--seed", "5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_train_argv(shapes, full, *flags)) == 0
    run_until_first_checkpoint(monkeypatch, trainer, lambda: main(_train_argv(shapes, cut, *flags)))
    assert load_run(cut).state["iteration"] == evaluations[0]
    assert main(["segment", "train", "--resume", str(cut)]) == 0
    resumed = load_run(cut).history
    assert [row["iteration"] for row in resumed] == evaluations
    assert_same_rows(load_run(full).history, resumed, ("train_loss", "mIoU", "aAcc", "lr"))


def test_sigkill_at_a_random_point_then_resume_finishes(shapes, tmp_path):
    out = tmp_path / "run"
    kill_after_first_checkpoint(
        _train_argv(shapes, out, "--iters", "6", "--val-interval", "2"), out
    )
    done = load_run(out).state["iteration"]  # always a complete checkpoint
    assert done in (2, 4, 6)
    if done < 6:
        assert main(["segment", "train", "--resume", str(out)]) == 0
    run = load_run(out)
    assert run.state["iteration"] == 6 and [row["iteration"] for row in run.history] == [2, 4, 6]


def test_unreadable_images_are_skipped_counted_and_named(shapes, tmp_path, caplog):
    data = tmp_path / "data"  # 3 of 8 training images broken (one of each kind), 1 of 3 val
    picks = {"images/training": slice(3), "images/validation": slice(2, None)}
    broken = copy_with_unreadable_images(shapes, data, picks)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(_train_argv(data, out)) == 0
    history = load_run(out).history
    # Every broken file is counted each time a pass reaches it; a batch left with one image is
    # passed over (BatchNorm), so the 4 iterations may reach into a second pass.
    assert [row["iteration"] for row in history] == [2, 4]
    assert sum(row["train_skipped"] for row in history) >= 3
    assert [row["val_skipped"] for row in history] == [1, 1]
    for path in broken:
        assert path.name in caplog.text
    results = tmp_path / "val.json"
    assert main(["segment", "val", "--checkpoint", str(out), "--results-file", str(results)]) == 0
    result = json.loads(results.read_text())
    assert (result["images"], result["skipped"]) == (2, 1)


def test_bad_label_stops_training_with_file_and_value(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("training", "validation"):
        for name in ("a", "b"):
            _write_pair(data, split, name, np.full((40, 52), 3, dtype=np.uint8))
    bad = np.full((40, 52), 3, dtype=np.uint8)
    bad[5, 5] = 42
    _write_pair(data, "training", "b", bad)
    assert main(_train_argv(data, tmp_path / "out", "--iters", "1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sgformer segment: error: ") and "b.png holds label value 42" in last


def test_bad_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["segment", "train", "--decoder", "deeplab"])
    assert main(["segment", "train", "--schedule", "ade", "--output", str(tmp_path)]) == 2
    assert "unknown --schedule 'ade'" in capsys.readouterr().err
    assert main(["segment", "val", "--checkpoint", str(tmp_path / "none")]) == 2


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes.


def _run(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "sgformer"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(processes), "-m", "sgformer"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_gloo_processes_train_and_evaluate_like_one(trained, shapes, tmp_path):
    out = tmp_path / "ddp"
    log = _run([*_train_argv(shapes, out), "--iters", "2"], 2).stderr
    assert "2 processes, global batch 4" in log
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    assert checkpoint["state"]["iteration"] == 2 and not list(out.glob(".*tmp*"))

    # Each rank scores its own shard; torchmetrics sums the statistics over ranks.
    results = {}
    for processes in (1, 2):
        path = tmp_path / f"val{processes}.json"
        argv = ["segment", "val", "--checkpoint", str(trained), "--results-file", str(path)]
        _run([*argv, "--workers", "0"], processes)
        results[processes] = json.loads(path.read_text())
    assert results[2]["images"] == results[1]["images"] == 3
    for key in ("mIoU", "aAcc"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-6)
    assert results[2]["per_class_iou"] == pytest.approx(results[1]["per_class_iou"], abs=1e-6)
