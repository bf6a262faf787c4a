"""Per-class classification metrics from one confusion matrix (beyond the paper, which reports top-1/top-5).

`confusion[t, p]` counts the examples of true class t predicted as p (top-1). From it, per class k:
  support   = Σ_p C[k, p]                    (examples of class k)
  precision = C[k, k] / Σ_t C[t, k]         (None when nothing was predicted as k)
  recall    = C[k, k] / support             (None when the split has no example of k)
  F1        = 2 C[k, k] / (Σ_t C[t, k] + support)   (the harmonic mean of the two; None when both sums are 0)
The F1 formula needs neither precision nor recall to exist: a class that is never predicted but has
examples has F1 0 (sklearn's `f1_score` agrees; its precision there is 0 with a warning, ours None).
"""

import numpy as np
import tensorflow as tf

from bot_keras import steps
from bot_keras.cli import SetupError


def confusion_sums(labels, logits):
    """float32 [K, K] top-1 confusion counts of one batch (one-hot `labels`, `logits` [B, K])."""
    num_classes = logits.shape[-1]
    true = tf.argmax(labels, axis=-1, output_type=tf.int32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.math.confusion_matrix(true, predicted, num_classes=num_classes, dtype=tf.float32)


def _ratio(numerator, denominator):
    return [float(n / d) if d else None for n, d in zip(numerator, denominator, strict=True)]


def per_class_metrics(confusion, class_names):
    """{name: {"precision", "recall", "f1", "support"}} in class order (module docstring)."""
    confusion = np.asarray(confusion, np.float64)
    hits, predicted, support = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    columns = {
        "precision": _ratio(hits, predicted),
        "recall": _ratio(hits, support),
        "f1": _ratio(2 * hits, predicted + support),
        "support": [int(s) for s in support],
    }
    return {name: {key: values[k] for key, values in columns.items()} for k, name in enumerate(class_names)}


def worst_classes(per_class, count=5):
    """The `count` class names with the lowest F1 (then recall), classes without an F1 left out."""
    scored = [(m["f1"], m["recall"] or 0.0, name) for name, m in per_class.items() if m["f1"] is not None]
    return [name for _, _, name in sorted(scored)[:count]]


def pyplot(path):
    """matplotlib.pyplot on the Agg backend; a SetupError naming `--confusion_png=path` without it."""
    try:
        import matplotlib
    except ImportError:
        raise SetupError(
            f"--confusion_png={path}: drawing the matrix needs matplotlib, which bot-keras does not install "
            "by default: pip install -e '.[tools]'"
        ) from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion, class_names, path):
    """Writes `confusion_figure` as a PNG to `path`. Needs matplotlib (the `tools` extra)."""
    plt = pyplot(path)
    figure = confusion_figure(confusion, class_names, plt)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def confusion_figure(confusion, class_names, plt):
    """The confusion matrix drawn with `plt` (matplotlib.pyplot): rows true classes, columns predictions,
    each row normalised by the class's examples (the diagonal is the recall), class names on both axes."""
    confusion = np.asarray(confusion, np.float64)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    side = min(max(4.0, 0.3 * k + 2), 40.0)
    figure, axes = plt.subplots(figsize=(side, side))
    image = axes.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(k)
    font = max(4, min(10, int(400 / max(k, 1))))
    axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=font)
    axes.set_yticks(ticks, labels=class_names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if k <= 20:  # the counts themselves where they fit
        for t in range(k):
            for p in range(k):
                axes.text(p, t, int(confusion[t, p]), ha="center", va="center", fontsize=font,
                          color="white" if rows[t, p] > 0.5 else "black")
    figure.tight_layout()
    return figure


def with_confusion(class_names):
    """(metrics, summarize) for `steps.make_eval_function`: the classification sums plus the top-1
    confusion matrix, summarised as `steps.means` plus "per_class" (`per_class_metrics`) and "confusion"
    (a list of rows, int counts)."""
    class_names = list(class_names)
    base = steps.CLASSIFICATION_METRICS

    def sums(per_example_loss, labels, logits):
        return {**base.sums(per_example_loss, labels, logits), "confusion": confusion_sums(labels, logits)}

    def summarize(totals):
        totals = dict(totals)
        confusion = np.rint(totals.pop("confusion")).astype(np.int64)
        result = steps.means(totals)
        result.update(per_class=per_class_metrics(confusion, class_names), confusion=confusion.tolist())
        return result

    k = len(class_names)
    return steps.Metrics(base.names + ("confusion",), sums, shapes={"confusion": (k, k)}), summarize
