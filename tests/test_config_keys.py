"""A key that does not exist never runs silently (issue 25, item 8): every schema — the run's
dataclasses and the components' signatures — refuses a key it does not have, in one line naming
the closest real key, before anything trains. Hydra's `+key=value` gets past struct mode, so these
compose; `validate` is what refuses them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from conftest import compose_config
from transferlab.cli import CONF_DIR
from transferlab.config import Config, validate
from transferlab.errors import ConfigError


@pytest.mark.parametrize("overrides,message", [
    (["+target.epoch=3"], "target.epoch: no such setting; did you mean target.epochs?"),
    (["+source.epoch=3"], "source.epoch: no such setting; did you mean source.epochs?"),
    (["+data.max_lenght=64"], "data.max_lenght: no such setting; did you mean data.max_length?"),
    (["+trainer.precison=16"], "trainer.precison: no such setting; did you mean trainer.precision?"),
    (["+evaluate.wise_ft_alpha=[0.5]"], "evaluate.wise_ft_alpha: no such setting; did you mean evaluate.wise_ft_alphas?"),
    (["+cache.enable=false"], "cache.enable: no such setting; did you mean cache.enabled?"),
    (["+sed=1"], "sed: no such setting; did you mean seed?"),
    (["+logger.projet=x"], "logger.projet: no such setting; did you mean logger.project?"),
    (["regularizer=l2sp", "+regularizer.alpa=0.1"],
     "regularizer.alpa: L2SP takes no such setting; did you mean regularizer.alpha? (it takes alpha, beta)"),
    # regularizer=none (the default) takes no settings at all: object.__init__'s **kwargs let it through
    (["+regularizer.alpa=0.1"], "regularizer.alpa: NoRegularizer takes no such setting (it takes none)"),
    (["+freeze.k=1"], "freeze.k: FullFinetune takes no such setting"),
    (["+target.optimizer.weight_decy=0.1"], "target.optimizer.weight_decy: AdamW takes no such setting; did you mean"),
    (["+data.dataset.n_sampels=10"], "data.dataset.n_sampels: load_digits takes no such setting"),
    (["+regularizer@extra_regularizers.bss2=bss", "+extra_regularizers.bss2.etta=0.1"],
     "extra_regularizers.bss2.etta: BSS takes no such setting; did you mean extra_regularizers.bss2.eta?"),
    (["+extra_regularizers.bss.eta=0.1"], "extra_regularizers.bss: not a component (no _target_)"),
])
def test_a_key_no_schema_has_is_refused_naming_the_closest(overrides, message):
    cfg = compose_config(overrides)  # composes: `+` adds keys past struct mode
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def schemas(schema=Config, where=""):
    """(path, dataclass) of every schema reachable from Config."""
    yield where, schema
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schemas(hints[f.name], f"{where}.{f.name}" if where else f.name)


@pytest.mark.parametrize("where,schema", list(schemas()), ids=lambda v: v if isinstance(v, str) else None)
def test_every_schema_refuses_a_key_it_does_not_have(where, schema):
    """Generic, not a list of cases: each dataclass, each of its fields misspelled (one letter
    dropped) is refused, naming the field itself as the closest."""
    base = compose_config()
    for f in dataclasses.fields(schema):
        if len(f.name) < 4:
            continue
        typo = f.name[:-1] if f.name[:-1] not in {g.name for g in dataclasses.fields(schema)} else f.name + "x"
        cfg = base.copy()
        node = cfg
        for part in filter(None, where.split(".")):
            node = node[part]
        with open_dict(node):
            node[typo] = 1
        with pytest.raises(ConfigError, match=None) as info:
            validate(cfg)
        key = f"{where}.{typo}" if where else typo
        assert str(info.value).startswith(f"{key}: no such setting"), str(info.value)
        assert (f"did you mean {where + '.' if where else ''}{f.name}?" in str(info.value)
                or f.name in str(info.value)), str(info.value)


@pytest.mark.parametrize("overrides", [
    [],
    ["+regularizer@extra_regularizers.bss2=bss", "extra_regularizers.bss2.eta=0.01"],
    ["regularizer=l2sp", "+regularizer@extra_regularizers.bss=bss", "+regularizer@extra_regularizers.delta2=delta"],
    ["trainer.devices=[0,1]", "trainer.progress_bar=false"],  # fields typed Any hold free values
    ["data.ood_shift={_target_: transferlab.data.shifts.gaussian_noise, sigma: 0.3}"],
])
def test_open_sections_stay_open(overrides):
    """Components are checked against their signatures, named components under
    extra_regularizers each so, and a free value (Any) is not a schema."""
    cfg = compose_config(overrides)
    validate(cfg)  # raises ConfigError on a key no schema or signature has
    named = {o.split("@extra_regularizers.")[1].split("=")[0] for o in overrides if "@extra_regularizers." in o}
    assert set(cfg.extra_regularizers) == named
    for key in (o.split("=")[0] for o in overrides if o[0] not in "+~"):
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.parametrize("arm", sorted(f"{p.parent.name}={p.stem}" for p in (Path(CONF_DIR) / "ablation").glob("*/*.yaml")))
def test_every_ablation_arm_validates(arm):
    group, option = arm.split("=")
    cfg = compose_config([f"+ablation/{group}={option}"])
    validate(cfg)  # raises ConfigError on a key no schema or signature has
    # each option the arm picks is the one in effect, with the arm's own settings on top
    own = yaml.safe_load((Path(CONF_DIR) / "ablation" / group / f"{option}.yaml").read_text())
    for entry in own["defaults"]:
        for key, picked in entry.items():
            node = key.removeprefix("override /")
            want = OmegaConf.merge(compose_config([f"{node}={picked}"])[node], own.get(node) or {})
            assert cfg[node] == want, (arm, node)


def inner(size: int = 1):
    return size


def outer(pool=None, scale: float = 1.0):
    return pool


def test_a_component_inside_a_component_is_checked_too():
    from omegaconf import OmegaConf

    from transferlab.config import check_arguments

    node = OmegaConf.create({"_target_": "test_config_keys.outer",
                             "pool": {"_target_": "test_config_keys.inner", "sise": 2}})
    with pytest.raises(ConfigError, match="data.dataset.pool.sise: inner takes no such setting; "
                                          "did you mean data.dataset.pool.size"):
        check_arguments(node, "data.dataset")
    node.pool = {"_target_": "test_config_keys.inner", "size": -2}
    check_arguments(node, "data.dataset")  # not a regularizer: a plain int may be negative
    node.pool = {"_target_": "test_config_keys.inner", "size": "two"}
    with pytest.raises(ConfigError, match="data.dataset.pool.size=two: must be an integer"):
        check_arguments(node, "data.dataset")


def test_the_hydra_node_is_hydras():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert isinstance(cfg.hydra, DictConfig)
    validate(cfg)


def test_an_extra_regularizer_may_not_take_the_regularizers_name():
    with pytest.raises(ConfigError, match="extra_regularizers.bss: regularizer=bss goes by that name already"):
        validate(compose_config(["regularizer=bss", "+regularizer@extra_regularizers.bss=bss"]))
    validate(compose_config(["regularizer=bss", "+regularizer@extra_regularizers.bss2=bss"]))


def test_the_cli_refuses_a_key_that_does_not_exist_before_training(tmp_path):
    """`transferlab +target.epoch=3` (Hydra's hint for the typo target.epoch=3): one line naming
    target.epochs, exit 1, nothing trained."""
    env = {**os.environ, "TRANSFERLAB_OUTPUT": str(tmp_path / "out"), "TRANSFERLAB_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "transferlab", "+target.epoch=3", "logger=csv"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "transferlab: error:" in line]
    assert lines == ["transferlab: error: target.epoch: no such setting; did you mean target.epochs?"], result.stderr
    [results_file] = (tmp_path / "out").rglob("results.json")
    results = json.loads(results_file.read_text())
    assert results["status"] == "failed" and "target.epochs" in results["error"]
    assert not any(results_file.parent.rglob("*.pt")) and not (tmp_path / "cache").exists()
