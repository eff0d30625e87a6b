"""`transferlab soup <sweep dir>`: model soups (Wortsman et al., ICML 2022) over a sweep's runs.

Ingredients are the completed runs that were fine-tuned from one starting point: the same source
stage (identical `checkpoints/source.pt`), the same seed (so the same target-head init) and the same
target task and backbone — a sweep over target hyper-parameters (lr, regularizer, epochs, ...).
Runs that do not share that start are refused, in one line: averaging weights from different
starts is not a soup.

- uniform soup: the mean of every ingredient's weights (backbone and target head);
- greedy soup: ingredients sorted by validation score, each added only when the soup's
  validation score does not drop (the paper's "held-out" set is our target validation split).

Each soup — and, for reference, the best single ingredient selected on validation — is evaluated
once on the target test split. Written: <sweep dir>/soup.md and soup.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from transferlab.config import register_schemas
from transferlab.data.loaders import EVAL_BATCH, make_loader
from transferlab.errors import TransferlabError
from transferlab.files import file_digest
from transferlab.experiment import build_setup
from transferlab.heads import classification_head
from transferlab.results import RESULTS_FILE, read_results
from transferlab.tasks import task_of
from transferlab.weights import average  # the mean of state dicts (weights.py: shared with merging)


def start_of(run: dict, run_dir: Path) -> tuple:
    """What an ingredient must share with the others."""
    c = run["config"]
    source = run_dir / "checkpoints" / "source.pt"
    return (file_digest(source) if source.is_file() else None, c["seed"], json.dumps(c["data"], sort_keys=True),
            json.dumps(c["backbone"], sort_keys=True))


def ingredients(sweep_dir: Path) -> list[tuple[Path, dict]]:
    runs = []
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        try:
            run = read_results(path.parent)
        except (OSError, ValueError):
            continue
        if run.get("status") == "completed" and (path.parent / "checkpoints" / "target.pt").is_file():
            runs.append((path.parent, run))
    if len(runs) < 2:
        raise TransferlabError(f"{sweep_dir}: {len(runs)} completed run(s) with a target.pt; a soup needs at least 2")
    starts = {start_of(run, d) for d, run in runs}
    if len(starts) > 1 or next(iter(starts))[0] is None:
        raise TransferlabError(f"{sweep_dir}: its runs do not share one starting point (the same source.pt, seed, data "
                               f"and backbone: {len(starts)} different); soup a sweep over target settings only")
    return runs


def make_soups(sweep_dir: Path) -> dict:
    sweep_dir = Path(sweep_dir)
    runs = ingredients(sweep_dir)
    register_schemas()
    cfg = OmegaConf.create(runs[0][1]["config"])
    setup = build_setup(cfg)  # the shared data and backbone (weights come from each target.pt)
    data, backbone = setup.data, setup.backbone
    task = task_of(data.target)
    head = classification_head(backbone.feature_dim, data.target.num_classes)
    val = make_loader(data.target.val, EVAL_BATCH, shuffle=False)
    test = make_loader(data.target.test, EVAL_BATCH, shuffle=False)

    class Model(torch.nn.Module):  # backbone → head; a token task's head reads per-token features
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, x):
            return self.head(backbone.token_features(x) if task.token_level else backbone(x))

    model = Model()
    saved = [torch.load(d / "checkpoints" / "target.pt", map_location="cpu", weights_only=True) for d, _ in runs]
    states = [{**{f"backbone.{k}": v for k, v in s["backbone"].items()}, **{f"head.{k}": v for k, v in s["head"].items()}}
              for s in saved]
    primary = task.primary

    def score(state: dict, loader) -> dict:
        model.load_state_dict(state)
        return task.evaluate(model, loader)

    val_scores = [score(s, val)[primary] for s in states]
    order = sorted(range(len(states)), key=lambda i: -val_scores[i])
    greedy, greedy_val = [order[0]], val_scores[order[0]]
    for i in order[1:]:
        candidate = score(average([states[j] for j in (*greedy, i)]), val)[primary]
        if candidate >= greedy_val:
            greedy, greedy_val = [*greedy, i], candidate
    uniform = average(states)
    rows = {
        "best single ingredient (selected on val)": (order[0:1], val_scores[order[0]], score(states[order[0]], test)),
        "uniform soup": (list(range(len(states))), score(uniform, val)[primary], score(uniform, test)),
        "greedy soup": (greedy, greedy_val, score(average([states[j] for j in greedy]), test)),
    }
    names = [str(d.relative_to(sweep_dir)) for d, _ in runs]
    result = {"primary_metric": primary, "ingredients": names,
              "val": dict(zip(names, val_scores)),
              "soups": {k: {"ingredients": [names[i] for i in members], f"val_{primary}": v,
                            **{f"test_{m}": t for m, t in test_scores.items()}}
                        for k, (members, v, test_scores) in rows.items()}}
    (sweep_dir / "soup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Model soups: {sweep_dir}", "",
             f"{len(runs)} ingredients fine-tuned from one start (same source stage, seed, data, backbone). "
             f"Greedy: sorted by val {primary}, each kept only when the soup's val {primary} does not drop. "
             "Test evaluated once per row.", "",
             f"| model | ingredients | val {primary} | test {primary} |", "| --- | ---: | ---: | ---: |"]
    for k, s in result["soups"].items():
        lines.append(f"| {k} | {len(s['ingredients'])} | {s[f'val_{primary}']:.4f} | {s[f'test_{primary}']:.4f} |")
    (sweep_dir / "soup.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transferlab soup", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        result = make_soups(args.sweep_dir)
    except TransferlabError as e:
        print(f"transferlab soup: error: {e}", file=sys.stderr)
        return 2
    print((args.sweep_dir / "soup.md").read_text())
    return 0 if result else 1
