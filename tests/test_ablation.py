"""tools/ablation.py: row specs, the trainer arguments, reading the trainer's CSV log, the table, the plot."""

import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest
from test_finetune import write_scenes
from tools_module import load_tool

from bot_keras import cli, finetune, loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
ablation = load_tool("ablation")

BASE = "configs/cifar10/ablation_base.flags"
CAMVID = "configs/transfer/camvid_fcn_resnet18_d.flags"


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

    def validate(rows, common):
        jobs = ablation.plan_jobs(rows, [None], [], base=BASE, common=common, epochs=3, out_dir=str(tmp_path))
        ablation.validate_jobs(jobs, rows, {job.key: "new" for job in jobs})

    validate(ablation.parse_rows(["base:", "+ cos: --lr_schedule=cosine"]), ["--dataset=synthetic"])
    with pytest.raises(ablation.SpecError) as error:
        validate(ablation.parse_rows(["base:", "+ typo: --lable_smoothing=0.1", "other: --lr_schedule=poly"]),
                 [])
    text = str(error.value)
    assert "row '+ typo': Unknown command line flag 'lable_smoothing'" in text
    assert "row 'other': --lr_schedule='poly'" in text
    assert "row 'base'" not in text


def test_the_table6_rows_and_transfers_validate(monkeypatch, tmp_path):
    """configs/cifar10/table6_rows.txt as its header runs it: two seeds, CamVid on every row, raccoon on
    the first and last."""
    monkeypatch.chdir(ROOT)
    texts, labels = ablation.read_spec_lines("configs/cifar10/table6_rows.txt")
    rows = ablation.parse_rows(texts, where=labels)
    assert [row.name for row in rows] == [
        "efficient (Sec. 3)", "+ cosine (Sec. 5.1)", "+ label smoothing (Sec. 5.2)", "+ mixup (Sec. 5.4)"]
    raccoon = "configs/transfer/raccoon_retinanet_resnet18_d.flags@0,-1"
    transfers = [ablation.parse_transfer(CAMVID, num_rows=4), ablation.parse_transfer(raccoon, num_rows=4)]
    jobs = ablation.plan_jobs(rows, [0, 1], transfers, base=BASE, common=["--dataset=folder:/data/cifar10"],
                              epochs=12, out_dir=str(tmp_path))
    assert len(jobs) == 8 + 8 + 4
    ablation.validate_jobs(jobs, rows, {job.key: "new" for job in jobs})


def test_the_beyond_rows_validate_and_start_with_the_table6_all_tricks_row(monkeypatch, tmp_path):
    """configs/cifar10/beyond_rows.txt: every row's command line parses and validates, and its first row
    trains exactly the all-tricks row of table6_rows.txt (so the finished runs can be reused)."""
    monkeypatch.chdir(ROOT)
    common = ["--dataset=folder:/data/cifar10"]
    texts, labels = ablation.read_spec_lines("configs/cifar10/beyond_rows.txt")
    beyond = ablation.parse_rows(texts, where=labels)
    assert [row.name for row in beyond] == [
        "all tricks (Sec. 3-5)", "+ EMA", "+ CutMix", "+ RandAugment", "+ stochastic depth"]
    jobs = ablation.plan_jobs(beyond, [0, 1], [], base=BASE, common=common, epochs=12, out_dir=str(tmp_path))
    ablation.validate_jobs(jobs, beyond, {job.key: "new" for job in jobs})
    texts, labels = ablation.read_spec_lines("configs/cifar10/table6_rows.txt")
    table6 = ablation.parse_rows(texts, where=labels)
    last = ablation.plan_jobs(table6, [0], [], base=BASE, common=common, epochs=12, out_dir=str(tmp_path))[-1]
    strip = lambda job: [a for a in job.arguments if not a.startswith("--model_dir=")]  # noqa: E731
    assert strip(jobs[0]) == strip(last)
    assert jobs[1].arguments[-3:-2] == ("--ema_decay=0.999",)


def run_ablation(argv):
    return cli.call(
        ablation.main, ablation.define_flags, argv, command=ablation.COMMAND, required=ablation.REQUIRED
    )


def test_seeds_and_transfers_are_parsed_with_their_errors_named(monkeypatch):
    assert ablation.parse_seeds([]) == [None]
    assert ablation.parse_seeds(["0", "1", "7"]) == [0, 1, 7]
    with pytest.raises(ablation.SpecError, match=r"--seeds='0,x' is not a comma-separated list"):
        ablation.parse_seeds(["0", "x"])
    with pytest.raises(ablation.SpecError, match=r"--seeds='1,1' repeats a seed"):
        ablation.parse_seeds(["1", "1"])
    monkeypatch.chdir(ROOT)
    every = ablation.parse_transfer(CAMVID, num_rows=3)
    assert (every.name, every.rows, every.flags, every.task) == (
        "camvid_fcn_resnet18_d", (0, 1, 2), (), "segmentation")
    ends = ablation.parse_transfer(f"{CAMVID}@-1,0 --data_dir='/my data'", num_rows=4)
    assert (ends.rows, ends.flags) == ((0, 3), ("--data_dir=/my data",))
    raccoon = ablation.parse_transfer("configs/transfer/raccoon_retinanet_resnet18_d.flags@1", num_rows=2)
    assert (raccoon.rows, raccoon.task) == ((1,), "detection")
    for text, message in [
        (f"{CAMVID}@4", r"row index 4 is out of range: there are 4 rows"),
        (f"{CAMVID}@-5", r"row index -5 is out of range"),
        (f"{CAMVID}@last", r"'last' after '@' is not a row index"),
        ("nope.flags@0", r"no such flagfile 'nope.flags'"),
        (f"{CAMVID} --backbone_weights=x", r"sets '--backbone_weights=x'; tools/ablation.py sets the"),
        (f"{CAMVID} data_dir=x", r"'data_dir=x' is not a --flag"),
        (f"{CAMVID} --dat_dir=x", r"Unknown command line flag 'dat_dir'"),
        (f"{CAMVID} --task=classification", r"--task='classification'; a transfer is one of segmentation"),
    ]:
        with pytest.raises(ablation.SpecError, match=message):
            ablation.parse_transfer(text, num_rows=4)


def test_dry_run_prints_every_command_in_the_seed_layout_and_rejects_typos(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    rows = ["--row=a: --batch_size=64", "--row=+ b: --lr_schedule=cosine"]
    argv = [f"--base={BASE}", *rows, "--epochs=2", f"--out_dir={tmp_path}", "--dry_run", "--",
            "--dataset=synthetic"]
    assert run_ablation(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == (
        f"row '+ b': python -m bot_keras.train --flagfile={BASE} --verbose=2 --dataset=synthetic "
        f"--batch_size=64 --lr_schedule=cosine --epochs=2 --model_dir={tmp_path}/01_b"
    )
    seeded = [*argv[:-3], "--seeds=0,1", f"--transfer={CAMVID}@-1 --data_dir=/d", *argv[-3:]]
    assert run_ablation(seeded) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "row 'a', seed 0", "row '+ b', seed 0", "row 'a', seed 1", "row '+ b', seed 1",
        "row '+ b', seed 0, transfer camvid_fcn_resnet18_d",
        "row '+ b', seed 1, transfer camvid_fcn_resnet18_d"]
    # Seed S's run is the run of the single-seed tool with --out_dir=OUT/seedS -- --seed=S.
    assert lines[3] == (
        f"row '+ b', seed 1: python -m bot_keras.train --flagfile={BASE} --verbose=2 --dataset=synthetic "
        f"--seed=1 --batch_size=64 --lr_schedule=cosine --epochs=2 --model_dir={tmp_path}/seed1/01_b"
    )
    assert lines[5].endswith(
        f": python -m bot_keras.finetune --flagfile={CAMVID} --verbose=2 --data_dir=/d "
        f"--backbone_weights={tmp_path}/seed1/01_b --seed=1 "
        f"--model_dir={tmp_path}/seed1/transfer/camvid_fcn_resnet18_d/01_b"
    )
    for extra, message in [
        (["--row=a: --bach_size=64", "--seeds=3,4"],
         "error: row 'a', seed 3: Unknown command line flag 'bach_size'. Did you mean: batch_size ?\n"),
        (["--row=a: --seed=3", "--seeds=0,1"], "row 'a' sets --seed; with --seeds=0,1 the tool sets"),
        (["--row=a: --model=resnet34_d", "--seeds=0", f"--transfer={CAMVID}"],
         "row 'a', seed 0, transfer camvid_fcn_resnet18_d: --backbone='resnet18_d' but the row trains "
         "--model='resnet34_d'"),
        ([f"--transfer={CAMVID}", f"--transfer={CAMVID}@0", "--row=a:"], "have the same name"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_ablation([f"--base={BASE}", *extra, "--epochs=2", f"--out_dir={tmp_path}"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err  # once, for the first seed
    (tmp_path / "00_a").mkdir()
    (tmp_path / "00_a" / "model.keras").write_text("half a run")  # files, but no checkpoint to continue
    with pytest.raises(SystemExit):
        run_ablation([f"--base={BASE}", "--row=a:", "--epochs=2", f"--out_dir={tmp_path}"])
    assert f"{tmp_path}/00_a: unfinished run(s) without a checkpoint" in capsys.readouterr().err
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


def _finished(**numbers):
    return {"status": "finished", **numbers}


def test_table_mean_std_per_seed_delta_and_the_spread_note():
    """Three seeds; the means and sample standard deviations worked by hand."""
    seg = ablation.Transfer("x/seg.flags", (0, 2), (), "segmentation")
    failed = {"status": "failed", "returncode": 3, "log": "seed1/02_c.log"}
    results = {
        # a: top-1 70, 72, 77 → mean 73, s.d. sqrt((3² + 1² + 4²) / 2) = sqrt(13) = 3.61
        (0, 0, None): _finished(top1=0.70, top5=0.9, train_time_s=600.0, images_per_sec=401.4),
        (0, 1, None): _finished(top1=0.72, top5=0.9, train_time_s=630.0, images_per_sec=410.0),
        (0, 2, None): _finished(top1=0.77, top5=0.9, train_time_s=660.0, images_per_sec=None),
        # + b: 78, 80, 82 → 80 ± 2; its range [78, 82] does not meet a's [70, 77]
        (1, 0, None): _finished(top1=0.78), (1, 1, None): _finished(top1=0.80),
        (1, 2, None): _finished(top1=0.82),
        # + c: one finished seed, 74, inside a's range
        (2, 0, None): _finished(top1=0.74, top5=0.95, train_time_s=90.0, images_per_sec=455.6),
        (2, 1, None): failed,
        # seg on rows 0 and 2 only: a 30, 34, 32 → 32 ± 2; c 35 (outside a's [30, 34])
        (0, 0, "seg"): _finished(metric=0.30, train_time_s=960.0), (0, 1, "seg"): _finished(metric=0.34),
        (0, 2, "seg"): _finished(metric=0.32),
        (2, 0, "seg"): _finished(metric=0.35, train_time_s=1000.0), (2, 1, "seg"): {"status": "skipped"},
    }
    names = ["a", "+ b", "+ c"]
    lines = ablation.format_table(names, [0, 1, 2], results, [seg]).splitlines()
    assert lines[0] == ("| Row | Top-1 (%) | Δ top-1 (pp) | Top-1 per seed (0, 1, 2) | seg mIoU (%) | Δ (pp) "
                        "| per seed |")
    assert lines[2] == ("| a | 73.00 ± 3.61 | — | 70.00 / 72.00 / 77.00 | 32.00 ± 2.00 | — "
                        "| 30.00 / 34.00 / 32.00 |")
    assert lines[3] == "| + b | 80.00 ± 2.00 | +7.00 | 78.00 / 80.00 / 82.00 | — | — | not run |"
    assert lines[4] == ("| + c | 74.00 | +1.00, inside the seed spread | 74.00 / failed / pending | 35.00 "
                        "| +3.00 | 35.00 / skipped / pending |")
    runs = ablation.format_runs(names, [0, 1, 2], results, [seg]).splitlines()
    assert runs[0] == ("| Row | Seed | Top-1 (%) | Top-5 (%) | Training time | Images/s | seg mIoU (%) "
                       "| seg time |")
    assert runs[2] == "| a | 0 | 70.00 | 90.00 | 10.0 min | 401 | 30.00 | 16.0 min |"
    assert runs[4] == "| a | 2 | 77.00 | 90.00 | 11.0 min | n/a | 32.00 | n/a |"
    assert runs[5] == "| + b | 0 | 78.00 | n/a | n/a | n/a | — | — |"
    assert runs[9] == "| + c | 1 | failed (exit 3, see seed1/02_c.log) |  |  |  | skipped |  |"
    assert runs[10] == "| + c | 2 | pending |  |  |  | pending |  |"
    # One seed: no ± and no spread note; a failed first row leaves no reference.
    single = {(0, None, None): _finished(top1=0.5), (1, None, None): _finished(top1=0.5234)}
    lines = ablation.format_table(["a", "b"], [None], single).splitlines()
    assert lines[2:] == ["| a | 50.00 | — | 50.00 |", "| b | 52.34 | +2.34 | 52.34 |"]
    single[(0, None, None)] = failed
    assert ablation.format_table(["a", "b"], [None], single).splitlines()[2:] == [
        "| a | pending | n/a | failed |", "| b | 52.34 | n/a | 52.34 |"]


def test_plot_is_a_png_and_a_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    results = [{"name": "a", "epochs": [1, 2, 3], "val_top1": [0.2, 0.4, 0.5]},
               {"name": "+ b", "epochs": [1, 2], "val_top1": [None, 0.45]}]
    if importlib.util.find_spec("matplotlib") is not None:
        path = tmp_path / "curves.png"
        ablation.plot_curves(results, str(path), title="t")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = {(0, 0, None): _finished(top1=0.5), (0, 1, None): _finished(top1=0.6),
                (1, 0, None): {"status": "failed"}, (0, 0, "seg"): _finished(metric=0.3)}
        seg = ablation.Transfer("seg.flags", (0,), (), "segmentation")
        ablation.plot_rows(["a", "+ b"], [0, 1], rows, str(tmp_path / "rows.png"), title="t", transfers=[seg])
        assert (tmp_path / "rows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    assert f"| tiny | {100 * summary['top1']:.2f} | — | {100 * summary['top1']:.2f} |" in table
    assert f"| tiny | — | {100 * summary['top1']:.2f} | {100 * summary['top5']:.2f} | " in table
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already finished" in second.stdout
    assert (out / "ablation.md").read_text().split("| tiny |")[1] == table.split("| tiny |")[1]


# --- seeds, transfer and resume through the real trainer and fine-tuner ------------------------------------


def in_process(kill_dir=None):
    """`run_command` running the training command in this process (a subprocess costs ~10 s of start-up a
    run). The run in `kill_dir` stops after its first epoch (--max_steps) and loses its final files: what a
    run killed after its first epoch's checkpoint leaves."""

    def run_command(command, *, log, env):
        module, arguments = command[2], list(command[3:])
        killed = kill_dir is not None and f"--model_dir={kill_dir}" in arguments
        tool = ablation.COMMANDS[module]
        define_flags = tool.define_flags
        if tool is finetune:  # the fine-tuning command defines the flags of its --task
            define_flags = lambda fv: finetune.define_flags(fv, finetune.task_of(arguments))  # noqa: E731
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                cli.call(tool.main, define_flags, arguments + ["--max_steps=2"] * killed, command=module)
                code = 0
            except SystemExit as stop:
                code = stop.code
        keras.backend.clear_session()
        if killed:
            (kill_dir / "final_metrics.json").unlink()
            (kill_dir / "model.keras").unlink()
            return -9
        return code

    return run_command


def test_two_seeds_a_transfer_and_a_killed_run_resumed(monkeypatch, tmp_path, capsys):
    """A tiny row × two seeds on synthetic data, each fine-tuned on a tiny seg_folder; seed 1's run is killed
    after its first epoch (its transfer skipped), and the next call continues it with --resume."""
    monkeypatch.chdir(ROOT)
    write_scenes(tmp_path / "scenes", counts=(("train", 4), ("val", 2)))
    seg = tmp_path / "tiny_seg.flags"
    seg.write_text("--task=segmentation\n--dataset=seg_folder:scenes\n--eval_split=val\n--backbone=resnet18_d\n"
                   "--crop_size=32\n--eval_size=48\n--batch_size=2\n--epochs=1\n--base_lr=0.1\n")
    out = tmp_path / "abl"
    argv = [f"--base={BASE}", "--row=a: --batch_size=8", "--epochs=2", "--seeds=0,1",
            f"--transfer={seg} --data_dir={tmp_path}", f"--out_dir={out}", "--no_plot",
            "--", "--dataset=synthetic:32", "--eval_split=validation", "--steps_per_epoch=2"]
    killed = out / "seed1" / "00_a"
    monkeypatch.setattr(ablation, "run_command", in_process(kill_dir=killed))
    assert run_ablation(argv) == 1  # the killed run counts as failed
    assert "row 'a', seed 1: FAILED (exit -9)" in capsys.readouterr().out
    assert ablation.run_state(str(killed)) == "resume"
    table = (out / "ablation.md").read_text()
    assert "| a | 1 | failed (exit -9, see seed1/00_a.log) |  |  |  | skipped |  |" in table

    def no_training(command, **_):
        raise AssertionError(f"--no_train started {command}")

    monkeypatch.setattr(ablation, "run_command", no_training)
    assert run_ablation([*argv[:-4], "--no_train", *argv[-4:]]) == 0  # a report of the unfinished ablation
    table = (out / "ablation.md").read_text()
    assert "| a | 1 | pending (1 epoch logged) |  |  |  | pending |  |" in table
    seed0 = 100 * json.loads((out / "seed0" / "00_a" / "final_metrics.json").read_text())["val_top1"]
    assert f"| a | {seed0:.2f} | — | {seed0:.2f} / pending | " in table  # the finished seed alone

    monkeypatch.setattr(ablation, "run_command", in_process())
    finished = {path: path.stat().st_mtime_ns for path in out.glob("**/final_metrics.json")}
    assert len(finished) == 2  # seed 0's classifier and its transfer
    assert run_ablation(argv) == 0
    printed = capsys.readouterr().out
    assert f"row 'a', seed 1: resuming (log: {killed}.log)" in printed
    assert printed.count("already finished") == 2
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # reused, not trained again
    resumed_log = (out / "seed1" / "00_a.log").read_text()
    assert resumed_log.count(" -m bot_keras.train ") == 2  # the first attempt's log, then the resume's
    assert resumed_log.splitlines()[0].endswith(f"--model_dir={killed}")
    assert f"--model_dir={killed} --resume" in resumed_log and "Resumed from" in resumed_log
    assert ablation.read_csv_log(killed / "logs" / "training.csv")["epoch"] == [0, 1]
    assert json.loads((killed / "final_metrics.json").read_text())["step"] == 4

    # The layout: seed S's runs in OUT/seedS, their transfers in OUT/seedS/transfer/NAME.
    for seed in (0, 1):
        assert f"--seed={seed}\n" in (out / f"seed{seed}" / "00_a" / "flags.txt").read_text()
        assert (out / f"seed{seed}" / "00_a.json").is_file()
        transfer_flags = (out / f"seed{seed}" / "transfer" / "tiny_seg" / "00_a" / "flags.txt").read_text()
        assert f"--backbone_weights={out}/seed{seed}/00_a\n" in transfer_flags
        assert f"--seed={seed}\n" in transfer_flags and f"--data_dir={tmp_path}\n" in transfer_flags

    # The table's numbers: final_metrics.json's, averaged by hand.
    def metric(path, key):
        return json.loads((path / "final_metrics.json").read_text())[key]

    def mean_std(a, b):
        return f"{100 * (a + b) / 2:.2f} ± {100 * abs(a - b) / 2 ** 0.5:.2f}"

    top1 = [metric(out / f"seed{seed}" / "00_a", "val_top1") for seed in (0, 1)]
    miou = [metric(out / f"seed{seed}" / "transfer" / "tiny_seg" / "00_a", "val_mean_iou") for seed in (0, 1)]
    assert (f"| a | {mean_std(*top1)} | — | {100 * top1[0]:.2f} / {100 * top1[1]:.2f} | {mean_std(*miou)} "
            f"| — | {100 * miou[0]:.2f} / {100 * miou[1]:.2f} |") in (out / "ablation.md").read_text()
    records = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["transfer"], r["status"]) for r in records] == [
        (0, None, "finished"), (1, None, "finished"), (0, "tiny_seg", "finished"),
        (1, "tiny_seg", "finished")]
