"""The method contract (method.py), the optimizer and schedule groups, and tasks owning their
metrics: each checked against an independent computation from its formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import compose_config
from transferlab.backbones.cnn import SmallCNN
from transferlab.data import make_transfer_data
from transferlab.data.loaders import make_loader
from transferlab.experiment import run_experiment
from transferlab.heads import classification_head
from transferlab.method import MethodContext, Step
from transferlab.optim import factor_curve
from transferlab.regularizers.lwf import LwF
from transferlab.stages.target import target_module
from transferlab.tasks import Classification, TokenClassification, confusion_scores, task_of


def source_stage_of(cfg, run_dir):
    """The run's data, and its source stage (backbone + kept head) loaded from source.pt."""
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0)
    backbone = instantiate(cfg.backbone, input_shape=data.input_shape)
    source = torch.load(run_dir / "checkpoints" / "source.pt", weights_only=True)
    backbone.load_state_dict(source["backbone"])
    head = classification_head(backbone.feature_dim, 5)
    head.load_state_dict(source["head"])
    return data, backbone, head, source


# -- tasks own their metrics ---------------------------------------------------------------------
def test_confusion_scores_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 never predicted
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (true, pred), 1)
    scores = confusion_scores(confusion)
    assert scores["acc"] == accuracy_score(true, pred)
    assert scores["macro_f1"] == pytest.approx(f1_score(true, pred, labels=range(5), average="macro",
                                                        zero_division=0), abs=1e-15)


def test_classification_tally_over_batches_equals_one_pass():
    task = Classification(3)
    logits, y = torch.randn(50, 3), torch.randint(0, 3, (50,))
    tally = task.add(task.add(task.new_tally(), logits[:20], y[:20]), logits[20:], y[20:])
    whole = task.scores(task.add(task.new_tally(), logits, y))
    assert task.scores(tally) == whole
    assert whole["acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_majority_scores():
    assert Classification(3).majority_score(torch.tensor([0, 2, 2, 1]), torch.tensor([2, 2, 0, 1, 2])) == 0.6
    assert TokenClassification(["O", "B-x"]).majority_score(None, None) == 0.0


def test_results_json_carries_the_task_block(make_cfg, tmp_path):
    results = run_experiment(make_cfg("source.epochs=1", "target.epochs=1"), tmp_path / "run")
    task = json.loads((tmp_path / "run" / "results.json").read_text())["task"]
    assert task == results["task"] and task["kind"] == "classification" and task["primary_metric"] == "acc"
    data = make_transfer_data(instantiate(make_cfg().data.dataset), make_cfg().data, seed=0)
    test_y = data.target.test[1].numpy()
    majority = np.bincount(data.target.train[1].numpy()).argmax()
    assert task["majority_test"] == pytest.approx(float((test_y == majority).mean()))
    assert "target/test_acc" in results["metrics"] and "target/val_acc" in results["metrics"]


def test_transferability_scores_come_from_the_start_of_target_features(make_cfg, tmp_path):
    """Recomputed by hand: the source stage's backbone in eval mode on the target training set,
    the kept source head's softmax for LEEP / NCE."""
    from transferlab.transferability import transferability_scores

    cfg = make_cfg("source.epochs=1", "target.epochs=1")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    data, backbone, head, _ = source_stage_of(cfg, tmp_path / "run")
    with torch.no_grad():
        features = backbone.eval()(data.target.train[0])
        expected = transferability_scores(features, data.target.train[1], torch.softmax(head(features), -1))
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    scratch = run_experiment(make_cfg("source=scratch", "target.epochs=1"), tmp_path / "scratch")["metrics"]
    assert "transferability/logme" in scratch and "transferability/leep" not in scratch  # no source head


# -- optimizer and schedule groups ---------------------------------------------------------------
class RecordRates(pl.Callback):
    def __init__(self):
        self.rates = []  # per optimizer step: {group name: lr}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append({g["name"]: g["lr"] for g in optimizer.param_groups})


def expected_factor(kind, step, total, warmup, final=0.0):
    """The schedules written out from their definitions (optim.py's docstring)."""
    if step < warmup:
        return step / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    decay = {"constant": 1.0, "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p))}[kind]
    return final + (1 - final) * decay


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_per_group_rates_follow_warmup_decay_and_block_scale(kind):
    """optimizer=sgd scheduler=<kind> warmup_ratio=0.1 with layer-wise LR decay: the rate of group
    (block i) at step s is lr · decay^(num_blocks − i) · factor(s), at every step."""
    cfg = compose_config(["optimizer=sgd", f"scheduler={kind}", "target.scheduler.warmup_ratio=0.1",
                          "freeze=llrd", "freeze.decay=0.5", "target.lr=0.1", "data.target_train_size=160"])
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0, with_source=False)
    backbone = SmallCNN(data.input_shape, channels=[4, 8])
    head = classification_head(backbone.feature_dim, 5)
    freeze = instantiate(cfg.freeze)
    module = target_module(cfg, backbone, head, MethodContext(backbone=backbone, head=head, task=Classification(5)),
                           [freeze], freeze.lr_scales(len(backbone.blocks)))
    record = RecordRates()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[record], num_sanity_val_steps=0)
    trainer.fit(module, make_loader(data.target.train, 32, shuffle=True, with_index=True),
                make_loader(data.target.val, 64, shuffle=False))
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].defaults["momentum"] == 0.9
    total = 3 * 5  # 160 examples / 32 per batch, 3 epochs
    warmup = round(0.1 * total)
    assert len(record.rates) == total and warmup == 2
    for step, rates in enumerate(record.rates):
        factor = expected_factor(kind, step, total, warmup)
        assert rates["head"] == pytest.approx(0.1 * factor, abs=1e-12)
        for i in range(len(backbone.blocks)):
            assert rates[f"block{i}"] == pytest.approx(0.1 * 0.5 ** (len(backbone.blocks) - i) * factor, abs=1e-12)
    assert factor_curve(kind, total, warmup, 0.0)(0) == 0.0  # warmup starts at 0 (the transformers convention)


def test_sgd_cosine_warmup_run_trains_and_changes_the_source_key_only_when_the_source_recipe_changes(make_cfg, tmp_path):
    from transferlab.cache import cache_key
    from transferlab.stage_store import source_settings

    cfg = make_cfg("optimizer=sgd", "scheduler=cosine", "target.scheduler.warmup_ratio=0.1", "target.lr=0.05")
    results = run_experiment(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["metrics"]["target/test_acc"] > 0.5
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0)
    default = cache_key(source_settings(make_cfg(), data))
    assert cache_key(source_settings(cfg, data)) == default  # a target recipe never changes the source stage
    assert cache_key(source_settings(make_cfg("optimizer@source.optimizer=sgd"), data)) != default


def test_a_bad_warmup_is_one_line(make_cfg, tmp_path):
    cfg = make_cfg("scheduler=linear", "target.scheduler.warmup_steps=3", "target.scheduler.warmup_ratio=0.1")
    with pytest.raises(Exception, match="warmup_steps=3 and warmup_ratio=0.1 both set"):
        run_experiment(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


# -- LwF, the contract's proof: statistics on the target data, a module, a loss term -----------
def test_lwf_loss_term_equals_the_formula_value_and_gradient():
    torch.manual_seed(0)
    features, source_head = torch.randn(8, 6), nn.Linear(6, 4)
    teacher = torch.randn(20, 4)
    index = torch.tensor([3, 0, 7, 19, 5, 11, 2, 8])
    lwf = LwF(lam=0.7, temperature=2.5)
    lwf.teacher = teacher
    module = nn.Module()
    module.method_modules = nn.ModuleDict({"source_head": source_head})
    got = lwf.loss_term(Step(None, None, index, features, torch.zeros(8, 3), module))
    # lam · T² · (1/N) Σ_n Σ_c p_t log(p_t / p_s), p = softmax(z / T), written out
    t = 2.5
    p_t = torch.softmax(teacher[index] / t, 1)
    p_s = torch.softmax(source_head(features) / t, 1)
    want = 0.7 * t * t * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    g_got = torch.autograd.grad(got, source_head.weight)[0]
    g_want = torch.autograd.grad(want, source_head.weight)[0]
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)


def test_lwf_run_keeps_the_teacher_fixed_and_trains_the_source_head(make_cfg, tmp_path, monkeypatch):
    seen = []
    real = LwF.loss_term

    def spy(self, step):
        seen.append(self.teacher.clone())
        return real(self, step)

    monkeypatch.setattr(LwF, "loss_term", spy)
    cfg = make_cfg("regularizer=lwf", "regularizer.lam=2.0")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    assert len(seen) > 10 and all(torch.equal(t, seen[0]) for t in seen), "teacher logits change during the stage"
    # The teacher: the kept source head on the target training inputs, at the source weights, eval mode.
    data, backbone, head, source = source_stage_of(cfg, tmp_path / "run")
    with torch.no_grad():
        teacher = head(backbone.eval()(data.target.train[0]))
    torch.testing.assert_close(seen[0], teacher, atol=1e-5, rtol=1e-5)
    target = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)
    assert not torch.equal(target["methods"]["source_head.weight"], source["head"]["weight"]), "source head trains"
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert m["params/trainable"] == m["params/total"] == count(backbone) + 2 * count(head)  # + the source head
    assert m["cache/lwf_statistics_hit"] is False and m["transfer/forgetting"] is not None
    again = run_experiment(make_cfg("regularizer=lwf", "regularizer.lam=0.5"), tmp_path / "again")["metrics"]
    assert again["cache/lwf_statistics_hit"] is True  # lam and T do not change the teacher's logits


def test_lwf_needs_a_source_stage(make_cfg, tmp_path):
    with pytest.raises(Exception, match="regularizer=lwf needs a source stage"):
        run_experiment(make_cfg("regularizer=lwf", "source=scratch"), tmp_path / "run")


def test_task_of_splits():
    class Splits:
        token_level, label_names, num_classes = True, ["O", "B-person", "I-person"], 3

    assert isinstance(task_of(Splits), TokenClassification) and task_of(Splits).primary == "f1"


# -- the baselines: BSS, Co-Tuning, surgical fine-tuning, WiSE-FT -----------------------------------
def test_bss_value_and_gradient_equal_autograd_through_svdvals():
    from transferlab.regularizers.bss import BSS

    torch.manual_seed(0)
    for shape in [(16, 6), (4, 10)]:  # more examples than features, and fewer
        features = torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
        bss = BSS(eta=0.3, k=2)
        got = bss.loss_term(Step(None, None, None, features, None, None))
        sigma = torch.linalg.svdvals(features)  # descending
        want = 0.3 * (sigma[-2:] ** 2).sum()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g_got, = torch.autograd.grad(got, features)
        g_want, = torch.autograd.grad(want, features)
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n, d", [(128, 128), (128, 130), (130, 128), (48, 48)])
def test_bss_holds_the_smallest_singular_values_of_near_square_ill_conditioned_batches(n, d):
    """Near-square batches whose spectrum spans 1e-3..1e2 (condition 1e5; the Gram matrix's 1e10,
    beyond float32): BSS's k smallest σ² equal float64 SVD's of the same float32 features. The
    float32 Gram eigenvalues were off by up to 100% here, once exactly 0."""
    from transferlab.regularizers.bss import BSS

    rng = np.random.default_rng(n + d)
    r = min(n, d)
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    v, _ = np.linalg.qr(rng.standard_normal((d, r)))
    features = torch.tensor((u * np.logspace(2, -3, r)) @ v.T, dtype=torch.float32, requires_grad=True)
    sigma2 = np.linalg.svd(features.detach().numpy().astype(np.float64), compute_uv=False)[::-1] ** 2  # ascending
    got = BSS(eta=1.0, k=3).loss_term(Step(None, None, None, features, None, None))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(sigma2[:3].sum(), rel=1e-5)
    assert sigma2[0] > 0
    g_got, = torch.autograd.grad(got, features)
    f64 = features.detach().double().requires_grad_()
    want = (torch.linalg.svdvals(f64)[-3:] ** 2).sum()  # σ² of the k smallest, through an SVD in float64
    g_want, = torch.autograd.grad(want, f64)
    torch.testing.assert_close(g_got.double(), g_want, atol=1e-6, rtol=1e-4)


def test_co_tuning_relationship_and_loss_match_a_hand_computation():
    from transferlab.regularizers.co_tuning import CoTuning

    torch.manual_seed(0)
    backbone, source_head = nn.Linear(4, 6), nn.Linear(6, 3)
    x, y = torch.randn(30, 4), torch.arange(30) % 2
    source_model = nn.Sequential(backbone, source_head)
    ctx = MethodContext(backbone=backbone, source_model=source_model, source_head=source_head,
                        task=Classification(2), target_loader=lambda: make_loader((x, y), 7, shuffle=False))
    co = CoTuning(lam=1.5)
    co.use_statistics(co.compute_statistics(ctx), ctx)
    probs = torch.softmax(source_model(x), -1).detach()
    hand = torch.stack([probs[y == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(co.relationship, hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(co.relationship.sum(1), torch.ones(2))
    module = nn.Module()
    module.method_modules = nn.ModuleDict({"source_head": source_head})
    features = backbone(x)
    got = co.loss_term(Step(x, y, None, features, torch.zeros(30, 2), module))
    want = 1.5 * torch.stack([-(hand[y[n]] * torch.log_softmax(source_head(features[n]), -1)).sum()
                              for n in range(30)]).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_surgical_trains_only_the_named_blocks(make_cfg, tmp_path):
    cfg = make_cfg("freeze=surgical", "freeze.train_blocks=[1]", "source.epochs=1", "target.epochs=1")
    run_experiment(cfg, tmp_path / "run")
    source = torch.load(tmp_path / "run" / "checkpoints" / "source.pt", weights_only=True)["backbone"]
    target = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)["backbone"]
    moved = {k.split(".")[1] for k in source if not torch.equal(source[k], target[k])}
    assert moved == {"1"}, moved  # blocks.<i>.…: block 1 alone (BatchNorm statistics of block 0 kept)


def test_surgical_block_out_of_range_names_the_key(make_cfg, tmp_path):
    with pytest.raises(Exception, match=r"freeze.train_blocks=\[5\]: block 5 is out of range"):
        run_experiment(make_cfg("freeze=surgical", "freeze.train_blocks=[5]"), tmp_path / "run")


def test_wise_ft_endpoints_reproduce_the_run_and_the_start_weights(make_cfg, tmp_path):
    cfg = make_cfg("evaluate.wise_ft_alphas=[0,0.5,1]")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    assert m["wise_ft/1/target/test_acc"] == m["target/test_acc"]  # α = 1: the fine-tuned model, exactly
    assert m["wise_ft/1/target/test_macro_f1"] == m["target/test_macro_f1"]
    assert m["wise_ft/1/source/test_acc"] == m["source/test_acc_after"]
    # α = 0: the start (source) backbone with the fine-tuned target head, computed by hand
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0)
    backbone = instantiate(cfg.backbone, input_shape=data.input_shape)
    backbone.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "source.pt", weights_only=True)["backbone"])
    head = classification_head(backbone.feature_dim, 5)
    head.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)["head"])
    with torch.no_grad():
        predicted = head(backbone.eval()(data.target.test[0])).argmax(1)
    assert m["wise_ft/0/target/test_acc"] == pytest.approx(float((predicted == data.target.test[1]).float().mean()))
    assert m["wise_ft/0/source/test_acc"] == m["source/test_acc_before"]  # the source model untouched
    best = m["wise_ft/best_alpha"]
    assert m["wise_ft/target/test_acc"] == m[f"wise_ft/{best:g}/target/test_acc"]
    assert m[f"wise_ft/{best:g}/target/val_acc"] == max(m[f"wise_ft/{a}/target/val_acc"] for a in ("0", "0.5", "1"))


def test_wise_ft_alpha_out_of_range_is_one_line(make_cfg, tmp_path):
    with pytest.raises(Exception, match=r"evaluate.wise_ft_alphas=\[0.5, 1.5\]: every α must be in \[0, 1\]"):
        run_experiment(make_cfg("evaluate.wise_ft_alphas=[0.5,1.5]"), tmp_path / "run")


@pytest.mark.parametrize("regularizer", ["bss", "co_tuning"])
def test_new_regularizers_run_end_to_end(make_cfg, tmp_path, regularizer):
    m = run_experiment(make_cfg(f"regularizer={regularizer}", "source.epochs=1", "target.epochs=2"),
                       tmp_path / "run")["metrics"]
    assert m["target/test_acc"] > 0.5 and m["transfer/forgetting"] is not None


def test_regularizers_compose_each_with_its_own_coefficient(make_cfg, tmp_path):
    """L2-SP + BSS as one config: the L2-SP penalty logged as before, BSS's loss term beside it."""
    import csv

    cfg = make_cfg("regularizer=l2sp", "+regularizer@extra_regularizers.bss=bss", "extra_regularizers.bss.eta=0.01",
                   "source.epochs=1", "target.epochs=1", "trainer.log_every_n_steps=1")
    assert cfg.extra_regularizers.bss.eta == 0.01
    run_experiment(cfg, tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "target" / "metrics.csv")))
    assert any(r.get("target/penalty") for r in rows) and any(r.get("target/bss_loss") for r in rows)
    with pytest.raises(Exception, match="extra_regularizers.bss.eta=-1: must be >= 0"):
        from transferlab.config import validate

        validate(make_cfg("+regularizer@extra_regularizers.bss=bss", "extra_regularizers.bss.eta=-1"))


# -- generalization: an out-of-distribution test split --------------------------------------------
def test_ood_shift_is_scored_on_the_shifted_test_split(make_cfg, tmp_path):
    cfg = make_cfg("data.ood_shift={_target_:transferlab.data.shifts.invert}", "source.epochs=1", "target.epochs=1")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=0)
    x, y = data.target.ood_test
    torch.testing.assert_close(x, 1 - data.target.test[0])
    assert torch.equal(y, data.target.test[1])
    backbone = instantiate(cfg.backbone, input_shape=data.input_shape)
    target = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)
    backbone.load_state_dict(target["backbone"])
    head = classification_head(backbone.feature_dim, 5)
    head.load_state_dict(target["head"])
    with torch.no_grad():
        predicted = head(backbone.eval()(x)).argmax(1)
    assert m["target/ood_test_acc"] == pytest.approx(float((predicted == y).float().mean()))
    assert m["data/target_ood_test_size"] == len(y)


def test_ood_domains_are_held_out_domains_of_the_target_classes():
    from omegaconf import OmegaConf

    from transferlab.data import LabelledPool

    rng = np.random.default_rng(0)
    domain = np.repeat([0, 1, 2], 200)
    y = rng.integers(0, 3, 600)
    x = np.stack([np.full((2,), d, dtype=np.float32) for d in domain])  # an example's pixels name its domain
    pool = LabelledPool(x, y, None, None, ["a", "b", "c"], "toy", domain_train=domain, domain_names=["d0", "d1", "d2"])
    cfg = compose_config(["data.source_classes=[0,1,2]", "data.target_classes=[0,1,2]", "data.source_domains=[d0]",
                          "data.target_domains=[d1]", "data.ood_domains=[d2]", "data.ood_test_size=50"]).data
    data = make_transfer_data(pool, cfg, seed=0)
    ox, oy = data.target.ood_test
    assert len(oy) == 50 and torch.all(ox == 2) and set(oy.tolist()) <= {0, 1, 2}
    overlapping = OmegaConf.merge(cfg, {"ood_domains": ["d0"]})
    with pytest.raises(Exception, match=r"data.ood_domains=\['d0'\]: \['d0'\] also train the source or the target"):
        make_transfer_data(pool, overlapping, seed=0)
