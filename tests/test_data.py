"""The synthetic shapes dataset: determinism, layout, labels that match the pixels, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.datasets import ImageFolder

from sgformer.cli import main
from sgformer.data import (
    ARROW_HEAD_HALF_WIDTH,
    ARROW_SHAFT_HALF_WIDTH,
    CRESCENT_CUT_OFFSET,
    CRESCENT_CUT_RATIO,
    CROSS_HALF_WIDTH,
    RING_INNER_RATIO,
    SHAPE_CLASSES,
    SHAPE_EDGE_MARGIN,
    STAR_INNER_RATIO,
    STAR_POINTS,
    encode_rle,
    render_scene,
    render_shape_image,
    write_shapes_dataset,
)

# Small but complete: two images per class per split, a few dense scenes of each split.
SMALL = dict(
    num_train=16, num_val=8, img_size=48, num_dense_train=6, num_dense_val=4, dense_img_size=64
)
K = len(SHAPE_CLASSES)
# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, list]:
    root = tmp_path_factory.mktemp("shapes")
    calls = []
    summary = write_shapes_dataset(root, **SMALL, progress=lambda *a: calls.append(a), workers=2)
    return root, summary, calls


def test_summary_and_progress(dataset) -> None:
    root, summary, calls = dataset
    assert not summary["skipped"]
    assert summary["counts"] == {"train": 16, "val": 8, "dense_training": 6, "dense_validation": 4}
    stages = {stage: (done, total) for stage, done, total in calls}
    assert stages == {
        "train": (16, 16),
        "val": (8, 8),
        "dense/training": (6, 6),
        "dense/validation": (4, 4),
    }
    metadata = json.loads((root / "dataset.json").read_text())
    assert metadata["classes"] == list(SHAPE_CLASSES)
    assert metadata["num_instances"] == summary["num_instances"]
    assert summary["num_instances"]["training"] >= 6  # at least one shape per scene


def test_deterministic_and_independent_of_count(dataset, tmp_path) -> None:
    root, _, _ = dataset
    write_shapes_dataset(tmp_path / "again", **SMALL, workers=1)  # the fixture used 2 processes
    assert tree_bytes(tmp_path / "again") == tree_bytes(root)

    # Fewer images: the ones written are the same files (each image has its own RNG stream).
    write_shapes_dataset(tmp_path / "fewer", **{**SMALL, "num_train": 5, "num_dense_train": 2})
    fewer = tree_bytes(tmp_path / "fewer" / "train")
    full = tree_bytes(root / "train")
    assert len(fewer) == 5
    assert all(full[name] == data for name, data in fewer.items())

    write_shapes_dataset(tmp_path / "other", **SMALL, seed=1)
    other = tree_bytes(tmp_path / "other")
    assert other.keys() == tree_bytes(root).keys()
    original = tree_bytes(root)
    assert all(other[name] != original[name] for name in other if name.endswith(".png"))


def test_imagefolder_layout_balanced(dataset) -> None:
    root, _, _ = dataset
    # Every image, in every split, comes from its own random stream.
    pngs = [p.read_bytes() for p in root.rglob("*.png") if "annotations" not in p.parts]
    assert len(set(pngs)) == len(pngs) == 16 + 8 + 6 + 4
    for split, count in (("train", 16), ("val", 8)):
        folder = ImageFolder(str(root / split))
        # Sorted SHAPE_CLASSES: ImageFolder's indices are ours.
        assert folder.classes == list(SHAPE_CLASSES)
        assert np.bincount(folder.targets, minlength=K).tolist() == [count // K] * K
        for path, _ in folder.samples:
            assert Path(path).name.startswith(f"{split}_")
            with Image.open(path) as image:
                assert (image.mode, image.size) == ("RGB", (48, 48))


def test_dense_images_and_label_pngs(dataset) -> None:
    root, _, _ = dataset
    for split, count in (("training", 6), ("validation", 4)):
        images = sorted((root / "dense" / "images" / split).glob("*.png"))
        labels = sorted((root / "dense" / "annotations" / split).glob("*.png"))
        assert (
            [p.name for p in images]
            == [p.name for p in labels]
            == [f"{i:05d}.png" for i in range(count)]
        )
        for image_path, label_path in zip(images, labels, strict=True):
            with Image.open(image_path) as image, Image.open(label_path) as label:
                assert (image.mode, image.size) == ("RGB", (64, 64))
                assert (label.mode, label.size) == ("L", (64, 64))
                values = np.asarray(label)
            assert values.max() <= K
            assert values.max() >= 1  # every scene keeps at least its first shape


def test_coco_masks_match_label_pngs(dataset) -> None:
    root, _, _ = dataset
    dense = root / "dense"
    for split in ("training", "validation"):
        coco = COCO(str(dense / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
        assert coco.getCatIds() == list(range(1, K + 1))
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            assert (info["width"], info["height"]) == (64, 64)
            label = np.asarray(Image.open(dense / "annotations" / split / info["file_name"]))
            assert (dense / "images" / split / info["file_name"]).is_file()
            painted = np.zeros_like(label)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                mask = coco.annToMask(ann).astype(bool)
                assert ann["iscrowd"] == 0
                assert ann["area"] == mask.sum() > 0
                rows, cols = np.nonzero(mask)
                x, y = cols.min(), rows.min()
                assert ann["bbox"] == [x, y, cols.max() - x + 1, rows.max() - y + 1]
                assert not painted[mask].any(), "visible masks must not overlap"
                painted[mask] = ann["category_id"]
            np.testing.assert_array_equal(painted, label)


def test_encode_rle_column_major_and_roundtrip() -> None:
    # Column-major: [[0, 1], [1, 1]] reads 0, 1, 1, 1.
    assert encode_rle(np.array([[0, 1], [1, 1]], dtype=bool)) == {"size": [2, 2], "counts": [1, 3]}
    # A foreground first pixel starts with an empty background run.
    assert encode_rle(np.array([[1, 0], [0, 0]], dtype=bool))["counts"] == [0, 1, 3]
    assert encode_rle(np.zeros((3, 5), dtype=bool))["counts"] == [15]
    rng = np.random.default_rng(0)
    for shape in [(7, 11), (1, 1), (32, 5)]:
        mask = rng.random(shape) < 0.4
        rle = mask_utils.frPyObjects(encode_rle(mask), *shape)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    with pytest.raises(ValueError, match=r"2-D \(H, W\), got shape \(2, 2, 1\)"):
        encode_rle(np.zeros((2, 2, 1)))


def test_cli_writes_tree_and_rejects_small_images(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["data", "shapes", str(out), "--num-train", "16", "--num-val", "8", "--img-size", "32"]
    argv += ["--num-dense-train", "2", "--num-dense-val", "1", "--dense-img-size", "48"]
    assert main(argv) == 0
    assert "16 train / 8 val images" in capsys.readouterr().out
    assert len(list((out / "train").rglob("*.png"))) == 16
    assert (out / "dense" / "instances_validation.json").is_file()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out

    assert main(["data", "shapes", str(tmp_path / "small"), "--img-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "img_size must be at least 32 pixels" in err and "got 16" in err
    assert not (tmp_path / "small").exists()


def test_rerun_is_noop_and_other_parameters_refused(dataset) -> None:
    root, _, _ = dataset
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    summary = write_shapes_dataset(root, **SMALL)
    assert summary["skipped"] and summary["num_instances"] == dataset[1]["num_instances"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(ValueError, match=r"different seed \(stored \[0\], requested \[3\]\)"):
        write_shapes_dataset(root, **SMALL, seed=3)
    # --force allows overwriting; it does not rewrite what is already there.
    assert write_shapes_dataset(root, **SMALL, force=True)["skipped"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_foreign_or_incomplete_directory_needs_force(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not empty and holds no shapes dataset.*--force"):
        write_shapes_dataset(tmp_path, **SMALL)
    summary = write_shapes_dataset(tmp_path, **SMALL, force=True)
    assert not summary["skipped"] and (tmp_path / "notes.txt").is_file()

    next(iter((tmp_path / "val" / "star").glob("*.png"))).unlink()
    with pytest.raises(ValueError, match="incomplete shapes dataset"):
        write_shapes_dataset(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="is an existing file"):
        write_shapes_dataset(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 31}, "img_size must be at least 32 pixels.*got 31"),
        ({"dense_img_size": 8}, "dense_img_size must be at least 32 pixels.*got 8"),
        ({"num_val": -1}, "number of val images must be an int >= 0, got -1"),
        ({"num_dense_train": 2.5}, "dense_training images must be an int >= 0, got 2.5"),
        ({"seed": -2}, "seed must be an int >= 0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_shapes_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_render_shape_image_is_a_one_shape_scene() -> None:
    image, class_index = render_shape_image(np.random.default_rng(5), 40, class_index=6)
    scene, instances = render_scene(
        np.random.default_rng(5), 40, 1, class_indices=[6], edge_margin=SHAPE_EDGE_MARGIN
    )
    assert class_index == 6 and [c for c, _ in instances] == [6]
    np.testing.assert_array_equal(image, scene)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8


def test_classification_shapes_survive_the_eval_crop() -> None:
    # The default eval transform keeps the central 90 %: no shape pixel may lie outside it.
    size = 64
    edge = int(SHAPE_EDGE_MARGIN * size)
    touched = np.zeros((size, size), dtype=bool)
    for i in range(200):
        _, [(_, mask)] = render_scene(
            np.random.default_rng(i), size, 1, size_range=(0.75, 0.75), edge_margin=0.05
        )
        touched |= mask
    assert not touched[:edge].any() and not touched[-edge:].any()
    assert not touched[:, :edge].any() and not touched[:, -edge:].any()
    # ... yet shapes still reach the margin on every side.
    inner = (edge + 1, -edge - 2)
    assert all(touched[i].any() and touched[:, i].any() for i in inner)


def test_shape_is_salient_and_mask_matches_pixels() -> None:
    distances, ious = [], []
    for i in range(48):
        image, [(_, mask)] = render_scene(np.random.default_rng(i), 64, 1)
        pixels = image.astype(np.float32)
        inside = ~dilate(~mask, 1)  # away from the anti-aliased edge
        outside = dilate(mask, 3) & ~dilate(mask, 1)  # the local background around the shape
        shape_colour = np.median(pixels[inside], axis=0)
        background = np.median(pixels[outside], axis=0)
        distances.append(np.linalg.norm(pixels[mask].mean(0) - pixels[outside].mean(0)))
        # Pixels near the shape closer to its colour than to the background must be the mask.
        closer = np.linalg.norm(pixels - shape_colour, axis=-1) < np.linalg.norm(
            pixels - background, axis=-1
        )
        drawn = closer & dilate(mask, 2)
        ious.append((drawn & mask).sum() / (drawn | mask).sum())
    # Random colours alone would put some shapes within ~50 of their background.
    assert min(distances) > 90, sorted(distances)[:3]
    assert min(ious) > 0.9 and np.mean(ious) > 0.95, (min(ious), np.mean(ious))


def test_classes_have_distinct_silhouettes() -> None:
    # Same seed -> same background, size, position and rotation; only the class differs.
    masks = []
    for c in range(K):
        rng = np.random.default_rng(7)
        _, [(_, mask)] = render_scene(rng, 96, 1, class_indices=[c], size_range=(0.7, 0.7))
        masks.append(mask)
    # Silhouette area over the circumscribed disc's, from the geometry in sgformer.data.
    w, star, ring = CROSS_HALF_WIDTH, STAR_INNER_RATIO, RING_INNER_RATIO
    polygon = {n: n / 2 * np.sin(2 * np.pi / n) for n in (3, 4)}  # regular n-gon, radius 1
    head, shaft = ARROW_HEAD_HALF_WIDTH, ARROW_SHAFT_HALF_WIDTH
    # Crescent: unit disc minus its lens with the cut disc (radius r, centre d away).
    r, d = CRESCENT_CUT_RATIO, CRESCENT_CUT_OFFSET
    lens = (
        np.arccos((d * d + 1 - r * r) / (2 * d))
        + r * r * np.arccos((d * d + r * r - 1) / (2 * d * r))
        - 0.5 * np.sqrt((-d + 1 + r) * (d + 1 - r) * (d - 1 + r) * (d + 1 + r))
    )
    expected = {
        "arrow": head + 2 * shaft * np.sqrt(1 - shaft * shaft),
        "circle": np.pi,
        "crescent": np.pi - lens,
        "cross": 8 * np.sqrt(1 - w * w) * w - 4 * w * w,
        "ring": np.pi * (1 - ring * ring),
        "square": polygon[4],
        "star": 2 * STAR_POINTS * 0.5 * star * np.sin(np.pi / STAR_POINTS),
        "triangle": polygon[3],
    }
    radius = 0.7 * 96 / 2
    for name, mask in zip(SHAPE_CLASSES, masks, strict=True):
        assert mask.sum() / radius**2 == pytest.approx(expected[name], rel=0.03), name
    for a in range(K):
        for b in range(a + 1, K):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.9, (SHAPE_CLASSES[a], SHAPE_CLASSES[b], iou)


def test_scene_masks_disjoint_and_bad_scene_arguments() -> None:
    for i in range(8):
        image, instances = render_scene(np.random.default_rng(i), 96, 4)
        assert 1 <= len(instances) <= 4 and image.shape == (96, 96, 3)
        total = sum(mask.astype(int) for _, mask in instances)
        assert total.max() == 1 and all(mask.any() for _, mask in instances)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="class_indices has 1 entries, expected num_shapes=2"):
        render_scene(rng, 64, 2, class_indices=[0])
    with pytest.raises(ValueError, match=r"class indices must be in 0\.\.7, got \[8\]"):
        render_scene(rng, 64, 1, class_indices=[8])
    with pytest.raises(ValueError, match="size must be at least 32 pixels"):
        render_scene(rng, 20, 1)
