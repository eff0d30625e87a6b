#!/usr/bin/env python
"""What the exact diagonal Fisher (EWC) costs, next to one batched forward+backward of the same
examples (the floor), by each way of computing it.

    PYTHONPATH=src .venv/bin/python scripts/bench_fisher.py            # ~2-4 min on 2 CPU cores
    PYTHONPATH=src .venv/bin/python scripts/bench_fisher.py --repeats 2 --skip-memory   # quicker

Models: MiniLM-L6 (all 6 layers, pretrained, + a 3-class head: the `TaskModule` EWC gets) on 32
examples x 32 tokens (random ids, full mask: the issue's measurement), and the small CNN
(channels 32/64/128, BatchNorm, + a head) on 256 Fashion-MNIST-sized 28x28 images. The Fisher is
taken over every backbone parameter, as EWC does.

Ways (all in eval mode, all exact but the floor):
  floor        one batched forward + backward of the mean loss (what a training step costs, less
               the optimizer): not a Fisher, the yardstick
  loop         one forward + backward per example, squared gradients summed (the naive way)
  vmap         `diagonal_fisher(method="vmap")`: torch.func vmap(grad) (the path before issue 13)
  vmap eager   the same with HF's eager attention (SDPA has no vmap batching rule on CPU)
  hooks        `diagonal_fisher()` (default): per-layer rules inside one batched backward
Each is run `--repeats` times round-robin after a warm-up, so a slow spell of the (shared) machine
hits all alike. The table gives wall times (minimum, median) and this process's CPU time
(`time.process_time`): on a machine shared with other processes wall times are upper bounds and
swing by several x between rounds, while CPU time counts the work done. Ratios to the floor: of the
CPU minima, and paired (the median over rounds of each round's ratio). With more than one thread,
CPU time also counts threads spinning while they wait; `--threads 1` is the cleanest measurement.

Then the largest relative difference of hooks and vmap from the loop over the parameters
(max |F - F_loop| / max |F_loop|, per parameter), and, in a fresh subprocess each, the peak
resident memory (`resource.getrusage` max RSS) of the hooks Fisher of 256 MiniLM examples at 128
tokens: VmHWM after resetting the peak once the model is loaded (loading the weights peaks higher
than the loaded model holds), against the same process's RSS just before the Fisher.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")  # SDPA's "no batching rule" warning, once per vmap call

from transferlab.backbones.cnn import SmallCNN  # noqa: E402
from transferlab.regularizers.fisher import diagonal_fisher  # noqa: E402
from transferlab.stages.module import TaskModule  # noqa: E402


def minilm_model(seed: int = 0) -> TaskModule:
    from transferlab.backbones.minilm import MiniLM

    torch.manual_seed(seed)
    backbone = MiniLM()
    return TaskModule(backbone, nn.Linear(backbone.feature_dim, 3), stage="source", lr=1e-3).eval()


def text_batch(n: int, length: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(1000, 30000, (n, length), generator=g),
         "attention_mask": torch.ones(n, length, dtype=torch.long)}
    return x, torch.randint(0, 3, (n,), generator=g)


def cnn_model(seed: int = 0) -> TaskModule:
    torch.manual_seed(seed)
    backbone = SmallCNN((1, 28, 28), channels=[32, 64, 128])
    model = TaskModule(backbone, nn.Linear(backbone.feature_dim, 5), stage="source", lr=1e-3)
    with torch.no_grad():  # BatchNorm statistics that are not the initial 0 / 1
        model.train()(torch.rand(256, 1, 28, 28) * 2)
    return model.eval()


def image_batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 5, (n,), generator=g)


def backbone_params(model: TaskModule) -> dict[str, torch.Tensor]:
    mine = {id(p) for p in model.backbone.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in mine}


def take(x, i: int):
    return {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]


# -- the ways --------------------------------------------------------------------------------------
def floor(model, params, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def loop(model, params, x, y):
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(take(x, i)), y[i:i + 1]).backward()
        for n, p in params.items():
            fisher[n] += p.grad.square()
    model.zero_grad(set_to_none=True)
    return {n: f / len(y) for n, f in fisher.items()}


def vmap(model, params, x, y):
    return diagonal_fisher(model, params, [(x, y)], method="vmap")


def hooks(model, params, x, y):
    return diagonal_fisher(model, params, [(x, y)])


def set_attention(model, implementation: str) -> None:
    model.backbone.model_config._attn_implementation = implementation


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a machine other processes share, the CPU
    time is what the work itself took; the wall time includes waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(name: str, model, ways: dict, x, y, repeats: int) -> dict:
    params = backbone_params(model)
    times = {w: [] for w in ways}
    for fn, setup in ways.values():  # warm-up (first calls allocate, oneDNN picks kernels)
        setup()
        fn(model, params, x, y)
    for _ in range(repeats):
        for w, (fn, setup) in ways.items():
            setup()
            times[w].append(timed(fn, model, params, x, y))
    set_attention_default = ways["floor"][1]
    set_attention_default()
    want = loop(model, params, x, y)
    errors = {}
    for w in ways:
        if w in ("floor", "loop"):
            continue
        ways[w][1]()
        got = ways[w][0](model, params, x, y)
        errors[w] = max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-30)) for n in want)
        # parameters whose Fisher is zero up to rounding (BERT's key bias: softmax ignores a shift)
        errors[w + " (params with F > 1e-12)"] = max(
            (float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want if want[n].abs().max() > 1e-12),
            default=0.0)
    set_attention_default()
    wall = {w: [t[0] for t in ts] for w, ts in times.items()}
    cpu = {w: [t[1] for t in ts] for w, ts in times.items()}
    # paired: each round's ratio to the same round's floor, then the median over rounds
    paired = {w: statistics.median(c / f for c, f in zip(cpu[w], cpu["floor"])) for w in times}
    print(f"\n{name}: {len(y)} examples, {sum(p.numel() for p in params.values()) / 1e6:.2f}M backbone parameters, "
          f"{repeats} rounds, {torch.get_num_threads()} threads")
    print(f"  {'way':<12} {'wall min s':>10} {'wall median':>11} {'CPU min s':>10} {'CPU x floor':>11} {'paired':>7}")
    for w in times:
        print(f"  {w:<12} {min(wall[w]):10.3f} {statistics.median(wall[w]):11.3f} {min(cpu[w]):10.3f} "
              f"{min(cpu[w]) / min(cpu['floor']):11.2f} {paired[w]:7.2f}")
    for w, e in errors.items():
        print(f"  max relative difference from the loop, {w}: {e:.2e}")
    return {"wall": wall, "cpu": cpu, "cpu_ratio_of_minima": {w: min(cpu[w]) / min(cpu["floor"]) for w in times},
            "cpu_ratio_paired_median": paired, "errors": errors}


# -- peak memory, in a fresh process ---------------------------------------------------------------
def status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(examples: int, length: int) -> None:
    model = minilm_model()
    params = backbone_params(model)
    x, y = text_batch(examples, length)
    gc.collect()
    loading_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    # Loading the weights peaks above what the loaded model holds: reset the peak (Linux >= 4.0),
    # so VmHWM afterwards is the Fisher's own peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmRSS")
    start = time.perf_counter()
    diagonal_fisher(model, params, [(x, y)])
    seconds = time.perf_counter() - start  # wall
    print(json.dumps({"rss_before_mib": before, "peak_rss_mib": status_mib("VmHWM"),
                      "loading_peak_rss_mib": loading_peak, "seconds": seconds}))


def peak_memory(examples: int, length: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(examples), str(length),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nhooks Fisher, MiniLM-L6, {examples} examples x {length} tokens, own process: "
          f"peak RSS during the Fisher {result['peak_rss_mib']:.0f} MiB (model loaded, before the Fisher: "
          f"{result['rss_before_mib']:.0f} MiB; the Fisher added {result['peak_rss_mib'] - result['rss_before_mib']:.0f} MiB; "
          f"loading the weights had peaked at {result['loading_peak_rss_mib']:.0f} MiB), {result['seconds']:.1f} s wall")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-vmap", action="store_true", help="leave out the two vmap ways (the slowest)")
    parser.add_argument("--memory-child", nargs=2, type=int, metavar=("EXAMPLES", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads")

    model = minilm_model()
    sdpa = lambda: set_attention(model, "sdpa")  # noqa: E731
    eager = lambda: set_attention(model, "eager")  # noqa: E731
    ways = {"floor": (floor, sdpa), "loop": (loop, sdpa), "hooks": (hooks, sdpa)}
    if not args.skip_vmap:
        ways.update({"vmap": (vmap, sdpa), "vmap eager": (vmap, eager)})
    x, y = text_batch(32, 32)
    results = {"minilm": compare("MiniLM-L6, 32 tokens", model, ways, x, y, args.repeats)}

    model = cnn_model()
    nothing = lambda: None  # noqa: E731
    ways = {"floor": (floor, nothing), "loop": (loop, nothing), "vmap": (vmap, nothing), "hooks": (hooks, nothing)}
    x, y = image_batch(256)
    results["cnn"] = compare("SmallCNN 32/64/128, 28x28", model, ways, x, y, args.repeats)

    if not args.skip_memory:
        results["memory"] = peak_memory(256, 128, args.threads)
    print("\n" + json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("wall", "cpu")} if k != "memory" else v
                             for k, v in results.items()}, default=float))


if __name__ == "__main__":
    main()
