"""Experiment configs: unknown keys are errors naming the allowed keys; recipes validate; overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from pedetect.models.backbone import check_backbone_name, pretrained_source
from pedetect.recipe import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_to_yaml,
    load_experiment,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [
    "demo.yaml",
    "realistic.yaml",
    "rsna_4th_rexnet200.yaml",
    "rsna_5th_effnetb5.yaml",
    "rsna_1st_seresnext50.yaml",
    "rsna_2nd_heart.yaml",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate_and_name_their_source(name):
    config = load_experiment(CONFIGS / name)
    assert config.source, f"{name} must say where it comes from"
    check_backbone_name(config.cnn.backbone.name)  # timm has it (pedetect_small_cnn registered with timm)
    if name in ("demo.yaml", "realistic.yaml"):
        assert config.cnn.backbone.weights is None  # the demo's recipes start from random weights: nothing to fetch
    else:  # each winner started from pretrained weights: timm knows where this tag's come from (no download here)
        assert config.cnn.backbone.weights == "pretrained"
        source = pretrained_source(config.cnn.backbone.name)
        assert source["tag"] == config.cnn.backbone.name and ("hf_hub_id" in source or "url" in source)


def test_recipes_say_what_the_issue_asks():
    fourth = load_experiment(CONFIGS / "rsna_4th_rexnet200.yaml").cnn
    assert (fourth.backbone.name, fourth.input.image_size, fourth.epochs, fourth.batch_size) == (
        "rexnet_200.nav_in1k",
        512,
        3,
        32,
    )
    assert (fourth.optimizer.name, fourth.optimizer.lr, fourth.optimizer.weight_decay, fourth.scheduler.name) == (
        "adamw",
        1e-3,
        1e-2,
        "cosine",
    )
    assert fourth.augment.hflip > 0 and fourth.augment.shift_scale_rotate.p > 0 and fourth.augment.cutout.p > 0
    assert load_experiment(CONFIGS / "rsna_4th_rexnet200.yaml").data.folds == 3
    fifth = load_experiment(CONFIGS / "rsna_5th_effnetb5.yaml").cnn
    assert fifth.backbone.name.startswith("tf_efficientnet_b5") and fifth.input.image_size == 512
    assert fifth.targets.exam_labels and fifth.sampling.mode == "per_study" and fifth.sampling.positive_share == 0.25
    assert (fifth.sampling.study_slices, fifth.sampling.study_positives, fifth.batch_size) == (2, 8, 40)
    assert (fifth.backbone.drop_path_rate, fifth.backbone.drop_rate, fifth.loss.slice_weight) == (0.4, 0.0, 2.5)
    assert (fifth.targets.exam_label_weights, fifth.scheduler.step_steps, fifth.scheduler.gamma) == (
        "metric",
        500,
        0.99,
    )
    assert (fourth.head.pool, fourth.head.hidden, fourth.loss.focal_alpha, fourth.augment.dropout_one_of) == (
        "gem",
        256,
        None,
        True,
    )
    assert (fifth.augment.vflip, fifth.augment.hflip) == (0.5, 0.0)  # the published flip keeps left and right
    assert (fifth.optimizer.name, fifth.optimizer.lr, fifth.scheduler.name) == ("adam", 5e-4, "step")
    first = load_experiment(CONFIGS / "rsna_1st_seresnext50.yaml").cnn
    assert (first.backbone.name, first.input.mode, first.input.image_size, first.loss.kind, first.epochs) == (
        "legacy_seresnext50_32x4d.in1k",
        "adjacent",
        576,
        "bce",
        1,
    )
    assert (
        first.input.lung_crop is not None
        and first.batch_size * first.accumulate_grad_batches == 128
        and first.export == "last"
    )


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cnn:\n  optimiser:\n    lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "optimiser" in message and "bad.yaml" in message
    assert "optimizer" in message and "scheduler" in message  # the allowed keys


def test_nested_unknown_key_and_bad_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cnn:\n  augment:\n    cutout: {p: 0.5, hole: 3}\n  loss: {kind: dice}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "cnn.augment.cutout.hole" in message and "holes" in message
    assert "cnn.loss.kind" in message


def test_unknown_exam_label_is_an_error():
    with pytest.raises(ConfigError, match="unknown exam label"):
        apply_overrides(ExperimentConfig(), ["cnn.targets.exam_labels=[central]"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_overrides_set_single_values_and_check_keys():
    config = apply_overrides(
        ExperimentConfig(), ["cnn.optimizer.lr=3e-4", "runtime.devices=2", "logging.wandb.project=x"]
    )
    assert config.cnn.optimizer.lr == 3e-4 and config.runtime.devices == 2 and config.logging.wandb.project == "x"
    with pytest.raises(ConfigError, match="unknown section 'cnn.optimzer'.*optimizer"):
        apply_overrides(config, ["cnn.optimzer.lr=1"])
    with pytest.raises(ConfigError, match="cnn.optimizer.learning_rate"):
        apply_overrides(config, ["cnn.optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(config, ["cnn.epochs"])


def test_resolved_config_round_trips(tmp_path):
    config = apply_overrides(load_experiment(CONFIGS / "rsna_5th_effnetb5.yaml"), ["cnn.epochs=1"])
    save_config(config, tmp_path / "config.yaml")
    assert load_experiment(tmp_path / "config.yaml") == config
    text = config_to_yaml(config)
    assert "warmup_epochs" in text and "focal_gamma" in text  # every default written out


def test_the_2nd_place_heart_recipe_is_the_4th_place_with_its_heart_model():
    second, fourth = (load_experiment(CONFIGS / name) for name in ("rsna_2nd_heart.yaml", "rsna_4th_rexnet200.yaml"))
    heart = second.heart
    assert (heart.depth, heart.size, tuple(heart.window), heart.epochs, heart.class_weight) == (
        32,
        224,
        (50.0, 350.0),
        5,
        "balanced",
    )
    assert (heart.optimizer.name, heart.optimizer.lr) == ("adamw", 1e-4)
    assert second.cnn == fourth.cnn and second.seq == fourth.seq and second.data == fourth.data and fourth.heart is None


def test_a_recipe_extends_its_base_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nsource: x\ncnn:\n  epochs: 7\n  batch_size: 4\nseq:\n  hidden: 12\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\ncnn:\n  epochs: 2\n")
    config = load_experiment(tmp_path / "b.yaml")
    assert (config.name, config.source, config.cnn.epochs, config.cnn.batch_size, config.seq.hidden) == (
        "b",
        "x",
        2,
        4,
        12,
    )
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    with pytest.raises(ConfigError, match="in a loop"):
        load_experiment(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_experiment(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: a.yaml\ncnn:\n  epoch: 2\n")  # a misspelt key is still named
    (tmp_path / "a.yaml").write_text("name: a\n")
    with pytest.raises(ConfigError, match="unknown key 'cnn.epoch'"):
        load_experiment(tmp_path / "d.yaml")


def test_a_changed_config_removes_exactly_the_stages_it_invalidates(tmp_path):
    from pedetect.train.setup import TrainError, prepare_model_dir

    def layout():
        for name in ("cnn/fold0", "embed/fold0", "seq/fold0"):
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
        return lambda: sorted(p.name for p in tmp_path.iterdir() if p.is_dir())

    base = ExperimentConfig()
    prepare_model_dir(base, tmp_path, force=False, echo=lambda m: None)
    left = layout()
    said: list[str] = []
    prepare_model_dir(apply_overrides(base, ["seq.hidden=32"]), tmp_path, force=False, echo=said.append)
    assert left() == ["cnn", "embed"] and "stage-2 config changed (seq.hidden)" in said[0]
    left = layout()
    gridded = apply_overrides(base, ["seq.hidden=32", "embed.location_grid=3"])
    prepare_model_dir(gridded, tmp_path, force=False, echo=said.append)
    assert left() == ["cnn"] and "embed.location_grid" in said[1]
    left = layout()
    prepare_model_dir(apply_overrides(gridded, ["embed.batch_size=8"]), tmp_path, force=False, echo=said.append)
    assert left() == ["cnn", "embed", "seq"]  # batch size changes no result
    with pytest.raises(TrainError, match="cnn.epochs"):
        prepare_model_dir(apply_overrides(gridded, ["cnn.epochs=9"]), tmp_path, force=False, echo=said.append)


def test_a_recipe_whose_flips_would_mislabel_sides_is_refused_before_training():
    from pedetect.train.cnn import check_cnn_config
    from pedetect.train.setup import TrainError

    config = apply_overrides(load_experiment(CONFIGS / "rsna_5th_effnetb5.yaml"), ["cnn.augment.rotate90=0.5"])
    with pytest.raises(TrainError, match="rotate90 turns left and right"):
        check_cnn_config(config)
    check_cnn_config(
        apply_overrides(load_experiment(CONFIGS / "rsna_5th_effnetb5.yaml"), ["cnn.augment.hflip=0.5"])
    )  # swapped: fine
