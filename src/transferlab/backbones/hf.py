"""Any BERT-style Hugging Face encoder (embeddings + encoder.layer), loaded without a network.

`backbone=hf backbone.name=<hub id or local folder>`. Blocks are [embeddings, layer 0, ..., layer
n-1], so freeze policies, per-block learning rates and L2-SP see the transformer like any other
backbone; the model's own pooler is dropped (the head reads `pooling` of the last layer).
The backbone carries its tokenizer (`backbone.tokenizer`): the data is tokenized with it once
per run (see data/text.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from transferlab.backbones.base import Backbone, check_indices, masked_mean
from transferlab.errors import ConfigError, TransferlabError

NLP_EXTRA = "pip install -e '.[nlp]'"
POOLINGS = ("cls", "mean")


def import_transformers(option: str):
    try:
        import transformers
    except ImportError as e:
        raise TransferlabError(f"backbone={option} needs the NLP packages ({e.name} is missing): {NLP_EXTRA}") from None
    return transformers


def offline_by_environment() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def quiet_transformers(transformers):
    """Loading fewer layers than saved reports every unused weight; that is intended here."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


class HFEncoder(Backbone):
    pretrained = True  # its weights at construction are a meaningful starting point (source=pretrained)
    reads_text = True
    option = "hf"

    def __init__(self, name: str, pooling: str = "mean", num_layers: Optional[int] = None,
                 local_files_only: Optional[bool] = None, input_shape=None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"backbone.pooling={pooling}: choose one of {', '.join(POOLINGS)}")
        if num_layers is not None and num_layers < 1:
            raise ConfigError(f"backbone.num_layers={num_layers}: must be >= 1 (or null for all)")
        transformers = import_transformers(self.option)
        local = Path(name).is_dir()
        offline = local or (offline_by_environment() if local_files_only is None else local_files_only)
        extra = {} if num_layers is None else {"num_hidden_layers": num_layers}
        try:
            with quiet_transformers(transformers):
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=offline)
                model = transformers.AutoModel.from_pretrained(name, local_files_only=offline, **extra)
        except (OSError, ValueError) as e:
            where = "the local folder" if local else ("the local HF cache (offline)" if offline else "the hub")
            raise TransferlabError(f"backbone.name={name}: cannot load an encoder from {where} "
                                   f"({type(e).__name__}); point it at a local model folder") from None
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not hasattr(model, "embeddings") or not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"backbone.name={name}: {type(model).__name__} is not a BERT-style encoder "
                              "(embeddings + encoder.layer); use a BERT/RoBERTa/MiniLM/ELECTRA model, "
                              "or backbone=hf_causal for a decoder-only one (GPT-2, Llama, ...)")
        if num_layers is not None and num_layers > len(layers):
            raise ConfigError(f"backbone.num_layers={num_layers}: {name} has only {len(layers)} layers")
        self._adopt(model, name, pooling)

    def _adopt(self, model, name: str, pooling: str) -> None:
        self.name, self.pooling = name, pooling
        self.model_config = model.config
        self.blocks = nn.ModuleList([model.embeddings, *model.encoder.layer])
        self.feature_dim = model.config.hidden_size
        self.train()  # from_pretrained returns eval mode; Lightning decides from here on

    @classmethod
    def from_config(cls, config, pooling: str = "mean") -> "HFEncoder":
        """A randomly initialized encoder of `config`'s architecture (a transformers config, e.g.
        `BertConfig(hidden_size=384, ...)`): no files, no network, no tokenizer (`tokenizer` is
        None), not pretrained. For benchmarks and tests that feed token ids directly."""
        if pooling not in POOLINGS:
            raise ConfigError(f"backbone.pooling={pooling}: choose one of {', '.join(POOLINGS)}")
        transformers = import_transformers(cls.option)
        encoder = cls.__new__(cls)  # skips __init__'s loading; everything else as __init__ sets it
        Backbone.__init__(encoder)
        encoder.tokenizer, encoder.pretrained = None, False
        with quiet_transformers(transformers):
            model = transformers.AutoModel.from_config(config)
        encoder._adopt(model, f"random {config.model_type}", pooling)
        return encoder

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_from(0, batch)

    def token_features(self, batch: dict) -> torch.Tensor:
        """The last layer's hidden state per token, (N, L, feature_dim): what a token head reads."""
        return self.forward_from(0, batch, pool=False)

    def forward_from(self, k: int, x: dict, pool: bool = True) -> torch.Tensor:
        hidden = None if k == 0 else x["hidden"]
        for _, hidden in self._outputs(x, k, len(self.blocks), hidden):
            pass
        return self.pool_tokens(hidden, x["attention_mask"]) if pool else hidden

    def forward_intermediates(self, x: dict, indices: Sequence[int], stop_early: bool = False,
                              pool: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        stop = check_indices(indices, len(self.blocks), stop_early)
        kept = dict(self._outputs(x, 0, stop))
        hidden = kept[stop - 1]
        output = None if stop_early else (self.pool_tokens(hidden, x["attention_mask"]) if pool else hidden)
        return output, [kept[j] for j in indices]

    def _outputs(self, x: dict, start: int, stop: int, hidden: torch.Tensor | None = None):
        """(j, block j's output) for blocks start..stop-1; `hidden` is block start's input (start >= 1)."""
        mask = x["attention_mask"]
        if start == 0 and stop > 0:
            hidden = self.blocks[0](input_ids=x["input_ids"])
            yield 0, hidden
            start = 1
        # Additive mask, broadcast over heads and query positions (what BertModel builds for
        # its attention layers): padded keys get the dtype's minimum, i.e. zero attention.
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for j in range(start, stop):
            out = self.blocks[j](hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
            yield j, hidden

    def pool_tokens(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, d) → (N, d): the CLS token's, or the mean over real tokens."""
        if self.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, mask)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as BERT does it (source=scratch: the no-transfer baseline)."""
        std = self.model_config.initializer_range
        for module in self.blocks.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
