"""Any decoder-only Hugging Face model (GPT-2, Llama, Qwen, Mistral, ...), loaded without a network.

`backbone=hf_causal backbone.name=<local folder or hub id in the local HF cache>`. Blocks are
[embeddings, layer 0, ..., layer n-1, final norm], found generically from the model's children
(GPT-2: wte/wpe + h + ln_f; Llama/Qwen/Mistral: embed_tokens (+ rotary_emb) + layers + norm;
OPT: decoder.embed_tokens/embed_positions + decoder.layers + decoder.final_layer_norm).

Unlike `hf.py`, which runs an encoder's layers one at a time, this backbone runs the model's own
forward: a decoder layer needs the causal mask combined with the padding mask and per-family
position handling (rotary embeddings), which the model builds itself. `blocks` is therefore a
*view* of the model's modules, kept out of the module tree (so every parameter has one name,
`model.<...>`, in state dicts, the stage cache and the EWC Fisher): freeze policies, per-block
param groups and LoRA's injection act on the very modules the model's forward runs, and an FSDP
wrapper put around a decoder layer (inside `model`) is the one the forward goes through.

Features: `token_features` = the final norm's output per token; `forward` pools it, `last`
(default: the last non-padded token, the one that has read the whole text under causal
attention; found from the attention mask, so left and right padding both work) or `mean`.
Position ids are counted from the first real token (cumsum of the mask), as generation does, so
a text gets the same features whichever side it is padded on. With eager or SDPA attention the
backbone passes its own causal + padding mask (see `causal_padding_mask`: the EWC Fisher's vmap
needs it); other attention implementations (flash_attention_2) get the 2-D mask and build their
own, without the Fisher.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from transferlab.backbones.base import Backbone, check_indices, masked_mean
from transferlab.config import PositiveInt
from transferlab.backbones.hf import import_transformers, offline_by_environment, quiet_transformers
from transferlab.errors import ConfigError, TransferlabError

POOLINGS = ("last", "mean")


class Embeddings(nn.ModuleDict):
    """Block 0: every module of the model that is neither a layer nor the final norm (token and
    position embeddings, dropout, rotary embeddings). A view for freezing and param groups; the
    model's forward runs these modules itself."""


def decoder_parts(model: nn.Module, name: str) -> tuple[Embeddings, nn.ModuleList, nn.Module]:
    """(embeddings, layers, final norm) of a decoder-only model, found from its children:
    the layers are its one ModuleList, the final norm its one norm module (GPT-2 ln_f, Llama norm,
    OPT final_layer_norm); everything else is the embeddings block."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"backbone.name={name}: {type(model).__name__} is an encoder-decoder model; "
                          "backbone=hf_causal takes decoder-only models (GPT-2, Llama, Qwen, Mistral)")
    root = getattr(model, "decoder", model)  # OPT keeps the stack one level down
    children = list(root.named_children())
    lists = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.ModuleList)]
    norms = [i for i, (_, m) in enumerate(children) if "norm" in type(m).__name__.lower()]
    if len(lists) != 1 or len(norms) != 1:
        hint = "use backbone=hf for BERT-style encoders" if hasattr(model, "encoder") else \
            "expected one list of decoder layers and one final norm"
        raise ConfigError(f"backbone.name={name}: {type(model).__name__} is not a decoder-only transformer ({hint})")
    layers, norm = children[lists[0]][1], children[norms[0]][1]
    embeddings = Embeddings({n: m for i, (n, m) in enumerate(children) if i not in (lists[0], norms[0])})
    return embeddings, layers, norm


def set_pad_token(tokenizer, name: str) -> None:
    """Batches are padded; many decoder tokenizers have no pad token. Padding positions are masked
    out everywhere, so any existing token will do: eos, as is customary."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or getattr(tokenizer, "sep_token", None) or tokenizer.unk_token
    if fallback is None:
        raise ConfigError(f"backbone.name={name}: the tokenizer has no pad, eos or unk token to pad with; "
                          "add a pad_token to its tokenizer_config.json")
    tokenizer.pad_token = fallback


class HFDecoder(Backbone):
    pretrained = True
    reads_text = True
    language_model = True
    option = "hf_causal"

    def __init__(self, name: str, pooling: Literal["last", "mean"] = "last", num_layers: Optional[PositiveInt] = None,
                 local_files_only: Optional[bool] = None, gradient_checkpointing: bool = False,
                 input_shape=None):
        super().__init__()
        check_pooling(pooling)
        if num_layers is not None and num_layers < 1:
            raise ConfigError(f"backbone.num_layers={num_layers}: must be >= 1 (or null for all)")
        transformers = import_transformers(self.option)
        local = Path(name).is_dir()
        offline = local or (offline_by_environment() if local_files_only is None else local_files_only)
        try:
            with quiet_transformers(transformers):
                config = transformers.AutoConfig.from_pretrained(name, local_files_only=offline)
                if num_layers is not None:
                    available = getattr(config, "num_hidden_layers", None)
                    if available is not None and num_layers > available:
                        raise ConfigError(f"backbone.num_layers={num_layers}: {name} has only {available} layers")
                    config.num_hidden_layers = num_layers
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=offline)
                # float32 whatever the folder stores (SmolLM2's is bf16): training and its numerics are fp32 here
                model = transformers.AutoModel.from_pretrained(name, config=config, local_files_only=offline,
                                                               dtype=torch.float32)
        except (OSError, ValueError) as e:
            where = "the local folder" if local else ("the local HF cache (offline)" if offline else "the hub")
            raise TransferlabError(f"backbone.name={name}: cannot load a decoder from {where} "
                                   f"({type(e).__name__}); point it at a local model folder") from None
        set_pad_token(self.tokenizer, name)
        self._adopt(model, name, pooling, gradient_checkpointing)

    def _adopt(self, model, name: str, pooling: str, gradient_checkpointing: bool) -> None:
        self.name, self.pooling = name, pooling
        self.model = model  # the one registered child: parameters are named model.<...>
        self.model_config = model.config
        embeddings, layers, norm = decoder_parts(model, name)
        # Not registered (object.__setattr__ skips nn.Module's bookkeeping): a view of modules
        # `model` already holds, so nothing is counted, saved or named twice.
        object.__setattr__(self, "blocks", nn.ModuleList([embeddings, *layers, norm]))
        object.__setattr__(self, "layers", layers)  # the model's own list (forward_from swaps it for a span)
        self.feature_dim = model.config.hidden_size
        self._positions = "position_ids" in inspect.signature(model.forward).parameters
        if gradient_checkpointing:
            # Non-reentrant: correct when the inputs need no gradient (frozen embeddings, LoRA)
            # and with unused parameters; recomputes each layer in backward (training mode only).
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.train()  # from_pretrained returns eval mode; Lightning decides from here on

    @classmethod
    def from_config(cls, config, pooling: str = "last", tokenizer=None,
                    gradient_checkpointing: bool = False) -> "HFDecoder":
        """A randomly initialized decoder of `config`'s architecture (e.g. `GPT2Config(n_layer=2)`):
        no files, no network, not pretrained; `tokenizer` is whatever is given (None: feed ids)."""
        check_pooling(pooling)
        transformers = import_transformers(cls.option)
        decoder = cls.__new__(cls)  # skips __init__'s loading; everything else as __init__ sets it
        Backbone.__init__(decoder)
        decoder.tokenizer, decoder.pretrained = tokenizer, False
        if tokenizer is not None:
            set_pad_token(tokenizer, f"random {config.model_type}")
        with quiet_transformers(transformers):
            model = transformers.AutoModel.from_config(config)
        decoder._adopt(model, f"random {config.model_type}", pooling, gradient_checkpointing)
        return decoder

    def language_model_head(self) -> nn.Module:
        """The model's own next-token head, the source head of a language-modeling task: tied to
        the input embeddings when the model ties them (SmolLM2, GPT-2), else its `lm_head` weights
        (loaded from the folder; a random decoder gets a random one)."""
        embedding = self.model.get_input_embeddings()
        if getattr(self.model_config, "tie_word_embeddings", False):
            return TiedLMHead(embedding)
        head = nn.Linear(self.feature_dim, embedding.num_embeddings, bias=False)
        if self.pretrained:
            transformers = import_transformers(self.option)
            with quiet_transformers(transformers):
                full = transformers.AutoModelForCausalLM.from_pretrained(self.name, config=self.model_config,
                                                                         local_files_only=True, dtype=torch.float32)
            head.load_state_dict(full.get_output_embeddings().state_dict())
        else:
            nn.init.normal_(head.weight, std=getattr(self.model_config, "initializer_range", 0.02))
        return head

    def token_features(self, batch: dict) -> torch.Tensor:
        """The final norm's output per token, (N, L, feature_dim): what a token head reads."""
        return self._run(batch)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.pool(self.token_features(batch), batch["attention_mask"])

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, d) token features → (N, d): the last real token's, or the mean over real tokens."""
        if self.pooling == "mean":
            return masked_mean(hidden, mask)
        return hidden.gather(1, last_token(mask)[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)

    def forward_from(self, k: int, x: dict, pool: bool = True) -> torch.Tensor:
        hidden = x["hidden"] if k == len(self.blocks) else self._run(x, start=k, hidden=x.get("hidden"))
        return self.pool(hidden, x["attention_mask"]) if pool else hidden

    def forward_intermediates(self, x: dict, indices: Sequence[int], stop_early: bool = False,
                              pool: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One pass of the model's forward (through block max(indices) when stop_early). Block j's
        output is read as block j+1's input, where the model's forward hands it over; the last
        block run is the pass's own output."""
        stop = check_indices(indices, len(self.blocks), stop_early)
        kept = {}

        def keep(j):
            def hook(module, args, kwargs):
                kept[j] = args[0] if args else kwargs["hidden_states"]
            return hook

        handles = [self.blocks[j + 1].register_forward_pre_hook(keep(j), with_kwargs=True)
                   for j in set(indices) if j < stop - 1]
        try:
            kept[stop - 1] = self._run(x, stop=stop)
        finally:
            for handle in handles:
                handle.remove()
        output = None if stop_early else (self.pool(kept[stop - 1], x["attention_mask"]) if pool else kept[stop - 1])
        return output, [kept[j] for j in indices]

    def _run(self, batch: dict, start: int = 0, stop: int | None = None, hidden: torch.Tensor | None = None):
        """The model's forward over blocks start..stop-1: its output is block stop-1's output.

        The model's forward builds what a decoder layer needs (the causal + padding mask, position
        ids, rotary embeddings), so it runs for any span: for the call, its layer list holds only
        the span's layers and its final norm is an identity when the span ends before it. From
        block start >= 1, block start's input is replaced by `hidden`; the embeddings then run on
        placeholder ids and their output is discarded (frozen ones in eval mode draw no random
        numbers)."""
        stop = len(self.blocks) if stop is None else stop
        mask = batch["attention_mask"]
        extra = {}
        if self._positions:  # 0 at each text's first real token, whichever side the padding is on
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.model.config._attn_implementation in ("eager", "sdpa"):
            mask = causal_padding_mask(mask, self.model.get_input_embeddings().weight.dtype)
        ids = batch["input_ids"] if start == 0 else torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.long,
                                                                   device=mask.device)
        with self._span(start, stop, hidden):
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        return out.last_hidden_state

    @contextlib.contextmanager
    def _span(self, start: int, stop: int, hidden: torch.Tensor | None):
        n = len(self.blocks)
        if start == 0 and stop == n:
            yield
            return
        root = getattr(self.model, "decoder", self.model)  # OPT keeps the stack one level down
        names = {id(child): name for name, child in root.named_children()}
        layers_name, norm_name = names[id(self.layers)], names[id(self.blocks[-1])]
        handle = None
        if start >= 1:
            def replace_input(module, args, kwargs):
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            handle = self.blocks[start].register_forward_pre_hook(replace_input, with_kwargs=True)
        root._modules[layers_name] = nn.ModuleList(list(self.blocks[max(start, 1):min(stop, n - 1)]))
        if stop < n:
            root._modules[norm_name] = nn.Identity()
        try:
            yield
        finally:
            root._modules[layers_name], root._modules[norm_name] = self.layers, self.blocks[-1]
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init (source=scratch): N(0, initializer_range) for Linear / Conv1D / Embedding
        weights, zero biases, norms to 1 (and 0)."""
        std = getattr(self.model_config, "initializer_range", 0.02)
        for module in self.model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if not isinstance(weight, nn.Parameter):
                continue
            if "norm" in type(module).__name__.lower():
                weight.fill_(1.0)
            else:
                weight.normal_(0.0, std)
            if isinstance(bias, nn.Parameter):
                bias.zero_()


class TiedLMHead(nn.Module):
    """A language model's output layer tied to its input embedding matrix (SmolLM2, GPT-2): logits
    = h · Eᵀ. It owns no parameter: E lives in the embeddings block, kept out of this module's
    tree (one name per parameter in state dicts), so the head trains exactly when that block
    trains, and freezing the embeddings freezes the head too."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a view, not a child

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.embedding.weight)


def causal_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, 1, L, L) additive mask a decoder layer applies: query q sees key k <= q when k is
    a real token. Built here, not by transformers, because its builder branches on the mask's
    values (`padding_mask.all()`), which torch.func's vmap (the EWC Fisher's per-sample
    gradients) cannot trace. Each query also sees itself, so a padding query (left padding) has
    one key and stays finite; real queries are unaffected (their own key is real), and padding
    positions are never read (pooling and the token loss skip them)."""
    length = mask.shape[-1]
    position = torch.arange(length, device=mask.device)
    causal = position[None, :] <= position[:, None]  # (q, k)
    allowed = causal & (mask[:, None, None, :].bool() | torch.eye(length, dtype=torch.bool, device=mask.device))
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padded position: L-1 minus the first 1 counted from the
    right (argmax returns the first maximum). Right padding: length-1; left padding: L-1."""
    return mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"backbone.pooling={pooling}: choose one of {', '.join(POOLINGS)}")
