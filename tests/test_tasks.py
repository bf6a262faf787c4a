"""tasks.py: the one Task interface, its lazy registry, and the contract every task keeps.

The contract test trains each head of each task (classification; segmentation's FCN and DeepLabV3;
detection) for one step through `bot_keras.finetune --task=T` (the one driver, `trainer.run`, which
`bot_keras.train` calls too), evaluates, exports, serves the export in a fresh process with TensorFlow
alone (no bot_keras, no keras-hub; `serving_default` on a batch [N] of encoded images of two sizes, as
every task's takes), predicts from it through `python -m bot_keras.predict` (detection's in a fresh process
of its own, the others' in the test's) and from the run through the registry, and checks that the
predictions agree. The keras-hub test runs a process in which `import keras_hub` fails.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import commands
import keras
import numpy as np
import pytest
import tensorflow as tf
from test_finetune import base_args, write_scenes
from tiny_detection import write_rectangles_voc
from tiny_run import encode, pixels

from bot_keras import evaluate, export, finetune, model_files, predict, run_dir, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
# The prefix of TensorFlow's log lines (C++, and Python's absl format): I/W/E/F, then MMDD.
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)
# A site directory whose sitecustomize makes `import keras_hub` fail, as on an install without the extra.
BLOCK_KERAS_HUB = 'import sys\nsys.modules["keras_hub"] = None\n'


def _env(*, without_keras_hub=False, tmp_path=None):
    """The environment a user runs a command in (bot_keras quiets TensorFlow's start-up lines itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    path = [str(REPO)]
    if without_keras_hub:
        site = tmp_path / "no_keras_hub"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCK_KERAS_HUB)
        path.insert(0, str(site))
    return dict(env, PYTHONPATH=os.pathsep.join(path), CUDA_VISIBLE_DEVICES="")


def test_every_task_module_provides_the_interface():
    # The Protocol's operations and attributes, read from the class (so a new one cannot be forgotten).
    names = [n for n in vars(tasks.Task) if not n.startswith("_")] + list(tasks.Task.__annotations__)
    assert {"define_flags", "make_dataset", "build_model", "evaluate_run", "serving_module"} <= set(names)
    for name in tasks.TASKS:
        module = tasks.task_module(name)
        assert module.NAME == name
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{tasks.TASK_MODULES[name]} lacks {missing}"
        # --keep_best's metrics are validation columns the trainer logs (best_model.KeepBest reads them).
        assert module.BEST_METRICS and all(m.startswith("val_") for m in module.BEST_METRICS)
        assert set(module.BEST_METRICS) <= set(module.CSV_COLUMNS)
    with pytest.raises(ValueError, match=r"--task='regression' is not one of segmentation, detection"):
        tasks.task_module("regression")


def test_readers_import_no_command_and_no_keras_hub():
    # A fresh process: importing the readers pulls in neither a training command nor keras-hub.
    code = (
        "import sys\n"
        "import bot_keras.evaluate, bot_keras.export, bot_keras.predict, bot_keras.run_dir\n"
        "import bot_keras.model_files\n"
        "print(sorted(m for m in ('bot_keras.train', 'bot_keras.finetune', 'bot_keras.trainer', 'keras_hub',"
        " 'bot_keras.detection.task') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# Loads an export with TensorFlow alone, serves a batch of the files named on the command line through
# `serving_default` and saves every output.
_SERVE_WITH_TENSORFLOW_ONLY = """
import sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(image_bytes=tf.constant([open(path, "rb").read() for path in sys.argv[3:]]))
np.savez(sys.argv[2], **{name: value.numpy() for name, value in out.items()})
print(sorted(m for m in ("bot_keras", "keras_hub") if m in sys.modules))
"""


def _task_args(task, tmp_path, head=None):
    """(command line, eval image count, an image to predict) of a one-step run of `task` (with `head`)."""
    common = ["--max_steps=1", "--steps_per_epoch=2", "--verbose=0", f"--model_dir={tmp_path / 'run'}"]
    if task == "classification":
        scenes = write_scenes(tmp_path / "scenes")
        args = ["--task=classification", "--model=resnet18_d", "--dataset=synthetic:20", "--image_size=32",
                "--batch_size=4", "--epochs=1", "--base_lr=0.1", "--warmup_epochs=0"]
        return args + common, 10, scenes / "val" / "images" / "0.png"  # synthetic: at least 10 validation
    if task == "segmentation":
        scenes = write_scenes(tmp_path / "scenes")
        args = [a for a in base_args(scenes, tmp_path / "run") if not a.startswith("--model_dir")]
        args.append(f"--head={head}")
        if head == "deeplabv3":
            args += ["--aux_loss_weight=0", "--output_stride=16"]
        return args + common, 3, scenes / "val" / "images" / "0.png"
    root = write_rectangles_voc(tmp_path / "voc", {"train": 4, "val": 2})
    args = ["--task=detection", f"--dataset=voc:{root}", "--backbone=resnet18_d", "--crop_size=64",
            "--batch_size=4", "--eval_split=val", "--detection_scale_range=1,1"]
    return args + common, 2, pathlib.Path(root) / "JPEGImages" / "val000.png"


@pytest.mark.slow  # two fresh serving processes per head
@pytest.mark.parametrize(
    "task, head",
    [("classification", None), ("segmentation", "fcn"), ("segmentation", "deeplabv3"), ("detection", None)],
    ids=["classification", "segmentation-fcn", "segmentation-deeplabv3", "detection"],
)
def test_task_contract_train_evaluate_export_serve_predict(task, head, tmp_path):
    if head == "deeplabv3":
        pytest.importorskip("keras_hub", reason="--head=deeplabv3 needs the transfer extra")
    argv, eval_count, image = _task_args(task, tmp_path, head)
    run = tmp_path / "run"
    keras.utils.set_random_seed(0)
    finetune.main(["finetune"], finetune.parse_flags(argv))  # the driver every training command uses
    keras.backend.clear_session()
    # run.json: the task, and what the task resolved before training (`Task.preflight`).
    resolved = {"eval_size": 48} if task == "segmentation" else {}
    assert json.loads((run / "run.json").read_text()) == {"task": task, **resolved}
    recorded = (run / "flags.txt").read_text()
    assert recorded.startswith(f"--task={task}\n")
    # A run defines and records only its own task's flags.
    own = {"classification": "--model=", "segmentation": "--head=", "detection": "--max_detections="}
    for other, flag in own.items():
        assert (flag in recorded) == (other == task), (other, recorded)
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["step"] == 1

    result, line = evaluate.evaluate_task_run(run, task)
    assert result["count"] == eval_count, result
    assert f"({eval_count} images)" in line

    served = export.export(run, tmp_path / "served")
    assert predict.model_task(served) == predict.model_task(run) == task

    # The export with TensorFlow alone, on a batch of two images of different sizes, against the module the
    # export saved, built again in this process from the run (float tolerance; class ids identical).
    other = tmp_path / "other.png"
    other.write_bytes(encode(pixels(29, 37, seed=5), "PNG"))
    batch = [str(image), str(other)]
    script = [sys.executable, "-c", _SERVE_WITH_TENSORFLOW_ONLY, str(served), str(tmp_path / "served.npz")]
    out = subprocess.run(
        [*script, *batch],
        env=dict(_env(), PYTHONPATH=""), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"  # neither bot_keras nor keras_hub was imported
    fresh = dict(np.load(tmp_path / "served.npz", allow_pickle=True))  # class names: bytes objects
    info = run_dir.read_run(run, task=task)
    module, _ = tasks.task_module(task).serving_module(info, model_files.load_model(info), top_k=5)
    local = module.serve_bytes(image_bytes=tf.constant(predict.read_images(batch)))
    assert sorted(fresh) == sorted(local)
    for name, value in local.items():
        value = value.numpy()
        assert fresh[name].shape == value.shape and fresh[name].shape[0] == 2, name
        if value.dtype.kind == "f":
            np.testing.assert_allclose(fresh[name], value, rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(fresh[name], value, err_msg=name)
    keras.backend.clear_session()

    # The export through the command line: detection's in a fresh process, whose console must stay free of
    # TensorFlow's log lines (its NMS op prints oneDNN's notice unless bot_keras quiets it); the other
    # tasks' in this one (their fresh-process consoles: test_predict and the keras-hub-blocked test below) ...
    argv = [f"--model={served}", "--top_k=2", f"--output_dir={tmp_path / 'predicted'}", str(image)]
    if task == "detection":
        out = subprocess.run([sys.executable, "-m", "bot_keras.predict", *argv],
                             env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert not TF_LOG_LINE.search(out.stdout + out.stderr), out.stderr
    else:
        out = commands.run(predict.COMMAND, *argv)
    assert out.returncode == 0, out.stderr
    # ... and the run in this one, through the registry: the same lines (files written to the same place).
    lines = tasks.task_module(task).predict_files(
        run, [str(image)], tmp_path / "predicted", predict.read_images([str(image)]), k=2
    )
    expected = "\n".join(lines).strip().splitlines()
    assert out.stdout.strip().splitlines()[-len(expected):] == expected
    assert expected[0].startswith(str(image))


@pytest.mark.slow  # one fresh process
def test_fcn_segmentation_trains_evaluates_exports_and_predicts_without_keras_hub(tmp_path):
    scenes = write_scenes(tmp_path / "scenes")
    run, env = tmp_path / "run", _env(without_keras_hub=True, tmp_path=tmp_path)
    args = [*base_args(scenes, run), "--max_steps=1", "--steps_per_epoch=2"]
    image = scenes / "val" / "images" / "0.png"
    # Detection and DeepLabV3 need the extra: asked for in the same process after the FCN commands, as
    # `python -m bot_keras.finetune` does (its flags from sys.argv; cli.call: cli.run's exit codes), each
    # refusal's stderr kept apart (test_finetune's test_cli_bad_flags_exit_2_one_line_each_and_no_traceback
    # checks a fresh finetune process' whole stderr on a refusal).
    refusals = [["--task=detection", "--backbone=resnet18_d", f"--dataset=voc:{tmp_path}",
                 f"--model_dir={tmp_path / 'other'}"],
                [*base_args(scenes, tmp_path / "other"), "--head=deeplabv3", "--aux_loss_weight=0"]]
    script = (
        "import contextlib, io, json, sys\n"
        "from bot_keras import cli, evaluate, export, finetune, predict\n"
        f"finetune.main(['finetune'], finetune.parse_flags({args!r}))\n"
        f"cli.call(evaluate.main, evaluate.define_flags, ['--model_dir={run}'], command='evaluate')\n"
        f"cli.call(export.main, export.define_flags, ['--model_dir={run}', "
        f"'--export_dir={tmp_path / 'served'}'], command='export')\n"
        f"cli.call(predict.main, predict.define_flags, ['--model={tmp_path / 'served'}', "
        f"'--output_dir={tmp_path / 'out'}', '{image}'], command='predict')\n"
        "assert sys.modules['keras_hub'] is None\n"
        "refused = []\n"
        f"for argv in {refusals!r}:\n"
        "    sys.argv, err = ['bot_keras.finetune', *argv], io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            cli.call(finetune.main, finetune._define_command_flags, argv,\n"
        "                     command=finetune.COMMAND)\n"
        "            refused.append([0, err.getvalue()])\n"
        "        except SystemExit as stop:\n"
        "            refused.append([stop.code, err.getvalue()])\n"
        "print('refused:', json.dumps(refused))\n"
        "assert sys.modules['keras_hub'] is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A console as clean as bot_keras.train's: no TensorFlow log line (C++ or Python) from any command.
    assert not TF_LOG_LINE.search(done.stdout + done.stderr), done.stderr
    assert re.search(r"val \(3 images\): pixel accuracy [\d.]+%  mIoU", done.stdout), done.stdout
    assert (tmp_path / "out" / "0_classes.png").is_file() and (run / "eval_val.json").is_file()

    # Detection and DeepLabV3 need the extra: one line naming it, exit 2.
    refused = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("refused: "))[9:])
    assert len(refused) == 2
    for code, stderr in refused:
        assert code == 2, stderr
        assert stderr.strip().count("\n") == 0, stderr
        assert "pip install 'bot-keras[transfer]'" in stderr and "keras-hub" in stderr

