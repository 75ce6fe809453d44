"""Evaluation report of a trained model, written next to it by ``rnnimg train``.

    OUT/model/report.md       accuracy, per-class precision / recall / F1, confusion matrix, curves
    OUT/model/confusion.png   the selected epoch's validation confusion matrix
    OUT/model/curves.png      loss, accuracy and learning rate per epoch (train and validation)
    OUT/model/metrics.json    the same numbers under "evaluation" (written by ``export_model``)

The numbers are the validation split's at the epoch that was selected by validation accuracy,
so they lean optimistic; the test split's accuracy comes from ``rnnimg label ... --truth``.
Plots are drawn with matplotlib's Agg canvas (no display, no global pyplot state); without
matplotlib the report says so and carries the tables only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rnnimg import storage

REPORT = "report.md"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class Report:
    """Where the report went, and its text."""

    report_uri: str  # report.md
    confusion_uri: str | None  # confusion.png, None without matplotlib
    curves_uri: str | None  # curves.png, None without matplotlib
    markdown: str  # the text of report.md


def classification_summary(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support and macro F1 of a confusion matrix.

    Args:
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        labels: the K class names.

    Returns:
        ``{"accuracy", "clips", "macro_f1", "per_class": {name: {"precision", "recall", "f1", "support"}}, "confusion"}``.
        A class never predicted has precision 0; a class never present has recall 0.

    Raises:
        ValueError: the matrix is not K x K for K labels, or has negative counts.
    """
    conf = np.asarray(confusion, dtype=np.int64)
    k = len(labels)
    if conf.shape != (k, k):
        raise ValueError(f"confusion must be {k} x {k} for labels {list(labels)}, got shape {conf.shape}")
    if (conf < 0).any():
        raise ValueError("confusion counts must be >= 0")
    total = int(conf.sum())
    per_class = {}
    for i, name in enumerate(labels):
        tp, predicted, actual = int(conf[i, i]), int(conf[:, i].sum()), int(conf[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": float(np.trace(conf)) / total if total else 0.0,
        "clips": total,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion": conf.tolist(),
    }


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], title: str = "validation confusion") -> bytes:
    """The confusion matrix as a PNG: counts in the cells, rows = truth, columns = prediction."""
    conf = np.asarray(confusion, dtype=np.int64)
    k = len(labels)
    figure = _figure(1.2 + 0.7 * k, 1.0 + 0.6 * k)
    axes = figure.add_subplot()
    rows = conf.sum(1, keepdims=True)
    shares = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)  # colour = share of the true class
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            axes.text(j, i, str(conf[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    axes.set_xticks(range(k), labels=list(labels), rotation=45 if k > 4 else 0)
    axes.set_yticks(range(k), labels=list(labels))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _png(figure)


def curves_png(history: Sequence[dict], best_epoch: int | None = None) -> bytes:
    """Loss, accuracy (train and validation) and learning rate per epoch as a PNG.

    A dashed line marks the selected epoch; a dotted one each epoch where the run resumed from
    a checkpoint (its ``resumes`` count went up).
    """
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    figure = _figure(11, 3.2)
    panels = [("loss", ("train_loss", "val_loss")), ("clip accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",))]
    resumed = [h["epoch"] for prev, h in zip(history, history[1:]) if h.get("resumes", 0) > prev.get("resumes", 0)]
    for index, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        for key in keys:
            axes.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", markersize=3, label=key.replace("_", " "))
        if best_epoch is not None:
            axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="selected")
        for epoch in resumed:
            axes.axvline(epoch - 0.5, color="red", linestyle=":", linewidth=1, label="resumed")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(keys) > 1 or best_epoch is not None:
            axes.legend(fontsize=7)
    return _png(figure)


def report_markdown(summary: dict, history: Sequence[dict], best_metrics: dict, labels: Sequence[str], *, model_id: str = "",
                    plots: bool = True, plots_note: str = "") -> str:
    """The short markdown summary of a training run's selected model."""
    best_epoch = best_metrics.get("epoch")
    resumes = max((h.get("resumes", 0) for h in history), default=0)
    lines = [
        f"# Evaluation{f' of model {model_id}' if model_id else ''}",
        "",
        f"Validation split at the selected epoch {best_epoch} (of {len(history)} trained, chosen by validation accuracy, "
        f"so slightly optimistic), {summary['clips']} clips: **accuracy {summary['accuracy']:.3f}**, macro F1 {summary['macro_f1']:.3f}.",
        "",
        "| class | precision | recall | F1 | clips |",
        "|---|---|---|---|---|",
    ]
    for name, c in summary["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "", "| true \\ predicted | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, summary["confusion"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    last = history[-1] if history else {}
    lines += [
        "",
        f"Training: {len(history)} epochs, last train loss {last.get('train_loss', float('nan')):.4f}, "
        f"last validation loss {last.get('val_loss', float('nan')):.4f}, "
        f"{last.get('train_clips_per_s', float('nan')):.1f} training clips/s in the last epoch"
        + (f"; resumed from a checkpoint {resumes} time(s)" if resumes else "") + ".",
        "",
    ]
    if plots:
        lines += [f"![confusion matrix]({CONFUSION_PNG})", "", f"![training curves]({CURVES_PNG})", ""]
    elif plots_note:
        lines += [plots_note, ""]
    return "\n".join(lines)


def write_report(model_uri: str, summary: dict, history: Sequence[dict], best_metrics: dict, labels: Sequence[str], *,
                 model_id: str = "") -> Report:
    """Write report.md, confusion.png and curves.png into the model folder (any store URL).

    Returns:
        Where each file went and the markdown text.
    """
    try:
        import matplotlib  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        plots, note = False, "Plots not drawn: matplotlib is not installed (pip install 'rnnimg[report]')."
    else:
        plots, note = True, ""
    confusion_uri = curves_uri = None
    if plots:
        confusion_uri, curves_uri = storage.join(model_uri, CONFUSION_PNG), storage.join(model_uri, CURVES_PNG)
        storage.write_bytes(confusion_uri, confusion_png(summary["confusion"], labels, f"validation, epoch {best_metrics.get('epoch')}"))
        storage.write_bytes(curves_uri, curves_png(history, best_metrics.get("epoch")))
    markdown = report_markdown(summary, history, best_metrics, labels, model_id=model_id, plots=plots, plots_note=note)
    report_uri = storage.join(model_uri, REPORT)
    storage.write_bytes(report_uri, markdown.encode("utf-8"))
    return Report(report_uri=report_uri, confusion_uri=confusion_uri, curves_uri=curves_uri, markdown=markdown)
