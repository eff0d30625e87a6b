"""Config composition: every option composes, and bad input fails naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import compose_config
from transferlab.cli import CONF_DIR
from transferlab.config import Signed, check_arguments, validate
from transferlab.errors import ConfigError

GROUPS = ["data", "backbone", "freeze", "regularizer", "source", "optimizer", "scheduler", "trainer", "logger", "cache",
          "experiment", "study", "debug"]


def all_options():
    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_option_composes_and_validates(group, option):
    # Options that only run with a matching other choice (WNUT-16 has no source task).
    extra = {("source", "checkpoint"): ["source.path=x.pt"],
             ("data", "wnut16_ner"): ["source=pretrained"],
             ("data", "hf"): ["source=pretrained"]}.get((group, option), [])  # your data: one task, every class
    cfg = compose_config([f"{group}={option}", *extra])
    validate(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():  # trainer=gpu / ddp here
        from transferlab.collectives import check_devices

        with pytest.raises(ConfigError, match="no CUDA GPU is visible here"):
            check_devices(cfg.trainer)
        return
    if group in ("optimizer", "scheduler"):  # placed at target.<group> (the source stage's: source.<group>)
        assert cfg.target[group]._target_ and cfg.target[group]._partial_
    elif group not in ("experiment", "study", "debug"):
        assert cfg[group] is not None


def test_defaults_are_the_documented_ones():
    cfg = compose_config()
    assert cfg.data.dataset._target_.endswith("load_digits")
    assert cfg.backbone._target_.endswith("SmallCNN")
    assert cfg.freeze._target_.endswith("FullFinetune")
    assert cfg.regularizer._target_.endswith("NoRegularizer")
    assert cfg.source.mode.value == "train" and cfg.seed == 0 and cfg.logger.mode == "offline"


def test_canonical_knobs_override():
    cfg = compose_config(["seed=0", "target.lr=0.5", "target.epochs=3", "source.epochs=4",
                          "data.target_train_size=50", "regularizer=l2sp", "regularizer.alpha=0.2",
                          "freeze=partial", "freeze.k=2"])
    assert (cfg.seed, cfg.target.lr, cfg.target.epochs, cfg.source.epochs) == (0, 0.5, 3, 4)
    assert (cfg.data.target_train_size, cfg.regularizer.alpha, cfg.freeze.k) == (50, 0.2, 2)


@pytest.mark.parametrize("override,key", [
    ("freeze=partial freeze.kk=2", "freeze.kk"),
    ("target.lrr=0.1", "target.lrr"),
    ("regularizer=l2sp regularizer.alhpa=1", "regularizer.alhpa"),
])
def test_misspelled_key_fails_at_compose_naming_it(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(override.split())
    message = str(info.value) + str(info.value.__cause__)
    assert key.split(".")[-1] in message


@pytest.mark.parametrize("override,key", [("seed=abc", "seed"), ("target.epochs=ten", "epochs"),
                                          ("source=banana", "source")])
def test_wrong_type_or_unknown_option_fails_at_compose(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_config(override.split())
    assert key in str(info.value) + str(info.value.__cause__)


# A component's schema is its class's signature: types and bounds checked before anything runs.
@pytest.mark.parametrize("overrides,message", [
    (["freeze=partial", "freeze.k=one"], "freeze.k=one: must be an integer"),
    (["freeze=partial", "freeze.k=-1"], "freeze.k=-1: must be >= 0"),
    (["freeze=lora", "freeze.dropout=1.5"], "freeze.dropout=1.5: must be < 1"),
    (["freeze=llrd", "freeze.decay=0"], "freeze.decay=0: must be > 0"),
    (["regularizer=l2sp", "regularizer.alpha=-1"], "regularizer.alpha=-1: must be >= 0"),
    (["regularizer=ewc", "regularizer.lam=-100"], "regularizer.lam=-100: must be >= 0"),
    (["regularizer=ewc", "regularizer.normalize=median"], "regularizer.normalize=median: choose one of none, max, mean"),
    (["regularizer=lwf", "regularizer.temperature=0"], "regularizer.temperature=0: must be > 0"),
    (["backbone=mlp", "backbone.hidden=[8,-2]"], "backbone.hidden[1]=-2: must be > 0"),
    (["scheduler=cosine", "target.scheduler.warmup_ratio=1.5"], "target.scheduler.warmup_ratio=1.5: must be < 1"),
    (["optimizer=sgd", "+target.optimizer.momentun=0.5"], "target.optimizer.momentun: SGD takes no such setting"),
])
def test_component_arguments_are_checked_against_their_signature(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


class FutureRegularizer:
    """A regularizer whose author wrote plain floats, no bounds."""

    def __init__(self, strength: float, shift: Signed = 0.0):
        self.strength, self.shift = strength, shift


def test_every_regularizer_coefficient_must_be_non_negative_by_rule():
    """The rule covers any regularizer, present or future: a float argument without bounds of
    its own is a coefficient (>= 0); `Signed` opts out; elsewhere plain floats are free."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "test_config.FutureRegularizer", "strength": -0.5, "shift": -1.0})
    with pytest.raises(ConfigError, match="regularizer.strength=-0.5: must be >= 0"):
        check_arguments(node, "regularizer", coefficients=True)
    check_arguments(node, "freeze")  # not a regularizer: no rule
    node.strength = 0.0
    check_arguments(node, "regularizer", coefficients=True)  # shift is Signed: negative is fine


def test_config_imports_without_torch_or_lightning():
    import subprocess
    import sys

    code = ("import sys, transferlab.config, transferlab.cli; "
            "print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("overrides,needle", [
    (["target.lr=0"], "target.lr=0"),
    (["target.lr=-1"], "target.lr=-1"),
    (["source.lr=-0.1"], "source.lr"),
    (["data.source_classes=[0,1,5]"], "overlap on [5]"),
    (["data.target_classes=[]"], "data.target_classes is empty"),
    (["data.source_classes=[]"], "data.source_classes"),
    (["data.target_train_size=0"], "data.target_train_size"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["trainer.strategy=fsdp"], "trainer.strategy=fsdp"),
    (["trainer.checkpoint_interval_s=-1"], "trainer.checkpoint_interval_s"),
    (["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps"),
    (["trainer=ddp_cpu", "trainer.sync_batchnorm=true"], "trainer.sync_batchnorm"),
])
def test_validate_names_the_key(overrides, needle):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=None) as info:
        validate(cfg)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source_classes", ["[]", "[5,6]"])
def test_scratch_ignores_the_source_split(source_classes):
    """An empty or overlapping source split is an error for a transfer run, not for scratch."""
    with pytest.raises(ConfigError, match="data.source_classes"):
        validate(compose_config([f"data.source_classes={source_classes}"]))
    assert validate(compose_config(["source=scratch", f"data.source_classes={source_classes}"])) is None
