"""Freeze policies, run through a real Lightning fit on digits: frozen blocks do not move
(weights nor BatchNorm statistics), trainable ones do, param groups never change."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from conftest import compose_config
from transferlab.backbones.cnn import SmallCNN
from transferlab.data import make_transfer_data
from transferlab.data.loaders import make_loader
from transferlab.errors import ConfigError
from transferlab.freeze.linear_probe import LinearProbe
from transferlab.freeze.lp_ft import LinearProbeThenFinetune
from transferlab.freeze.partial import PartialFreeze
from transferlab.heads import classification_head
from transferlab.stages.module import TaskModule


class EpochSnapshots(pl.Callback):
    """Backbone state at the start of every epoch and at the end, plus the optimizer's groups."""

    def __init__(self):
        self.states, self.group_sizes = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})
        self.group_sizes.append([len(g["params"]) for g in trainer.optimizers[0].param_groups])

    def on_fit_end(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.backbone.state_dict().items()})


def fit(policy, epochs=3):
    torch.manual_seed(0)
    cfg = compose_config(["data.target_train_size=100"])
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0, with_source=False)
    backbone = SmallCNN(data.input_shape, channels=[8, 16, 16])
    head = classification_head(backbone.feature_dim, 5)
    module = TaskModule(backbone, head, stage="target", lr=1e-2)
    snaps = EpochSnapshots()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[policy, snaps], num_sanity_val_steps=0)
    head_before = head.weight.detach().clone()
    trainer.fit(module, make_loader(data.target.train, 32, shuffle=True), make_loader(data.target.val, 64, shuffle=False))
    assert not torch.equal(head.weight, head_before), "the head always trains"
    assert all(sizes == snaps.group_sizes[0] for sizes in snaps.group_sizes), "param groups must stay fixed"
    assert len(snaps.group_sizes[0]) == 4  # one group per block + the head
    return backbone, snaps.states


def block_keys(backbone, i):
    return [k for k in backbone.state_dict() if k.startswith(f"blocks.{i}.")]


def moved(states, a, b, keys):
    return {k for k in keys if not torch.equal(states[a][k], states[b][k])}


def test_linear_probe_keeps_backbone_and_batchnorm_statistics():
    backbone, states = fit(LinearProbe())
    everything = list(states[0])
    assert any("running_mean" in k for k in everything)
    assert moved(states, 0, -1, everything) == set()
    assert all(p.requires_grad for p in backbone.parameters()), "the shared backbone is handed back trainable"


def test_partial_freezes_exactly_the_first_k_blocks():
    backbone, states = fit(PartialFreeze(k=2))
    for i in (0, 1):
        assert moved(states, 0, -1, block_keys(backbone, i)) == set()
    last = block_keys(backbone, 2)
    assert moved(states, 0, -1, last) == set(last)  # weights and BN statistics of block 2 all move


def test_lp_ft_probes_then_finetunes():
    backbone, states = fit(LinearProbeThenFinetune(probe_epochs=2), epochs=4)
    everything = list(states[0])
    assert moved(states, 0, 2, everything) == set(), "epochs 0-1 are a linear probe"
    assert moved(states, 2, 3, everything) == set(everything), "from epoch 2 on, everything trains"


def test_freeze_k_larger_than_backbone_names_the_key():
    with pytest.raises(ConfigError, match=r"freeze.k=4: the backbone has 3 blocks"):
        PartialFreeze(k=4).check(num_blocks=3, epochs=5)
    with pytest.raises(ConfigError, match=r"freeze.probe_epochs=5"):
        LinearProbeThenFinetune(probe_epochs=5).check(num_blocks=3, epochs=5)


def test_always_frozen_is_what_every_epoch_freezes():
    assert LinearProbeThenFinetune(probe_epochs=2).always_frozen(3, epochs=4) == set()
    assert PartialFreeze(k=2).always_frozen(3, epochs=4) == {0, 1}
    assert LinearProbe().always_frozen(3, epochs=1) == {0, 1, 2}


def optimizer_groups(policy, num_blocks: int, lr: float) -> list[dict]:
    """The param groups TaskModule builds for a CNN of `num_blocks` blocks under `policy`."""
    backbone = SmallCNN((1, 8, 8), channels=[4] * num_blocks)
    policy.check(backbone.num_blocks, epochs=1)
    module = TaskModule(backbone, classification_head(backbone.feature_dim, 3), stage="target", lr=lr,
                        lr_scales=policy.lr_scales(backbone.num_blocks))
    return module.configure_optimizers().param_groups


@pytest.mark.parametrize("decay", [0.8, 0.5])
def test_llrd_param_group_lrs_follow_the_formula(decay):
    from transferlab.freeze.llrd import LayerwiseLRDecay

    policy = LayerwiseLRDecay(decay)
    groups = optimizer_groups(policy, num_blocks=4, lr=0.01)
    max_depth = 4  # the head
    expected = [0.01 * decay ** (max_depth - depth) for depth in range(4)] + [0.01]
    assert [g["lr"] for g in groups] == pytest.approx(expected)
    assert [g["name"] for g in groups][-1] == "head" and policy.always_frozen(4, 3) == set()


def test_llrd_decay_out_of_range_names_the_key():
    from transferlab.freeze.llrd import LayerwiseLRDecay

    with pytest.raises(ConfigError, match=r"freeze.decay=1.5"):
        LayerwiseLRDecay(1.5).check(3, 1)


# -- BitFit ----------------------------------------------------------------------------------------
def test_bitfit_moves_only_biases_and_hands_the_backbone_back_trainable():
    from transferlab.freeze.bitfit import BitFit

    backbone, states = fit(BitFit())
    params = dict(backbone.named_parameters())
    biases = {k for k in params if k.endswith(".bias")}
    assert biases and len(biases) < len(params)
    assert moved(states, 0, -1, params) == biases  # every bias moved, no other weight did
    assert all(p.requires_grad for p in backbone.parameters())


def test_bitfit_counts_biases_and_head_as_trainable(make_cfg, tmp_path):
    from transferlab.experiment import run_experiment

    cfg = make_cfg("freeze=bitfit", "source=scratch", "target.epochs=1")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    backbone = instantiate(cfg.backbone, input_shape=(1, 8, 8))
    biases = sum(m_.bias.numel() for m_ in backbone.modules() if getattr(m_, "bias", None) is not None)
    head = backbone.feature_dim * 5 + 5
    assert m["params/trainable"] == biases + head < m["params/total"]


# -- gradual unfreezing (ULMFiT) -------------------------------------------------------------------
def test_gradual_unfreezes_one_block_per_epoch_from_the_top():
    from transferlab.freeze.gradual import GradualUnfreeze

    policy = GradualUnfreeze(lr_factor=2.6)
    assert [policy.frozen_blocks(e, 3) for e in range(4)] == [{0, 1}, {0}, set(), set()]
    assert policy.always_frozen(3, epochs=2) == {0}  # block 0 never joins in 2 epochs
    backbone, states = fit(policy, epochs=3)  # 3 blocks: SmallCNN(channels=[8, 16, 16])
    for epoch in range(3):
        frozen = policy.frozen_blocks(epoch, 3)
        for i in range(3):
            keys = block_keys(backbone, i)
            # state at the start of `epoch` vs the start of the next (or fit end)
            assert moved(states, epoch, epoch + 1, keys) == (set() if i in frozen else set(keys)), (epoch, i)


@pytest.mark.parametrize("factor", [2.6, 1.5])
def test_gradual_param_group_lrs_follow_the_formula(factor):
    from transferlab.freeze.gradual import GradualUnfreeze

    groups = optimizer_groups(GradualUnfreeze(factor), num_blocks=4, lr=0.01)
    n = 4
    expected = [0.01 * factor ** -(n - 1 - i) for i in range(n)] + [0.01]
    assert [g["lr"] for g in groups] == pytest.approx(expected)


def test_gradual_lr_factor_below_one_names_the_key():
    from transferlab.freeze.gradual import GradualUnfreeze

    with pytest.raises(ConfigError, match=r"freeze.lr_factor=0.5"):
        GradualUnfreeze(0.5).check(3, 1)
