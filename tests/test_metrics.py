"""Per-class classification metrics: a hand-worked confusion matrix, the eval step's sums, the PNG."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from bot_keras import cli, metrics, steps

CLASSES = ["ant", "bee", "cow"]
# Seven examples, true → predicted: ant→ant ×2, ant→bee, bee→bee ×2, bee→ant, cow→bee. Nothing is
# predicted as cow.
TRUE = [0, 0, 0, 1, 1, 1, 2]
PREDICTED = [0, 0, 1, 1, 1, 0, 1]
CONFUSION = [[2, 1, 0], [1, 2, 0], [0, 1, 0]]


def _logits(predicted, k=3):
    return tf.one_hot(predicted, k) * 5.0 + tf.random.stateless_uniform([len(predicted), k], [1, 2])


def test_confusion_sums_count_true_against_predicted():
    confusion = metrics.confusion_sums(tf.one_hot(TRUE, 3), _logits(PREDICTED))
    np.testing.assert_array_equal(confusion.numpy(), CONFUSION)


def test_per_class_metrics_by_hand():
    per_class = metrics.per_class_metrics(np.array(CONFUSION), CLASSES)
    # ant: 2 hits of 3 predicted (precision 2/3) and of 3 examples (recall 2/3), F1 2·2/(3 + 3) = 2/3.
    # bee: 2 hits of 4 predicted (1/2) and of 3 examples (2/3), F1 4/7 = 2·(1/2)(2/3)/(1/2 + 2/3).
    # cow: never predicted (precision undefined), 0 of 1 example found, F1 0.
    assert per_class == {
        "ant": {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                "support": 3},
        "bee": {"precision": 0.5, "recall": pytest.approx(2 / 3), "f1": pytest.approx(4 / 7), "support": 3},
        "cow": {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1},
    }
    assert metrics.worst_classes(per_class, count=2) == ["cow", "bee"]
    # A class with neither examples nor predictions has no F1 and is not among the worst.
    empty = metrics.per_class_metrics(np.array([[1, 0], [0, 0]]), ["a", "b"])
    assert empty["b"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert metrics.worst_classes(empty) == ["a"]


def test_eval_function_sums_the_confusion_matrix_over_batches():
    """Through `steps.make_eval_function` on a model that returns fixed logits, in two batches."""
    logits = _logits(PREDICTED)

    def model(images, training):
        del training
        return tf.gather(logits, tf.cast(images[:, 0], tf.int32))

    data = tf.data.Dataset.from_tensor_slices(
        (tf.range(7, dtype=tf.float32)[:, None], tf.one_hot(TRUE, 3))
    ).batch(4)
    summed, summarize = metrics.with_confusion(CLASSES)
    result = steps.make_eval_function(tf.distribute.get_strategy(), model, metrics=summed,
                                      summarize=summarize)(data)
    assert result["confusion"] == CONFUSION and result["count"] == 7
    assert result["top1"] == pytest.approx(4 / 7)
    assert result["per_class"]["bee"]["f1"] == pytest.approx(4 / 7)


def test_confusion_png_is_drawn_with_the_class_names(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    plt = metrics.pyplot("unused.png")
    figure = metrics.confusion_figure(CONFUSION, CLASSES, plt)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in axes.get_yticklabels()] == CLASSES
    np.testing.assert_allclose(axes.images[0].get_array()[1], [1 / 3, 2 / 3, 0])  # bee's row / its 3
    plt.close(figure)

    path = tmp_path / "confusion.png"
    metrics.plot_confusion(CONFUSION, CLASSES, str(path))
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 300


def test_missing_matplotlib_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(cli.SetupError, match=r"^--confusion_png=\S+c\.png: drawing the matrix needs "
                                             r"matplotlib.*pip install -e '\.\[tools\]'$"):
        metrics.plot_confusion(CONFUSION, CLASSES, str(tmp_path / "c.png"))
