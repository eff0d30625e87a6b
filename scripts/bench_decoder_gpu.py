#!/usr/bin/env python
"""LoRA fine-tuning of decoder-only models: transferlab's target stage vs a raw peft + PyTorch loop.

    python scripts/bench_decoder_gpu.py            # one CUDA GPU (~3-5 min on an H200, imports included)
    python scripts/bench_decoder_gpu.py --smoke    # CPU, a tiny decoder, seconds: checks the script runs

On the device machine, as scripts/bench_gpu_device_cmd.txt does for bench_gpu.py (wheels in .whl/):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD/src python3 scripts/bench_decoder_gpu.py 2>&1 | tee $OUT/bench_decoder_gpu.log

Decoders built from configs with random weights (the device machine has no weights; a step's
speed does not depend on their values), vocab 32000:
  Llama-1.1B   TinyLlama's shape: hidden 2048, 22 layers, 32 heads (4 kv), FFN 5632  (~1.1B)
  GPT-2-medium hidden 1024, 24 layers, 16 heads, FFN 4096, Conv1D projections      (~0.35B)
LoRA r=16 on every default target (Llama: q/k/v/o/gate/up/down_proj; GPT-2: c_attn, c_proj, c_fc),
bf16 autocast, gradient checkpointing (non-reentrant), AdamW over what trains, batch 16 × seq 256
of random ids, each text right-padded to a random length in [seq/2, seq] (real batches are padded),
3 classes, last-token pooling.

Variants per decoder (same config, same seed):
  raw peft            hand loop: AutoModel.from_config → gradient_checkpointing_enable →
                      peft.inject_adapter_in_model (what freeze=lora does) → the model's own
                      forward with the 2-D mask, last-token pooling, a Linear head, AdamW over
                      the trainable parameters; batches resident in pinned memory
  raw peft, no ckpt   the same without gradient checkpointing: what checkpointing saves and costs
  transferlab lora    `train_target` with backbone=hf_causal (HFDecoder.from_config, its own 4-D
                      causal+padding mask), freeze=lora, trainer=gpu (bf16-mixed), gradient
                      checkpointing, as experiment.py runs it (KeepBestWeights, CSV-free, no logger)
  transferlab lora+l2sp   the same with regularizer=l2sp (the in-place penalty gradient on the adapters)

Timing: `--warmup` steps, then `--steps` timed steps with torch.cuda.synchronize() at both ends;
peak memory = torch.cuda.max_memory_allocated over the timed window (reset at its start), so
Lightning's setup, validation and the final save are outside both. JSON: $OUT/bench_decoder_gpu.json
(or ./outputs/). Wall times on a shared machine are upper bounds.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()
import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch import nn  # noqa: E402

import transferlab.stages.target as tl_target  # noqa: E402
import transferlab.stages.trainer as tl_trainer  # noqa: E402
from transferlab.backbones.hf_causal import HFDecoder, last_token  # noqa: E402
from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402
from transferlab.data.splits import TaskSplits, TransferData  # noqa: E402
from transferlab.data.text import Tokens  # noqa: E402
from transferlab.freeze.lora import default_targets, is_conv1d, targets  # noqa: E402
from transferlab.stages.trainer import make_trainer  # noqa: E402

T_IMPORTS = time.perf_counter()
for name in ("pytorch_lightning", "lightning", "lightning_fabric", "transformers", "peft"):
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

VOCAB, NUM_CLASSES, LR, RANK, ALPHA = 32000, 3, 1e-4, 16, 32.0
DECODERS = {
    "Llama-1.1B": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        intermediate_size=5632, max_position_embeddings=2048),
    "GPT-2-medium": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
}
SMOKE = {"tiny-llama": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=64)}
VARIANTS = ("raw peft", "raw peft, no ckpt", "transferlab lora", "transferlab lora+l2sp")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, a 2-layer hidden-64 Llama, batch 4, seq 16, 2 steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--decoders", nargs="*", default=None, help=f"a subset of {list(DECODERS)}")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.seq, args.warmup, args.steps = 4, 16, 1, 2
    return args


class Env:
    def __init__(self, smoke: bool):
        if not smoke and not torch.cuda.is_available():
            sys.exit("bench_decoder_gpu: no CUDA GPU here; use --smoke to check the script on a CPU")
        self.cuda = not smoke
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.trainer_overrides = [] if self.cuda else [
            "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.pin_memory=false"]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start_window(self) -> float:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.cuda else contextlib.nullcontext()


def compose_cfg(env: Env, regularizer: str, batch: int):
    register_schemas()
    GlobalHydra.instance().clear()
    overrides = ["trainer=gpu", "logger=none", "freeze=lora", f"freeze.r={RANK}", f"freeze.alpha={ALPHA}",
                 "freeze.dropout=0.0", f"regularizer={regularizer}", "target.epochs=1", f"target.batch_size={batch}",
                 f"target.lr={LR}", "seed=0", "trainer.gradient_checkpointing=true", *env.trainer_overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def make_data(n: int, seq: int, seed: int = 0) -> tuple[Tokens, torch.Tensor]:
    """Random ids, right-padded to random lengths in [seq/2, seq] (pad id 0), random labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return Tokens(ids * mask, mask), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def lora_config(model: nn.Module):
    from peft import LoraConfig

    names = default_targets(model)
    transposed = any(is_conv1d(m) for _, m in targets(model, names))
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names, fan_in_fan_out=transposed)


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def run_raw(env: Env, config, data, batch: int, warmup: int, steps: int, checkpointing: bool) -> dict:
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    with torch.device(env.device):
        model = transformers.AutoModel.from_config(config)
    if checkpointing:
        enable_checkpointing(model)
    inject_adapter_in_model(lora_config(model), model)  # freezes the base, B = 0
    model.to(env.device).train()
    head = nn.Linear(config.hidden_size, NUM_CLASSES).to(env.device)
    trainable = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    tokens, labels = data
    pin = (lambda t: t.pin_memory()) if env.cuda else (lambda t: t)
    ids, mask, labels = pin(tokens.input_ids), pin(tokens.attention_mask), pin(labels)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = env.start_window()
        rows = slice(step * batch, (step + 1) * batch)
        x_ids, x_mask = ids[rows].to(env.device, non_blocking=True), mask[rows].to(env.device, non_blocking=True)
        y = labels[rows].to(env.device, non_blocking=True)
        with env.autocast():
            hidden = model(input_ids=x_ids, attention_mask=x_mask, use_cache=False).last_hidden_state
            pooled = hidden[torch.arange(len(y), device=env.device), last_token(x_mask)]
            loss = F.cross_entropy(head(pooled), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    env.sync()
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"raw loop: loss {loss.item()}")
    return {"seconds": seconds, "peak_gib": env.peak_gib(), "trainable": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters() if not p.requires_grad),  # the frozen base
            "attention": model.config._attn_implementation}


class Window(pl.Callback):
    def __init__(self, env: Env, warmup: int, last: int):
        self.env, self.warmup, self.last = env, warmup, last
        self.start = self.end = self.peak = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = self.env.start_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            self.env.sync()
            self.end, self.peak = time.perf_counter(), self.env.peak_gib()


def run_transferlab(env: Env, cfg, config, data, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    with torch.device(env.device):  # random init on the GPU: seconds, not a minute, for 1B parameters
        backbone = HFDecoder.from_config(config, gradient_checkpointing=True)
    freeze, regularizer = instantiate(cfg.freeze), instantiate(cfg.regularizer)
    freeze.check_backbone(backbone)
    freeze.adapt_backbone(backbone, seed=0)  # what experiment.py does before the target stage
    tokens, labels = data
    one = (Tokens(tokens.input_ids[-1:], tokens.attention_mask[-1:]), labels[-1:])  # validation stays cheap
    split = TaskSplits(name="target", classes=list(range(NUM_CLASSES)), train=data, val=one, test=one)
    tdata = TransferData(source=None, target=split, input_shape=(tokens.input_ids.shape[1],),
                         dataset="random tokens", is_text=True)
    window = Window(env, warmup, warmup + steps - 1)

    def timed_make_trainer(cfg, *, callbacks, **kwargs):
        return make_trainer(cfg, callbacks=[*callbacks, window], **kwargs)

    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as run_dir, \
            mock.patch.object(tl_trainer, "make_trainer", timed_make_trainer):
        tl_target.train_target(cfg, tdata, backbone, freeze, [regularizer], Path(run_dir))
    if window.start is None or window.end is None:
        raise RuntimeError("the timed window was not reached")
    trainable = freeze.trainable_backbone_params(backbone, 1) + config.hidden_size * NUM_CLASSES + NUM_CLASSES
    return {"seconds": window.end - window.start, "peak_gib": window.peak, "trainable": trainable}


def main() -> None:
    args = parse_args()
    env = Env(args.smoke)
    chosen = {k: v for k, v in DECODERS.items() if args.decoders is None or k in args.decoders}
    decoders = SMOKE if args.smoke else chosen
    cfgs = {"transferlab lora": compose_cfg(env, "none", args.batch),
            "transferlab lora+l2sp": compose_cfg(env, "l2sp", args.batch)}
    device = torch.cuda.get_device_name(0) if env.cuda else "CPU"
    print(f"bench_decoder_gpu: {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"Lightning {pl.__version__}; imports {T_IMPORTS - T_START:.1f} s")
    print(f"  batch {args.batch}, seq {args.seq} (right-padded to random lengths), {args.warmup} warm-up + "
          f"{args.steps} timed steps, LoRA r={RANK}, {'bf16 autocast' if env.cuda else 'fp32'}, gradient checkpointing")
    if args.smoke:
        print("  SMOKE RUN: CPU, tiny decoder; the numbers mean nothing")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
               "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args), "decoders": {}}
    for name, make_config in decoders.items():
        config = make_config()
        data = make_data((args.warmup + args.steps) * args.batch, args.seq)
        print(f"\n{name}")
        rows = {}
        for variant in VARIANTS:
            if variant.startswith("raw"):
                row = run_raw(env, config, data, args.batch, args.warmup, args.steps,
                              checkpointing=variant == "raw peft")
            else:
                row = run_transferlab(env, cfgs[variant], config, data, args.warmup, args.steps)
            row["samples_per_s"] = round(args.batch * args.steps / row["seconds"], 1)
            rows[variant] = row
            print(f"  {variant:<24} {row['samples_per_s']:>10.1f} samples/s", flush=True)
            if env.cuda:
                torch.cuda.empty_cache()
        base = rows["raw peft"]
        params = base["params"]
        print(f"  {params / 1e9:.2f}B base parameters, attention '{base['attention']}'")
        print(f"  {'variant':<24} {'samples/s':>10} {'x raw':>7} {'peak GiB':>9} {'x raw':>7} {'trainable':>11}")
        for variant, row in rows.items():
            row["x_raw_speed"] = round(row["samples_per_s"] / base["samples_per_s"], 3)
            row["x_raw_memory"] = round(row["peak_gib"] / base["peak_gib"], 3) if env.cuda else None
            memory = f"{row['peak_gib']:>9.2f} {row['x_raw_memory']:>7.3f}" if env.cuda else f"{'-':>9} {'-':>7}"
            speed = f"{row['samples_per_s']:>10.1f} {row['x_raw_speed']:>7.3f}"
            print(f"  {variant:<24} {speed} {memory} {row['trainable']:>11,}")
        results["decoders"][name] = {"params": params, "variants": rows}
    results["total_s"] = round(time.perf_counter() - T_START, 1)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ("bench_decoder_gpu_smoke.json" if args.smoke else "bench_decoder_gpu.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\ntotal {results['total_s']:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
