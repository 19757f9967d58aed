"""Run settings: flags generated from the config dataclasses, presets, resume overrides."""

import argparse
from dataclasses import dataclass

import pytest

from sgformer import config
from sgformer.cli import build_parser
from sgformer.tasks.classification import RECIPES, ClassificationConfig
from sgformer.tasks.detection import SCHEDULES as DETECTION_SCHEDULES
from sgformer.tasks.detection import DetectionConfig
from sgformer.tasks.segmentation import SCHEDULES as SEGMENTATION_SCHEDULES
from sgformer.tasks.segmentation import SegmentationConfig
from sgformer.trainer import TrainConfig


@dataclass
class Example(TrainConfig):
    size: int = config.option(8, "side")
    sides: tuple[int, ...] = config.option((1, 2), "sides", nargs="+")
    mask: bool = config.option(True, "no mask", flag="--no-mask")
    aux: bool = config.option(False, "aux head", negatable=True)
    epochs: int = config.option(3, "epochs", resume=True)


def _parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    config.add_flags(parser, Example)
    return vars(parser.parse_args(argv))


def test_flags_default_to_not_given_and_say_the_default():
    given = _parse([])
    assert all(value is None for value in given.values())
    parser = argparse.ArgumentParser()
    config.add_flags(parser, Example)
    help_text = parser.format_help()
    assert "side (default 8)" in help_text and "sides (default 1 2)" in help_text
    assert "--no-mask" in help_text and "--no-aux" in help_text and "--mask" not in help_text
    assert _parse(["--size", "5", "--sides", "3", "4", "--no-mask", "--aux"]) | {} == {
        **given,
        "size": 5,
        "sides": [3, 4],
        "mask": False,
        "aux": True,
    }


def test_explicit_flags_win_over_the_preset_over_the_defaults():
    presets = {"big": {"size": 32, "epochs": 9}}
    args = config.resolve(Example, {"epochs": 4, "sides": [5]}, presets, "big")
    assert (args.size, args.epochs, args.sides, args.mask) == (32, 4, (5,), True)
    assert config.resolve(Example, {}).size == 8


def test_a_preset_naming_no_field_fails_at_once():
    with pytest.raises(AssertionError, match="preset 'bad' sets unknown fields \\['sizes'\\]"):
        config.check_presets(Example, {"bad": {"sizes": 1}})


def test_resume_keeps_the_run_settings_but_the_overridable(caplog):
    saved = {"size": 16, "epochs": 3, "sides": [1, 2], "old_key": "kept"}
    with caplog.at_level("WARNING"):
        args = config.resume(Example, saved, {"epochs": 6, "size": 4, "aux": None})
    assert (args.epochs, args.size, args.sides, args.old_key) == (6, 16, (1, 2), "kept")
    assert args.mask is True  # a field newer than the checkpoint takes its default
    assert "the checkpoint's values are used for size" in caplog.text


@pytest.mark.parametrize(
    ("command", "config_type", "presets"),
    [
        (["train"], ClassificationConfig, RECIPES),
        (["detect", "train"], DetectionConfig, DETECTION_SCHEDULES),
        (["segment", "train"], SegmentationConfig, SEGMENTATION_SCHEDULES),
    ],
)
def test_every_setting_of_a_train_command_is_a_flag(command, config_type, presets):
    config.check_presets(config_type, presets)
    given = vars(build_parser().parse_args(command))
    names = {f.name for f in config.fields(config_type)}
    assert names <= set(given) and all(given[name] is None for name in names)
