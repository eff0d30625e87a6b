"""The backbone API (issue 25, item 2; timm's `forward_intermediates` is the model): every
backbone returns chosen blocks' outputs in one pass and runs forward from block k given block k's
input. Checked against an independent computation: the blocks run one by one for the image
backbones, and transformers' own `output_hidden_states` for the text encoder and decoders."""

from __future__ import annotations

import pytest
import torch

from transferlab.backbones.cnn import SmallCNN
from transferlab.backbones.mlp import MLP

transformers = pytest.importorskip("transformers")
from transferlab.backbones.hf import HFEncoder  # noqa: E402
from transferlab.backbones.hf_causal import HFDecoder  # noqa: E402
from transferlab.backbones.hf_vision import HFVision  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
VISION = {
    "vit": lambda: transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, image_size=32, patch_size=8),
    "swin": lambda: transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                            num_heads=[1, 2], window_size=4),
    "convnext": lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4,
                                                    image_size=32),
    "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                layer_type="basic"),
}


@pytest.fixture(scope="module")
def vision_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    for name, config in VISION.items():
        transformers.AutoModel.from_config(config()).save_pretrained(root / name)
    return root


def image_backbone(name, vision_folders):
    torch.manual_seed(0)
    if name == "cnn":
        return SmallCNN((1, 16, 16), channels=[4, 6, 8])
    if name == "mlp":
        return MLP((1, 16, 16), hidden=[12, 10], dropout=0.1)
    if name == "efficientnet":
        from transferlab.backbones.efficientnet import EfficientNetLite0
        return EfficientNetLite0((1, 16, 16), image_size=32)
    return HFVision(str(vision_folders / name), input_shape=(3, 16, 16))


IMAGE_BACKBONES = ["cnn", "mlp", pytest.param("efficientnet", marks=pytest.mark.slow), *VISION]  # its weights load in ~10 s


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_image_backbones_intermediates_and_forward_from(name, vision_folders):
    backbone = image_backbone(name, vision_folders).eval()
    x = torch.rand(3, 1 if name in ("cnn", "mlp", "efficientnet") else 3, 16, 16)
    n = backbone.num_blocks
    with torch.no_grad():
        want, h = [], backbone.prepare_input(x)
        for block in backbone.blocks:  # the blocks one by one
            h = block(h)
            want.append(h)
        output, got = backbone.forward_intermediates(x, list(range(n)))
        torch.testing.assert_close(output, backbone(x), **TOL)
        torch.testing.assert_close(output, backbone.pool(want[-1]), **TOL)
        for j in range(n):
            torch.testing.assert_close(got[j], want[j], **TOL)
        # stop early: no output, the same inner outputs, in the order asked
        none, (second, first) = backbone.forward_intermediates(x, [1, 0], stop_early=True)
        assert none is None
        torch.testing.assert_close(first, want[0]), torch.testing.assert_close(second, want[1])
        for k in range(1, n + 1):  # from block k on block k's input: the same features
            torch.testing.assert_close(backbone.forward_from(k, backbone.block_input(want[k - 1], x)), output, **TOL)


def ids_and_mask(vocab: int, side: str) -> dict:
    torch.manual_seed(1)
    lengths = torch.tensor([7, 4, 2])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    if side == "left":
        mask = mask.flip(-1)
    return {"input_ids": torch.randint(3, vocab, (3, 7)) * mask, "attention_mask": mask}


def text_model(family: str):
    """(backbone, the same weights as a transformers model): both built from one seed."""
    if family == "bert":
        config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64)
        build = HFEncoder.from_config
    else:
        build = HFDecoder.from_config
        config = (transformers.GPT2Config(vocab_size=200, n_layer=3, n_embd=32, n_head=4, n_positions=16)
                  if family == "gpt2" else
                  transformers.LlamaConfig(vocab_size=200, num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    torch.manual_seed(0)
    backbone = build(config).eval()
    torch.manual_seed(0)
    return backbone, transformers.AutoModel.from_config(config).eval()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_text_intermediates_are_the_models_own_hidden_states(family):
    """transformers' hidden_states: [embeddings, layer 0, ...]; for a decoder its last entry is after
    the final norm (the last layer's own output is not in it: that norm of it is checked instead)."""
    backbone, model = text_model(family)
    batch = ids_and_mask(200, "right")
    real = batch["attention_mask"].bool()
    n = backbone.num_blocks
    with torch.no_grad():
        own = model(**batch, output_hidden_states=True)
        output, got = backbone.forward_intermediates(batch, list(range(n)), pool=False)
    layers = n - 1 if family == "bert" else n - 2
    for j in range(layers + (family == "bert")):
        torch.testing.assert_close(got[j][real], own.hidden_states[j][real], **TOL)
    torch.testing.assert_close(output[real], own.last_hidden_state[real], **TOL)
    torch.testing.assert_close(got[-1][real], own.last_hidden_state[real], **TOL)
    if family != "bert":  # block n-2, the last layer: the final norm of it is the model's output
        torch.testing.assert_close(backbone.blocks[-1](got[-2])[real], own.last_hidden_state[real], **TOL)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_text_forward_from_every_block_gives_the_full_forward(family, side):
    backbone, _ = text_model(family)
    batch = ids_and_mask(200, side)
    real = batch["attention_mask"].bool()
    n = backbone.num_blocks
    with torch.no_grad():
        pooled, tokens = backbone(batch), backbone.token_features(batch)
        _, inner = backbone.forward_intermediates(batch, list(range(n)), pool=False)
        for k in range(1, n + 1):
            x = backbone.block_input(inner[k - 1], batch)
            torch.testing.assert_close(backbone.forward_from(k, x), pooled, **TOL)
            torch.testing.assert_close(backbone.forward_from(k, x, pool=False)[real], tokens[real], **TOL)
            # stopped early at block k-1: the same output as the full pass gave
            _, (early,) = backbone.forward_intermediates(batch, [k - 1], stop_early=True)
            torch.testing.assert_close(early[real], inner[k - 1][real], **TOL)
    if family != "bert":  # the model's own layer list and final norm are back in place
        modules = list(backbone.model.modules())
        assert all(any(m is b for m in modules) for b in backbone.blocks[1:])
        torch.testing.assert_close(backbone(batch), pooled)


@pytest.mark.parametrize("indices", [[], [-1], [3]])
def test_block_indices_outside_the_backbone_are_refused(indices):
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    with pytest.raises(IndexError, match="block indices"):
        backbone.forward_intermediates(torch.rand(1, 1, 8, 8), indices)
