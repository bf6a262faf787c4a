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
