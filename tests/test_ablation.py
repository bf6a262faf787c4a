"""tools/ablation.py: row specs, the trainer arguments, reading the trainer's CSV log, the table, the plot."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import keras
import pytest
from tools_module import load_tool

from bot_keras import cli, loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
ablation = load_tool("ablation")

BASE = "configs/cifar10/ablation_base.flags"


# --- rows ------------------------------------------------------------------------------------------------


def test_row_name_and_flags_and_plus_rows_inherit():
    first = ablation.parse_row("baseline (Sec. 2): --batch_size=128 --lr_schedule=step")
    assert first == ablation.Row("baseline (Sec. 2)", ("--batch_size=128", "--lr_schedule=step"))
    second = ablation.parse_row("+ cosine: --lr_schedule=cosine", previous=first)
    assert second.flags == ("--batch_size=128", "--lr_schedule=step", "--lr_schedule=cosine")
    fresh = ablation.parse_row("other: --zero_gamma", previous=second)
    assert fresh.flags == ("--zero_gamma",)  # no '+': starts from the base again
    assert ablation.parse_row("empty:").flags == ()
    quoted = ablation.parse_row("""q: --teacher='runs/my teacher/model.keras'""")
    assert quoted.flags == ("--teacher=runs/my teacher/model.keras",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no colon --x=1", r"is not 'NAME: --flag=value \.\.\.'"),
        (": --x=1", r"is not 'NAME: --flag=value"),
        ("a: batch_size=1", r"row 'a': 'batch_size=1' is not a --flag"),
        ("a: --epochs=3", r"row 'a' sets '--epochs=3'; the budget"),
        ("a: --model_dir=/x", r"row 'a' sets '--model_dir=/x'"),
        ("a: --noresume", r"row 'a' sets '--noresume'"),
        ("+ a: --x=1", r"row '\+ a' starts with '\+' but there is no row before it"),
        ("a: --x='unclosed", r"row 'a': cannot split"),
    ],
)
def test_bad_rows_are_reported_with_the_row(text, message):
    with pytest.raises(ablation.SpecError, match=message):
        ablation.parse_row(text, where="--row")


def test_spec_file_skips_comments_and_names_the_line_of_an_error(tmp_path):
    spec = tmp_path / "rows.txt"
    spec.write_text("# header\n\nbase: --batch_size=64\n  # indented comment\n+ cos: --lr_schedule=cosine\n")
    texts, labels = ablation.read_spec_lines(str(spec))
    rows = ablation.parse_rows(texts, where=labels)
    assert [r.name for r in rows] == ["base", "+ cos"]
    assert rows[1].flags == ("--batch_size=64", "--lr_schedule=cosine")
    spec.write_text("base: --batch_size=64\n# c\nbad row\n")
    texts, labels = ablation.read_spec_lines(str(spec))
    with pytest.raises(ablation.SpecError, match=rf"{spec}:3: 'bad row' is not"):
        ablation.parse_rows(texts, where=labels)
    with pytest.raises(ablation.SpecError, match=r"duplicate row names \['a'\]"):
        ablation.parse_rows(["a: --x", "b: --y", "a: --z"])
    spec.write_text("# nothing\n")
    with pytest.raises(ablation.SpecError, match="holds no rows"):
        ablation.read_spec_lines(str(spec))
    with pytest.raises(ablation.SpecError, match="cannot read it"):
        ablation.read_spec_lines(str(tmp_path / "missing.txt"))


def test_row_directory_names():
    assert ablation.row_dir_name(0, "baseline (Sec. 2)") == "00_baseline_sec_2"
    assert ablation.row_dir_name(3, "+ label smoothing") == "03_label_smoothing"
    assert ablation.row_dir_name(12, "+++") == "12_row"


def test_row_flags_override_base_and_common_flags_and_the_budget_is_last(monkeypatch, tmp_path, parse):
    """The order the trainer sees (absl: the last occurrence of a flag wins)."""
    monkeypatch.chdir(ROOT)
    row = ablation.Row("+ big batch", ("--batch_size=512", "--dataset=synthetic:99"))
    args = ablation.row_arguments(row, base=BASE, common=["--dataset=synthetic", "--seed=7"], epochs=2.5,
                                  run_dir=str(tmp_path / "r"))
    assert args[0] == f"--flagfile={BASE}" and args[-2:] == ["--epochs=2.5", f"--model_dir={tmp_path / 'r'}"]
    f = parse(*args)
    assert (f.batch_size, f.dataset, f.seed) == (512, "synthetic:99", 7)
    assert (f.epochs, f.lr_schedule) == (2.5, "step")


def test_rows_are_validated_with_the_trainer_flags_before_training(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    good = ablation.parse_rows(["base:", "+ cos: --lr_schedule=cosine"])
    ablation.validate_rows(good, base=BASE, common=["--dataset=synthetic"], epochs=3, out_dir=str(tmp_path))
    bad = ablation.parse_rows(["base:", "+ typo: --lable_smoothing=0.1", "other: --lr_schedule=poly"])
    with pytest.raises(ablation.SpecError) as error:
        ablation.validate_rows(bad, base=BASE, common=[], epochs=3, out_dir=str(tmp_path))
    text = str(error.value)
    assert "row '+ typo': Unknown command line flag 'lable_smoothing'" in text
    assert "row 'other': --lr_schedule='poly'" in text
    assert "row 'base'" not in text


def run_ablation(argv):
    return cli.call(
        ablation.main, ablation.define_flags, argv, command=ablation.COMMAND, required=ablation.REQUIRED
    )


def test_main_dry_run_prints_every_command_and_rejects_typos(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    argv = [f"--base={BASE}", "--row=a: --batch_size=64", "--row=+ b: --lr_schedule=cosine", "--epochs=2",
            f"--out_dir={tmp_path}", "--dry_run", "--", "--dataset=synthetic"]
    assert run_ablation(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == (
        f"+ b: python -m bot_keras.train --flagfile={BASE} --verbose=2 --dataset=synthetic --batch_size=64 "
        f"--lr_schedule=cosine --epochs=2 --model_dir={tmp_path}/01_b"
    )
    with pytest.raises(SystemExit) as exit_info:
        run_ablation([f"--base={BASE}", "--row=a: --bach_size=64", "--epochs=2", f"--out_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "row 'a': Unknown command line flag 'bach_size'" in capsys.readouterr().err
    (tmp_path / "00_a" / "checkpoints").mkdir(parents=True)  # a row that died before it finished
    with pytest.raises(SystemExit):
        run_ablation([f"--base={BASE}", "--row=a:", "--epochs=2", f"--out_dir={tmp_path}"])
    assert f"row 'a': {tmp_path}/00_a holds an unfinished run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_ablation([f"--base={BASE}", "--epochs=2", f"--out_dir={tmp_path}"])
    assert "no rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_ablation(["--base=nope.flags", "--row=a:", "--epochs=2", f"--out_dir={tmp_path}"])
    assert "--base='nope.flags': no such flagfile" in capsys.readouterr().err


# --- results ---------------------------------------------------------------------------------------------


def _write_trainer_csv(run_dir, epochs_logs):
    """Writes logs/training.csv through the trainer's own callbacks (the file the tool reads)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    callbacks = loop.make_callbacks(str(run_dir), chief=True, verbose=0, epochs=len(epochs_logs),
                                    steps_per_epoch=1, model=model, resume=False)
    callbacks.on_train_begin()
    for epoch, logs in enumerate(epochs_logs):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()


def test_reads_the_trainers_csv_log_with_mixup_epochs_as_missing_accuracy(tmp_path):
    mixup_epoch = {"loss": 2.0, "lr": 0.4, "images_per_sec": 400.0, "val_loss": 1.5, "val_top1": 0.41,
                   "val_top5": 0.90}  # no training top1/top5 while mixup is on
    plain_epoch = {**mixup_epoch, "top1": 0.55, "top5": 0.95, "images_per_sec": 500.0, "val_top1": 0.6,
                   "val_top5": 0.96}
    _write_trainer_csv(tmp_path, [mixup_epoch, plain_epoch])
    log = ablation.read_csv_log(tmp_path / "logs" / "training.csv")
    assert log["epoch"] == [0, 1]
    assert log["top1"] == [None, 0.55]
    assert log["val_top1"] == [0.41, 0.6]
    summary = ablation.summarize_run(str(tmp_path))
    assert summary["epochs"] == [1, 2]
    assert summary["val_top1"] == [0.41, 0.6]
    assert (summary["top1"], summary["top5"]) == (0.6, 0.96)
    assert summary["images_per_sec"] == pytest.approx(450.0)


def test_table_rows_delta_against_the_first_row_and_failures():
    results = [
        {"name": "baseline", "top1": 0.5, "top5": 0.9, "wall_s": 412.0, "images_per_sec": 401.4,
         "returncode": 0},
        {"name": "+ cosine", "top1": 0.5234, "top5": 0.91, "wall_s": 390.0, "images_per_sec": 455.6,
         "returncode": 0},
        {"name": "+ mixup", "top1": 0.4811, "top5": 0.8999, "wall_s": 60.0, "images_per_sec": None,
         "returncode": 0},
        {"name": "+ broken", "returncode": 3, "wall_s": 5.0, "log": "03_broken.log"},
    ]
    lines = ablation.format_table(results).splitlines()
    assert lines[0] == "| Row | Top-1 (%) | Top-5 (%) | Δ top-1 (pp) | Wall time | Images/s |"
    assert lines[2] == "| baseline | 50.00 | 90.00 | — | 6.9 min | 401 |"
    assert lines[3] == "| + cosine | 52.34 | 91.00 | +2.34 | 6.5 min | 456 |"
    assert lines[4] == "| + mixup | 48.11 | 89.99 | -1.89 | 1.0 min | n/a |"
    assert lines[5] == "| + broken (failed: exit 3, see 03_broken.log) | n/a | n/a | n/a | 0.1 min | n/a |"
    failed_first = ablation.format_table([results[3], results[0]]).splitlines()
    assert failed_first[2].endswith("| n/a | n/a | n/a | 0.1 min | n/a |")
    assert failed_first[3] == "| baseline | 50.00 | 90.00 | n/a | 6.9 min | 401 |"


def test_plot_is_a_png_and_a_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    results = [{"name": "a", "epochs": [1, 2, 3], "val_top1": [0.2, 0.4, 0.5]},
               {"name": "+ b", "epochs": [1, 2], "val_top1": [None, 0.45]}]
    if importlib.util.find_spec("matplotlib") is not None:
        path = tmp_path / "curves.png"
        ablation.plot_curves(results, str(path), title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match=r"needs matplotlib.*pip install -e '\.\[tools\]'.*--no_plot"):
        ablation.plot_curves(results, str(tmp_path / "x.png"), title="t")


@pytest.mark.slow
def test_end_to_end_one_row_then_reuse(tmp_path):
    """One tiny row through the real trainer subprocess; a second call reuses the finished run."""
    out = tmp_path / "abl"
    command = [sys.executable, str(ROOT / "tools" / "ablation.py"), f"--base={BASE}",
               "--row=tiny: --batch_size=8", "--epochs=2", f"--out_dir={out}", "--no_plot",
               "--", "--dataset=synthetic:32", "--eval_split=validation", "--steps_per_epoch=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    table = (out / "ablation.md").read_text()
    summary = ablation.summarize_run(str(out / "00_tiny"))
    assert summary["epochs"] == [1, 2]
    assert f"| tiny | {100 * summary['top1']:.2f} | {100 * summary['top5']:.2f} | — |" in table
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already finished" in second.stdout
    assert (out / "ablation.md").read_text().split("| tiny |")[1] == table.split("| tiny |")[1]
