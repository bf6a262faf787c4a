"""teacher.py: loading the distillation teacher (Section 5.3); a distillation step never changes it."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_steps import _batches, _step_setup, _steps, _tiny_model

from bot_keras import cli, steps
from bot_keras.teacher import load_teacher, teacher_logits


def test_teacher_with_other_classes_or_size_is_rejected_naming_the_file(tmp_path):
    path = str(tmp_path / "teacher.keras")
    _tiny_model(num_classes=5).save(path)
    with pytest.raises(cli.SetupError, match=r"teacher\.keras' predicts 5 classes; the dataset has 3"):
        load_teacher(path, num_classes=3, image_size=6)
    with pytest.raises(cli.SetupError, match=r"takes 6x6 images; --image_size=8"):
        load_teacher(path, num_classes=5, image_size=8)
    # A text file named .keras is not "File not found" (Keras' words): it is named as not a .keras file.
    (tmp_path / "notes.keras").write_text("not a zip")
    with pytest.raises(
        cli.SetupError,
        match=r"^--teacher='\S*notes\.keras': not a \.keras file \(a \.keras model is a zip archive; this "
        r"9-byte file is not one\)$",
    ):
        load_teacher(str(tmp_path / "notes.keras"), num_classes=5, image_size=6)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_distillation_trains_the_student_and_never_changes_the_teacher(tmp_path, precision):
    keras.utils.set_random_seed(1)
    path = str(tmp_path / "teacher.keras")
    _tiny_model(batch_norm=True).save(path)
    teacher = load_teacher(path, num_classes=3, image_size=6)
    teacher_before = [w.copy() for w in teacher.get_weights()]  # includes BN moving mean/variance
    # Under mixed_float16 the student's step is loss-scaled; the teacher's logits enter the loss in float32.
    model, optimizer, _ = _step_setup(precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    loss = steps.make_per_example_loss(label_smoothing=0.1, temperature=4.0, hard_weight=None)
    step = steps.make_train_function(
        tf.distribute.get_strategy(),
        model,
        optimizer,
        per_example_loss=loss,
        global_batch_size=8,
        teacher=teacher,
    )
    student_before = model.get_weights()
    _steps(step, _batches(), 3)
    for a, b in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(student_before, model.get_weights(), strict=True)) > 1e-4


def test_savedmodel_teacher_gives_the_models_logits(tmp_path):
    model = _tiny_model()
    model.export(str(tmp_path / "teacher_savedmodel"), verbose=False)  # Keras' SavedModel: float images in
    teacher = load_teacher(str(tmp_path / "teacher_savedmodel"), num_classes=3, image_size=6)
    images = tf.random.stateless_normal((4, 6, 6, 3), seed=(1, 2))
    np.testing.assert_allclose(teacher_logits(teacher, images), model(images), rtol=1e-5, atol=1e-6)
    with pytest.raises(cli.SetupError, match=r"teacher_savedmodel' predicts 3 classes; the dataset has 4"):
        load_teacher(str(tmp_path / "teacher_savedmodel"), num_classes=4, image_size=6)


def test_a_classification_run_directory_is_a_teacher_at_the_students_size(tmp_path):
    from tiny_run import CLASS_NAMES, IMAGE_SIZE, make_run

    from bot_keras.models import build_model

    run_dir, model = make_run(tmp_path / "run")
    images = tf.random.stateless_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3), seed=(3, 4))
    teacher = load_teacher(str(run_dir), num_classes=len(CLASS_NAMES), image_size=IMAGE_SIZE)
    np.testing.assert_allclose(teacher_logits(teacher, images), model(images), rtol=1e-5, atol=1e-5)
    assert not teacher.trainable_weights
    # A student at another size: the run's model rebuilt at it with the same weights (a size-agnostic
    # build holding them is the second implementation).
    larger = tf.random.stateless_normal((2, 48, 48, 3), seed=(5, 6))
    teacher = load_teacher(str(run_dir), num_classes=len(CLASS_NAMES), image_size=48)
    anysize = build_model("resnet18_d", num_classes=len(CLASS_NAMES), input_shape=(None, None, 3))
    anysize.set_weights(model.get_weights())
    np.testing.assert_allclose(teacher_logits(teacher, larger), anysize(larger), rtol=1e-4, atol=1e-4)
    with pytest.raises(cli.SetupError, match=r"^--teacher='\S+': run directory \S+ is incomplete"):
        (run_dir / "model.keras").rename(run_dir / "moved.keras")
        load_teacher(str(run_dir), num_classes=len(CLASS_NAMES), image_size=IMAGE_SIZE)
