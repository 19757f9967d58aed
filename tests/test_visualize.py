"""Significance figures and arrays: real photos, odd sizes, bucket counts, the command line."""

import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import sgformer
from sgformer.cli import main
from sgformer.reallocation import bucket_bounds, buckets_for, merged_token_counts
from sgformer.visualize import (
    load_model,
    plot_significance,
    save_significance,
    significance_data,
    to_rgb,
    upsample_to_image,
)

# docs/design.md, "Variants": reduction ratio of the hybrid blocks of stages 1-3
SR_RATIOS = (8, 4, 2)
NANO_MAPS = 3  # sgformer_nano: one hybrid block in each of stages 1-3


@pytest.fixture(scope="module")
def nano() -> torch.nn.Module:
    torch.manual_seed(0)
    return sgformer.create_model("sgformer_nano").eval()


def _png_stats(path) -> tuple[float, int]:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return float(pixels.std()), len(np.unique(pixels.reshape(-1, 3), axis=0))


def _write_photo(path, size: int = 80) -> str:
    Image.fromarray(skimage.data.astronaut()).resize((size, size)).save(path)
    return str(path)


def test_figure_of_a_sample_photo_is_written_and_not_blank(nano, tmp_path) -> None:
    fig = plot_significance(nano, skimage.data.astronaut(), img_size=96)
    path = tmp_path / "astronaut.png"
    fig.savefig(path)
    std, colours = _png_stats(path)
    assert std > 30 and colours > 2000, (std, colours)
    data = fig.sgformer_data
    assert data["image"].shape == (96, 96, 3)
    assert [b["grid"] for b in data["blocks"]] == [(24, 24), (12, 12), (6, 6)]
    assert all(b["overlay"].shape == (96, 96) for b in data["blocks"])


def test_allocation_counts_equal_the_model_buckets_on_an_odd_grey_image(nano) -> None:
    grey = np.random.default_rng(0).random((75, 131))
    fig = plot_significance(nano, grey, img_size=75)
    data = fig.sgformer_data
    assert data["image"].shape == (75, 131, 3)
    assert len(data["blocks"]) == NANO_MAPS
    titles = [ax.get_title() for ax in fig.axes]
    for block in data["blocks"]:
        stride = 4 * 2 ** block["stage"]
        grid = (math.ceil(75 / stride), math.ceil(131 / stride))
        assert block["grid"] == grid and block["overlay"].shape == (75, 131)
        buckets = buckets_for(SR_RATIOS[block["stage"]])
        num_tokens = grid[0] * grid[1]
        assert block["tokens_per_bucket"] == [e - s for s, e in bucket_bounds(num_tokens, buckets)]
        assert block["merged_per_bucket"] == merged_token_counts(num_tokens, buckets)
        merged = dict(zip(block["group_sizes"], block["merged_per_bucket"], strict=True))
        drawn = " + ".join(str(merged[g]) for g in sorted(merged))
        assert any(f"merged {drawn} = {sum(merged.values())}" in t for t in titles), titles


def test_overlay_is_upsampled_by_the_stride_then_cropped() -> None:
    columns = torch.arange(9.0).expand(5, 9)  # a 5 x 9 stage-3 grid of an 75 x 131 image
    overlay = upsample_to_image(columns, 16, (75, 131))
    assert overlay.shape == (75, 131)
    # Pixel 120 is the centre of token column 7 (112-127); resizing the grid straight onto
    # 131 px instead of cropping the overhang would put it near column 7.8.
    assert overlay[:, 120] == pytest.approx(7.03, abs=0.01)
    assert overlay[:, 130] == pytest.approx(7.66, abs=0.01)


def test_grey_and_rgba_inputs_become_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb(grey)
    assert rgb.shape == (3, 4, 3) and (rgb == grey[..., None]).all()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    rgb = to_rgb(rgba)
    assert (rgb[:2] == (200, 0, 0)).all() and (rgb[2:] == 255).all()
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*got \(3, 4, 5\)"):
        to_rgb(np.zeros((3, 4, 5)))


def test_rgba_file_is_drawn(nano, tmp_path) -> None:
    rgba = np.dstack([skimage.data.coffee()[::4, ::4], np.full((100, 150), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    data = significance_data(nano, tmp_path / "rgba.png", img_size=64, blocks=[0])
    assert data["image"].shape == (64, 96, 3)
    assert data["blocks"][0]["significance"].shape == (16, 24)


def test_blocks_selection_and_parts(nano) -> None:
    image = skimage.data.camera()
    plain = plot_significance(nano, image, img_size=64, blocks="2,0")
    assert [b["index"] for b in plain.sgformer_data["blocks"]] == [2, 0]
    # input + per row: significance, allocation, and a colour bar for each
    assert len(plain.axes) == 1 + 2 * 4
    parts = plot_significance(nano, image, img_size=64, blocks=[1], parts=True)
    assert len(parts.axes) == 1 + 4 * 2
    titles = " ".join(ax.get_title() for ax in parts.axes)
    assert "stages[1].blocks[0] global" in titles and "stages[1].blocks[0] local" in titles
    with pytest.raises(ValueError, match="out of range.*3 hybrid-scale blocks"):
        significance_data(nano, image, img_size=64, blocks=[3])
    with pytest.raises(ValueError, match="comma-separated"):
        significance_data(nano, image, img_size=64, blocks="first")


def test_npz_holds_the_documented_keys(tmp_path) -> None:
    photo = _write_photo(tmp_path / "photo.png")
    result = save_significance(
        [photo], "sgformer_nano", output=tmp_path / "out", img_size=64, fmt="npy"
    )
    assert result["written"] == [str(tmp_path / "out" / "photo_significance.npz")]
    arrays = np.load(result["written"][0])
    fields = ("significance", "allocation", "global", "local", "group_sizes", "merged_tokens")
    expected = {"image"} | {
        f"stage{s}_block0_{f}" for s in range(NANO_MAPS) for f in (*fields, "stride")
    }
    assert set(arrays.files) == expected
    assert arrays["image"].shape == (64, 64, 3)
    allocation = arrays["stage0_block0_allocation"]
    assert allocation.shape == (16, 16)
    assert set(np.unique(allocation)) == {196, 56, 28}
    assert arrays["stage2_block0_merged_tokens"].tolist() == merged_token_counts(16, buckets_for(2))


def test_cli_without_images_uses_the_sample_photos(tmp_path, capsys) -> None:
    out = tmp_path / "maps"
    argv = ["significance", "--model", "sgformer_nano", "--img-size", "48", "--output", str(out)]
    assert main([*argv, "--format", "npy"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "meaningless" in captured.err
    assert "wrote 4 npy file(s)" in captured.out
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{n}_significance.npz" for n in ("astronaut", "cat", "coffee", "rocket")]
    assert np.load(out / "cat_significance.npz")["image"].shape == (48, 72, 3)  # 300 x 451


def test_cli_skips_unreadable_files(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    argv = ["significance", "--model", "sgformer_nano", "--img-size", "48"]
    assert main([*argv, "--output", str(tmp_path / "none"), str(broken)]) == 2
    assert "no image could be read (1 skipped)" in capsys.readouterr().err

    photo = _write_photo(tmp_path / "photo.png")
    out = tmp_path / "some"
    assert main([*argv, "--blocks", "1", "--output", str(out), str(broken), photo]) == 0
    captured = capsys.readouterr()
    assert f"skipping {broken}" in captured.err
    assert "wrote 1 png file(s)" in captured.out and "skipped 1 unreadable" in captured.out
    assert [p.name for p in out.iterdir()] == ["photo_significance.png"]
    std, colours = _png_stats(out / "photo_significance.png")
    assert std > 30 and colours > 500, (std, colours)


def test_cli_with_a_training_checkpoint(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = sgformer.create_model("sgformer_nano", num_classes=3, img_size=64)
    path = tmp_path / "best.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "model_ema": None,
            "model_name": "sgformer_nano",
            "model_kwargs": {"num_classes": 3, "img_size": 64},
            "class_names": ["circle", "square", "triangle"],
        },
        path,
    )
    photo = _write_photo(tmp_path / "photo.png", size=100)
    out = tmp_path / "out"
    good = ["significance", photo, "--checkpoint", str(path), "--output", str(out)]
    assert main([*good, "--blocks", "0", "--format", "npy"]) == 0
    assert "random weights" not in capsys.readouterr().err
    # the checkpoint's img_size (64) is the default short side
    assert np.load(out / "photo_significance.npz")["image"].shape == (64, 64, 3)
    loaded, info = load_model(checkpoint=path)
    torch.testing.assert_close(loaded.head.weight, model.head.weight)
    prediction = significance_data(loaded, photo, 64, "0", info["class_names"])["prediction"]
    assert prediction[0] in ("circle", "square", "triangle") and 1 / 3 <= prediction[1] <= 1

    assert main([*good, "--model", "sgformer_s"]) == 2
    assert "sgformer_nano" in capsys.readouterr().err
    assert main([*good, "--use-ema"]) == 2
    assert "EMA" in capsys.readouterr().err


def test_bad_arguments_fail_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match="format must be"):
        save_significance([], "sgformer_nano", output=tmp_path, fmt="jpg")
    with pytest.raises(ValueError, match="at least 32 px"):
        save_significance([], "sgformer_nano", output=tmp_path, img_size=16)
    with pytest.raises(ValueError, match="model name"):
        save_significance([], output=tmp_path)
    with pytest.raises(ValueError, match="too elongated"):
        significance_data(sgformer.create_model("sgformer_nano"), np.zeros((10, 1000)), 64)
