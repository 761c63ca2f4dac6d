"""Typed config: YAML + overrides, type errors, unknown keys with suggestions, relative paths, round trip."""
from pathlib import Path

import pytest
import yaml

from semiseg.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_sections_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", """
model:
  backbone: {name: tiny_resnet}
  mask2former: {hidden_dim: 64, num_queries: 10}
solver:
  lr: 1e-4          # PyYAML reads this as a string; a float field accepts it
  steps: [100, 200]
  amp: bf16
train:
  seed: 3
"""))
    assert cfg.model.backbone.name == "tiny_resnet"
    assert cfg.model.backbone.freeze_at == 0  # untouched keys keep their defaults
    assert cfg.model.mask2former.hidden_dim == 64 and cfg.model.mask2former.nheads == 8
    assert cfg.solver.lr == 1e-4 and isinstance(cfg.solver.lr, float)
    assert cfg.solver.steps == (100, 200)
    assert cfg.solver.amp == "bf16"
    assert cfg.train.seed == 3
    assert cfg.data.augmentation.kind == "lsj"


def test_overrides_apply_in_order_with_yaml_values(tmp_path):
    path = write(tmp_path / "c.yaml", "solver: {max_iter: 10}\n")
    cfg = load_config(path, ["solver.max_iter=20", "solver.steps=[5, 15]", "data.strict=true",
                             "train.device=cuda:1", "model.backbone.name=tiny_resnet",
                             "data.augmentation.crop_size=[64, 96]", "solver.max_iter=30"])
    assert cfg.solver.max_iter == 30
    assert cfg.solver.steps == (5, 15)
    assert cfg.data.strict is True
    assert cfg.train.device == "cuda:1"
    assert cfg.data.augmentation.crop_size == (64, 96)


def test_string_fields_keep_the_raw_override_text():
    cfg = apply_overrides(Config(), ["train.device=1"])
    assert cfg.train.device == "1"
    assert apply_overrides(Config(), ["train.device=yes"]).train.device == "yes"


@pytest.mark.parametrize("override, words", [
    ("solver.max_iter=ten", ["solver.max_iter", "integer", "'ten'"]),
    ("solver.max_iter=1.5", ["solver.max_iter", "integer"]),
    ("solver.lr=fast", ["solver.lr", "number"]),
    ("data.strict=3", ["data.strict", "true or false"]),
    ("solver.amp=fp8", ["solver.amp", "'fp8'", "'bf16'"]),
    ("solver.steps=5", ["solver.steps", "list"]),
    ("solver.steps=[1, x]", ["solver.steps[1]", "integer"]),
    ("model.mask2former.pixel_mean=[1, 2]", ["pixel_mean", "3 values"]),
    ("model=5", ["model", "mapping"]),
    ("solver.max_iter", ["key=value"]),
    ("train.eval_period=0", ["train.eval_period=0", "positive"]),
    ("data.num_workers=-1", ["data.num_workers", ">= 0"]),
    ("train.best_metric=segm.APP", ["train.best_metric", "segm.AP"]),
])
def test_type_errors_name_the_key_and_value(override, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"override {override!r}")
    for word in words:
        assert word in message


def test_validation_inside_sections_is_a_config_error():
    with pytest.raises(ConfigError, match="augmentation.*kind"):
        apply_overrides(Config(), ["data.augmentation.kind=zoom"])
    with pytest.raises(ConfigError, match="hidden_dim"):
        apply_overrides(Config(), ["model.mask2former.hidden_dim=30"])


def test_unknown_keys_in_file_and_override_suggest_the_right_one(tmp_path):
    path = write(tmp_path / "bad.yaml", "solver:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "unknown key 'solver.lrr'" in str(e.value)
    assert "did you mean 'solver.lr'?" in str(e.value)

    path = write(tmp_path / "bad2.yaml", "modle:\n  arch: mask2former\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'.*did you mean 'model'"):
        load_config(path)

    with pytest.raises(ConfigError, match=r"override 'model.backbone.nmae=x'.*unknown key 'model.backbone.nmae'"
                                          r".*did you mean 'model.backbone.name'"):
        load_config(write(tmp_path / "ok.yaml", ""), ["model.backbone.nmae=x"])

    with pytest.raises(ConfigError, match="unknown key 'train.zzz'.*valid keys of train: output_dir"):
        apply_overrides(Config(), ["train.zzz=1"])
    with pytest.raises(ConfigError, match="solver.lr has no sub-keys"):
        apply_overrides(Config(), ["solver.lr.x=1"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line 3.*mapping values"):
        load_config(write(tmp_path / "bad.yaml", "solver:\n  lr: 1\n   x: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    path = write(tmp_path / "configs" / "c.yaml", """
data:
  train_ann: ../data/train.json
  train_images: /abs/images
model:
  backbone: {weights: weights/r50.pkl}
train:
  output_dir: runs/x
""")
    monkeypatch.chdir(tmp_path / "configs" / "..")
    cfg = load_config(path, ["data.val_ann=val.json"])
    assert cfg.data.train_ann == (tmp_path / "data" / "train.json").resolve()
    assert cfg.data.train_images == Path("/abs/images")
    assert cfg.model.backbone.weights == (tmp_path / "configs" / "weights" / "r50.pkl").resolve()
    assert cfg.train.output_dir == (tmp_path / "configs" / "runs" / "x").resolve()
    assert cfg.data.val_ann == (tmp_path / "val.json").resolve()  # overrides: relative to the cwd
    assert cfg.data.val_images is None


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["model.num_classes=7", "solver.steps=[3, 4]", "data.train_ann=/x/a.json",
                                     f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.model.mask2former.num_classes == 7  # model.num_classes is authoritative
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["solver"]["steps"] == [3, 4]


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.solver.max_iter > 0, path


def test_base_config_file_and_shipped_preset(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("base: semiseg:tiny_maskdino\ndata: {train_ann: a.json}\n"
                                                "solver: {lr: 0.5, max_iter: 7}\n")
    (tmp_path / "top.yaml").write_text("base: sub/base.yaml\nsolver: {lr: 0.25}\nmodel: {maskdino: {hidden_dim: 32}}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.model.arch == "maskdino" and cfg.model.maskdino.hidden_dim == 32  # preset, then the file
    assert cfg.model.maskdino.num_queries == 20 and str(cfg.model.backbone.weights) == "semiseg:tiny_resnet_pretext"
    assert (cfg.solver.lr, cfg.solver.max_iter) == (0.25, 7)
    assert cfg.data.train_ann == tmp_path / "sub" / "a.json"  # relative to the file that names it


def test_bad_bases_are_one_line_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base a.yaml includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: semiseg:huge\n")
    with pytest.raises(ConfigError, match="semiseg:huge: no such preset; choose one of semiseg:tiny_mask2former"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model: {arch: yolo}\n")
    with pytest.raises(ConfigError, match="model.arch='yolo': expected one of mask2former, maskdino"):
        load_config(tmp_path / "d.yaml")
