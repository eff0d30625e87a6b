"""backbone=hf_causal on tiny randomly initialized decoders (GPT-2 and Llama configs: 2 layers,
hidden 64, MiniLM's vocabulary and tokenizer for ids): last-token pooling under both paddings,
blocks as a view of the model, LoRA's default targets train only adapters + head, penalty
gradients equal autograd, whole sentiment / NER runs from a saved folder, an exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_penalty_matches_autograd, compose_config, prepare_statistics
from transferlab.backbones.hf_causal import HFDecoder, last_token
from transferlab.backbones.minilm import minilm_path
from transferlab.data.loaders import make_loader
from transferlab.data.text import tokenize
from transferlab.errors import ConfigError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.freeze.lora import LoRA, is_adapter
from transferlab.method import MethodContext
from transferlab.regularizers.ewc import EWC
from transferlab.regularizers.l2sp import L2SP
from transferlab.stages.module import TaskModule

transformers = pytest.importorskip("transformers")
HIDDEN = 64
TEXTS = ["the flight was late again", "great crew", "no", "what a lovely morning in the city park today"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def tiny_config(family: str, tokenizer):
    ids = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, n_positions=64, **ids)
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)


def tiny_decoder(family: str, tokenizer, **kwargs) -> HFDecoder:
    torch.manual_seed(0)
    return HFDecoder.from_config(tiny_config(family, tokenizer), tokenizer=tokenizer, **kwargs)


def batch_of(tokenizer, texts, side: str) -> dict:
    tokenizer.padding_side = side
    try:
        return dict(tokenize(np.array(texts, dtype=object), tokenizer, 32)[list(range(len(texts)))])
    finally:
        tokenizer.padding_side = "right"


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 saved as a model folder, its tokenizer without a pad token."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    transformers.GPT2Model(tiny_config("gpt2", tokenizer)).save_pretrained(folder)
    saved = transformers.AutoTokenizer.from_pretrained(minilm_path())
    saved.pad_token, saved.eos_token = None, "[SEP]"  # as GPT-2's own tokenizer: eos, no pad
    saved.save_pretrained(folder)
    return folder


# -- the backbone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_last_token_pooling_picks_the_last_real_token_under_both_paddings(family, tokenizer):
    backbone = tiny_decoder(family, tokenizer).eval()
    right, left = batch_of(tokenizer, TEXTS, "right"), batch_of(tokenizer, TEXTS, "left")
    lengths = right["attention_mask"].sum(1)
    assert not torch.equal(right["attention_mask"], left["attention_mask"])  # really padded differently
    width = right["input_ids"].shape[1]
    by_hand = {"right": lengths - 1, "left": torch.full_like(lengths, width - 1)}
    for side, batch in (("right", right), ("left", left)):
        assert last_token(batch["attention_mask"]).tolist() == by_hand[side].tolist()
        with torch.no_grad():
            hidden, pooled = backbone.token_features(batch), backbone(batch)
        assert hidden.shape == (len(TEXTS), width, HIDDEN) and pooled.shape == (len(TEXTS), HIDDEN)
        torch.testing.assert_close(pooled, hidden[torch.arange(len(TEXTS)), by_hand[side]])
        # our causal + padding mask gives what transformers' own mask gives, at every real token
        real = batch["attention_mask"].bool()
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            own = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=positions, use_cache=False).last_hidden_state
        torch.testing.assert_close(hidden[real], own[real], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(hidden).all()  # padding queries too (they attend to themselves)
    # positions count from each text's first real token: the same features whichever side pads
    with torch.no_grad():
        torch.testing.assert_close(backbone(right), backbone(left), atol=1e-5, rtol=1e-5)
        mean = HFDecoder.from_config(backbone.model_config, pooling="mean")
        mean.load_state_dict(backbone.state_dict())
        mean.eval()
        mask = right["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(mean(right), (backbone.token_features(right) * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_blocks_are_a_view_of_every_parameter_once(family, tokenizer):
    backbone = tiny_decoder(family, tokenizer)
    assert backbone.num_blocks == 4 and type(backbone.blocks[-1]).__name__.endswith(("LayerNorm", "RMSNorm"))
    in_blocks = [id(p) for block in backbone.blocks for p in block.parameters()]
    assert sorted(in_blocks) == sorted(id(p) for p in backbone.parameters())  # each exactly once
    assert all(k.startswith("model.") for k in backbone.state_dict())  # one name per parameter
    # freezing a block freezes the model's own modules; param groups: one per block + head
    backbone.blocks[0].requires_grad_(False)
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if "wte" in n or "embed_tokens" in n)
    module = TaskModule(backbone, nn.Linear(HIDDEN, 3), stage="target", lr=1e-3, lr_scales=[0.25, 0.5, 0.75, 1.0])
    groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["block0", "block1", "block2", "block3", "head"]
    assert [g["lr"] for g in groups] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    with pytest.raises(ConfigError, match="backbone.pooling=cls"):
        tiny_decoder(family, tokenizer, pooling="cls")


@pytest.mark.parametrize("family", ["Qwen2", "Mistral", "OPT"])
def test_other_families_are_found_generically(family):
    shape = dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=4, vocab_size=1000,
                 max_position_embeddings=64)
    shape.update(ffn_dim=128, word_embed_proj_dim=HIDDEN) if family == "OPT" else \
        shape.update(intermediate_size=128, num_key_value_heads=2)
    torch.manual_seed(0)
    backbone = HFDecoder.from_config(getattr(transformers, f"{family}Config")(**shape)).eval()
    assert backbone.num_blocks == 4 and "norm" in type(backbone.blocks[-1]).__name__.lower()
    in_blocks = sorted(id(p) for b in backbone.blocks for p in b.parameters())
    assert in_blocks == sorted(id(p) for p in backbone.parameters())
    lora = LoRA(r=2, alpha=4.0, dropout=0.0)
    lora.check_backbone(backbone)
    opt = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert lora.target_modules == (opt if family == "OPT" else DEFAULT_TARGETS["llama"])
    ids = torch.randint(5, 1000, (1, 6))
    right = {"input_ids": torch.cat([ids, torch.ones(1, 2, dtype=torch.long)], 1),
             "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}
    left = {"input_ids": torch.cat([torch.ones(1, 2, dtype=torch.long), ids], 1),
            "attention_mask": torch.tensor([[0] * 2 + [1] * 6])}
    with torch.no_grad():
        torch.testing.assert_close(backbone(right), backbone(left), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy, epoch, frozen", [
    ("partial", 0, {0, 1}), ("linear_probe", 0, {0, 1, 2, 3}), ("gradual", 0, {0, 1, 2}), ("gradual", 1, {0, 1})])
def test_freeze_policies_act_on_the_decoder_blocks(policy, epoch, frozen, tokenizer):
    from hydra.utils import instantiate

    backbone = tiny_decoder("gpt2", tokenizer)
    freeze = instantiate(compose_config([f"freeze={policy}", "freeze.k=2"] if policy == "partial" else
                                        [f"freeze={policy}"]).freeze)
    module = TaskModule(backbone, nn.Linear(HIDDEN, 3), stage="target", lr=1e-3,
                        lr_scales=freeze.lr_scales(backbone.num_blocks))
    trainer = type("Trainer", (), {"max_epochs": 4, "current_epoch": epoch})()
    freeze.setup(trainer, module, "fit")
    freeze.on_train_epoch_start(trainer, module)
    module.train()
    assert {i for i, block in enumerate(backbone.blocks) if not block.training} == frozen  # eval: no dropout
    F.cross_entropy(module(batch_of(tokenizer, TEXTS, "right")), torch.tensor([0, 1, 2, 0])).backward()
    freeze.on_before_optimizer_step(trainer, module, None)
    moving = {i for i, block in enumerate(backbone.blocks) if all(p.grad is not None for p in block.parameters())}
    assert moving == set(range(4)) - frozen
    assert all(p.grad is None for i in frozen for p in backbone.blocks[i].parameters())


def test_reset_parameters_gives_a_fresh_init(tokenizer):
    backbone = tiny_decoder("llama", tokenizer)
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(0.5)
    backbone.reset_parameters()  # source=scratch
    assert torch.equal(backbone.blocks[-1].weight, torch.ones(HIDDEN))  # the final RMSNorm
    weight = backbone.model.layers[0].self_attn.q_proj.weight.detach()
    assert abs(float(weight.std()) - backbone.model_config.initializer_range) < 0.003
    assert abs(float(weight.mean())) < 0.003


def test_an_encoder_is_refused_in_one_line(tokenizer):
    with pytest.raises(ConfigError, match="not a decoder-only transformer.*backbone=hf"):
        HFDecoder(minilm_path(), num_layers=1)
    with pytest.raises(TransferlabError, match="backbone.name=/no/such/model: cannot load a decoder"):
        HFDecoder("/no/such/model", local_files_only=True)


def test_a_saved_folder_loads_with_a_pad_token(saved_gpt2):
    backbone = HFDecoder(str(saved_gpt2), num_layers=1)
    assert backbone.pretrained and backbone.num_blocks == 3  # embeddings, 1 of 2 layers, norm
    assert backbone.tokenizer.pad_token == "[SEP]" == backbone.tokenizer.eos_token
    reference = transformers.GPT2Model.from_pretrained(saved_gpt2)
    torch.testing.assert_close(backbone.model.h[0].attn.c_attn.weight, reference.h[0].attn.c_attn.weight)
    with pytest.raises(ConfigError, match="backbone.num_layers=5"):
        HFDecoder(str(saved_gpt2), num_layers=5)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch, y = batch_of(tokenizer, TEXTS, "right"), torch.tensor([0, 1, 2, 0])
    grads = []
    for checkpointing in (False, True):
        backbone = tiny_decoder("llama", tokenizer, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()) == checkpointing
        torch.manual_seed(1)
        head = nn.Linear(HIDDEN, 3)
        F.cross_entropy(head(backbone(batch)), y).backward()
        grads.append([p.grad for p in backbone.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- LoRA and the penalties -----------------------------------------------------------------------
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                   "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def adapted(family, tokenizer, r=4):
    backbone = tiny_decoder(family, tokenizer)
    lora = LoRA(r=r, alpha=8.0, dropout=0.0)  # target_modules: null, resolved by architecture
    lora.check_backbone(backbone)
    assert lora.target_modules == DEFAULT_TARGETS[family]
    assert lora.adapter_settings()["lora"]["target_modules"] == DEFAULT_TARGETS[family]
    lora.adapt_backbone(backbone, seed=0)
    return backbone, lora


def test_encoders_keep_query_value_as_the_default():
    from transferlab.backbones.minilm import MiniLM

    lora = LoRA(r=4, alpha=8.0, dropout=0.0)
    lora.check_backbone(MiniLM(num_layers=1))
    assert lora.target_modules == ["query", "value"]  # what earlier runs' cache keys hold


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_keeps_the_function_and_trains_only_adapters_and_head(family, tokenizer):
    plain = tiny_decoder(family, tokenizer).eval()
    backbone, lora = adapted(family, tokenizer)
    backbone.eval()
    batch, y = batch_of(tokenizer, TEXTS, "left"), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # B = 0: the adapted model computes what the plain one did
        torch.testing.assert_close(backbone(batch), plain(batch))
    adapters = {n for n, p in backbone.named_parameters() if is_adapter(n)}
    # r · (in + out) per adapted projection. GPT-2: c_attn 64→192, attn.c_proj 64→64, c_fc 64→256,
    # mlp.c_proj 256→64. Llama: q, o 64→64; k, v 64→32 (2 kv heads of 16); gate, up 64→128; down 128→64.
    per_layer = {"gpt2": 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)),
                 "llama": 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))}[family]
    assert lora.trainable_backbone_params(backbone, 1) == 2 * per_layer
    head = nn.Linear(HIDDEN, 3)
    module = TaskModule(backbone, head, stage="target", lr=1e-2)
    lora.setup(type("T", (), {"max_epochs": 1})(), module, "fit")
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    optimizer = module.configure_optimizers()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(module(batch), y).backward()
        optimizer.step()
    for name, p in backbone.named_parameters():
        assert torch.equal(p, before[name]) != (name in adapters), name  # adapters move, the base does not
    assert all(p.grad is None for n, p in backbone.named_parameters() if n not in adapters)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_l2sp_and_ewc_gradients_on_the_lora_decoder_equal_autograd(family, tokenizer):
    backbone, _ = adapted(family, tokenizer)
    backbone.eval()
    named = dict(backbone.named_parameters())
    texts = np.array(TEXTS * 3, dtype=object)
    labels = torch.tensor([0, 1, 2, 0] * 3)
    tokens = tokenize(texts, tokenizer, 32)
    batch, y = tokens[list(range(4))], labels[:4]
    # EWC: the Fisher from per-sample gradients (vmap) through the decoder's own forward
    ewc = EWC(lam=50.0)
    source_model = nn.Sequential(backbone, nn.Linear(HIDDEN, 3))
    prepare_statistics(ewc, source_model, make_loader((tokens, labels), 6, shuffle=False), backbone)
    backbone.eval()
    fisher = dict(zip(ewc.names, [f.clone() for f in ewc.fisher]))
    # It covers what trains — the adapters alone (adapter-sized, not model-sized); at B = 0 only
    # B's entries are nonzero (dL/dA = 0).
    assert set(fisher) == {n for n in named if is_adapter(n)}
    assert all(float(f.sum()) > 0 for n, f in fisher.items() if "lora_B" in n)
    assert all(float(f.abs().sum()) == 0 for n, f in fisher.items() if "lora_A" in n)
    anchors = {n: p.detach().clone() for n, p in named.items()}
    l2sp = L2SP(alpha=0.7, beta=0.05)
    head = nn.Linear(HIDDEN, 3)
    l2sp.attach(MethodContext(backbone=backbone, head=head))
    ewc.attach(MethodContext(backbone=backbone, head=head))
    adapters = [n for n in named if is_adapter(n)]
    assert len(l2sp.anchors) == len(ewc.anchors) == len(adapters)  # both states adapter-sized
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move what trains, so both penalties are nonzero
        for p in [*backbone.parameters(), *head.parameters()]:
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))

    def l2sp_penalty():  # over the adapters (the base does not move) + the head
        drift = sum(((named[n] - a) ** 2).sum() for n, a in anchors.items() if is_adapter(n))
        return 0.7 / 2 * drift + 0.05 / 2 * sum((p ** 2).sum() for p in head.parameters())

    def ewc_penalty():
        return 50.0 / 2 * sum((fisher[n] * (named[n] - anchors[n]) ** 2).sum() for n in fisher)

    for reg, penalty in ((l2sp, l2sp_penalty), (ewc, ewc_penalty)):
        assert float(penalty().detach()) > 1e-6
        for p in [*backbone.parameters(), *head.parameters()]:
            p.grad = None
        assert_penalty_matches_autograd(reg, backbone, head, batch, y, penalty)
        assert all(p.grad is None for n, p in named.items() if not is_adapter(n))


# -- whole runs -----------------------------------------------------------------------------------
def run_overrides(tmp_path, folder, *overrides) -> list[str]:
    return ["backbone=hf_causal", f"backbone.name={folder}", "logger=csv", "cache=off",
            f"paths.output_root={tmp_path / 'outputs'}", "data.target_train_size=40", "data.max_length=32",
            "target.epochs=1", "target.batch_size=8", "target.lr=1e-3", *overrides]


def run_cfg(tmp_path, folder, *overrides):
    return compose_config(run_overrides(tmp_path, folder, *overrides))


def completed(run_dir) -> dict:
    """The results contract: results.json on disk says completed, with metrics."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["error"] is None, results["error"]
    return results["metrics"]


def test_sentiment_run_from_a_saved_folder(tmp_path, saved_gpt2):
    cfg = run_cfg(tmp_path, saved_gpt2, "experiment=tweets_sentiment", "freeze=llrd",
                  "data.val_fraction=0.005", "data.test_fraction=0.005")
    assert cfg.backbone._target_.endswith("HFDecoder") and cfg.backbone.name == str(saved_gpt2)
    run_experiment(cfg, tmp_path / "run")
    m = completed(tmp_path / "run")
    assert 0 <= m["target/test_acc"] <= 1 and m["target/epochs_run"] == 1
    backbone_params = sum(p.numel() for p in HFDecoder(str(saved_gpt2)).parameters())
    assert m["params/total"] == backbone_params + HIDDEN * 3 + 3


def test_ner_run_with_lora_and_l2sp(tmp_path, saved_gpt2):
    cfg = run_cfg(tmp_path, saved_gpt2, "experiment=wnut_ner", "freeze=lora", "freeze.r=2", "regularizer=l2sp",
                  "data.val_fraction=0.05", "data.test_fraction=0.05")
    run_experiment(cfg, tmp_path / "run")
    m = completed(tmp_path / "run")
    for key in ("target/test_f1", "target/val_f1", "target/test_acc"):
        assert key in m and 0 <= m[key] <= 1, key
    tags = 21
    adapters = 2 * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # r=2, 2 layers
    assert m["params/trainable"] == adapters + HIDDEN * tags + tags


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
def test_a_killed_lora_run_resumes_to_identical_metrics(tmp_path, saved_gpt2):
    # Dropout in the adapters and the model, L2-SP anchors, the loader position: all restored.
    overrides = ["experiment=tweets_sentiment", "freeze=lora", "freeze.r=2", "freeze.dropout=0.2",
                 "regularizer=l2sp", "target.epochs=2", "data.val_fraction=0.005", "data.test_fraction=0.005",
                 "trainer.checkpoint_interval_s=null", "trainer.checkpoint_every_n_steps=3"]
    cfg = run_cfg(tmp_path, saved_gpt2, *overrides)
    run_experiment(cfg, tmp_path / "uninterrupted")
    reference = completed(tmp_path / "uninterrupted")
    run_dir = tmp_path / "killed"
    cli = run_overrides(tmp_path, saved_gpt2, *overrides)
    env = {**os.environ, "TRANSFERLAB_KILL_AT": "target:step7", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "transferlab", *cli, f"hydra.run.dir={run_dir}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["target.ckpt"]
    run_experiment(cfg, run_dir)  # in this process: no kill hook
    assert json.loads((run_dir / "results.json").read_text())["provenance"]["resumed"] is True
    drop = ("time/", "cache/", "efficiency/")
    assert ({k: v for k, v in completed(run_dir).items() if not k.startswith(drop)}
            == {k: v for k, v in reference.items() if not k.startswith(drop)})


def test_fsdp_without_cuda_is_one_line(tmp_path, saved_gpt2):
    cfg = run_cfg(tmp_path, saved_gpt2, "experiment=tweets_sentiment", "trainer=fsdp")
    assert cfg.trainer.strategy == "fsdp_layers" and cfg.trainer.precision == "bf16-mixed"
    from transferlab.config import validate

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the CPU-only refusal")
    # torch's FSDP itself refuses CPUs ("FSDP needs a non-CPU accelerator device"): one line first
    from transferlab.collectives import check_devices

    validate(cfg)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible") as e:
        check_devices(cfg.trainer)  # what run_experiment and launch check right after validate
    assert "\n" not in str(e.value)
    cpu = run_cfg(tmp_path, saved_gpt2, "experiment=tweets_sentiment", "trainer.strategy=fsdp_layers")
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp_layers needs CUDA GPUs"):
        validate(cpu)
    with pytest.raises(ConfigError, match="regularizer=ewc with trainer.strategy=fsdp_layers"):
        validate(run_cfg(tmp_path, saved_gpt2, "experiment=tweets_sentiment", "trainer=fsdp", "regularizer=ewc"))


def test_backbone_hf_points_a_decoder_to_hf_causal(saved_gpt2):
    from transferlab.backbones.hf import HFEncoder

    with pytest.raises(ConfigError, match="not a BERT-style encoder.*backbone=hf_causal"):
        HFEncoder(str(saved_gpt2))
