"""Task registry and GLUE metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ikd_sweep.tasks import TASKS, get_task


def logits_for(preds, num_labels=2):
    """Logits whose argmax is `preds`, with uneven magnitudes so only the argmax matters."""
    out = np.full((len(preds), num_labels), -1.0)
    for i, p in enumerate(preds):
        out[i, p] = 0.5 + i
    return out


def test_accuracy():
    m = get_task("sst2").compute_metrics(logits_for([1, 0, 1, 1, 0]), [1, 0, 0, 1, 1])
    assert m == {"accuracy": pytest.approx(3 / 5), "main": pytest.approx(3 / 5)}


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_f1_and_accuracy(name):
    y = [1, 1, 1, 1, 0, 0]
    pred = [1, 1, 0, 1, 1, 0]
    # TP = 3 (rows 0, 1, 3), FN = 1 (row 2), FP = 1 (row 4), TN = 1 (row 5)
    # precision = 3/4, recall = 3/4, F1 = 2PR/(P+R) = 2*TP/(2*TP+FP+FN) = 6/8 = 0.75
    # accuracy = (TP+TN)/6 = 4/6; main = (0.75 + 0.6667)/2 = 0.70833
    m = get_task(name).compute_metrics(logits_for(pred), y)
    assert m["f1"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["main"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert m["main"] == pytest.approx(0.708333, abs=1e-6)


def test_f1_without_positive_predictions_is_zero():
    m = get_task("mrpc").compute_metrics(logits_for([0, 0, 0]), [1, 0, 1])
    assert m["f1"] == 0.0
    assert m["main"] == pytest.approx((0 + 1 / 3) / 2)


def test_cola_matthews():
    y = [1, 1, 1, 1, 0, 0, 0, 1]
    pred = [1, 1, 0, 1, 0, 1, 0, 1]
    tp, tn, fp, fn = 4, 2, 1, 1  # tp rows 0,1,3,7; fn row 2; fp row 5; tn rows 4,6
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == pytest.approx(7 / 15)
    m = get_task("cola").compute_metrics(logits_for(pred), y)
    assert m["matthews"] == pytest.approx(mcc)
    assert m["main"] == pytest.approx(mcc)
    assert m["accuracy"] == pytest.approx(6 / 8)


def test_cola_perfect_and_inverted():
    y = [0, 1, 1, 0]
    cola = get_task("cola")
    assert cola.compute_metrics(logits_for(y), y)["main"] == pytest.approx(1.0)
    assert cola.compute_metrics(logits_for([1 - v for v in y]), y)["main"] == pytest.approx(-1.0)


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_stsb_pearson_spearman(shape):
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    y = [1.0, 3.0, 2.0, 4.0]
    # means 2.5 and 2.5; deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5):
    # sum of products = 2.25 - .25 - .25 + 2.25 = 4, sums of squares 5 and 5, so r = 4/5.
    # The values are their own ranks, so Spearman is also 0.8.
    if shape == "column":
        scores = scores[:, None]
    m = get_task("stsb").compute_metrics(scores, y)
    assert m["pearson"] == pytest.approx(0.8)
    assert m["spearman"] == pytest.approx(0.8)
    assert m["main"] == pytest.approx(0.8)


def test_stsb_monotone_nonlinear():
    x = np.arange(1.0, 7.0)
    m = get_task("stsb").compute_metrics((x**3)[:, None], x)
    assert m["spearman"] == pytest.approx(1.0)
    dx, dy = x - x.mean(), x**3 - (x**3).mean()
    r = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())
    assert r < 0.99
    assert m["pearson"] == pytest.approx(r)
    assert m["main"] == pytest.approx((r + 1) / 2)


def test_stsb_constant_prediction_is_zero_not_nan():
    m = get_task("stsb").compute_metrics(np.full(4, 2.5), [1.0, 2.0, 3.0, 4.0])
    assert m == {"pearson": 0.0, "spearman": 0.0, "main": 0.0}


def test_mnli_three_classes():
    y = [0, 1, 2, 2, 1, 0]
    pred = [0, 1, 2, 1, 1, 2]
    m = get_task("mnli").compute_metrics(logits_for(pred, 3), y)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["main"] == m["accuracy"]
    assert get_task("mnli").dev_splits[0] == "dev_matched"


def test_wrong_logit_shape():
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        get_task("mnli").compute_metrics(logits_for([0, 1], 2), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        get_task("rte").compute_metrics(np.array([0.1, 0.9]), [0, 1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        get_task("rte").compute_metrics(logits_for([0, 1, 1]), [0, 1])


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError) as exc:
        get_task("glue")
    msg = str(exc.value)
    assert "'glue'" in msg
    for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "bbc_news"):
        assert name in msg


def test_registry_labels():
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3
    assert get_task("bbc_news").num_labels == 5
    for name, task in TASKS.items():
        assert task.name == name
        if name != "stsb":
            assert not task.is_regression
            assert len(task.label_names) == task.num_labels
    assert set(TASKS) >= {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}


def test_majority_baseline_guesses_the_training_majority_on_dev():
    # MRPC: train mostly "equivalent" (1); dev 3 of 4 equivalent -> accuracy .75, F1 6/7.
    got = get_task("mrpc").majority_baseline(np.array([1, 1, 0]), np.array([1, 0, 1, 1]))
    assert got["accuracy"] == pytest.approx(0.75) and got["f1"] == pytest.approx(6 / 7)
    assert got["main"] == pytest.approx((0.75 + 6 / 7) / 2)
    # The majority is the training rows', not dev's: a dev of all 0s scores 0 here.
    assert get_task("rte").majority_baseline(np.array([1, 1, 0]), np.array([0, 0]))["main"] == 0
    # A constant guess has no correlation and no Matthews: the floor is 0 by construction.
    assert get_task("cola").majority_baseline(np.array([1, 0, 1]), np.array([0, 1]))["main"] == 0
    assert get_task("stsb").majority_baseline(np.array([1.0, 4.0]), np.array([0.5, 3]))["main"] == 0
