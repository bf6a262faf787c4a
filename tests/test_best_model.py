"""--keep_best: the best epoch's model saved as model_best.keras with its epoch and metric, atomically."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bot_keras import best_model, run_dir

METRICS = ("val_top1", "val_top5", "val_loss")  # classification's BEST_METRICS


def _setup(tmp_path, metric):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    step_var = tf.Variable(0, dtype=tf.int64)
    keep = best_model.KeepBest(
        metric, metrics=METRICS, model=model, chief=True, step_var=step_var, steps_per_epoch=10,
        sync_bn=False,
        save=lambda m: run_dir.save_model(m, tmp_path, run_dir.BEST_MODEL_FILE),
    )
    return model, step_var, keep


def _epochs(model, step_var, evaluate, scores):
    """Epoch e sets every weight to e, then evaluates at step 10·(e + 1) (as the loop does)."""
    for epoch, _ in enumerate(scores):
        for w in model.weights:
            w.assign(np.full(w.shape, float(epoch), "float32"))
        step_var.assign(10 * (epoch + 1))
        evaluate(None)


def _saved_epoch(tmp_path):
    saved = keras.saving.load_model(tmp_path / run_dir.BEST_MODEL_FILE)
    values = {float(v) for w in saved.weights for v in np.ravel(w.numpy())}
    assert len(values) == 1
    return int(values.pop())


@pytest.mark.parametrize("metric, scores, best", [
    ("val_top1", [0.2, 0.5, 0.4, 0.5], 1),  # a tie does not replace the earlier best
    ("val_loss", [2.0, 1.5, 1.7, 1.2], 3),  # lower is better
])
def test_the_best_epochs_model_and_metric_are_kept(tmp_path, metric, scores, best):
    model, step_var, keep = _setup(tmp_path, metric)
    assert keep.summary() == {}
    name = metric.removeprefix("val_")
    results = iter([{name: s} for s in scores])
    _epochs(model, step_var, keep.wrap(lambda _: next(results)), scores)
    assert keep.summary() == {"best_epoch": best, f"best_{metric}": scores[best]}
    assert _saved_epoch(tmp_path) == best


def test_a_kill_between_the_temporary_file_and_the_rename_keeps_the_previous_best(tmp_path, monkeypatch):
    model, step_var, keep = _setup(tmp_path, "val_top1")
    results = iter([{"top1": 0.3}, {"top1": 0.6}])
    evaluate = keep.wrap(lambda _: next(results))
    _epochs(model, step_var, evaluate, [0.3])
    assert _saved_epoch(tmp_path) == 0

    def killed(*args):  # the process dies where the rename would happen
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        for w in model.weights:
            w.assign(np.full(w.shape, 1.0, "float32"))
        step_var.assign(20)
        evaluate(None)
    monkeypatch.undo()
    assert _saved_epoch(tmp_path) == 0  # the previous best, whole
    assert keep.summary() == {"best_epoch": 0, "best_val_top1": 0.3}  # not updated either


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match=r"keep_best must be one of .* got 'top1'"):
        best_model.KeepBest("top1", metrics=METRICS, model=None, save=None, chief=True, step_var=None,
                            steps_per_epoch=1, sync_bn=False)


def test_checkpoint_best_reads_model_best_keras_and_names_its_absence(tmp_path):
    from tiny_run import make_run

    from bot_keras import cli

    run, model = make_run(tmp_path / "run")
    message = r"--checkpoint=best: \S+run has no model_best\.keras \(train with --keep_best\)"
    with pytest.raises(cli.SetupError, match=message):
        run_dir.read_run(run, checkpoint="best")
    model.save(run / run_dir.BEST_MODEL_FILE)
    assert run_dir.read_run(run, checkpoint="best").model_path == run / "model_best.keras"
    assert run_dir.read_run(run).model_path == run / "model.keras"
