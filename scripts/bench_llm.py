"""SmolLM2-135M fine-tuning on next-token prediction: transferlab's target stage against a
hand-written PyTorch loop — the same HF model from the same folder, the same peft LoRA (or all
weights), AdamW at the same rate, the same batches of the same tweets — in one invocation.

    .venv/bin/python scripts/bench_llm.py                 # LoRA and full, 12 steps of 8 × ≤32 tokens
    .venv/bin/python scripts/bench_llm.py --steps 30 --modes lora
    .venv/bin/python scripts/bench_llm.py --device cuda --bf16 --checkpointing   # on a GPU

Each measurement is its own process (peak RSS is per process), in alternating order over
--rounds. Time per trained token counts the training steps only: transferlab's from Lightning's
first to last batch (a callback), the hand loop's likewise; the first --warmup steps of each are
excluded (allocator warm-up). It prints tokens/s, the ratio transferlab / hand loop (time per
token; goal ≤ 1.10) and each process's peak RSS (goal ≤ 1.1×).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ROOT = __file__.rsplit("/scripts/", 1)[0]


def batches(cfg):
    """The target training batches transferlab's loader draws (seed + 1, epoch 0)."""
    from transferlab.data import make_transfer_data
    from transferlab.data.loaders import make_loader
    from transferlab.data.text import tokenize_transfer_data
    from transferlab.experiment import build
    from transferlab.backbones.smollm2 import SmolLM2

    backbone = SmolLM2(cfg.cache.dir)
    data = make_transfer_data(build(cfg.data.dataset), cfg.data, seed=cfg.seed, with_source=False)
    data = tokenize_transfer_data(data, backbone.tokenizer, cfg.data.max_length)
    return backbone, list(make_loader(data.target.train, cfg.target.batch_size, shuffle=True, seed=cfg.seed + 1))


def compose(args):
    from hydra import compose as hydra_compose, initialize_config_dir
    from transferlab.cli import CONF_DIR
    from transferlab.config import register_schemas

    register_schemas()

    overrides = ["data=tweets_lm", "backbone=smollm2", "source=pretrained", "logger=none", "cache=default",
                 "evaluate.transferability=false", "evaluate.diagnostics=false", "target.epochs=1", f"target.batch_size={args.batch}",
                 f"data.target_train_size={args.batch * args.steps}", f"data.max_length={args.length}",
                 "data.val_fraction=0.0001", "data.test_size=1", "data.source_dataset=null",
                 f"target.lr={args.lr}", f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"trainer.gradient_checkpointing={str(args.checkpointing).lower()}"]
    if args.bf16:
        overrides.append("trainer.precision=bf16-mixed")
    if args.mode == "lora":
        overrides.append("freeze=lora")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class StepClock:
    """Wall time from the end of step `warmup` to the end of the last step, and tokens trained."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.steps, self.tokens, self.start = warmup, device, 0, 0, None

    def step_done(self, tokens: int) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            self.tokens += tokens

    def result(self) -> dict:
        return {"seconds": time.perf_counter() - self.start, "tokens": self.tokens}


def run_transferlab(args) -> dict:
    import tempfile

    from transferlab.experiment import run_experiment
    from transferlab.stages import target as target_stage

    clock = StepClock(args.warmup, args.device)

    class TimedKeepBest(target_stage.KeepBestWeights):  # the stage's own callback, plus a clock
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.step_done(int(batch[0]["attention_mask"].sum()))

    target_stage.KeepBestWeights = TimedKeepBest
    with tempfile.TemporaryDirectory() as run_dir:
        run_experiment(compose(args), run_dir)
    return clock.result()


def run_hand_loop(args) -> dict:
    import torch
    import torch.nn.functional as F

    cfg = compose(args)
    backbone, train = batches(cfg)
    model = backbone.model  # the HF LlamaModel; the tied head is the embedding matrix
    device = torch.device(args.device)
    if args.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(cfg.seed)
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = inject_adapter_in_model(LoraConfig(r=cfg.freeze.r, lora_alpha=cfg.freeze.alpha,
                                                   lora_dropout=cfg.freeze.dropout, target_modules=names), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.target.lr, weight_decay=cfg.target.weight_decay)
    clock = StepClock(args.warmup, args.device)
    for x, y, *_ in train:
        x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            hidden = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], use_cache=False).last_hidden_state
            logits = F.linear(hidden, model.get_input_embeddings().weight)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step_done(int(x["attention_mask"].sum()))
    return clock.result()


def child(args) -> None:
    import resource

    import torch
    torch.set_num_threads(args.threads) if args.threads else None
    result = (run_transferlab if args.which == "transferlab" else run_hand_loop)(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--which", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.which:
        return child(args)
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("modes", "which", "mode") and
                   v not in (None, False)]
    passthrough = [a.replace("=True", "") for a in passthrough]
    for mode in args.modes.split(","):
        results = {"transferlab": [], "hand": []}
        for round_ in range(args.rounds):
            order = ["hand", "transferlab"] if round_ % 2 == 0 else ["transferlab", "hand"]
            for which in order:
                out = subprocess.run([sys.executable, __file__, *passthrough, f"--which={which}", f"--mode={mode}"],
                                     capture_output=True, text=True, cwd=ROOT)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{which} ({mode}) failed:\n{out.stderr[-3000:]}")
                r = json.loads(line[7:])
                results[which].append(r)
                print(f"{mode:5s} round {round_} {which:11s} {r['tokens'] / r['seconds']:8.1f} tokens/s  "
                      f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
        per_token = {k: sum(r["seconds"] for r in v) / sum(r["tokens"] for r in v) for k, v in results.items()}
        rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in results.items()}
        print(f"{mode}: time per token transferlab / hand loop = {per_token['transferlab'] / per_token['hand']:.3f}; "
              f"peak RSS ratio = {rss['transferlab'] / rss['hand']:.3f}  "
              f"({1 / per_token['transferlab']:.1f} vs {1 / per_token['hand']:.1f} tokens/s)")


if __name__ == "__main__":
    main()
