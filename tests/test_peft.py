"""freeze=peft: any peft adapter config as a `_target_` node. Its LoRA default injects exactly what
freeze=lora does; DoRA and IA3 (freeze=dora, freeze=ia3) on MiniLM and tiny GPT-2 / Llama decoders
train only their adapters (counted against peft's own count) and the head; the whole peft config is
in the settings and the adapter part of cache keys, so a changed adapter setting gets its own EWC
statistics; the config node's keys are checked against peft's signature."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config
from transferlab.backbones.cnn import SmallCNN
from transferlab.backbones.minilm import MiniLM
from transferlab.config import validate
from transferlab.errors import ConfigError
from transferlab.experiment import build, run_experiment
from transferlab.freeze.lora import LoRA
from transferlab.freeze.peft import BOOKKEEPING, PeftAdapters

peft = pytest.importorskip("peft")
HIDDEN = 384  # MiniLM's width; its feedforward is 1536 wide


def option(name: str, **config) -> PeftAdapters:
    """conf/freeze/<name>.yaml as Hydra builds it, with config fields overridden."""
    node = OmegaConf.load(CONF_DIR / "freeze" / f"{name}.yaml")
    for key, value in config.items():
        node.config[key] = value
    return instantiate(node)


def minilm() -> MiniLM:
    torch.manual_seed(0)
    return MiniLM(num_layers=1)


def adapted(policy, backbone, seed=0):
    policy.check_backbone(backbone)
    policy.adapt_backbone(backbone, seed=seed)
    return backbone


def peft_count(backbone, config) -> int:
    """peft's own count of what trains under `config`, on a fresh copy through get_peft_model."""
    return peft.get_peft_model(backbone, dataclasses.replace(config)).get_nb_trainable_parameters()[0]


def test_freeze_peft_defaults_to_what_freeze_lora_injects():
    policy = option("peft", lora_dropout=0.0)
    assert isinstance(policy.config, peft.LoraConfig) and type(policy).__name__ == "PeftAdapters"
    lora = adapted(LoRA(r=8, alpha=16, dropout=0.0), minilm())
    general = adapted(policy, minilm())
    assert sorted(policy.resolve(general).target_modules) == ["query", "value"]  # the same default by architecture
    a, b = lora.state_dict(), general.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same adapters, the same seed
    assert policy.trainable_backbone_params(general, 1) == 2 * 8 * (HIDDEN + HIDDEN)


def test_adapter_settings_hold_the_whole_peft_config():
    policy = option("dora")
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)} - set(BOOKKEEPING) - {"runtime_config"}
    given = policy.settings["config"]  # the recorded __init__ argument, as plain values
    assert set(given) == fields | {"_target_"} and given["_target_"] == "peft.LoraConfig"
    assert given["use_dora"] is True and given["r"] == 8 and given["target_modules"] is None
    policy.check_backbone(minilm())
    settings = policy.adapter_settings()["peft"]
    assert set(settings) == set(given)
    assert settings["target_modules"] == ["query", "value"]  # resolved before it is keyed
    assert {k: v for k, v in settings.items() if k != "target_modules"} == \
           {k: v for k, v in given.items() if k != "target_modules"}
    assert json.loads(json.dumps(settings)) == settings  # plain JSON: enums by value, sets sorted
    # any field, not only the four LoRA ever had, changes the adapter settings
    for field, value in [("use_rslora", True), ("init_lora_weights", "gaussian"), ("use_dora", False),
                         ("lora_dropout", 0.2), ("layers_to_transform", [0])]:
        other = option("dora", **{field: value})
        other.check_backbone(minilm())
        assert other.adapter_settings() != policy.adapter_settings(), field
        assert other.adapter_settings()["peft"][field] == value
    # freeze=lora keeps its own form: earlier runs' cache keys hold it
    lora = LoRA(r=8, alpha=16, dropout=0.1)
    lora.check_backbone(minilm())
    assert lora.adapter_settings() == {"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}}
    assert lora.settings == {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": None}


@pytest.mark.parametrize("name", ["peft", "dora", "ia3"])
def test_the_options_validate_and_their_config_keys_are_checked(name):
    validate(compose_config([f"freeze={name}"]))
    with pytest.raises(ConfigError, match=r"freeze.config.lora_alpah: .*did you mean freeze.config.lora_alpha"):
        validate(compose_config(["freeze=peft", "+freeze.config.lora_alpah=3"]))
    # a value peft refuses: one line naming the node, when the run builds its components (before any stage)
    with pytest.raises(ConfigError, match=r"^freeze.config: ValueError: .*feedforward_modules"):
        build(compose_config(["freeze=ia3", "freeze.config.target_modules=[key]",
                              "freeze.config.feedforward_modules=[output.dense]"]).freeze)


def test_adapters_need_named_layers():
    with pytest.raises(ConfigError, match=r"freeze.config.target_modules=null: SmallCNN .*transformer backbone"):
        option("ia3").check_backbone(SmallCNN((1, 8, 8), channels=[4]))
    with pytest.raises(ConfigError, match=r"freeze.config.target_modules=\['nothing'\]: MiniLM has no module"):
        option("dora", target_modules=["nothing"]).check_backbone(minilm())
    with pytest.raises(ConfigError, match=r"freeze.config.inference_mode=true"):
        option("peft", inference_mode=True).check_backbone(minilm())


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_dora_and_ia3_on_minilm_keep_the_function_and_train_only_adapters(name):
    plain = minilm().eval()
    policy = option(name)
    backbone = adapted(policy, minilm()).eval()
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():  # at injection: DoRA's B = 0 with m = ‖W‖; IA3's vectors are ones
        torch.testing.assert_close(backbone(batch), plain(batch))
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.named_parameters() if policy.prefix in n}
    count = policy.trainable_backbone_params(backbone, 1)
    # by hand: DoRA r·(in + out) + a magnitude per output on query and value; IA3 a vector per
    # output of key and value, per input of the two feedforward-like output.dense layers (384, 1536)
    assert count == {"dora": 2 * (8 * (HIDDEN + HIDDEN) + HIDDEN), "ia3": 2 * HIDDEN + HIDDEN + 4 * HIDDEN}[name]
    assert count == peft_count(minilm(), policy.resolve(backbone))


@pytest.mark.parametrize("name", ["dora", "ia3"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dora_and_ia3_on_tiny_decoders(name, family):
    from test_decoder import TEXTS, batch_of, tiny_decoder
    from transferlab.backbones.minilm import minilm_path
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    policy = option(name)
    backbone = adapted(policy, tiny_decoder(family, tokenizer))
    config = policy.resolve(backbone)
    if family == "gpt2":  # transformers' Conv1D: peft must read it transposed
        assert config.fan_in_fan_out is True
    assert policy.trainable_backbone_params(backbone, 1) == peft_count(tiny_decoder(family, tokenizer), config) > 0
    batch, y = batch_of(tokenizer, TEXTS, "left"), torch.tensor([0, 1, 2, 0])
    head = torch.nn.Linear(64, 3)
    torch.nn.functional.cross_entropy(head(backbone.train()(batch)), y).backward()
    for n, p in backbone.named_parameters():  # gradients reach the adapters and nothing else
        assert (p.grad is not None) == (policy.prefix in n), n


# -- whole runs ---------------------------------------------------------------------------------------
def run_cfg(tmp_path, *overrides):
    return compose_config([
        "experiment=tweets_domain_shift", "logger=csv", f"paths.output_root={tmp_path / 'outputs'}",
        "backbone.num_layers=1", "data.source_train_size=48",
        "data.target_train_size=48", "data.val_fraction=0.005", "data.test_fraction=0.005", "data.max_length=32",
        "source.epochs=1", "target.epochs=1", "source.batch_size=16", "target.batch_size=16", "target.lr=1e-3",
        *overrides])


def assert_kept_the_pretrained_weights(saved: dict, adapter: str) -> None:
    """Every pretrained MiniLM weight bit-identical in the saved target backbone after the fit (a
    wrapped layer keeps its own under base_layer); `adapter` names the entries that are not the base."""
    pretrained = MiniLM(num_layers=1).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in saved.items() if adapter not in k}
    assert set(base) == set(pretrained)
    for name, value in pretrained.items():
        assert torch.equal(base[name], value), name


def test_an_ia3_run_trains_only_its_vectors_and_the_head(tmp_path):
    m = run_experiment(run_cfg(tmp_path, "freeze=ia3", "source=pretrained"), tmp_path / "run")["metrics"]
    head = HIDDEN * 3 + 3
    assert m["params/trainable"] == 2 * HIDDEN + HIDDEN + 4 * HIDDEN + head
    saved = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)["backbone"]
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in saved.items() if "ia3_l" in k)  # they trained
    assert_kept_the_pretrained_weights(saved, "ia3_l")  # and nothing else did


def test_a_dora_run_trains_only_its_adapters_and_the_head(tmp_path):
    m = run_experiment(run_cfg(tmp_path, "freeze=dora", "freeze.config.r=4", "source=pretrained", "regularizer=l2sp"),
                       tmp_path / "run")["metrics"]
    # DoRA r = 4 on query and value: r·(in + out) + a magnitude per output each, plus the head
    assert m["params/trainable"] == 2 * (4 * (HIDDEN + HIDDEN) + HIDDEN) + HIDDEN * 3 + 3
    saved = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)["backbone"]
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: they trained
    assert_kept_the_pretrained_weights(saved, "lora_")  # and nothing else did (the magnitudes are lora_ too)


@pytest.mark.slow  # three end-to-end runs: CI runs it (.ci/run)
def test_a_changed_adapter_setting_gets_its_own_ewc_statistics(tmp_path):
    first = run_experiment(run_cfg(tmp_path, "freeze=peft", "freeze.config.r=4", "regularizer=ewc"), tmp_path / "a")
    again = run_experiment(run_cfg(tmp_path, "freeze=peft", "freeze.config.r=4", "regularizer=ewc"), tmp_path / "b")
    other = run_experiment(run_cfg(tmp_path, "freeze=peft", "freeze.config.r=4", "+freeze.config.use_rslora=true",
                                   "regularizer=ewc"), tmp_path / "c")
    first, again, other = first["metrics"], again["metrics"], other["metrics"]
    assert first["params/trainable"] == 2 * 4 * (HIDDEN + HIDDEN) + HIDDEN * 3 + 3
    assert first["cache/ewc_statistics_hit"] is False and again["cache/ewc_statistics_hit"] is True
    assert again["target/test_acc"] == first["target/test_acc"]
    # the same source stage, one adapter setting LoRA never had changed (the scaling: α/√r, not α/r): its own Fisher
    assert other["cache/source_hit"] is True and other["cache/ewc_statistics_hit"] is False
    entries = [p for p in (tmp_path / "outputs" / "cache" / "method_statistics").iterdir() if p.is_dir()]
    assert len(entries) == 2
