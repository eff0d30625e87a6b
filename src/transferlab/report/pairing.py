"""Transfer gain: each completed transfer run against its own scratch baseline.

The rule (the package docstring has it in full): same primary metric, target data, backbone and
seed; of those candidates the same recipe, else the plain baseline, else the first. One pass over
the runs: the scratch runs are indexed once by their pairing key.
"""

from __future__ import annotations

from transferlab.evidence import primary_metric
from transferlab.report.runs import (canonical, headline, headline_metric, is_completed, sign, source_mode,
                                     target_class)

SOURCE_DATA_KEYS = ("source_classes", "source_domains", "source_train_size", "source_dataset")
SAME_RECIPE, PLAIN, FIRST = "same recipe", "plain baseline", "first match"
NO_SEED = "no scratch run for seed"
NO_DATA = "no scratch run with this target data, backbone and label budget"


def add_gains(runs: list[dict]) -> list[dict]:
    """Each run plus "scratch" (its paired scratch run's name, or None), "scratch_setting",
    "pairing" (the rule that chose the scratch run, or why there is none; None for runs that are
    not completed transfer runs), "candidates" (how many scratch runs matched) and, when paired,
    metrics["transfer/gain"]. The rule is the package docstring's.

    Linear in the runs: the scratch runs are indexed once by pairing key (and by recipe within
    it), so each transfer run costs one key and three look-ups."""
    by_key: dict[str, list[dict]] = {}  # pairing key → its scratch runs, in directory order
    by_recipe: dict[tuple[str, str], dict] = {}  # (pairing key, recipe) → the first such scratch run
    plain: dict[str, dict] = {}  # pairing key → its first plain-baseline scratch run
    seedless: set[str] = set()  # pairing keys without the seed: tells "wrong seed" from "no such data"
    for run in runs:
        if is_completed(run) and source_mode(run) == "scratch" and headline(run) is not None:
            key = pairing_key(run)
            by_key.setdefault(key, []).append(run)
            by_recipe.setdefault((key, recipe_key(run)), run)
            if is_plain_baseline(run):
                plain.setdefault(key, run)
            seedless.add(pairing_key(run, with_seed=False))
    paired = []
    for run in runs:
        match, why, found = None, None, []
        if is_completed(run) and source_mode(run) != "scratch":
            key = pairing_key(run)
            found = by_key.get(key, []) if headline(run) is not None else []
            if found:
                match, why = by_recipe.get((key, recipe_key(run))), SAME_RECIPE
                if match is None:
                    match, why = plain.get(key), PLAIN
                if match is None:
                    match, why = found[0], FIRST
            elif headline(run) is None:
                why = f"no {headline_metric(run)} value"
            else:
                why = NO_SEED if pairing_key(run, with_seed=False) in seedless else NO_DATA
        # the improvement in the task's good direction: scratch − run for a lower-is-better metric
        gain = {} if match is None else {"transfer/gain": sign(run) * (headline(run) - headline(match))}
        paired.append(run | {"scratch": match and match["name"], "scratch_setting": match and match.get("setting"),
                             "pairing": why, "candidates": len(found), "metrics": run["metrics"] | gain})
    return paired


def pairing_key(run: dict, with_seed: bool = True) -> str:
    """Same primary metric, target data (label budget included), backbone and seed."""
    config = run["config"]
    target_data = {k: v for k, v in (config.get("data") or {}).items() if k not in SOURCE_DATA_KEYS}
    seed = config.get("seed") if with_seed else None
    return canonical([primary_metric(run), target_data, config.get("backbone"), seed])


def recipe_key(run: dict) -> str:
    """What "same recipe" compares: every key under target, freeze and regularizer."""
    return canonical([run["config"].get(group) for group in ("target", "freeze", "regularizer")])


def is_plain_baseline(run: dict) -> bool:
    return (target_class(run, "freeze").endswith("FullFinetune")
            and target_class(run, "regularizer").endswith("NoRegularizer"))
