"""DELTA (Li et al., ICLR 2019): keep the *behaviour* of chosen backbone blocks, not their weights.

    Ω = alpha/2 · mean_n Σ_j Σ_c W_jc · mean_p (F_jcp(w, x_n) − F_jcp(w⁰, x_n))²  +  beta/2 · ‖w_head‖²

F_jcp is channel c of block j's output at position p (images: a feature map's h·w positions;
text: one hidden unit at each of the text's own tokens — padding excluded, since how much of it a
text gets depends on the longest text that shares its batch), w⁰ the weights at the start of the
target stage, in eval mode.

The coefficient. The reference recipe (the authors' code as TLlib ships it:
`AttentionBehavioralRegularization`, trade-off 0.01, batch 48) computes
trade_off · ½ · Σ_n Σ_c c·a_c ‖F_c − F⁰_c‖² / (h·w) summed over the batch. Here the batch is
averaged instead (alpha does not change with the batch size) and W = c·a, so

    alpha = trade_off × batch size        (the reference default: 0.01 × 48 = 0.48, our default)

Without attention, TLlib's `BehavioralRegularization` neither weights nor divides by h·w, so its
trade-off maps to alpha = trade_off × batch size × h·w of the block's map; here both variants share
one scale (W averages 1, positions are averaged), so switching attention off leaves alpha's meaning.

F(w⁰, x_n) never changes during the stage (frozen copy, eval mode, no augmentation), so it is
computed once per training example when the stage starts (one forward pass over the training
split) and read by the batch's `index` at every step; the first step checks it against the frozen
copy's forward on the batch, and the copy runs every step instead when that differs (augmented
inputs, mixed precision) or the outputs would not fit in START_FEATURES_LIMIT_BYTES.

- `attention: false` (TLlib's BehavioralRegularization): W_jc = 1.
- `attention: true` (the paper's recipe): W_j = C_j · softmax_c(z_jc / temperature), z_j the
  increases Δ_jc of the target loss when channel c of block j is zeroed, standardized over the
  block's channels ((Δ − mean) / std; temperature 5). Raw increases are ~1e-3, so a softmax of
  them would be flat (every W ≈ 1, attention off in effect). Δ is measured once (cached) at the
  start weights with a linear probe fitted on the start features of up to `attention_examples`
  target training examples. C_j makes the weights average 1 (TLlib's `c * attention`). It costs
  one forward of those examples per channel of the chosen blocks — except for the last block (the
  default): pooling is per channel, so zeroing channel c there is zeroing feature c of the
  features computed once (checked against one real forward). Each block's weight spread is
  recorded in results.json (`delta/attention_block<j>_min`, `_max`).

The beta term pulls the new head toward 0 (as L2-SP's; TLlib's trade-off-head, the same scale),
added as an exact gradient.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from transferlab.config import NonNegative, Positive, PositiveInt
from transferlab.errors import ConfigError
from transferlab.method import SOURCE_MODEL, TARGET_DATA, MethodContext, Step
from transferlab.regularizers.base import Regularizer, sum_of_squares, with_grads
from transferlab.tasks import evaluating, to_device

log = logging.getLogger(__name__)

START_FEATURES_LIMIT_BYTES = 2 << 30  # the start features of every training example, all chosen blocks


def channels_last(out: torch.Tensor) -> torch.Tensor:
    """A block's output as (N, positions, channels): images (N, C, H, W), text (N, L, d), (N, d)."""
    if out.ndim == 4:
        return out.flatten(2).transpose(1, 2)
    return out if out.ndim == 3 else out.unsqueeze(1)


def padding_mask(x) -> Optional[torch.Tensor]:
    """(N, positions, 1): 1 on a text's tokens, 0 on its padding; None for images."""
    return x["attention_mask"][..., None] if isinstance(x, dict) else None


def distance_per_channel(now: torch.Tensor, start: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean over positions of (now − start)², per example and channel: (N, channels). Text: over
    the text's own tokens."""
    squared = (now - start).square()
    if mask is None:
        return squared.mean(1)
    mask = mask.to(squared.dtype)
    return (squared * mask).sum(1) / mask.sum(1).clamp_min(1)


def attention_weights(increase: torch.Tensor, temperature: float) -> torch.Tensor:
    """W = C · softmax(z / temperature), z the loss increases standardized over the C channels
    (population std, as the reference recipe's numpy); equal increases give W = 1."""
    increase = increase.double()
    std = increase.std(correction=0)
    z = (increase - increase.mean()) / std if std > 0 else torch.zeros_like(increase)
    return (len(increase) * torch.softmax(z / temperature, 0)).float()


def first(x, k: int):
    """The first k examples of a batch's inputs (a tensor, or a dict of tensors for text)."""
    return {key: v[:k] for key, v in x.items()} if isinstance(x, dict) else x[:k]


def zero_channel(output: torch.Tensor, c: int) -> torch.Tensor:
    """A block's output with channel c zeroed (dim 1 of a feature map, the last dim of token states)."""
    output = output.clone()
    output.select(1 if output.ndim == 4 else -1, c).zero_()
    return output


class DELTA(Regularizer):
    supports_language_modeling = False  # its feature maps and attention are a classifier's
    has_loss_term = True
    reads_raw_inputs = True  # the start copy runs on the batch's inputs: no frozen-block cache
    uses_start_weights = True
    # Its statistics read the start backbone (ctx.backbone), not the source model, so any source
    # will do (source=pretrained, scratch); SOURCE_MODEL stays an input of their cache key.
    needs_source_model = False
    # the loss increases per channel are the statistics; the coefficients and the softmax
    # temperature act on them afterwards
    statistics_excluded = ("alpha", "beta", "temperature")

    def __init__(self, alpha: NonNegative = 0.48, beta: NonNegative = 0.01, blocks: Optional[list[int]] = None,
                 attention: bool = True, attention_examples: PositiveInt = 256, temperature: Positive = 5.0):
        self.alpha, self.beta, self.attention, self.attention_examples = alpha, beta, attention, attention_examples
        self.temperature = temperature
        self.block_choice = blocks
        self.statistics_inputs = (SOURCE_MODEL, TARGET_DATA) if attention else ()
        self.channel_weights: list[torch.Tensor] | None = None

    def blocks(self, backbone) -> list[int]:
        n = len(backbone.blocks)
        chosen = [n - 1] if self.block_choice is None else [j % n if -n <= j < n else j for j in self.block_choice]
        outside = [j for j in chosen if not 0 <= j < n]
        if outside:
            raise ConfigError(f"regularizer.blocks={self.block_choice}: block {outside[0]} is out of range; "
                              f"the backbone has {n} blocks (0..{n - 1}, or -1 for the last)")
        return sorted(set(chosen))

    # -- channel attention, once, at the start weights ---------------------------------------------
    @torch.no_grad()
    def compute_statistics(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        from sklearn.linear_model import LogisticRegression

        if ctx.task is not None and ctx.task.token_level:
            raise ConfigError("regularizer=delta attention=true: the target task is token classification; "
                              "use regularizer.attention=false")
        backbone, blocks = ctx.backbone, self.blocks(ctx.backbone)
        with evaluating(backbone) as device:
            batches, n = [], 0  # at most attention_examples target training examples, in order
            for batch in ctx.target_loader():
                x, y = to_device(batch, device)[:2]
                keep = min(len(y), self.attention_examples - n)
                batches.append((first(x, keep), y[:keep]))
                n += keep
                if n >= self.attention_examples:
                    break
            pooled = [backbone(x).float() for x, _ in batches]  # the start features, once
            labels = torch.cat([y for _, y in batches]).cpu().numpy()
            probe = LogisticRegression(max_iter=1000).fit(torch.cat(pooled).cpu().numpy(), labels)
            weight = torch.as_tensor(probe.coef_, dtype=torch.float32, device=device)
            bias = torch.as_tensor(probe.intercept_, dtype=torch.float32, device=device)
            if weight.shape[0] == 1:  # scikit-learn's binary case: one row, for the second class
                weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
            classes = torch.as_tensor(probe.classes_, device=device)
            targets = [torch.searchsorted(classes, y) for _, y in batches]

            def features_loss(features: list[torch.Tensor]) -> float:
                return sum(F.cross_entropy(f @ weight.T + bias, t, reduction="sum").item()
                           for f, t in zip(features, targets)) / n

            base = features_loss(pooled)
            widths = [channels_last(out).shape[-1]
                      for out in backbone.forward_intermediates(batches[0][0], blocks, stop_early=True)[1]]

            def zeroed_loss(c: int) -> float:
                """The last block with channel c zeroed: the pooled features with feature c zeroed
                (pooling is per channel), so no forward pass."""
                zeroed = [f.clone() for f in pooled]
                for f in zeroed:
                    f[:, c] = 0
                return features_loss(zeroed)

            def forward_loss(j: int, c: int) -> float:
                """Block j's output with channel c zeroed, the rest of the pass from there."""
                def features(x) -> torch.Tensor:
                    out = backbone.forward_intermediates(x, [j], stop_early=True)[1][0]
                    return backbone.forward_from(j + 1, backbone.block_input(zero_channel(out, c), x)).float()
                return features_loss([features(x) for x, _ in batches])

            stats = {}
            for j, width in zip(blocks, widths):
                # One forward per channel, except for the last block (the default), where zeroing
                # acts on the features directly; checked against a forward on channel 0.
                fast = (j == len(backbone.blocks) - 1 and width == pooled[0].shape[1]
                        and abs(zeroed_loss(0) - forward_loss(j, 0)) <= 1e-5 * max(1.0, abs(base)))
                stats[f"increase_block{j}"] = torch.tensor(
                    [(zeroed_loss(c) if fast else forward_loss(j, c)) - base for c in range(width)], dtype=torch.float64)
        return stats  # the raw increases: the temperature applies in use_statistics, outside the cache key

    def use_statistics(self, stats: dict[str, torch.Tensor], ctx: MethodContext) -> None:
        blocks = self.blocks_chosen = self.blocks(ctx.backbone)
        if sorted(stats) != sorted(f"increase_block{j}" for j in blocks):
            raise ValueError("DELTA: channel attention for other blocks (or from an older version)")
        self.channel_weights = [attention_weights(stats[f"increase_block{j}"], self.temperature) for j in blocks]

    def report(self) -> dict[str, float]:
        """Each block's attention spread: min and max W (1 and 1: attention does nothing)."""
        if self.channel_weights is None:
            return {}
        return {f"attention_block{j}_{end}": round(float(getattr(w, end)()), 4)
                for j, w in zip(self.blocks_chosen, self.channel_weights) for end in ("min", "max")}

    # -- the target stage ----------------------------------------------------------------------
    def reads_blocks(self, backbone) -> list[int]:
        return self.blocks(backbone)

    def attach(self, ctx: MethodContext) -> None:
        backbone = ctx.backbone
        self.block_ids = self.blocks(backbone)
        if self.attention and self.channel_weights is None:
            raise ConfigError("regularizer=delta attention=true needs a source stage (channel attention from the "
                              "source model): use source=train, or regularizer.attention=false")
        # The start weights' behaviour, in eval mode, never trained. From ctx.start_weights (taken
        # before fit): in a resumed run the backbone has moved already.
        self.start = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.start.load_state_dict(ctx.start_weights)
        self.head = list(ctx.head.parameters())
        device = next(backbone.parameters()).device
        if self.channel_weights is not None:
            self.channel_weights = [w.to(device) for w in self.channel_weights]
        self.start_features = self.training_split_start_features(ctx, device)
        self.checked = False

    @torch.no_grad()
    def training_split_start_features(self, ctx: MethodContext, device) -> Optional[list[torch.Tensor]]:
        """Each chosen block's start output for every training example, in split order: one
        (N, positions, channels) tensor per block (text: at the split's width, zero on padding).
        None without the training split, or when it would not fit."""
        if ctx.target_loader is None:
            return None
        self.start.to(device)
        kept: list[list[torch.Tensor]] = [[] for _ in self.block_ids]
        size = 0
        for batch in ctx.target_loader():
            for i, out in enumerate(self.start_block_outputs(to_device(batch, device)[0])):
                kept[i].append(out)
                size += out.numel() * out.element_size()
            if size > START_FEATURES_LIMIT_BYTES:
                log.info("regularizer=delta: the start features would exceed %d GiB: the start copy runs "
                         "every step", START_FEATURES_LIMIT_BYTES >> 30)
                return None
        width = max(out.shape[1] for out in kept[0])  # text batches are cut to their longest text
        return [torch.cat([F.pad(out, (0, 0, 0, width - out.shape[1])) for out in outs]) for outs in kept]

    def on_fit_end(self, trainer, pl_module) -> None:
        self.start = self.start_features = None

    @torch.no_grad()
    def start_block_outputs(self, x) -> list[torch.Tensor]:
        """The chosen blocks' outputs of the start copy, (N, positions, channels) each."""
        return [channels_last(out) for out in self.start.forward_intermediates(x, self.block_ids, stop_early=True)[1]]

    def start_of_batch(self, step: Step) -> list[torch.Tensor]:
        """The chosen blocks' start outputs on the batch: read from the training split's (after a
        check on the first step), or by the frozen copy's forward."""
        if self.start_features is not None and step.index is not None:
            index = step.index.to(self.start_features[0].device)
            # text: a batch is cut to its longest text, so its positions are the split's first ones
            stored = [f[index, :channels_last(step.blocks[j]).shape[1]] for j, f in zip(self.block_ids, self.start_features)]
            if self.checked:
                return stored
            forward = self.forward_start(step)
            mask = padding_mask(step.x)
            mask = 1 if mask is None else mask  # padding is not compared (nor counted in the loss)
            same = all(s.shape == f.shape and torch.allclose((s * mask).float(), (f * mask).float(), rtol=1e-4, atol=1e-5)
                       for s, f in zip(stored, forward))
            if same:
                self.checked, self.start = True, None  # the copy is not needed any more
                return stored
            log.info("regularizer=delta: the stored start features differ from the start copy's on the "
                     "first batch (augmented inputs or mixed precision?): it runs every step")
            self.start_features = None
            return forward
        return self.forward_start(step)

    def forward_start(self, step: Step) -> list[torch.Tensor]:
        self.start.to(step.features.device)
        return self.start_block_outputs(step.x)

    def loss_term(self, step: Step) -> torch.Tensor:
        mask = padding_mask(step.x)
        total = step.features.new_zeros(())
        for i, (j, start) in enumerate(zip(self.block_ids, self.start_of_batch(step))):
            per_channel = distance_per_channel(channels_last(step.blocks[j]), start, mask)  # (N, channels)
            if self.channel_weights is not None:
                per_channel = per_channel * self.channel_weights[i]
            total = total + per_channel.sum(1).mean()
        return self.alpha / 2 * total

    def add_penalty_grad_(self) -> None:
        grads, params = with_grads(self.head)
        if grads:
            torch._foreach_add_(grads, params, alpha=self.beta)

    def penalty(self) -> torch.Tensor:
        return self.beta / 2 * sum_of_squares(self.head)
