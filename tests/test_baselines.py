"""DELTA and model soups, against hand computations from their papers' definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferlab.backbones.cnn import SmallCNN
from transferlab.data.loaders import make_loader
from transferlab.experiment import run_experiment
from transferlab.method import MethodContext, Step
from transferlab.regularizers.delta import DELTA
from transferlab.soup import average, make_soups
from transferlab.tasks import Classification


def at_start(**fields) -> MethodContext:
    """A context as the target stage hands it to a method that `uses_start_weights`: taken."""
    ctx = MethodContext(**fields)
    ctx.take_start_weights()
    return ctx


def block_output(backbone, x, j, zero_channel=None):
    """Block j's output computed by running the blocks one by one (no hooks)."""
    for i, block in enumerate(backbone.blocks[: j + 1]):
        x = block(x)
    if zero_channel is not None:
        x = x.clone()
        x[:, zero_channel] = 0
    return x


def delta_step(delta, backbone, head, x, y=None, index=None) -> Step:
    """A training step as TaskModule makes it for DELTA: one forward that returns the blocks it reads."""
    blocks = delta.reads_blocks(backbone)
    features, outputs = backbone.forward_intermediates(x, blocks)
    return Step(x, y, index, features, head(features), None, dict(zip(blocks, outputs)))


def finish(backbone, x, j):
    for block in backbone.blocks[j + 1:]:
        x = block(x)
    return backbone.pool(x)


def test_delta_attention_free_loss_is_the_feature_map_distance():
    torch.manual_seed(0)
    backbone, head = SmallCNN((1, 8, 8), channels=[4, 6]), torch.nn.Linear(6, 3)
    start = SmallCNN((1, 8, 8), channels=[4, 6])
    start.load_state_dict(backbone.state_dict())
    delta = DELTA(alpha=0.3, beta=0.0, blocks=[0, 1], attention=False)
    delta.attach(at_start(backbone=backbone, head=head))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(5, 1, 8, 8)
    backbone.eval(), start.eval()
    got = delta.loss_term(delta_step(delta, backbone, head, x))
    # α/2 · mean over the batch of Σ_channels mean_positions (F − F⁰)²
    want = 0.3 / 2 * sum(((block_output(backbone, x, j) - block_output(start, x, j)) ** 2).mean((2, 3)).sum(1).mean()
                         for j in (0, 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got, backbone.blocks[0][0].weight)
    (g_want,) = torch.autograd.grad(want, backbone.blocks[0][0].weight)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)


def test_delta_channel_attention_matches_zeroing_each_channel_by_hand():
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    backbone = SmallCNN((1, 8, 8), channels=[4, 5]).eval()
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 3
    ctx = MethodContext(backbone=backbone, task=Classification(3),
                        target_loader=lambda: make_loader((x, y), 16, shuffle=False))
    delta = DELTA(blocks=[0], attention=True, attention_examples=30)
    stats = delta.compute_statistics(ctx)
    delta.use_statistics(stats, ctx)
    with torch.no_grad():
        f = backbone(x[:30])
        probe = LogisticRegression(max_iter=1000).fit(f.numpy(), y[:30].numpy())
        w, b = torch.tensor(probe.coef_, dtype=torch.float32), torch.tensor(probe.intercept_, dtype=torch.float32)
        loss = lambda feats: F.cross_entropy(feats @ w.T + b, y[:30]).item()  # noqa: E731
        base = loss(f)
        increase = [loss(finish(backbone, block_output(backbone, x[:30], 0, c), 0)) - base for c in range(4)]
    torch.testing.assert_close(stats["increase_block0"], torch.tensor(increase, dtype=torch.float64), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta.channel_weights[0], reference_attention(increase), atol=1e-4, rtol=1e-4)
    assert delta.channel_weights[0].mean().item() == pytest.approx(1.0)  # weights average 1: alpha means the same


def reference_attention(increase, temperature=5.0) -> torch.Tensor:
    """The paper's recipe from its description: Δ standardized over the block's C channels (mean 0,
    population std 1), softmax at temperature 5, times C (so the weights average 1)."""
    d = np.asarray(increase, dtype=np.float64)
    z = (d - d.mean()) / d.std()
    e = np.exp(z / temperature)
    return torch.tensor(len(d) * e / e.sum(), dtype=torch.float32)


def test_delta_attention_from_given_increases_is_the_papers_recipe():
    """Raw increases of ~1e-3 (as zeroing a channel gives): the softmax of them would be flat
    (0.999..1.001); standardized at temperature 5 they spread, as the reference recipe's do."""
    from transferlab.regularizers.delta import attention_weights

    increase = torch.tensor(np.random.default_rng(0).gamma(1.0, 1e-3, 128))
    weights = attention_weights(increase, 5.0)
    torch.testing.assert_close(weights, reference_attention(increase.numpy()), atol=1e-6, rtol=1e-6)
    flat = 128 * torch.softmax(increase, 0)
    assert flat.max() - flat.min() < 0.01
    assert weights.min() < 0.9 and weights.max() > 1.5
    assert torch.equal(attention_weights(torch.full((6,), 0.002), 5.0), torch.ones(6))  # no spread: W = 1


def test_delta_alpha_is_the_reference_trade_off_times_its_batch_size():
    """The reference recipe's loss (TLlib's AttentionBehavioralRegularization, written here from
    its formula: trade_off · ½ · Σ over the batch Σ_c C·a_c‖F_c − F⁰_c‖²/(h·w), a = softmax) equals
    transferlab's DELTA with alpha = trade_off × batch size and the same attention."""
    torch.manual_seed(0)
    backbone, head = SmallCNN((1, 8, 8), channels=[4, 6]), torch.nn.Linear(6, 3)
    start = SmallCNN((1, 8, 8), channels=[4, 6])
    start.load_state_dict(backbone.state_dict())
    trade_off, batch = 0.01, 12
    delta = DELTA(alpha=trade_off * batch, beta=0.0, blocks=[0], attention=True)
    softmax = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    delta.channel_weights = [4 * softmax]
    delta.attach(at_start(backbone=backbone, head=head))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(batch, 1, 8, 8)
    backbone.eval(), start.eval()
    got = delta.loss_term(delta_step(delta, backbone, head, x))
    now, then = block_output(backbone, x, 0), block_output(start, x, 0)
    b, c, h, w = now.shape
    distance = (now - then).reshape(b, c, h * w).norm(dim=2) ** 2
    reference = trade_off * 0.5 * (c * softmax * distance / (h * w)).sum()
    torch.testing.assert_close(got, reference, atol=1e-7, rtol=1e-5)
    assert DELTA().alpha == pytest.approx(0.01 * 48)  # the default: the reference's 0.01 at batch 48


def test_delta_block_out_of_range_names_the_key():
    backbone = SmallCNN((1, 8, 8), channels=[4, 5])
    with pytest.raises(Exception, match=r"regularizer.blocks=\[7\]: block 7 is out of range"):
        DELTA(blocks=[7], attention=False).blocks(backbone)


def delta_pair(backbone, head, loader, **settings):
    """Two DELTAs at the same start: one given the training split (its start features stored
    once), one without (the frozen copy runs on every batch)."""
    stored, forward = DELTA(**settings), DELTA(**settings)
    stored.attach(at_start(backbone=backbone, head=head, target_loader=loader))
    forward.attach(at_start(backbone=backbone, head=head))
    assert stored.start_features is not None and forward.start_features is None
    return stored, forward


def delta_steps(backbone, head, deltas, batches):
    """Each DELTA's loss and gradient on block 0's first weight, batch by batch."""
    weight = next(backbone.blocks[0].parameters())
    for x, y, index in batches:
        results = []
        for delta in deltas:
            loss = delta.loss_term(delta_step(delta, backbone, head, x, y, index))
            results.append((loss, torch.autograd.grad(loss, weight)[0]))
        yield results


def test_delta_start_features_stored_once_equal_the_start_copy_on_every_batch():
    torch.manual_seed(0)
    backbone, head = SmallCNN((1, 8, 8), channels=[4, 6]), torch.nn.Linear(6, 3)
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 3
    stored, forward = delta_pair(backbone, head, lambda: make_loader((x, y), 8, shuffle=False),
                                 alpha=0.3, beta=0.0, blocks=[0, 1], attention=False)  # 4x4 and 2x2 maps
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    backbone.eval()
    batches = list(make_loader((x, y), 6, shuffle=True, seed=3, with_index=True))
    for (got, g_got), (want, g_want) in delta_steps(backbone, head, (stored, forward), batches):
        assert want > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)
    assert stored.checked and stored.start is None  # after the first batch's check, no copy at all


def test_delta_on_text_counts_tokens_not_padding_and_reads_stored_start_features():
    from transferlab.backbones.minilm import MiniLM
    from transferlab.data.text import tokenize

    torch.manual_seed(0)
    backbone = MiniLM(num_layers=1)
    head = torch.nn.Linear(backbone.feature_dim, 2)
    texts = ["ok", "my bag is lost and nobody answers the phone at all", "delayed again #fail", "great flight",
             "the the cat sat on the mat", "no"]
    tokens, y = tokenize(np.array(texts, dtype=object), backbone.tokenizer, max_length=32), torch.arange(6) % 2
    start = MiniLM(num_layers=1).eval()
    start.load_state_dict(backbone.state_dict())
    stored, forward = delta_pair(backbone, head, lambda: make_loader((tokens, y), 4, shuffle=False),
                                 alpha=0.5, beta=0.0, blocks=[0, 1], attention=False)  # embeddings, layer
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    backbone.eval()
    # "ok" (index 0) alone, then beside the longest text (so with more padding)
    alone, beside = [(tokens[i], y[i], torch.tensor(i)) for i in ([0], [0, 1])]
    ((a, _), (a_forward, _)), ((b, _), (b_forward, _)) = delta_steps(backbone, head, (stored, forward), [alone, beside])
    torch.testing.assert_close(a, a_forward, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, b_forward, atol=1e-6, rtol=1e-5)
    assert stored.checked  # the second batch read the stored features

    @torch.no_grad()
    def distance(i):  # Σ over blocks of the mean over the text's own tokens of ‖F(w, x) − F(w⁰, x)‖², by hand
        x = tokens[[i]]
        length = int(x["attention_mask"].sum())
        x = {k: v[:, :length] for k, v in x.items()}
        embeddings = backbone.blocks[0](input_ids=x["input_ids"]) - start.blocks[0](input_ids=x["input_ids"])
        layer = backbone.token_features(x) - start.token_features(x)
        return (embeddings.square().sum() + layer.square().sum()) / length

    torch.testing.assert_close(a, 0.5 / 2 * distance(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, 0.5 / 2 * (distance(0) + distance(1)) / 2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["true", "false"])
def test_delta_runs_end_to_end(make_cfg, tmp_path, attention):
    m = run_experiment(make_cfg("regularizer=delta", f"regularizer.attention={attention}", "regularizer.alpha=0.1",
                                "source.epochs=1", "target.epochs=2"), tmp_path / "run")["metrics"]
    assert m["target/test_acc"] > 0.5
    assert ("cache/delta_statistics_hit" in m) == (attention == "true")
    if attention == "true":  # the last block's weights spread as the reference recipe's do (not ≈ 1)
        last = max(int(k.split("block")[1].split("_")[0]) for k in m if k.startswith("delta/attention_block"))
        assert m[f"delta/attention_block{last}_min"] < 0.9 < 1.1 < m[f"delta/attention_block{last}_max"]
    else:
        assert not any(k.startswith("delta/") for k in m)


# -- model soups -------------------------------------------------------------------------------------
def test_uniform_soup_of_identical_ingredients_is_the_ingredient():
    state = {"w": torch.randn(3, 4), "count": torch.tensor(7)}
    soup = average([state, {k: v.clone() for k, v in state.items()}, state])
    assert torch.equal(soup["w"], state["w"])
    assert soup["count"] == 7


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three target learning rates from one source stage and seed (the stage cache shares it)."""
    from conftest import FAST, compose_config

    root = tmp_path_factory.mktemp("soup")
    for i, lr in enumerate(["1e-2", "3e-3", "1e-2"]):
        cfg = compose_config(FAST + [f"paths.output_root={root / 'out'}", f"target.lr={lr}", "target.epochs=2"])
        run_experiment(cfg, root / "sweep" / str(i))
    return root / "sweep"


def test_soups_of_a_sweep(sweep):
    result = make_soups(sweep)
    soups, val = result["soups"], result["val"]
    assert soups["greedy soup"]["val_acc"] >= max(val.values())  # greedy never lowers val
    assert len(soups["uniform soup"]["ingredients"]) == 3
    runs = [json.loads((sweep / str(i) / "results.json").read_text())["metrics"] for i in range(3)]
    best = soups["best single ingredient (selected on val)"]
    assert best["test_acc"] in [r["target/test_acc"] for r in runs]
    # runs 0 and 2 are the same config: their soup is either of them
    assert runs[0]["target/test_acc"] == runs[2]["target/test_acc"]
    assert (sweep / "soup.md").read_text().startswith("# Model soups")


def test_soup_refuses_runs_from_different_starts(make_cfg, tmp_path):
    for seed in (0, 1):
        run_experiment(make_cfg(f"seed={seed}", "source.epochs=1", "target.epochs=1"), tmp_path / "sweep" / str(seed))
    with pytest.raises(Exception, match="do not share one starting point"):
        make_soups(tmp_path / "sweep")


def test_delta_last_block_attention_without_a_forward_per_channel_equals_zeroing_by_hand():
    """The default block (the last) takes the shortcut: zeroing a pooled feature. It must equal a
    forward pass with that channel of the block's output zeroed, for every channel."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(1)
    backbone = SmallCNN((1, 8, 8), channels=[4, 5]).eval()
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 3
    ctx = MethodContext(backbone=backbone, task=Classification(3),
                        target_loader=lambda: make_loader((x, y), 16, shuffle=False))
    calls = []
    handle = backbone.register_forward_hook(lambda *_: calls.append(1))
    delta = DELTA(blocks=None, attention=True, attention_examples=30)
    stats = delta.compute_statistics(ctx)
    delta.use_statistics(stats, ctx)
    handle.remove()
    # 2 batches: features, probe loss, pooled, one check — not one forward per channel (5 more × 2)
    assert len(calls) <= 9
    with torch.no_grad():
        f = backbone(x[:30])
        probe = LogisticRegression(max_iter=1000).fit(f.numpy(), y[:30].numpy())
        w, b = torch.tensor(probe.coef_, dtype=torch.float32), torch.tensor(probe.intercept_, dtype=torch.float32)
        loss = lambda feats: F.cross_entropy(feats @ w.T + b, y[:30]).item()  # noqa: E731
        last = len(backbone.blocks) - 1
        increase = [loss(finish(backbone, block_output(backbone, x[:30], last, c), last)) - loss(f) for c in range(5)]
    torch.testing.assert_close(stats[f"increase_block{last}"], torch.tensor(increase, dtype=torch.float64),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta.channel_weights[0], reference_attention(increase), atol=1e-4, rtol=1e-4)
