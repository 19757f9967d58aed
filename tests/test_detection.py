"""Detection and instance segmentation: COCO data checks, COCO AP on hand-made predictions,
the SG-Former + FPN Mask R-CNN, presets, and train / resume / val / predict via the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    assert_same_rows,
    copy_with_unreadable_images,
    kill_after_first_checkpoint,
    run_until_first_checkpoint,
)
from sgformer import cli, trainer
from sgformer.checkpoint import load_run
from sgformer.data import write_shapes_dataset
from sgformer.model import create_model
from sgformer.tasks.detection import (
    SCHEDULES,
    DetectionTask,
    build_detector,
    param_groups,
)
from sgformer.tasks.detection.coco import (
    CocoInstances,
    encode_mask,
    evaluate_coco,
    load_coco,
    to_coco_results,
)
from sgformer.tasks.detection.task import step_scheduler

SIDE = 64
# Four 1-class objects on two 64 x 64 images, as (image_id, x, y, w, h): all "small" in COCO
# terms (area < 32^2), so APs equals AP and APm/APl are undefined (None).
OBJECTS = [(1, 10, 10, 20, 20), (1, 40, 5, 15, 15), (2, 5, 30, 25, 25), (2, 35, 35, 20, 20)]
# COCOeval samples precision at 101 recall points 0, 0.01, ..., 1; with recall capped at 0.5
# the points 0..0.5 (51 of them) count.
HALF_RECALL_AP = 51 / 101
TINY_DETECTOR = {
    "short_side": (SIDE,),
    "max_size": SIDE,
    "out_channels": 32,
    "anchor_sizes": (8, 16, 32, 64, 128),
    "box_head_dim": 64,
    "mask_head_dim": 16,
    "rpn_pre_nms_train": 100,
    "rpn_post_nms_train": 50,
    "rpn_pre_nms_test": 50,
    "rpn_post_nms_test": 20,
    "rpn_batch_size": 32,
    "box_batch_size": 32,
    "detections_per_img": 10,
}


def _rect_mask(x: int, y: int, w: int, h: int, side: int = SIDE) -> np.ndarray:
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _coco(images: list[dict], annotations: list[dict], num_classes: int = 1) -> dict:
    categories = [{"id": i + 1, "name": f"c{i + 1}"} for i in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture
def hand_made_gt(tmp_path: Path):
    images = [{"id": i, "file_name": f"{i}.png", "width": SIDE, "height": SIDE} for i in (1, 2)]
    annotations = [
        {
            "id": k + 1,
            "image_id": image_id,
            "category_id": 1,
            "bbox": [x, y, w, h],
            "area": w * h,
            "segmentation": encode_mask(_rect_mask(x, y, w, h)),
            "iscrowd": 0,
        }
        for k, (image_id, x, y, w, h) in enumerate(OBJECTS)
    ]
    return load_coco(_write_json(tmp_path / "gt.json", _coco(images, annotations)))


def _detection(objects: list[tuple], scores: list[float]) -> dict[str, torch.Tensor]:
    """torchvision-style output of one image: xyxy boxes, labels, scores, (N, 1, H, W) masks."""
    return {
        "boxes": torch.tensor([[x, y, x + w, y + h] for _, x, y, w, h in objects]).float(),
        "labels": torch.ones(len(objects), dtype=torch.int64),
        "scores": torch.tensor(scores),
        "masks": torch.from_numpy(
            np.stack([_rect_mask(x, y, w, h) for _, x, y, w, h in objects])[:, None]
        ).float(),
    }


def _results_for(objects: list[tuple], scores: list[float] | None = None) -> list[dict]:
    scores = scores or [0.9] * len(objects)
    results = []
    for image_id in (1, 2):
        chosen = [(o, s) for o, s in zip(objects, scores, strict=True) if o[0] == image_id]
        if chosen:
            output = _detection([o for o, _ in chosen], [s for _, s in chosen])
            results += to_coco_results(output, image_id, category_ids=[1])
    return results


# ---------------------------------------------------------------------------------------------
# COCO AP on hand-made predictions.


def test_perfect_predictions_score_one(hand_made_gt) -> None:
    metrics = evaluate_coco(hand_made_gt, _results_for(OBJECTS))
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0), (iou_type, name)
        assert metrics[f"{iou_type}_APm"] is None  # no medium objects: undefined, not 0
        assert metrics[f"{iou_type}_APl"] is None


def test_half_of_the_objects_missed(hand_made_gt) -> None:
    # One object per image found exactly: recall 0.5 at precision 1 -> 51/101 at every IoU.
    metrics = evaluate_coco(hand_made_gt, _results_for([OBJECTS[0], OBJECTS[2]]))
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(HALF_RECALL_AP)


def test_false_positive_ranked_first_halves_precision(hand_made_gt) -> None:
    # A wrong box scored above the one right box: precision 0.5 up to recall 0.25 of 4 objects.
    wrong = (1, 0, 44, 12, 12)
    metrics = evaluate_coco(hand_made_gt, _results_for([wrong, OBJECTS[0]], [0.9, 0.8]))
    expected = 0.5 * 26 / 101  # recall points 0..0.25 (26 of 101) at precision 0.5
    assert metrics["bbox_AP"] == pytest.approx(expected)
    assert metrics["segm_AP50"] == pytest.approx(expected)


def test_no_detections_and_skipped_images(hand_made_gt) -> None:
    assert evaluate_coco(hand_made_gt, [])["bbox_AP"] == 0.0
    # Image 2 unreadable: its objects are left out, so image 1 found perfectly scores 1.
    image1 = [o for o in OBJECTS if o[0] == 1]
    metrics = evaluate_coco(hand_made_gt, _results_for(image1), image_ids=[1])
    assert metrics["bbox_AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iou type"):
        evaluate_coco(hand_made_gt, [], iou_types=("keypoints",))


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], "top level is list"),
        ({"images": [], "categories": [{"id": 1}]}, "no annotations"),
        (_coco([{"id": 1}], []), "has no file_name"),
        (
            _coco([{"id": 1, "file_name": "a.png"}], [{"id": 1, "image_id": 1, "category_id": 1}]),
            "has no bbox",
        ),
        (
            _coco(
                [{"id": 1, "file_name": "a.png"}],
                [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}],
            ),
            "annotation 7 has category_id 5",
        ),
    ],
)
def test_not_coco_is_rejected(tmp_path: Path, data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_coco(_write_json(tmp_path / "bad.json", data))


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("images: []")
    with pytest.raises(ValueError, match="is not JSON"):
        load_coco(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco(tmp_path / "none.json")


def _image_file(folder: Path, name: str, width: int, height: int) -> dict:
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(folder / name)
    return {"file_name": name, "width": width, "height": height}


def test_bad_boxes_dropped_and_missing_images_skipped(tmp_path: Path) -> None:
    images = [
        {"id": 1, **_image_file(tmp_path, "a.png", 40, 30)},
        {"id": 2, "file_name": "gone.png", "width": 40, "height": 30},
        {"id": 3, **_image_file(tmp_path, "c.png", 40, 30)},
    ]
    boxes = {
        1: [5, 5, 10, 10],  # fine
        2: [0, 0, 0, 8],  # zero width: dropped
        3: [50, 40, 10, 10],  # wholly outside the 40 x 30 image: dropped
        4: [30, 20, 20, 20],  # partly outside: clipped to [30, 20, 40, 30]
        5: [1, 1, 5, 5],  # on the missing image
    }
    annotations = [
        {"id": k, "image_id": 2 if k == 5 else 1, "category_id": 1, "bbox": b, "area": 1}
        for k, b in boxes.items()
    ]
    annotations.append(
        {"id": 6, "image_id": 3, "category_id": 1, "bbox": [2, 2, 4, 4], "iscrowd": 1}
    )
    ann_file = _write_json(tmp_path / "ann.json", _coco(images, annotations))
    dataset = CocoInstances(tmp_path, ann_file)
    assert dataset.stats.as_dict() == {
        "images": 2,
        "annotations": 6,
        "missing_images": 1,
        "dropped_boxes": 2,
        "clipped_boxes": 1,
        "crowd": 1,
    }
    assert dataset.image_ids == [1, 3]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 5, 15, 15], [30, 20, 40, 30]]))
    assert target["masks"].shape == (2, 30, 40)  # no segmentation: the box is the mask
    assert target["masks"][1].sum() == 10 * 10
    _, crowd_only = dataset[1]
    assert crowd_only["boxes"].shape == (0, 4) and crowd_only["masks"].shape == (0, 30, 40)


def test_size_mismatch_and_no_images_found(tmp_path: Path) -> None:
    images = [{"id": 1, **_image_file(tmp_path, "a.png", 40, 30)}]
    images[0]["width"] = 50
    ann = _write_json(tmp_path / "ann.json", _coco(images, []))
    with pytest.raises(ValueError, match="a.png is 40 x 30 but .* says 50 x 30"):
        CocoInstances(tmp_path, ann)[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="none of the 1 images"):
        CocoInstances(empty, ann)


def test_flip_moves_boxes_with_masks(tmp_path: Path) -> None:
    root = write_shapes_dataset(
        tmp_path, num_train=0, num_val=0, num_dense_train=2, num_dense_val=0, dense_img_size=SIDE
    )["dense"]
    dataset = CocoInstances(
        Path(root) / "images" / "training", Path(root) / "instances_training.json", hflip=1.0
    )
    for index in range(len(dataset)):
        _, target = dataset[index]
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            from_mask = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            torch.testing.assert_close(box, from_mask)


# ---------------------------------------------------------------------------------------------
# Model, optimiser and schedule.


@pytest.mark.parametrize("size", [(SIDE, SIDE), (37, 150), (150, 41), (97, 61)])
def test_any_image_size(size: tuple[int, int]) -> None:
    model = build_detector("sgformer_nano", 3, **TINY_DETECTOR).eval()
    height, width = size
    with torch.no_grad():
        out = model([torch.rand(3, height, width), torch.rand(3, 48, 48)])
    boxes = out[0]["boxes"]
    assert out[0]["masks"].shape[-2:] == (height, width)
    assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
    model.train()
    targets = [
        {"boxes": torch.tensor([[2.0, 3, 20, 30]]), "labels": torch.tensor([2]),
         "masks": torch.from_numpy(_rect_mask(2, 3, 18, 27, max(size)))[None, :height, :width]},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 48, 48, dtype=torch.uint8)},
    ]  # fmt: skip
    losses = model([torch.rand(3, height, width), torch.rand(3, 48, 48)], targets)
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_no_mask_frozen_stages_and_param_groups() -> None:
    model = build_detector("sgformer_nano", 2, mask=False, frozen_stages=1, **TINY_DETECTOR)
    assert not hasattr(model.roi_heads, "mask_head") or model.roi_heads.mask_head is None
    trunk = model.backbone.trunk
    assert not trunk.pos_embed.requires_grad
    assert not any(p.requires_grad for p in trunk.stem.parameters())
    assert not any(p.requires_grad for p in trunk.stages[0].parameters())
    assert all(p.requires_grad for p in trunk.stages[1].parameters())
    model.train()
    assert not trunk.stages[0].training and trunk.stages[1].training

    groups = {g["name"]: g for g in param_groups(model, 1e-4, 0.05, 0.5)}
    assert set(groups) == {"backbone", "backbone_no_decay", "heads", "heads_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(5e-5)
    assert groups["heads"]["lr"] == pytest.approx(1e-4)
    assert groups["heads_no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    norm = trunk.stages[1].blocks[0].norm1
    assert id(norm.weight) in no_decay and id(norm.bias) in no_decay
    decayed = {id(p) for p in groups["backbone"]["params"]}
    assert id(trunk.stages[1].blocks[0].mlp.fc1.weight) in decayed
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(p.requires_grad for p in model.parameters())

    with pytest.raises(ValueError, match="frozen-stages must be in -1..4"):
        build_detector("sgformer_nano", 2, frozen_stages=5, **TINY_DETECTOR)


def test_pos_embed_has_no_weight_decay() -> None:
    model = build_detector("sgformer_nano", 2, **TINY_DETECTOR)
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 0.05, 1.0)}
    assert any(p is model.backbone.trunk.pos_embed for p in groups["backbone_no_decay"]["params"])


def test_backbone_checkpoint_loads(tmp_path: Path) -> None:
    classifier = create_model("sgformer_nano", num_classes=8)
    torch.save(classifier.state_dict(), tmp_path / "cls.pth")
    model = build_detector("sgformer_nano", 2, backbone_checkpoint=tmp_path / "cls.pth")
    torch.testing.assert_close(
        model.backbone.trunk.stages[2].blocks[0].mlp.fc1.weight,
        classifier.stages[2].blocks[0].mlp.fc1.weight,
    )
    other = create_model("sgformer_nano", depths=(2, 2, 4, 1), num_classes=8)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    extra = r"does not fit this model.*unexpected keys: stages.2.blocks.2"
    with pytest.raises(ValueError, match=extra):
        build_detector("sgformer_nano", 2, backbone_checkpoint=tmp_path / "other.pth")


def test_step_schedule_with_warmup() -> None:
    """mmdetection's step policy on timm's scheduler: linear warm-up in iterations from
    lr x warmup_factor, then x0.1 after epochs 8 and 11 counted from the start."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=2.0)
    scheduler = step_scheduler(optimizer, 100, (8, 11), 0.1, warmup_iters=500, warmup_factor=1e-3)

    def lr_at(iteration: int) -> float:
        scheduler.step_update(num_updates=iteration)
        return optimizer.param_groups[0]["lr"] / 2.0

    assert lr_at(0) == pytest.approx(1e-3)
    assert lr_at(250) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert lr_at(500) == pytest.approx(1.0)
    assert lr_at(799) == pytest.approx(1.0)
    assert lr_at(800) == pytest.approx(0.1)
    assert lr_at(1100) == pytest.approx(0.01)


def _settings(given: dict) -> object:
    return DetectionTask.settings(given)[0]


def test_presets_and_explicit_flags() -> None:
    data = {"data_root": "imgs", "ann_file": "a.json", "val_ann_file": "v.json"}
    one = _settings(data)
    assert (one.schedule, one.epochs, one.lr_steps, one.short_side) == ("1x", 12, (8, 11), (800,))
    assert (one.lr, one.weight_decay, one.max_size, one.model) == (1e-4, 0.05, 1333, "sgformer_s")
    three = _settings({**data, "schedule": "3x", "epochs": 2, "short_side": [600]})
    assert (three.epochs, three.lr_steps, three.short_side) == (2, (27, 33), (600,))
    assert SCHEDULES["3x"]["short_side"][0] == 480 and SCHEDULES["3x"]["short_side"][-1] == 800
    shapes = _settings({})
    assert (shapes.schedule, shapes.model) == ("shapes", "sgformer_nano")
    with pytest.raises(ValueError, match="unknown --schedule '2x'"):
        _settings({"schedule": "2x"})
    with pytest.raises(ValueError, match="--val-ann-file is required"):
        _settings({"data_root": "imgs", "ann_file": "a.json"})


# ---------------------------------------------------------------------------------------------
# CLI: train, resume, val, predict on tiny generated data.


def test_detect_train_resume_val_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dense = Path(
        write_shapes_dataset(
            tmp_path / "data",
            num_train=0,
            num_val=0,
            num_dense_train=4,
            num_dense_val=2,
            dense_img_size=SIDE,
        )["dense"]
    )
    run = tmp_path / "run"
    data_flags = [
        "--data-root", str(dense / "images" / "training"),
        "--ann-file", str(dense / "instances_training.json"),
        "--val-data-root", str(dense / "images" / "validation"),
        "--val-ann-file", str(dense / "instances_validation.json"),
    ]  # fmt: skip
    train = ["detect", "train", *data_flags, "--schedule", "shapes", "-b", "2"]
    small = ["--short-side", str(SIDE), "--max-size", str(SIDE), "--workers", "0"]
    once = ["--epochs", "2", "--eval-interval", "2", "--output", str(run), "--log", "tensorboard"]
    assert cli.main([*train, *small, *once]) == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    first = load_run(run, "detection")
    assert (first.state["epoch"], first.state["iteration"]) == (2, 4)  # 4 images / batch 2
    assert "bbox_AP" not in first.history[0] and "bbox_AP" in first.history[1]
    assert first.best["epoch"] == 2
    assert (run / "summary.csv").read_text().count("\n") == 3

    # Resumed with a time limit that has passed after one iteration: stops inside epoch 3,
    # evaluates and checkpoints there; resumed again, it goes on from that very batch.
    resume = ["detect", "train", "--resume", str(run), "--epochs", "4"]
    assert cli.main([*resume, "--time-limit", "1e-6"]) == 0
    second = load_run(run, "detection")
    assert (second.state["epoch"], second.state["iteration"]) == (2.5, 5)
    assert "bbox_AP" in second.history[2]
    assert second.history[:2] == first.history
    steps = {int(s["step"]) for s in second.state["optimizer"]["state"].values()}
    assert steps == {5}  # AdamW moments continued from the checkpoint's, not restarted

    assert cli.main(["detect", "train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "already finished 2.5 epochs" in capsys.readouterr().err

    results = tmp_path / "metrics.json"
    val = ["detect", "val", "--checkpoint", str(run), "--results-file", str(results)]
    assert (
        cli.main(
            [*val, "--data-root", data_flags[5], "--ann-file", data_flags[7], "--workers", "0"]
        )
        == 0
    )
    metrics = json.loads(results.read_text())
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        for iou_type in ("bbox", "segm"):
            value = metrics[f"{iou_type}_{name}"]
            assert value is None or 0.0 <= value <= 1.0
    assert metrics["images"] == 2
    assert "bbox: AP" in capsys.readouterr().out

    out = tmp_path / "pred"
    images = dense / "images" / "validation"
    assert cli.main(["detect", "predict", str(images), "--checkpoint", str(run),
                     "--output", str(out), "--score-threshold", "0"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation", "file_name"} <= set(p)
               for p in predictions)  # fmt: skip
    assert Image.open(out / "00000.png").size == (SIDE, SIDE)


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write_json(tmp_path / "bad.json", {"images": []})
    argv = ["detect", "train", "--data-root", str(tmp_path), "--ann-file", str(bad)]
    assert cli.main([*argv, "--val-ann-file", str(bad)]) == 2
    assert "sgformer detect: error:" in capsys.readouterr().err
    assert cli.main(["detect", "val", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """4 tiny training scenes (2 iterations an epoch at batch 2) and 2 validation scenes."""
    root = tmp_path_factory.mktemp("dense")
    return Path(
        write_shapes_dataset(
            root, num_train=0, num_val=0, num_dense_train=4, num_dense_val=2, dense_img_size=SIDE
        )["dense"]
    )


def _dense_train_argv(dense: Path) -> list[str]:
    return [
        "detect", "train", "--schedule", "shapes", "-b", "2", "--seed", "5",
        "--data-root", str(dense / "images" / "training"),
        "--ann-file", str(dense / "instances_training.json"),
        "--val-data-root", str(dense / "images" / "validation"),
        "--val-ann-file", str(dense / "instances_validation.json"),
        "--short-side", str(SIDE), "--max-size", str(SIDE), "--workers", "0",
    ]  # fmt: skip


def test_resume_at_a_checkpoint_repeats_the_uninterrupted_run(dense, tmp_path, monkeypatch):
    # The cut run dies right after its first checkpoint (epoch 1), as a kill between two
    # checkpoints leaves it; resumed, it must give the uninterrupted run's numbers.
    flags = [*_dense_train_argv(dense), "--epochs", "3", "--eval-interval", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main([*flags, "--output", str(full)]) == 0
    run_until_first_checkpoint(
        monkeypatch, trainer, lambda: cli.main([*flags, "--output", str(cut)])
    )
    assert load_run(cut).state["epoch"] == 1
    assert cli.main(["detect", "train", "--resume", str(cut)]) == 0
    resumed = load_run(cut).history
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert_same_rows(load_run(full).history, resumed, ("train_loss", "lr", "bbox_AP"))


def test_sigkill_at_a_random_point_then_resume_finishes(dense, tmp_path):
    out = tmp_path / "run"
    kill_after_first_checkpoint(
        [*_dense_train_argv(dense), "--epochs", "3", "--output", str(out)], out
    )
    done = load_run(out).state["epoch"]  # always a complete checkpoint
    assert done in (1, 2, 3)
    if done < 3:
        assert cli.main(["detect", "train", "--resume", str(out)]) == 0
    run = load_run(out)
    assert run.state["epoch"] == 3 and [row["epoch"] for row in run.history] == [1, 2, 3]


def test_unreadable_images_are_skipped_counted_and_named(dense, tmp_path, caplog):
    data = tmp_path / "data"  # 3 of 4 training images broken (one of each kind), 1 of 2 val
    picks = {"images/training": slice(3), "images/validation": slice(1, None)}
    broken = copy_with_unreadable_images(dense, data, picks)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert cli.main([*_dense_train_argv(data), "--epochs", "1", "--output", str(out)]) == 0
    row = load_run(out).history[0]
    assert (row["train_skipped"], row["val_skipped"], row["images"]) == (3, 1, 1)
    for path in broken:
        assert path.name in caplog.text
    results = tmp_path / "val.json"
    val_argv = ["detect", "val", "--checkpoint", str(out), "--results-file", str(results)]
    val_argv += ["--data-root", str(data / "images" / "validation")]
    val_argv += ["--ann-file", str(data / "instances_validation.json")]
    assert cli.main(val_argv) == 0
    result = json.loads(results.read_text())
    assert (result["images"], result["skipped"]) == (1, 1)


@pytest.mark.slow
def test_detect_train_two_processes(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes: one shard each, losses and AP over both, rank-0 checkpoint."""
    dense = Path(
        write_shapes_dataset(
            tmp_path / "data",
            num_train=0,
            num_val=0,
            num_dense_train=8,
            num_dense_val=3,
            dense_img_size=SIDE,
        )["dense"]
    )
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "sgformer", *_dense_train_argv(dense), "--epochs", "1"]
    command += ["--output", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_run(run, "detection")
    state = checkpoint.state
    assert (state["epoch"], state["iteration"]) == (1, 2)  # 8 images / (2 x 2)
    assert state["metrics"]["images"] == 3  # the odd image is evaluated once, not twice


@pytest.mark.slow
def test_detect_train_compiled(dense, tmp_path) -> None:
    """--compile reaches Mask R-CNN's training step: it trains, evaluates and checkpoints."""
    run = tmp_path / "compiled"
    argv = [*_dense_train_argv(dense), "--epochs", "1", "--compile", "--output", str(run)]
    assert cli.main(argv) == 0
    done = load_run(run, "detection")
    assert done.args["compile"] == "default"
    assert done.state["iteration"] == 2 and np.isfinite(done.history[0]["train_loss"])
    assert "bbox_AP" in done.history[0]
