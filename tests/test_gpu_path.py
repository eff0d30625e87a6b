"""The GPU path (trainer=gpu), checked on the CPU where it can be: the pin_memory flag reaches the
stages' loaders, regularizer statistics follow the parameters' device, evaluation and the Fisher
move CPU batches to the model's device, and an HF encoder builds from a config without files.
Tests that need CUDA skip cleanly without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_config
from transferlab.method import MethodContext
from transferlab.backbones.cnn import SmallCNN
from transferlab.data.loaders import make_loader
from transferlab.regularizers.base import sum_of_squares
from transferlab.regularizers.ewc import EWC
from transferlab.regularizers.fisher import diagonal_fisher
from transferlab.regularizers.l2 import L2
from transferlab.regularizers.l2sp import L2SP
from transferlab.tasks import Classification, to_device
from transferlab.stages.trainer import stage_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(seed=0):
    torch.manual_seed(seed)
    backbone = SmallCNN((1, 8, 8), channels=[4, 6])
    return backbone, nn.Linear(backbone.feature_dim, 3)


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- config and loaders -------------------------------------------------------------------------
def test_trainer_gpu_is_bf16_pinned_and_not_deterministic():
    t = compose_config(["trainer=gpu"]).trainer
    assert (t.accelerator, t.devices, t.precision, t.deterministic, t.pin_memory) == ("gpu", 1, "bf16-mixed", False, True)
    assert compose_config([]).trainer.pin_memory is False  # the CPU default does not pin
    assert stage_device(t) == torch.device("cuda") and stage_device(compose_config([]).trainer) == torch.device("cpu")


@pytest.mark.parametrize("pin", [False, True])
def test_make_loader_passes_pin_memory_to_the_dataloader(pin):
    assert make_loader(batch(), 4, shuffle=True, pin_memory=pin).pin_memory is pin


@pytest.mark.parametrize("stage", ["source", "target"])
def test_stages_build_their_loaders_with_trainer_pin_memory(monkeypatch, tmp_path, stage):
    """cfg.trainer.pin_memory reaches the train and val loaders of both stages (stopped before fit)."""
    from hydra.utils import instantiate

    import transferlab.stages.source as source_stage
    import transferlab.stages.target as target_stage
    import transferlab.stages.trainer as trainer_module
    from transferlab.data import make_transfer_data

    cfg = compose_config(["logger=none", "trainer.pin_memory=true", "regularizer=none", "freeze=full"])
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0)
    backbone = instantiate(cfg.backbone, input_shape=data.input_shape)
    seen = []

    class Stop(Exception):
        pass

    def spy(split, batch_size, *, shuffle, seed=0, pin_memory=False, **sharding):
        seen.append(pin_memory)
        if len(seen) == 2:
            raise Stop

    monkeypatch.setattr(trainer_module, "make_loader", spy)  # fit_stage builds both stages' loaders
    with pytest.raises(Stop):
        if stage == "source":
            source_stage.train_source(cfg, data, backbone, tmp_path)
        else:
            target_stage.train_target(cfg, data, backbone, instantiate(cfg.freeze), [instantiate(cfg.regularizer)],
                                      tmp_path, loggers=[])
    assert seen == [True, True]


# -- regularizers: statistics and penalties follow the parameters -------------------------------
def test_ewc_moves_cpu_statistics_to_the_parameters_dtype_and_device():
    """The cache hands the Fisher over on the CPU; attach (at fit start, after Lightning moved the
    backbone) must put Fisher and anchors where the parameters are. Here: float64 parameters stand
    in for another device, which `.to(p)` handles the same way."""
    backbone, head = small_model()
    fisher = {n: torch.ones_like(p) for n, p in backbone.named_parameters()}
    ewc = EWC(lam=1.0)
    ewc.use_statistics(fisher, MethodContext(backbone=backbone))
    backbone.double(), head.double()  # what Lightning's .to(device) does, in a way a CPU can show
    ewc.attach(MethodContext(backbone=backbone, head=head))
    for p, f, a in zip(backbone.parameters(), ewc.fisher, ewc.anchors):
        assert (f.dtype, f.device, a.dtype, a.device) == (p.dtype, p.device, p.dtype, p.device)
    x, y = batch()
    nn.functional.cross_entropy(head(backbone(x.double())), y).backward()
    ewc.add_penalty_grad_()  # mixed dtypes would raise in the fused foreach op
    first = next(backbone.parameters())
    with torch.no_grad():
        first.add_(0.1)
    # λ/2 Σ F (w − w*)² with F = 1: only the first tensor moved, each entry by 0.1
    assert ewc.penalty().dtype == torch.float64
    assert float(ewc.penalty()) == pytest.approx(0.5 * 0.1 ** 2 * first.numel(), rel=1e-9)


def test_ewc_penalty_is_the_fused_form_of_the_written_out_sum():
    backbone, head = small_model()
    g = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in backbone.named_parameters()}
    ewc = EWC(lam=2.0)
    ewc.use_statistics(fisher, MethodContext(backbone=backbone))
    ewc.attach(MethodContext(backbone=backbone, head=head))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    by_hand = sum((f * (p - a).square()).sum() for p, a, f in zip(ewc.shared, ewc.anchors, ewc.fisher))
    torch.testing.assert_close(ewc.penalty(), (2.0 / 2 * by_hand).detach(), rtol=1e-5, atol=1e-7)
    for p in backbone.parameters():
        p.requires_grad_(False)
    assert ewc.penalty().item() == 0.0  # nothing trains: no penalty, on the parameters' device


def test_penalties_with_nothing_trainable_are_zero_on_the_parameters_device():
    backbone, head = small_model()
    l2, l2sp = L2(alpha=1.0), L2SP(alpha=1.0, beta=0.0)
    l2.attach(MethodContext(backbone=backbone, head=head)), l2sp.attach(MethodContext(backbone=backbone, head=head))
    for p in [*backbone.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    for value in (l2.penalty(), l2sp.penalty()):
        assert value.item() == 0.0 and value.device == next(backbone.parameters()).device
    assert sum_of_squares([], device=torch.device("cpu")).device == torch.device("cpu")


# -- evaluation and the Fisher put batches on the model's device --------------------------------
class DeviceSpy(nn.Module):
    """A tiny model that records the device of every input it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(x["input_ids"].device if isinstance(x, dict) else x.device)
        return self.linear(x["input_ids"].float() if isinstance(x, dict) else x)


def test_to_device_moves_tensor_and_dict_batches():
    x, y = to_device(({"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4)}, torch.zeros(2)), "cpu")
    assert set(x) == {"input_ids", "attention_mask"} and y.device.type == "cpu"


def test_accuracy_and_fisher_read_the_model_device(monkeypatch):
    """Both ask the model where it lives and move each batch there (CPU here: the call is there)."""
    import transferlab.regularizers.fisher as fisher_module
    import transferlab.tasks as evaluate

    calls = []
    real = evaluate.to_device

    def spy(batch, device):
        calls.append(torch.device(device))
        return real(batch, device)

    monkeypatch.setattr(evaluate, "to_device", spy)
    monkeypatch.setattr(fisher_module, "to_device", spy)
    model = DeviceSpy()
    loader = make_loader((torch.rand(10, 4), torch.randint(0, 2, (10,))), 4, shuffle=False)
    Classification(2).evaluate(model, loader)
    diagonal_fisher(model, dict(model.named_parameters()), loader)
    assert calls == [torch.device("cpu")] * 6


# -- HF encoder from a config -------------------------------------------------------------------
def test_hf_encoder_from_config_needs_no_files():
    transformers = pytest.importorskip("transformers")
    from transferlab.backbones.hf import HFEncoder

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    encoder = HFEncoder.from_config(config, pooling="cls")
    assert encoder.num_blocks == 3 and encoder.feature_dim == 32 and encoder.tokenizer is None
    assert not encoder.pretrained and HFEncoder.pretrained and encoder.training
    ids = torch.randint(0, 100, (3, 7))
    out = encoder({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert out.shape == (3, 32)


# -- CUDA only ----------------------------------------------------------------------------------
@cuda
def test_pinned_loader_batches_are_page_locked():
    x, y = next(iter(make_loader(batch(), 4, shuffle=False, pin_memory=True)))
    assert x.is_pinned() and y.is_pinned()


@cuda
def test_ewc_and_l2sp_statistics_follow_the_backbone_to_cuda():
    backbone, head = small_model()
    ewc = EWC(lam=1.0)
    ewc.use_statistics({n: torch.ones_like(p) for n, p in backbone.named_parameters()}, MethodContext(backbone=backbone))
    backbone.cuda(), head.cuda()
    l2sp = L2SP(alpha=0.1, beta=0.01)
    for reg in (ewc, l2sp):
        reg.attach(MethodContext(backbone=backbone, head=head))
    x, y = batch()
    nn.functional.cross_entropy(head(backbone(x.cuda())), y.cuda()).backward()
    for reg in (ewc, l2sp):
        reg.add_penalty_grad_()
        assert reg.penalty().device.type == "cuda"
    assert all(t.is_cuda for t in [*ewc.fisher, *ewc.anchors, *l2sp.anchors])


@cuda
def test_accuracy_runs_a_cuda_model_on_cpu_batches():
    backbone, head = small_model()
    model = nn.Sequential(backbone, head).cuda()
    x, y = batch()
    assert 0.0 <= Classification(3).evaluate(model, make_loader((x, y), 8, shuffle=False))["acc"] <= 1.0


@cuda
def test_a_transfer_run_with_ewc_completes_on_cuda(make_cfg, tmp_path):
    """trainer=gpu end to end: source fit, test evaluation and the Fisher on the GPU (Lightning
    leaves the model on the CPU after fit), EWC statistics moved to the device, target fit."""
    from transferlab.experiment import run_experiment

    results = run_experiment(make_cfg("trainer=gpu", "regularizer=ewc"), tmp_path / "run")
    assert results["status"] == "completed", results.get("error")
    m = results["metrics"]
    assert 0.0 <= m["target/test_acc"] <= 1.0 and 0.0 <= m["source/test_acc_after"] <= 1.0
    assert m["cache/ewc_statistics_hit"] is False
