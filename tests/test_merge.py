"""Model merging: each method against its paper's formula, written out here independently on small
hand-made state dicts, the shared weight arithmetic, and `transferlab merge` end to end on a small
sweep (3 target tasks × 2 seeds from one source stage), with its bad-input cases."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from conftest import FAST, compose_config
from transferlab.errors import TransferlabError
from transferlab.experiment import run_experiment
from transferlab.merge import main as merge_main
from transferlab.merge import merge_sweep, parse_settings
from transferlab.merging import methods
from transferlab.weights import add, average, fold_lora, interpolate, state_digest, task_vector

D = torch.float64


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def merged(name: str, start, finetuned, **knobs):
    return methods()[name].merge(start, finetuned, **knobs)


# -- the shared weight arithmetic (WiSE-FT, soups and merging use these) ---------------------------
def test_interpolate_is_exact_at_the_ends_and_keeps_integer_tensors_from_tuned():
    start = {"w": torch.randn(4, 3), "n": torch.tensor(1)}
    tuned = {"w": torch.randn(4, 3), "n": torch.tensor(9)}
    assert torch.equal(interpolate(start, tuned, 1.0)["w"], tuned["w"])
    assert torch.equal(interpolate(start, tuned, 0.0)["w"], start["w"])
    torch.testing.assert_close(interpolate(start, tuned, 0.25)["w"], 0.75 * start["w"] + 0.25 * tuned["w"])
    assert interpolate(start, tuned, 0.5)["n"] == 9


def test_experiment_and_soup_use_the_one_weight_room():
    import transferlab.experiment as experiment
    import transferlab.soup as soup
    import transferlab.weights as weights

    assert experiment.interpolate is weights.interpolate and soup.average is weights.average


def test_task_vector_and_add_invert_each_other():
    start = {"w": torch.randn(5), "n": torch.tensor(3)}
    tuned = {"w": torch.randn(5), "n": torch.tensor(4)}
    tau = task_vector(start, tuned)
    assert set(tau) == {"w"}  # integer tensors are not part of a task vector
    torch.testing.assert_close(add(start, tau, 1.0)["w"], tuned["w"])
    assert torch.equal(add(start, tau, 0.0)["w"], start["w"])


def test_fold_lora_matches_peft_own_forward():
    """W₀ + (α/r)·B A computes what the adapted layer computes (peft's own forward, eval mode)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at 0: give it something to fold
    model.eval()
    state = model.state_dict()
    assert torch.equal(fold_lora(state, 0.0)["0.weight"], start["0.weight"])  # B·0: the base, exactly
    plain.load_state_dict(fold_lora(state, 6 / 2))
    x = torch.randn(7, 6)
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


def test_state_digest_names_the_weights():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert state_digest(a) == state_digest({"b": torch.zeros(2), "w": torch.ones(3)})
    assert state_digest(a) != state_digest({"w": torch.ones(3), "b": torch.tensor([0.0, 1e-7])})


# -- each method against its paper, re-derived by hand --------------------------------------------
def test_uniform_is_the_plain_average_and_task_arithmetic_at_one_over_t():
    start = {"w": t(0.0, 1.0)}
    thetas = [{"w": t(1.0, 2.0)}, {"w": t(3.0, -1.0)}, {"w": t(2.0, 5.0)}]
    torch.testing.assert_close(merged("uniform", start, thetas)["w"], t(2.0, 2.0))
    torch.testing.assert_close(merged("task_arithmetic", start, thetas, lam=1 / 3)["w"], t(2.0, 2.0))


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    start = {"w": t(1.0, 1.0, 1.0)}
    thetas = [{"w": t(2.0, 1.0, 0.0)}, {"w": t(1.0, 3.0, 0.5)}]  # τ = (1, 0, −1), (0, 2, −0.5)
    torch.testing.assert_close(merged("task_arithmetic", start, thetas, lam=0.5)["w"], t(1.5, 2.0, 0.25))


def test_ties_trim_elect_disjoint_mean_on_a_hand_made_example():
    start = {"w": t(0.5, 0.5, 0.5, 0.5)}
    # τ1 = (0.4, −0.1, 0.3, −0.2), τ2 = (−0.1, 0.2, 0.3, −0.6)
    thetas = [{"w": t(0.9, 0.4, 0.8, 0.3)}, {"w": t(0.4, 0.7, 0.8, -0.1)}]
    # trim k = 50%: τ̂1 = (0.4, 0, 0.3, 0), τ̂2 = (0, 0, 0.3, −0.6)
    # elect: Σ τ̂ = (0.4, 0, 0.6, −0.6) → γ = (+, 0 → majority +, +, −)
    # disjoint mean: (0.4, nothing agrees → 0, (0.3 + 0.3)/2, −0.6); θ = θ₀ + 2·τ_m
    out = merged("ties", start, thetas, k=50.0, lam=2.0)["w"]
    torch.testing.assert_close(out, t(0.5 + 0.8, 0.5, 0.5 + 0.6, 0.5 - 1.2))


def test_ties_sign_election_keeps_only_the_agreeing_entries():
    start = {"w": torch.zeros(4, dtype=D)}
    thetas = [{"w": t(1.0, -2.0, 3.0, 0.5)}, {"w": t(2.0, 1.0, -1.0, -0.5)}, {"w": t(-4.0, 0.5, -1.0, 0.25)}]
    # k = 100: nothing trimmed. Σ = (−1, −0.5, 1, 0.25) → γ = (−, −, +, +)
    # agreeing: e0 {−4}, e1 {−2}, e2 {3}, e3 {0.5, 0.25} → (−4, −2, 3, 0.375)
    out = merged("ties", start, thetas, k=100.0, lam=1.0)["w"]
    torch.testing.assert_close(out, t(-4.0, -2.0, 3.0, 0.375))


def test_ties_trims_over_the_whole_task_vector_not_per_tensor():
    from transferlab.merging.ties import trim

    tau = {"a": t(1.0, -5.0), "b": t(3.0, 0.1, -4.0)}  # top 40% of 5 entries: 2 kept, −5 and −4
    out = trim(tau, 40.0)
    torch.testing.assert_close(out["a"], t(0.0, -5.0))
    torch.testing.assert_close(out["b"], t(0.0, 0.0, -4.0))


def test_dare_drops_with_probability_p_and_is_unbiased():
    """E[τ̂] = τ: each entry survives with probability 1−p, scaled by 1/(1−p)."""
    p, n = 0.9, 200_000
    start = {"w": torch.zeros(n, dtype=D)}
    out = merged("dare", start, [{"w": torch.full((n,), 0.3, dtype=D)}], p=p, lam=1.0, seed=1)["w"]
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 0.3 / (1 - p)))
    assert abs(out.mean().item() - 0.3) < 0.3 * 0.05  # std of the mean: 3·0.3/√n ≈ 0.002
    # per entry, over seeds
    tau = t(1.0, -2.0, 0.5, 4.0)
    draws = torch.stack([merged("dare", {"w": torch.zeros(4, dtype=D)}, [{"w": tau}], p=0.5, lam=1.0, seed=s)["w"]
                         for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), tau, atol=0.07 * 4.0, rtol=0)
    assert torch.equal(draws[0], merged("dare", {"w": torch.zeros(4, dtype=D)}, [{"w": tau}], p=0.5, lam=1.0,
                                        seed=0)["w"])  # seeded


def test_dare_with_p_zero_is_task_arithmetic():
    start = {"w": t(1.0, 2.0)}
    thetas = [{"w": t(2.0, 0.0)}, {"w": t(0.0, 5.0)}]
    torch.testing.assert_close(merged("dare", start, thetas, p=0.0, lam=0.7),
                               merged("task_arithmetic", start, thetas, lam=0.7))
    torch.testing.assert_close(merged("dare", start, thetas, p=0.0, lam=1.5, combine="ties"),
                               merged("ties", start, thetas, k=100.0, lam=1.5))


def test_fisher_merging_is_the_fisher_weighted_mean():
    thetas = [{"w": t(0.0, 0.0), "b": t(1.0)}, {"w": t(4.0, 4.0), "b": t(3.0)}]
    fishers = [{"w": t(1.0, 3.0), "b": t(0.0)}, {"w": t(3.0, 1.0), "b": t(0.0)}]
    out = merged("fisher", {}, thetas, stats=fishers)
    torch.testing.assert_close(out["w"], t(3.0, 1.0))  # (1·0 + 3·4)/4, (3·0 + 1·4)/4
    torch.testing.assert_close(out["b"], t(2.0))  # no Fisher anywhere (floored): the plain average


def test_fisher_merging_with_equal_fishers_is_the_plain_average():
    torch.manual_seed(0)
    thetas = [{"w": torch.randn(3, 4, dtype=D), "v": torch.randn(2, dtype=D)} for _ in range(3)]
    fisher = {"w": torch.rand(3, 4, dtype=D) + 0.1, "v": torch.rand(2, dtype=D) + 0.1}
    out = merged("fisher", {}, thetas, stats=[fisher, fisher, fisher])
    for k in ("w", "v"):
        torch.testing.assert_close(out[k], sum(th[k] for th in thetas) / 3)


def regmean_data(alpha: float):
    torch.manual_seed(0)
    xs = [torch.randn(40, 5, dtype=D), torch.randn(30, 5, dtype=D) * 2 + 1]
    ws = [torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)]
    thetas = [{"lin.weight": w, "lin.bias": torch.randn(3, dtype=D)} for w in ws]
    grams = [{"lin.weight": x.T @ x} for x in xs]
    return xs, ws, thetas, merged("regmean", {}, thetas, stats=grams, alpha=alpha)


def test_regmean_is_the_least_squares_merge_of_the_layers_outputs():
    """α = 1: W* = argmin Σₜ ‖Xₜ Wᵀ − Xₜ Wₜᵀ‖², solved here by least squares on the stacked data."""
    xs, ws, thetas, out = regmean_data(1.0)
    x = torch.cat(xs)
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws)])
    torch.testing.assert_close(out["lin.weight"], torch.linalg.lstsq(x, y).solution.T)
    torch.testing.assert_close(out["lin.bias"], (thetas[0]["lin.bias"] + thetas[1]["lin.bias"]) / 2)  # averaged


def test_regmean_off_diagonal_scaling_is_least_squares_with_the_diagonal_kept():
    """G̃ = α G + (1−α) diag(G): the least-squares problem with √α·Xₜ rows and √(1−α)·diag(‖xⱼ‖)
    rows (targets mapped by Wₜ alike)."""
    alpha = 0.6
    xs, ws, _, out = regmean_data(alpha)
    rows, targets = [], []
    for xi, wi in zip(xs, ws):
        extra = torch.diag(xi.square().sum(0).sqrt())
        rows += [math.sqrt(alpha) * xi, math.sqrt(1 - alpha) * extra]
        targets += [math.sqrt(alpha) * xi @ wi.T, math.sqrt(1 - alpha) * extra @ wi.T]
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(out["lin.weight"], solution)


def test_regmean_on_a_pointwise_convolution_is_least_squares_over_every_position():
    """A 1×1 convolution is a Linear over the channels at each position: its merged weight is the
    least-squares fit of both tasks' outputs at every example and position (α = 1)."""
    from transferlab.merge import pointwise
    from transferlab.merging import regmean

    torch.manual_seed(1)
    convs = [torch.nn.Conv2d(4, 3, 1, bias=False).double() for _ in range(2)]
    maps = [torch.randn(5, 4, 3, 3, dtype=D) for _ in range(2)]  # two tasks' inputs (N, C, H, W)
    grams = [{"conv.weight": (lambda x: x.T @ x)(m.movedim(1, -1).reshape(-1, 4))} for m in maps]
    thetas = [{"conv.weight": c.weight.detach()} for c in convs]
    out = regmean.merge({"conv.weight": torch.zeros(3, 4, 1, 1, dtype=D)}, thetas, stats=grams, alpha=1.0)
    rows = torch.cat([m.movedim(1, -1).reshape(-1, 4) for m in maps])
    targets = torch.cat([c(m).detach().movedim(1, -1).reshape(-1, 3) for c, m in zip(convs, maps)])
    want = torch.linalg.lstsq(rows, targets).solution.T.reshape(3, 4, 1, 1)
    torch.testing.assert_close(out["conv.weight"], want)
    assert pointwise(convs[0]) and not pointwise(torch.nn.Conv2d(4, 3, 3))
    assert not pointwise(torch.nn.Conv2d(4, 4, 1, groups=4)) and not pointwise(torch.nn.Conv2d(4, 3, 1, stride=2))


def test_every_method_of_identical_fine_tunes_gives_them_back():
    torch.manual_seed(0)
    start = {"lin.weight": torch.randn(3, 4, dtype=D)}
    theta = {"lin.weight": torch.randn(3, 4, dtype=D)}
    stats = {"fisher": [{"lin.weight": torch.rand(3, 4, dtype=D)}] * 2,
             "gram": [{"lin.weight": (lambda x: x.T @ x)(torch.randn(10, 4, dtype=D))}] * 2}
    for name, method in methods().items():
        knobs = {"lam": 0.5} if method.scaled else {}  # two identical τ: θ₀ + 0.5·2τ = θ
        if name == "ties":
            knobs = {"lam": 1.0, "k": 100.0}
        if name == "dare":
            knobs = {"lam": 0.5, "p": 0.0}
        extra = {"stats": stats[method.statistics[0]]} if method.statistics else {}
        torch.testing.assert_close(method.merge(start, [theta, theta], **extra, **knobs)["lin.weight"],
                                   theta["lin.weight"], msg=name)


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,message", [
    ("k=0", "k=0: out of range"), ("k=150", "k=150: out of range"), ("p=1", "p=1: out of range"),
    ("p=-0.2", "p=-0.2: out of range"), ("lambda=0", "lambda=0: out of range"),
    ("lambda=0.5,-1", "out of range"), ("lambda=x", "not a number"), ("alpha=2", "alpha=2: out of range"),
    ("method=nope", "no such merge method"), ("colour=red", "no such setting"),
])
def test_bad_settings_fail_in_one_line(setting, message):
    with pytest.raises(TransferlabError, match=message.replace("(", r"\(")) as info:
        parse_settings([setting])
    assert "\n" not in str(info.value)


def test_a_setting_no_chosen_method_reads_is_refused():
    with pytest.raises(TransferlabError, match="k: none of the chosen methods"):
        parse_settings(["method=uniform,fisher", "k=30"])
    assert parse_settings(["method=ties", "k=30", "lambda=0.5,1"]) == {"method": ["ties"], "k": 30.0,
                                                                      "lam": (0.5, 1.0)}


# -- end to end: a sweep over target tasks from one start -------------------------------------------
TASKS = ["[5,6,7]", "[6,7,8,9]", "[5,8,9]"]
SMALL = [o for o in FAST if not o.startswith("backbone.")] + [
    "backbone=mlp", "backbone.hidden=[32,16]", "source.epochs=1", "target.epochs=2", "evaluate.transferability=false"]


def make_sweep(root, extra=(), tasks=TASKS, seeds=(0, 1)):
    for seed in seeds:
        for i, classes in enumerate(tasks):
            cfg = compose_config(SMALL + [f"paths.output_root={root / 'out'}", f"data.target_classes={classes}",
                                          f"seed={seed}", *extra])
            run_experiment(cfg, root / "sweep" / f"s{seed}_t{i}")
    return root / "sweep"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """3 target tasks × 2 seeds, each seed's tasks from one source stage (the stage cache shares it)."""
    return make_sweep(tmp_path_factory.mktemp("merge"))


@pytest.fixture(scope="module")
def merged_sweep(sweep):
    said = []
    result = merge_sweep(sweep, {"lam": (0.3, 1.0), "examples": 200}, log=said.append)
    return sweep, result, said


def test_merge_every_method_over_seeds(merged_sweep):
    sweep, result, _ = merged_sweep
    for name in ("merge.md", "merge.csv", "merge.tex", "merge.json", "plots/merge_normalized_test.png",
                 "plots/merge_normalized_test.pdf"):
        assert (sweep / name).is_file(), name
    assert result["seeds"] == ["0", "1"] and len(result["tasks"]) == 3
    assert result["rows"] == ["individual", "start", *methods()]
    for seed, per in result["per_seed"].items():
        for label in result["tasks"]:  # the individual run, re-evaluated, is its own results.json
            own = per["rows"]["individual"]["tasks"][label]
            assert own["normalized_test"] == 1.0 and own["normalized_val"] == 1.0
            recorded = json.loads((sweep / per["runs"][label] / "results.json").read_text())["metrics"]
            assert own["test"] == pytest.approx(recorded["target/test_acc"])
        for name, method in methods().items():
            row = per["rows"][name]
            if method.scaled:
                assert row["lambda"] in (0.3, 1.0) and set(row["val_by_lambda"]) == {0.3, 1.0}
            assert all(0 <= task["test"] <= 1 for task in row["tasks"].values())
    for key in result["rows"]:
        summary = result["summary"][key]
        assert summary["average"]["n"] == 2 and math.isfinite(summary["average"]["ci"])  # error bars
        for label in result["tasks"]:
            assert summary["tasks"][label]["normalized_test"]["n"] == 2
    assert set(result["comparison"]) == set(methods()) - {"uniform"}  # paired, against the plain average
    text = (sweep / "merge.md").read_text()
    assert text.startswith("# Model merging") and "| individual fine-tunes | — | 1.0000 ± 0.0000" in text
    assert "Paired comparison" in text and "RegMean" in text and "TIES" in text
    tex = (sweep / "merge.tex").read_text()
    assert "\\toprule" in tex and "\\pm" in tex
    csv_rows = (sweep / "merge.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(result["rows"]) * (3 + 1)
    saved = json.loads((sweep / "merge.json").read_text())
    assert saved["per_seed"]["0"]["start_digest"] != saved["per_seed"]["1"]["start_digest"]  # one start per seed


def test_uniform_merge_is_the_average_of_the_fine_tunes(merged_sweep):
    """The uniform row evaluates exactly the soup average of the runs' backbones."""
    sweep, result, _ = merged_sweep
    assert result["per_seed"]["0"]["rows"]["uniform"]["tasks"]  # evaluated
    runs = result["per_seed"]["0"]["runs"]
    states = [torch.load(sweep / run / "checkpoints" / "target.pt", weights_only=True)["backbone"]
              for run in runs.values()]
    mean = average(states)
    torch.testing.assert_close(mean["blocks.0.1.weight"], sum(s["blocks.0.1.weight"] for s in states) / 3)


def test_statistics_are_kept_in_the_run_dir_and_reused(merged_sweep):
    sweep, result, _ = merged_sweep
    for per in result["per_seed"].values():
        assert per["statistics_cached"] == {"fisher": [False] * 3, "gram": [False] * 3}
        for run in per["runs"].values():
            assert (sweep / run / "checkpoints" / "merge_fisher.pt").is_file()
    again = merge_sweep(sweep, {"method": ["fisher"], "examples": 200}, log=lambda line: None)
    assert all(per["statistics_cached"] == {"fisher": [True] * 3} for per in again["per_seed"].values())
    first = result["per_seed"]["0"]["rows"]["fisher"]["tasks"]
    assert again["per_seed"]["0"]["rows"]["fisher"]["tasks"] == first


def copy_sweep(sweep, tmp_path):
    """The runs' results.json and checkpoints (the merge needs nothing else)."""
    out = tmp_path / "sweep"
    shutil.copytree(sweep, out, ignore=shutil.ignore_patterns("csv", "plots", "merge.*", "merge_*.pt"))
    return out


def test_a_seed_missing_a_task_is_skipped_and_said(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path)
    shutil.rmtree(copy / "s1_t2")
    said = []
    result = merge_sweep(copy, {"method": ["uniform"]}, log=said.append)
    assert result["seeds"] == ["0"] and "1" in result["skipped"]
    assert any("seed 1 skipped" in line and "[5,8,9]" in line for line in said)
    assert "Skipped seeds" in (copy / "merge.md").read_text()


def test_runs_from_different_starts_are_named(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path)
    shutil.copyfile(copy / "s1_t1" / "checkpoints" / "source.pt", copy / "s0_t1" / "checkpoints" / "source.pt")
    with pytest.raises(TransferlabError, match=r"seed 0: run s0_t1 does not share the start of s0_t0, s0_t2") as info:
        merge_sweep(copy, {"method": ["uniform"]}, log=lambda line: None)
    assert "\n" not in str(info.value)


def test_the_run_dir_records_the_start_and_the_merge_checks_it(sweep, tmp_path):
    source = torch.load(sweep / "s0_t1" / "checkpoints" / "source.pt", weights_only=True)["backbone"]
    target = torch.load(sweep / "s0_t1" / "checkpoints" / "target.pt", weights_only=True)
    assert target["start_digest"] == state_digest(source)  # the target stage started from the source stage
    copy = copy_sweep(sweep, tmp_path)
    target["start_digest"] = "0" * 64
    torch.save(target, copy / "s0_t1" / "checkpoints" / "target.pt")
    with pytest.raises(TransferlabError, match=r"seed 0: run s0_t1 does not share the start of s0_t0, s0_t2 "
                                               r"\(the start digests their target.pt records differ\)"):
        merge_sweep(copy, {"method": ["uniform"]}, log=lambda line: None)


def test_runs_with_different_backbones_are_refused(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path)
    results = json.loads((copy / "s1_t0" / "results.json").read_text())
    results["config"]["backbone"]["hidden"] = [64, 16]
    (copy / "s1_t0" / "results.json").write_text(json.dumps(results))
    with pytest.raises(TransferlabError, match="runs with different backbones: run s1_t0 uses another backbone"):
        merge_sweep(copy, {"method": ["uniform"]}, log=lambda line: None)


def test_scratch_runs_share_no_start(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path)
    for run in copy.iterdir():
        if (run / "results.json").is_file():
            results = json.loads((run / "results.json").read_text())
            results["config"]["source"]["mode"] = "scratch"
            (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(TransferlabError, match="source=scratch starts from its own random initialization"):
        merge_sweep(copy, {"method": ["uniform"]}, log=lambda line: None)


def test_one_task_is_not_a_merge(sweep, tmp_path):
    copy = copy_sweep(sweep, tmp_path)
    for run in ("s0_t1", "s0_t2", "s1_t1", "s1_t2"):
        shutil.rmtree(copy / run)
    with pytest.raises(TransferlabError, match="merging needs fine-tunes of at least 2 different target tasks"):
        merge_sweep(copy, {"method": ["uniform"]}, log=lambda line: None)


def test_the_command_prints_one_line_and_exits_non_zero(sweep, capsys):
    assert merge_main([str(sweep), "p=1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transferlab merge: error: p=1.5: out of range") and "\n" not in err
    assert merge_main([str(sweep / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_fine_tunes_merge_as_folded_weights(tmp_path):
    """freeze=lora: each run's ΔW = (α/r)·B A folded onto the shared base; the folded fine-tune is
    exactly the run (normalized 1), and its base is checked against the start."""
    lora = ["freeze=lora", 'freeze.target_modules=["0.1","1.0"]', "freeze.r=4", "target.lr=3e-2"]
    sweep = make_sweep(tmp_path, lora, tasks=TASKS[:2], seeds=(0,))
    result = merge_sweep(sweep, {"method": ["uniform", "ties", "regmean"], "lam": (1.0,)}, log=lambda line: None)
    per = result["per_seed"]["0"]
    for label, run in per["runs"].items():
        recorded = json.loads((sweep / run / "results.json").read_text())["metrics"]["target/test_acc"]
        assert per["rows"]["individual"]["tasks"][label]["test"] == pytest.approx(recorded)


def test_base_weights_drops_every_adapter_entry_and_equals_lora_folded_at_zero():
    from transferlab.weights import base_weights, fold_lora

    torch.manual_seed(0)
    lora = {"l.base_layer.weight": torch.randn(4, 3), "l.base_layer.bias": torch.randn(4),
            "l.lora_A.default.weight": torch.randn(2, 3), "l.lora_B.default.weight": torch.randn(4, 2),
            "other.weight": torch.randn(2)}
    folded = fold_lora(lora, 0.0)
    assert base_weights(lora).keys() == folded.keys() and all(torch.equal(base_weights(lora)[k], folded[k]) for k in folded)
    dora = {**lora, "l.lora_magnitude_vector.default.weight": torch.randn(4)}  # DoRA's magnitudes, IA3 alike
    assert set(base_weights(dora)) == {"l.weight", "l.bias", "other.weight"}
