"""The package installs, imports and exposes the layout the other modules rely on."""

import importlib


def test_public_api_names_other_modules_rely_on():
    # docs/architecture.md's contract: each name resolves to a callable in the module it promises.
    contract = {
        "bot_keras.models": ("build_model", "build_backbone", "load_classifier_weights"),
        "bot_keras.data": ("make_dataset", "dataset_info", "read_class_names", "write_class_names"),
        "bot_keras.schedules": ("build_lr_schedule", "scaled_learning_rate", "training_steps"),
        "bot_keras.optimizers": ("build_optimizer", "decayed_variables"),
        "bot_keras.losses": ("classification_loss", "distillation_loss"),
        "bot_keras.data.mixup": ("sample_mixup_lambda", "mixup"),
        "bot_keras.distribute": ("create_strategy", "set_precision", "per_replica_batch_size"),
        "bot_keras.run_dir": ("read_run", "read_flags", "save_model", "write_run_info"),
        "bot_keras.model_files": ("load_model", "load_keras_model", "load_backbone", "copy_weights"),
        "bot_keras.atomic_write": ("write_atomic", "write_error"),
    }
    missing = [f"{module}.{name}" for module, names in contract.items() for name in names
               if not callable(getattr(importlib.import_module(module), name, None))]
    assert missing == []


def test_no_tensorflow_addons_dependency():
    from importlib.metadata import requires

    deps = " ".join(requires("bot-keras") or [])
    assert "tensorflow-addons" not in deps and "tensorflow_addons" not in deps
