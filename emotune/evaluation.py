"""Scores and the files that show them: macro-F1, per-class report, confusion-matrix PNG, predictions CSV.

Used by trials (on dev) and by ensembles (on held-out data) so both report the same way.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` classes (a class never predicted and absent scores 0, as in the challenge)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def class_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support, plus macro and weighted averages (scikit-learn's dict)."""
    from sklearn.metrics import classification_report

    return classification_report(y_true, y_pred, labels=list(range(len(labels))), target_names=list(labels),
                                 output_dict=True, zero_division=0)


def report_text(report: dict, labels: Sequence[str]) -> str:
    lines = [f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in [*labels, "macro avg", "weighted avg"]:
        r = report[name]
        lines.append(f"{name:<12}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1-score']:>10.4f}{int(r['support']):>10}")
    return "\n".join(lines)


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) over all ``n_classes`` classes: rows true, columns predicted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def confusion_png(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with counts and row-normalised colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_counts(y_true, y_pred, len(labels))
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_predictions(path: str | Path, ids: Sequence[str], probabilities: np.ndarray, labels: Sequence[str],
                      true: Sequence[str | None] | None = None, predicted: Sequence[int] | None = None) -> Path:
    """CSV ``id,[label,]prediction,p_<class>...``: what a selector or a user needs to reuse the predictions.

    ``prediction`` is the argmax of the row unless ``predicted`` gives the class indices (an ensemble's vote
    with its tie-break, or its calibrated scores, can differ from the argmax of what it writes).
    """
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *(["label"] if true is not None else []), "prediction", *(f"p_{c}" for c in labels)])
        for i, uid in enumerate(ids):
            choice = int(predicted[i]) if predicted is not None else int(np.argmax(probabilities[i]))
            row = [uid, *([true[i]] if true is not None else []), labels[choice]]
            writer.writerow(row + [f"{p:.6f}" for p in probabilities[i]])
    return path


def read_predictions(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """The ids, the probability matrix and the class order of a predictions CSV."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    columns = [i for i, h in enumerate(header) if h.startswith("p_")]
    labels = [header[i][2:] for i in columns]
    ids = [r[0] for r in rows[1:]]
    probabilities = np.array([[float(r[i]) for i in columns] for r in rows[1:]], dtype=np.float64)
    return ids, probabilities, labels


def save_json(data, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return path


def dev_reports(best_dir: str | Path, title: str) -> list[Path]:
    """The classification report (text and JSON) and confusion-matrix PNG of a best model's dev predictions.

    Drawn once per trial from ``dev_predictions.csv`` (when it ends, or when ASHA stops it), not at every
    improvement: the plot costs as much as an epoch of the demo's training.
    """
    best_dir = Path(best_dir)
    source = best_dir / "dev_predictions.csv"
    if not source.is_file():
        return []
    with source.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    _, probabilities, labels = read_predictions(source)
    true = [labels.index(r["label"]) for r in rows]
    predicted = probabilities.argmax(1)
    report = class_report(true, predicted, labels)
    text = best_dir / "dev_classification_report.txt"
    text.write_text(f"{title}\n\n{report_text(report, labels)}\n")
    return [text, save_json(report, best_dir / "dev_classification_report.json"),
            confusion_png(true, predicted, labels, best_dir / "dev_confusion_matrix.png", title=title)]
