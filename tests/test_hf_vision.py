"""backbone=hf_vision: tiny randomly initialized models of each family, saved to folders as
from_pretrained reads them, checked against the transformers model's own forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, assert_completes_or_refuses, compose_config, options
from transferlab.config import validate
from transferlab.errors import ConfigError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.results import read_results

transformers = pytest.importorskip("transformers")
from transferlab.backbones.hf_vision import IMAGENET_MEAN, IMAGENET_STD, HFVision  # noqa: E402

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)  # not ImageNet's: they can only come from the folder
SIZE = 32
TINY_VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=8)


def cls_token(out):
    return out.last_hidden_state[:, 0]


def pooler(out):
    return out.pooler_output.flatten(1)  # ResNet's is (N, C, 1, 1)


# family: (config, the model's own pooled features, number of blocks)
FAMILIES = {
    "vit": (lambda: transformers.ViTConfig(intermediate_size=32, **TINY_VIT), cls_token, 4),
    "deit": (lambda: transformers.DeiTConfig(intermediate_size=32, **TINY_VIT), cls_token, 4),
    "dinov2": (lambda: transformers.Dinov2Config(mlp_ratio=2, **TINY_VIT), cls_token, 4),
    "dinov2_registers": (lambda: transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2,
                                                                        **TINY_VIT),
                         cls_token, 4),
    "clip": (lambda: transformers.CLIPVisionConfig(intermediate_size=32, **TINY_VIT), pooler, 4),
    "swin": (lambda: transformers.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=8, depths=[1, 1],
                                             num_heads=[1, 2], window_size=4), pooler, 4),
    "convnext": (lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4,
                                                     image_size=SIZE), pooler, 4),
    "convnextv2": (lambda: transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4,
                                                         image_size=SIZE), pooler, 4),
    "resnet": (lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                 layer_type="basic"), pooler, 3),
}


def save(folder, model, processor: dict | None = None):
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved folder per family, with a hand-written preprocessor config."""
    root = tmp_path_factory.mktemp("hf_vision")
    torch.manual_seed(0)
    processor = {"size": {"height": SIZE, "width": SIZE}, "image_mean": list(MEAN), "image_std": list(STD)}
    return {name: save(root / name, transformers.AutoModel.from_config(config()), processor)
            for name, (config, _, _) in FAMILIES.items()}


def reference(folder):
    return transformers.AutoModel.from_pretrained(folder).eval()


def normalized(x: torch.Tensor, size: int = SIZE, mean=MEAN, std=STD) -> torch.Tensor:
    """What the model's image processor would hand it: 3 channels, resized, normalized."""
    x = F.interpolate(x.expand(-1, 3, -1, -1), size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# -- the model's own features -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_features_equal_the_models_own(folders, family):
    _, own, num_blocks = FAMILIES[family]
    backbone = HFVision(str(folders[family]), input_shape=(3, 28, 28)).eval()
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        want = own(reference(folders[family])(pixel_values=normalized(x)))
        got = backbone(x)
    assert backbone.num_blocks == num_blocks and backbone.feature_dim == want.shape[1] == got.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_in_sequence_reproduce_forward(folders, family):
    backbone = HFVision(str(folders[family])).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        h = x
        for block in backbone.blocks:
            h = block(h)
            assert isinstance(h, torch.Tensor)  # block k reads block k-1's output, nothing else
        torch.testing.assert_close(backbone.pool(h), backbone(x))
    # every parameter lives in a block (freeze policies, param groups, the frozen-prefix cache)
    assert {id(p) for p in backbone.parameters()} == {id(p) for p in backbone.blocks.parameters()}
    assert not list(backbone.pool.parameters())


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_another_image_size_interpolates_position_embeddings(folders, family):
    backbone = HFVision(str(folders[family]), image_size=48).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        want = FAMILIES[family][1](reference(folders[family])(pixel_values=normalized(x, 48),
                                                              interpolate_pos_encoding=True))
        torch.testing.assert_close(backbone(x), want, atol=1e-5, rtol=1e-5)
    assert backbone.image_size == (48, 48)


def test_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(intermediate_size=32, **TINY_VIT), projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    backbone = HFVision(str(save(tmp_path / "clip", model))).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model.vision_model(pixel_values=normalized(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)).pooler_output
        torch.testing.assert_close(backbone(x), want, atol=1e-5, rtol=1e-5)
    assert backbone.family == "CLIP vision" and backbone.pooling == "cls"


# -- preprocessing ---------------------------------------------------------------------------------
def test_preprocessing_comes_from_the_folders_processor_config(folders):
    backbone = HFVision(str(folders["convnext"]))
    adapter = backbone.blocks[0].adapter
    assert backbone.image_size == adapter.image_size == (SIZE, SIZE)
    assert backbone.image_mean == adapter.image_mean == MEAN and backbone.image_std == adapter.image_std == STD
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(adapter(x), normalized(x))
    assert not list(adapter.parameters()) and not any("adapter" in k for k in backbone.state_dict())


def test_preprocessing_falls_back_to_the_model_config_and_imagenet(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(intermediate_size=32, **{**TINY_VIT, "image_size": 24})
    folder = save(tmp_path / "bare", transformers.AutoModel.from_config(config))  # no preprocessor config
    backbone = HFVision(str(folder))
    assert backbone.image_size == (24, 24)
    assert backbone.image_mean == IMAGENET_MEAN and backbone.image_std == IMAGENET_STD


def test_crop_size_and_the_image_size_knob(tmp_path, folders):
    folder = tmp_path / "cropped"
    folder.mkdir()
    for f in folders["dinov2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": {"height": 24, "width": 24},
         "image_mean": 0.5, "image_std": 0.25}))  # DINOv2's processor resizes, then crops
    backbone = HFVision(str(folder))
    assert backbone.image_size == (24, 24) and backbone.image_mean == (0.5,) * 3 and backbone.image_std == (0.25,) * 3
    assert HFVision(str(folder), image_size=40).image_size == (40, 40)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_grayscale_is_repeated_to_three_channels(folders, family):
    backbone = HFVision(str(folders[family]), input_shape=(1, 8, 8)).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), backbone(x.expand(-1, 3, -1, -1)))


# -- settings and errors ----------------------------------------------------------------------------
def test_pooling_knob(folders):
    vit = HFVision(str(folders["vit"]), pooling="mean").eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = reference(folders["vit"])(pixel_values=normalized(x)).last_hidden_state
        torch.testing.assert_close(vit(x), tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)  # patches, not CLS
    assert HFVision(str(folders["deit"]), pooling="mean").pool.prefix == 2  # CLS + distillation token
    assert HFVision(str(folders["dinov2_registers"]), pooling="mean").pool.prefix == 3  # CLS + 2 registers
    with pytest.raises(ConfigError, match="backbone.pooling=cls: ResNet .* has no CLS token"):
        HFVision(str(folders["resnet"]), pooling="cls")


def test_scratch_reinitializes(folders):
    backbone = HFVision(str(folders["vit"]))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.reset_parameters()
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    matrices = [k for k, v in before.items() if v.ndim == 2 and k.startswith("blocks.1.")]  # layer 0's Linears
    assert matrices and not any(torch.equal(before[k], after[k]) for k in matrices)


def assert_one_line_error(error_type, name: str, needle: str, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        HFVision(name, **kwargs)
    message = str(info.value)
    assert f"backbone.name={name}" in message and needle in message and "\n" not in message
    return message


def test_missing_model_while_offline_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(TransferlabError, "nobody-here/no-such-vit", "local HF cache (offline)")
    assert_one_line_error(TransferlabError, str(tmp_path / "missing"), "no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(TransferlabError, str(tmp_path / "empty"), "the local folder")


def test_a_text_model_is_not_an_image_model(tmp_path):
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=64)
    folder = save(tmp_path / "bert", transformers.BertModel(config))
    message = assert_one_line_error(ConfigError, str(folder), "bert is not an image model")
    assert "backbone=hf" in message


def test_config_schema_checks_the_knobs(folders):
    overrides = [o for o in FAST if not o.startswith("backbone.")] + ["backbone=hf_vision"]
    cfg = compose_config([*overrides, f"backbone.name={folders['vit']}"])
    assert cfg.backbone.pooling is None and cfg.backbone.image_size is None
    validate(cfg)
    for bad, needle in (("backbone.pooling=max", "choose one of cls, mean"), ("backbone.image_size=0", "must be > 0")):
        with pytest.raises(ConfigError, match=needle):
            validate(compose_config([*overrides, f"backbone.name={folders['vit']}", bad]))


# -- whole runs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,overrides", [
    ("vit", []),
    ("convnext", []),
    ("vit", ["freeze=partial", "freeze.k=2"]),
    ("convnext", ["regularizer=l2sp"]),
])
def test_digits_run_end_to_end(tmp_path, folders, family, overrides):
    # conftest's FAST minus its CNN setting (make_cfg's list sets backbone.channels, which hf_vision lacks)
    cfg = compose_config([o for o in FAST if not o.startswith("backbone.")] + [
        "backbone=hf_vision", f"backbone.name={folders[family]}", f"paths.output_root={tmp_path / 'outputs'}",
        "data.source_train_size=64", "data.target_train_size=64", "source.epochs=1", "target.epochs=1", *overrides])
    run_experiment(cfg, tmp_path / "run")
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed", results["error"]
    m = results["metrics"]
    numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert all(math.isfinite(v) for v in numbers.values()), {k: v for k, v in numbers.items() if not math.isfinite(v)}
    assert 0 <= m["target/test_acc"] <= 1 and m["source/test_acc_before"] is not None
    if "freeze=partial" in overrides:
        assert m["params/trainable"] < m["params/total"]


@pytest.mark.slow  # 17 short runs: every freeze policy and every regularizer on a tiny ViT (CI runs them)
@pytest.mark.parametrize("group, option", [("freeze", o) for o in options("freeze")]
                         + [("regularizer", o) for o in options("regularizer")])
def test_every_freeze_policy_and_regularizer_composes_with_hf_vision(folders, tmp_path, group, option):
    overrides = [o for o in FAST if not o.startswith("backbone.")] + [
        "backbone=hf_vision", f"backbone.name={folders['vit']}", f"{group}={option}", "source.epochs=1",
        "target.epochs=2", "data.source_train_size=60", "data.target_train_size=60", f"paths.output_root={tmp_path}",
        *(["freeze.probe_epochs=1"] if option == "lp_ft" else [])]  # LP-FT: 1 probe + 1 full epoch
    assert_completes_or_refuses(compose_config(overrides), tmp_path / "run")
