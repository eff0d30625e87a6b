"""EleutherAI's lm-evaluation-harness on the model in memory: `evaluate.lm_eval.tasks=[...]`
scores a language model before and after the target stage with lm-eval's own `HFLM` wrapper, so
a benchmark means exactly what it means everywhere else (its prompts, its metrics, its
normalizations). Optional: `pip install -e '.[lmeval]'`.

Offline, a task needs its dataset in the local Hugging Face cache, or a task YAML of your own
whose `dataset_path` / `dataset_kwargs.data_files` name local files; `evaluate.lm_eval.include_path`
is the folder of such YAMLs (tests/data has one).

The backbone (a decoder's base model, LoRA adapters included) and the language-model head are
put together as the model's own `*ForCausalLM` class without copying a weight: lm-eval sees the
very parameters the target stage trains.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Optional

import torch
from torch import nn

from transferlab.errors import ConfigError, TransferlabError

log = logging.getLogger(__name__)
INSTALL = "pip install -e '.[lmeval]'"


def causal_lm(backbone, head: nn.Module):
    """The backbone's model and `head` as one transformers causal LM (no copy: the same tensors)."""
    import transformers

    config = backbone.model_config
    with torch.device("meta"):  # every part is replaced by the backbone's own below
        causal = transformers.AutoModelForCausalLM.from_config(config)
    setattr(causal, causal.base_model_prefix, backbone.model)
    embedding = getattr(head, "embedding", None)  # a tied head: the embedding matrix itself
    if embedding is not None:
        output = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        output.weight = embedding.weight
    else:
        output = head
    causal.set_output_embeddings(output)
    return causal


@functools.lru_cache(maxsize=4)
def task_manager(manager_class, include_path: Optional[str]):
    """lm-eval's task index (~6 s: it reads every task YAML it ships), built once per process and
    folder: a run scores its tasks before and after the target stage, a sweep in every job."""
    with quiet():
        return manager_class(include_path=include_path)


def evaluate_harness(backbone, head, tasks: list[str], *, limit: Optional[float], num_fewshot: Optional[int],
                     include_path: Optional[str], batch_size: int, device: torch.device) -> dict[str, float]:
    """{<task>/<metric>: value} for lm-eval's tasks (stderr entries left out)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise TransferlabError(f"evaluate.lm_eval.tasks: lm-evaluation-harness is not installed ({e.name}): "
                               f"{INSTALL}") from None
    manager = task_manager(TaskManager, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"evaluate.lm_eval.tasks: no lm-eval task named {unknown[0]!r}"
                          f"{'' if include_path else ' (a task of your own: evaluate.lm_eval.include_path=<folder of task YAMLs>)'}")
    model = causal_lm(backbone, head)
    was_training = model.training
    model.eval()
    try:
        tok = backbone.tokenizer
        # lm-eval prefixes each context with bos (else eos); a tokenizer with neither: its cls / pad
        prefix = next((t for t in (tok.bos_token_id, tok.eos_token_id, getattr(tok, "cls_token_id", None),
                                   tok.pad_token_id) if t is not None), None)
        wrapped = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(device),
                       prefix_token_id=prefix)
        with quiet():
            out = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
    except (ConnectionError, OSError) as e:  # a dataset not in the local cache, offline
        raise TransferlabError(f"evaluate.lm_eval.tasks={list(tasks)}: a task's data cannot be read offline "
                               f"({type(e).__name__}); put its dataset in the HF cache or point a task YAML at "
                               "local files (evaluate.lm_eval.include_path)") from None
    finally:
        model.train(was_training)
    scores = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]  # "acc,none" → "acc"
            if "stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            scores[f"{task}/{name}"] = float(value) if math.isfinite(value) else None
    return scores


@contextlib.contextmanager
def quiet():
    """lm-eval logs every task and request at INFO; a run's log needs the result, not those."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
