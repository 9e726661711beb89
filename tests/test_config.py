import tomllib
from pathlib import Path

import pytest

from fedus.config import ConfigError, RunConfig, flatten, unflatten
from fedus.scenarios import available, load_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_matches_the_typed_defaults():
    """Flower only overrides keys it knows from pyproject: both must list the same keys and defaults."""
    flwr_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flatten(flwr_cfg) == RunConfig().to_flat()


def test_flat_round_trip_and_overrides():
    cfg = RunConfig().with_overrides(["train.lr=3e-4", "teacher.arch=resnet50", "rounds=7", "train.mixup=false"])
    assert (cfg.train.lr, cfg.teacher.arch, cfg.rounds, cfg.train.mixup) == (3e-4, "resnet50", 7, False)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.train.weight_decay == 0.05 and RunConfig().train.lr == 1e-4  # reference recipe defaults


@pytest.mark.parametrize("bad", ["train.lr=-1", "rounds=zero", "nosuch.key=1", "train.precision=fp8", "justtext"])
def test_bad_values_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as err:
        RunConfig().with_overrides([bad])
    assert "\n" not in str(err.value)


def test_probe_rounds():
    cfg = RunConfig().with_overrides(["rounds=5"])
    assert [r for r in range(6) if cfg.probe_at(r)] == [0, 5]
    assert cfg.with_overrides(["eval.probe-rounds=all"]).probe_at(3)


def test_scenarios_load(monkeypatch, tmp_path):
    assert {"synthetic-devices", "public-corpus-by-center"} <= set(available())
    assert load_scenario("synthetic-devices").config.data.source == "synthetic"
    monkeypatch.setenv("FEDUS_CORPUS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="FEDUS_CORPUS"):
        load_scenario("public-corpus-by-center")
    with pytest.raises(ConfigError, match="unknown scenario"):
        load_scenario("nope")


def test_a_teacher_weights_file_is_never_labelled_random_init():
    """`--set teacher.weights=...` (e.g. on `fedus server`) must not leave the random-init provenance."""
    cfg = RunConfig().with_overrides(['teacher.weights="/site/models/dinov3.safetensors"'])
    assert cfg.teacher.source == "weights file given by the user: dinov3.safetensors"
    assert "random init" in RunConfig().teacher.source
    stated = RunConfig().with_overrides(['teacher.weights="/m/t.safetensors"', 'teacher.source="fitted here on the corpus"'])
    assert stated.teacher.source == "fitted here on the corpus"


@pytest.mark.parametrize("bad, hint, toml_hint", [  # a TOML file names the first unknown part (a whole section)
    ("train.local-step=3", "did you mean train.local-steps?", None),
    ("round=3", "did you mean rounds?", None),
    ("train.nosuch=1", "keys in 'train': train.augment, ", None),
    ("nosuch.key=1", "sections: central-dp, coreset, ", "'nosuch' (sections: central-dp, coreset, "),
    ("trian.lr=1", "'trian.lr' (did you mean train.lr?)", "'trian' (did you mean train?)"),
])
def test_an_unknown_key_names_the_likely_ones_not_all(bad, hint, toml_hint):
    """From --set and from a scenario's TOML alike: one line, the likely keys, not all ~150."""
    key, value = bad.split("=")
    with pytest.raises(ConfigError) as from_set:
        RunConfig().with_overrides([bad])
    with pytest.raises(ConfigError) as from_toml:
        RunConfig.from_dict(unflatten({key: int(value)}))
    for message, expected in ((str(from_set.value), hint), (str(from_toml.value), toml_hint or hint)):
        assert message.startswith("unknown config key '") and expected in message and "\n" not in message
        assert len(message) < len(", ".join(RunConfig().to_flat())) / 2, message
