"""Run an ablation: one base flagfile, a list of rows of flag overrides, each trained for the same budget,
for one or more seeds, and optionally each row's classifier fine-tuned on other tasks (the paper's
Section 6: does a better classifier transfer better?).

    python tools/ablation.py --base=configs/cifar10/ablation_base.flags \\
        --rows=configs/cifar10/table6_rows.txt --epochs=12 --seeds=0,1 --out_dir=runs/table6 \\
        --transfer='configs/transfer/camvid_fcn_resnet18_d.flags --data_dir=/data' \\
        --transfer='configs/transfer/raccoon_retinanet_resnet18_d.flags@0,-1 --data_dir=/data' \\
        -- --dataset=folder:/data/cifar10

Rows. A row is `NAME: --flag=value --flag2=value ...` (shell-style quoting); a NAME that starts with '+' adds
its flags to the previous row's, the way the paper's tables read ("+ cosine decay" keeps everything above
it). Rows come from repeated --row arguments and/or a --rows file (one row a line, '#' comments, blank lines
ignored). Each row of each seed is one `python -m bot_keras.train` subprocess, run one after another, with

    --flagfile=BASE --verbose=2 [flags after `--`] [--seed=S] [the row's flags] --epochs=BUDGET
        --model_dir=RUN_DIR [--resume]

so a row's flags override the base and the common flags, and every row trains for --epochs (a row may not
set --epochs, --model_dir or --resume, nor --seed when --seeds is given).

Seeds. --seeds=0,1 runs every row once per listed seed (a list, not a count: --seeds=0,1,2 for three
runs), passing `--seed=S` to the trainer; seed S's runs live in OUT/seedS/. Without --seeds every row runs
once, in OUT/, with the seed of the base and common flags.

Transfer. --transfer='FLAGFILE[@ROWS] [--flag=value ...]' (repeatable) fine-tunes each finished
classification run with `python -m bot_keras.finetune`:

    --flagfile=FLAGFILE --verbose=2 [the --transfer's flags] --backbone_weights=ROW_RUN_DIR [--seed=S]
        --model_dir=OUT[/seedS]/transfer/NAME/NN_row [--resume]

where NAME is the flagfile's name without `.flags`. @ROWS limits it to some rows: row indexes as in the
run directories' NN (0 is the first row), comma-separated, negative ones counting from the end (@0,-1: the
first and the last row). The flags after the flagfile reach only that transfer's runs (e.g. its
--data_dir); the tool sets --backbone_weights, --model_dir, --resume and, with --seeds, --seed (the same
seed as the classifier). The transfer metric is the fine-tuning run's final_metrics.json: val_mean_iou
(mIoU) of a segmentation run, val_map_voc07 (VOC07 mAP@0.5) of a detection run. Transfers run after every
classification run. Every run's command line is parsed and validated with the trainer's or the
fine-tuner's own flags before anything trains, so a typo fails in seconds.

What it writes in --out_dir (OUT[/seedS]/ for each seed):
    NN_row/, NN_row.log, NN_row.json      a row's run directory, console log and summary
    transfer/NAME/NN_row{/,.log,.json}    the same for its fine-tuning with --transfer NAME
    ablation.md      the tables: per row, the mean ± sample standard deviation over the seeds of the
                     validation top-1 and of each transfer metric, every seed's value, Δ against the first
                     row in percentage points (marked "inside the seed spread" when the two rows' per-seed
                     ranges overlap); then one line per run (top-1, top-5, training time, images/s); then
                     every run's command. Rewritten after every run, so a long ablation can be read as it goes
    results.json     every run's summary
    ablation.png     validation top-1 per epoch of every run (one colour per row)
    ablation_rows.png  top-1 per row (mean, error bar ± one standard deviation, each seed a dot) and each
                     transfer metric per row
The plots need matplotlib (`pip install -e ".[tools]"`; --no_plot skips them).

Resuming. A run whose directory holds final_metrics.json is finished and reused, never trained again; a
directory with a checkpoint but no final_metrics.json (a killed run) is continued with `--resume`; one that
holds only what a run writes before its first checkpoint is started afresh. So a killed ablation continues
where it stopped when the same command runs again. --no_train writes the tables and plots from the finished
runs without training anything (unfinished runs show as pending): a report of an ablation that another
process is still running. Run one training ablation per --out_dir at a time. The subprocesses inherit the
tool's niceness: `nice -n 19 python tools/ablation.py ...` leaves the CPU to everything else.
"""

import csv
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # `python tools/ablation.py` in a checkout: the trainer's flags come from it

from bot_keras import cli, finetune, run_dir, train  # noqa: E402 - after the path set-up above

RESERVED_FLAGS = ("epochs", "model_dir", "resume")  # the tool owns the budget and the run directories
TRANSFER_RESERVED_FLAGS = ("backbone_weights", "model_dir", "resume")
# The number a fine-tuning run's final_metrics.json reports for its task, and its name in the tables.
TRANSFER_METRICS = {
    run_dir.SEGMENTATION: ("val_mean_iou", "mIoU"),
    run_dir.DETECTION: ("val_map_voc07", "VOC07 mAP"),
}
COMMANDS = {"bot_keras.train": train, "bot_keras.finetune": finetune}


class SpecError(ValueError):
    """A row, transfer or spec file that cannot be run; the message names the row (and file line)."""


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    flags: tuple  # the row's own overrides, including those inherited through '+' names


@dataclasses.dataclass(frozen=True)
class Transfer:
    flagfile: str
    rows: tuple  # indexes of the rows whose classifiers it fine-tunes
    flags: tuple  # fine-tuning flags after the flagfile's
    task: str  # the flagfile's --task: which metric of final_metrics.json is the transfer metric

    @property
    def name(self):
        """The flagfile's name without `.flags`: its run directories' folder and its columns' title."""
        return os.path.basename(self.flagfile).removesuffix(".flags")


# --- rows and transfers ------------------------------------------------------------------------------------


def _flag_tokens(text, *, where, what, reserved, reason):
    """The `--flag[=value]` tokens of `text` (shell-split); SpecError for anything else or a reserved flag."""
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise SpecError(f"{where}: {what}: cannot split {text.strip()!r}: {error}.") from None
    for token in tokens:
        if not token.startswith("--"):
            raise SpecError(f"{where}: {what}: {token!r} is not a --flag or --flag=value.")
        flag = token[2:].split("=", 1)[0]
        if flag in reserved or flag in ("no" + f for f in reserved):
            raise SpecError(f"{where}: {what} sets {token!r}; {reason}")
    return tokens


def parse_row(text, *, previous=None, where="--row"):
    """`"NAME: --a=1 --b"` → Row. A NAME starting with '+' inherits the flags of `previous`."""
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not colon or not name:
        raise SpecError(f"{where}: {text!r} is not 'NAME: --flag=value ...' (a name and a colon are needed).")
    tokens = _flag_tokens(rest, where=where, what=f"row {name!r}", reserved=RESERVED_FLAGS,
                          reason="the budget (--epochs) and the run directories are the same for every row "
                                 "and are set by tools/ablation.py.")
    if name.startswith("+"):
        if previous is None:
            raise SpecError(f"{where}: row {name!r} starts with '+' but there is no row before it to add to.")
        return Row(name, previous.flags + tuple(tokens))
    return Row(name, tuple(tokens))


def parse_rows(texts, *, where="--row"):
    """Several row texts in order (`where` may be a list naming each, e.g. 'file:line')."""
    rows, previous = [], None
    for i, text in enumerate(texts):
        label = where[i] if isinstance(where, (list, tuple)) else where
        previous = parse_row(text, previous=previous, where=label)
        rows.append(previous)
    names = [row.name for row in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{where if isinstance(where, str) else 'rows'}: duplicate row names {duplicates}.")
    return rows


def read_spec_lines(path):
    """The row texts of a --rows file and their 'file:line' labels (comments and blank lines skipped)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise SpecError(f"--rows={path!r}: cannot read it: {error.strerror}.") from None
    texts, labels = [], []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            texts.append(stripped)
            labels.append(f"{path}:{number}")
    if not texts:
        raise SpecError(f"--rows={path!r} holds no rows (one 'NAME: --flag=value ...' a line).")
    return texts, labels


def parse_seeds(values):
    """--seeds' list → [int, ...]; no --seeds → [None] (one run a row, in OUT itself)."""
    if not values:
        return [None]
    try:
        seeds = [int(value) for value in values]
    except ValueError:
        raise SpecError(f"--seeds={','.join(values)!r} is not a comma-separated list of integers.") from None
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"--seeds={','.join(values)!r} repeats a seed.")
    return seeds


def parse_transfer(text, *, num_rows):
    """`'FLAGFILE[@ROWS] [--flag=value ...]'` → Transfer (module docstring); ROWS may count from the end."""
    where = f"--transfer={text!r}"
    spec, _, rest = text.strip().partition(" ")
    path, at, selection = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not os.path.isfile(path):
        raise SpecError(f"{where}: no such flagfile {path!r}.")
    tokens = _flag_tokens(rest, where=where, what="the transfer", reserved=TRANSFER_RESERVED_FLAGS,
                          reason="tools/ablation.py sets the backbone, run directory and resume of every "
                                 "transfer run.")
    task = finetune.task_of([f"--flagfile={path}", *tokens])  # first: the flags to parse are the task's
    if task not in TRANSFER_METRICS:
        raise SpecError(f"{where}: --task={task!r}; a transfer is one of {', '.join(TRANSFER_METRICS)}.")
    try:
        parse_command("bot_keras.finetune", [f"--flagfile={path}", *tokens])
    except (flags.Error, cli.SetupError) as error:
        raise SpecError(f"{where}: {error}") from None
    if not at:
        return Transfer(path, tuple(range(num_rows)), tuple(tokens), task)
    indexes = []
    for item in selection.split(","):
        try:
            index = int(item)
        except ValueError:
            raise SpecError(f"{where}: {item!r} after '@' is not a row index (0 is the first row).") from None
        if not -num_rows <= index < num_rows:
            raise SpecError(f"{where}: row index {index} is out of range: there are {num_rows} rows.")
        indexes.append(index % num_rows)
    return Transfer(path, tuple(sorted(set(indexes))), tuple(tokens), task)


def row_dir_name(index, name):
    """`01_label_smoothing` for row 1 named '+ label smoothing'."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "row"
    return f"{index:02d}_{slug}"


def seed_dir(out_dir, seed):
    """Where seed `seed`'s runs live: OUT/seedS, or OUT itself without --seeds."""
    return out_dir if seed is None else os.path.join(out_dir, f"seed{seed}")


def row_arguments(row, *, base, common, epochs, run_dir, seed=None):
    """The trainer arguments of one row (see the module docstring for the order and why)."""
    seed_flag = [] if seed is None else [f"--seed={seed}"]
    return [f"--flagfile={base}", "--verbose=2", *common, *seed_flag, *row.flags, f"--epochs={epochs:g}",
            f"--model_dir={run_dir}"]


def transfer_arguments(transfer, *, backbone_dir, run_dir, seed=None):
    """The fine-tuning arguments of one transfer run (see the module docstring)."""
    seed_flag = [] if seed is None else [f"--seed={seed}"]
    return [f"--flagfile={transfer.flagfile}", "--verbose=2", *transfer.flags,
            f"--backbone_weights={backbone_dir}", *seed_flag, f"--model_dir={run_dir}"]


# --- jobs ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One training subprocess: a row's classification run for one seed, or a transfer run of it."""

    row: int
    seed: object  # an int, or None without --seeds
    transfer: object  # a Transfer, or None for the classification run
    run_dir: str
    arguments: tuple  # without --resume (added when the run directory holds a checkpoint)
    backbone_dir: str = None  # a transfer's classification run

    @property
    def key(self):
        return (self.row, self.seed, self.transfer.name if self.transfer else None)

    @property
    def module(self):
        return "bot_keras.train" if self.transfer is None else "bot_keras.finetune"

    def label(self, rows):
        """"row 'NAME', seed S, transfer T": names the run in messages."""
        return ", ".join([f"row {rows[self.row].name!r}"]
                         + ([] if self.seed is None else [f"seed {self.seed}"])
                         + ([f"transfer {self.transfer.name}"] if self.transfer else []))


def plan_jobs(rows, seeds, transfers, *, base, common, epochs, out_dir):
    """Every run in the order they train: the rows seed by seed, then each transfer's runs."""
    jobs, classifiers = [], {}
    for seed in seeds:
        for i, row in enumerate(rows):
            path = os.path.join(seed_dir(out_dir, seed), row_dir_name(i, row.name))
            arguments = row_arguments(row, base=base, common=common, epochs=epochs, run_dir=path, seed=seed)
            classifiers[(i, seed)] = path
            jobs.append(Job(i, seed, None, path, tuple(arguments)))
    for transfer in transfers:
        for seed in seeds:
            for i in transfer.rows:
                path = os.path.join(seed_dir(out_dir, seed), "transfer", transfer.name,
                                    row_dir_name(i, rows[i].name))
                arguments = transfer_arguments(transfer, backbone_dir=classifiers[(i, seed)], run_dir=path,
                                               seed=seed)
                jobs.append(Job(i, seed, transfer, path, tuple(arguments), classifiers[(i, seed)]))
    return jobs


def run_state(path):
    """'finished' (final_metrics.json), 'resume' (a checkpoint to continue from), 'new' (nothing yet, or only
    what a run writes before its first checkpoint: the trainer starts it afresh) or 'stuck' (files but no
    checkpoint to continue from)."""
    if os.path.exists(os.path.join(path, run_dir.METRICS_FILE)):
        return "finished"
    if not os.path.isdir(path) or not os.listdir(path) or run_dir.never_started(path):
        return "new"
    return "resume" if run_dir.has_checkpoint(path) else "stuck"


def job_arguments(job, state):
    return [*job.arguments, "--resume"] if state == "resume" else list(job.arguments)


def parse_command(module, arguments):
    """The flags of `python -m MODULE ARGUMENTS` on a fresh FlagValues (the command's own definitions; a
    fine-tuning command line's are those of its --task)."""
    if COMMANDS[module] is finetune:
        return finetune.parse_flags(arguments)
    flag_values = flags.FlagValues()
    COMMANDS[module].define_flags(flag_values)
    flag_values([module, *arguments])
    return flag_values


def validate_jobs(jobs, rows, states):
    """Parses every run's command line with its command's flags and validates the runs still to train;
    checks that each transfer's --backbone is the row's --model. Raises SpecError listing every problem."""
    problems, models, seen = [], {}, set()
    for job in jobs:
        state = states[job.key]
        arguments = job_arguments(job, state)
        if job.transfer and states[(job.row, job.seed, None)] != "finished":
            # The backbone run does not exist yet: validate the rest (finetune checks the weights' path).
            arguments.remove(f"--backbone_weights={job.backbone_dir}")
        try:
            flag_values = parse_command(job.module, arguments)
            if state != "finished":
                COMMANDS[job.module].validate_flags(flag_values)
        except (flags.Error, cli.SetupError) as error:
            problem = f"{job.label(rows)}: {error}"
            if (job.row, job.key[2], str(error)) not in seen:  # a row's typo once, not once per seed
                seen.add((job.row, job.key[2], str(error)))
                problems.append(problem)
            continue
        if job.transfer is None:
            models[(job.row, job.seed)] = flag_values.model
        elif models.get((job.row, job.seed), flag_values.backbone) != flag_values.backbone:
            problems.append(f"{job.label(rows)}: --backbone={flag_values.backbone!r} but the row trains "
                            f"--model={models[(job.row, job.seed)]!r}; its weights would not fit.")
    if problems:
        raise SpecError("\n".join(problems))


# --- results ---------------------------------------------------------------------------------------------


def read_csv_log(path):
    """The trainer's logs/training.csv as {column: [values]}; 'NA' and empty cells read as None."""
    columns = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            for key, value in record.items():
                if key == "epoch":
                    cell = int(value)
                else:
                    cell = None if value in ("", "NA", None) else float(value)
                columns.setdefault(key, []).append(cell)
    return columns


def summarize_run(path):
    """Per-epoch validation top-1 and the last epoch's numbers of a finished run, read from its CSV log."""
    log = read_csv_log(os.path.join(path, "logs", "training.csv"))
    if not log.get("epoch"):
        raise ValueError(f"{path}/logs/training.csv has no epoch rows.")
    speeds = [v for v in log.get("images_per_sec", []) if v is not None and v > 0]
    return {
        "epochs": [e + 1 for e in log["epoch"]],  # 1-based: after the first epoch
        "val_top1": log.get("val_top1", [None] * len(log["epoch"])),
        "top1": log.get("val_top1", [None])[-1],
        "top5": log.get("val_top5", [None])[-1],
        "images_per_sec": sum(speeds) / len(speeds) if speeds else None,
    }


def _final_metrics(path):
    with open(os.path.join(path, run_dir.METRICS_FILE)) as f:
        return json.load(f)


def summarize_job(job):
    """A finished run's numbers: a classifier's from its CSV log, a transfer's metric from final_metrics.json;
    both with the trainer's own training time (summed over resumed attempts)."""
    metrics = _final_metrics(job.run_dir)
    summary = {"train_time_s": metrics.get("wall_time_s")}
    if job.transfer is None:
        return {**summary, **summarize_run(job.run_dir)}
    return {**summary, "metric": metrics.get(TRANSFER_METRICS[job.transfer.task][0])}


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}"


def _minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def mean_and_std(values):
    """(mean, sample standard deviation) of `values`; the deviation is None for fewer than two values."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean(values):
    """'73.25 ± 0.67' in percent (one value: just it; none: 'pending')."""
    if not values:
        return "pending"
    mean, std = mean_and_std(values)
    return _percent(mean) + ("" if std is None else f" ± {100 * std:.2f}")


def format_delta(values, reference):
    """Δ of the means in percentage points, noting when the two rows' per-seed ranges overlap."""
    if not values or not reference:
        return "n/a"
    text = f"{100 * (statistics.mean(values) - statistics.mean(reference)):+.2f}"
    several = len(values) > 1 or len(reference) > 1
    if several and max(min(values), min(reference)) <= min(max(values), max(reference)):
        text += ", inside the seed spread"
    return text


def _cell_status(result):
    """What a table cell shows for a run without a number."""
    if result is None:
        return "pending"
    if result.get("status") == "failed":
        return f"failed (exit {result.get('returncode')}, see {result.get('log')})"
    if result.get("epochs_logged"):  # a run in progress (or killed) that --no_train found
        count = result["epochs_logged"]
        return f"pending ({count} epoch{'' if count == 1 else 's'} logged)"
    return result.get("status", "pending")


def _values(results, key, row, seeds, name):
    found = [results.get((row, seed, name)) for seed in seeds]
    return [r[key] for r in found if r and r.get("status") == "finished" and r.get(key) is not None]


def _per_seed(results, key, row, seeds, name):
    cells = []
    for seed in seeds:
        result = results.get((row, seed, name))
        if result and result.get("status") == "finished" and result.get(key) is not None:
            cells.append(_percent(result[key]))
        else:
            cells.append(_cell_status(result).split(" (")[0])
    return " / ".join(cells)


def transfer_title(transfer):
    """'camvid_fcn_resnet18_d mIoU (%)'."""
    return f"{transfer.name} {TRANSFER_METRICS[transfer.task][1]} (%)"


def format_table(names, seeds, results, transfers=()):
    """The per-row table: mean ± std over the seeds, Δ against the first row, every seed's value.

    `results` maps (row index, seed, transfer name or None) to a run's summary (`status` 'finished' with
    its numbers, 'failed', 'pending', 'skipped'); a missing entry is pending."""
    seed_text = ", ".join("—" if seed is None else str(seed) for seed in seeds)
    header = ["Row", "Top-1 (%)", "Δ top-1 (pp)", f"Top-1 per seed ({seed_text})"]
    for transfer in transfers:
        header += [transfer_title(transfer), "Δ (pp)", "per seed"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: | ---: | --- |" * (1 + len(transfers))]
    columns = [(None, "top1", range(len(names)))] + [(t.name, "metric", t.rows) for t in transfers]
    references = {name: _values(results, key, 0, seeds, name) for name, key, _ in columns}
    for row, row_name in enumerate(names):
        cells = [row_name]
        for name, key, covered in columns:
            if row not in covered:
                cells += ["—", "—", "not run"]  # a transfer limited to other rows
                continue
            values = _values(results, key, row, seeds, name)
            delta = ("—" if values else "n/a") if row == 0 else format_delta(values, references[name])
            cells += [format_mean(values), delta, _per_seed(results, key, row, seeds, name)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_runs(names, seeds, results, transfers=()):
    """One line per classification run: its numbers and each of its transfer runs' metric and time."""
    header = ["Row", "Seed", "Top-1 (%)", "Top-5 (%)", "Training time", "Images/s"]
    for transfer in transfers:
        header += [transfer_title(transfer), f"{transfer.name} time"]
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: |" + " ---: |" * (len(header) - 2)]
    for row, row_name in enumerate(names):
        for seed in seeds:
            result = results.get((row, seed, None))
            cells = [row_name, "—" if seed is None else str(seed)]
            if result and result.get("status") == "finished":
                speed = result.get("images_per_sec")
                cells += [_percent(result.get("top1")), _percent(result.get("top5")),
                          _minutes(result.get("train_time_s")), "n/a" if speed is None else f"{speed:.0f}"]
            else:
                cells += [_cell_status(result), "", "", ""]
            for transfer in transfers:
                run = results.get((row, seed, transfer.name))
                if row not in transfer.rows:
                    cells += ["—", "—"]
                elif run and run.get("status") == "finished":
                    cells += [_percent(run.get("metric")), _minutes(run.get("train_time_s"))]
                else:
                    cells += [_cell_status(run), ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_report(rows, seeds, transfers, jobs, results, *, command, base, common, epochs):
    """ablation.md: the tables, then how they were made and every run's exact command."""
    names = [row.name for row in rows]
    counts = {}
    for result in results.values():
        counts[result.get("status", "pending")] = counts.get(result.get("status", "pending"), 0) + 1
    seed_text = "the base and common flags' seed" if seeds == [None] else ", ".join(map(str, seeds))
    text = [
        "# Ablation\n",
        f"Budget: {epochs:g} epochs per row. Seeds: {seed_text}. Base flagfile: `{base}`."
        + (f" Flags for every row: `{' '.join(common)}`." if common else ""),
        f"Runs: {', '.join(f'{n} {status}' for status, n in sorted(counts.items()))}.\n",
        "Top-1: validation accuracy after the last epoch, the mean ± sample standard deviation over the "
        "finished seeds (one seed: its value), then each seed's value in seed order. Δ: the difference of "
        "the means against the first row, in percentage points; \"inside the seed spread\" means the two "
        "rows' per-seed ranges overlap, so the seeds alone move the number as much as the row does."
        + (" Transfer columns: the fine-tuning run's validation metric, the same way." if transfers else "")
        + "\n",
        format_table(names, seeds, results, transfers),
        "Every run (training time: the trainer's own clock, summed over resumed attempts; images/s: the "
        "mean training throughput over the epochs of the CSV log):\n",
        format_runs(names, seeds, results, transfers),
        f"Command: `{command}`\n",
        "Runs (each `python -m MODULE ARGUMENTS`; `--resume` added to continue a killed run):\n",
    ]
    for job in jobs:
        text.append(f"- {job.label(rows)}: `python -m {job.module} {shlex.join(job.arguments)}`")
    return "\n".join(text) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "tools/ablation.py: the accuracy plot needs matplotlib, which bot-keras does not install by "
            "default: pip install -e '.[tools]' (or pass --no_plot to skip the plot)."
        ) from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results, path, *, title):
    """PNG of validation top-1 (%) against the epoch, one line per run, one colour per row (`results`: a
    list of summaries with 'name', 'epochs', 'val_top1' and optionally 'seed')."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for result in results:
        curve = zip(result.get("epochs", []), result.get("val_top1", []), strict=True)
        points = [(epoch, 100 * top1) for epoch, top1 in curve if top1 is not None]
        if not points:
            continue
        first = result["name"] not in colours
        line = axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                         color=colours.get(result["name"]), label=result["name"] if first else None)[0]
        colours.setdefault(result["name"], line.get_color())
    axes.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if colours:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_rows(names, seeds, results, path, *, title, transfers=()):
    """PNG with one panel per metric (top-1, then each transfer's): per row the mean with an error bar of
    one sample standard deviation, and every seed's value as a dot."""
    plt = _pyplot()
    panels = [(None, "top1", "validation top-1 (%)")] + [
        (t.name, "metric", transfer_title(t)) for t in transfers]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4.5), squeeze=False)
    for axes, (name, key, label) in zip(axes_list[0], panels, strict=True):
        for row in range(len(names)):
            values = [100 * v for v in _values(results, key, row, seeds, name)]
            if not values:
                continue
            mean, std = mean_and_std(values)
            axes.errorbar([row], [mean], yerr=[std or 0.0], fmt="o", color="C0", capsize=5, markersize=7)
            axes.plot([row] * len(values), values, "x", color="C1")
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axes.set_ylabel(label)
        axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"{title} (mean ± 1 s.d. over seeds; x: each seed)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- running ---------------------------------------------------------------------------------------------


def run_command(command, *, log, env):
    """Runs one training subprocess with its output in `log`; returns its exit status."""
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_job(job, *, rows, out_dir, train_now=True):
    """Reuses a finished run, or (train_now) trains or resumes it in a subprocess; returns its summary dict
    (also written to RUN_DIR.json after training). Without train_now an unfinished run is 'pending'."""
    label = job.label(rows)
    log_path, summary_path = job.run_dir + ".log", job.run_dir + ".json"
    result = {"log": os.path.relpath(log_path, out_dir)}
    state = run_state(job.run_dir)
    if state == "finished":
        previous = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                previous = json.load(f)
        if train_now:
            print(f"{label}: already finished in {job.run_dir}; reusing it.", flush=True)
        return {**result, "wall_s": previous.get("wall_s"), "status": "finished", **summarize_job(job)}
    if not train_now:
        csv_log = os.path.join(job.run_dir, "logs", "training.csv")
        logged = len(read_csv_log(csv_log).get("epoch", [])) if os.path.isfile(csv_log) else 0
        return {**result, "status": "pending", **({"epochs_logged": logged} if logged else {})}
    if state == "stuck":
        raise cli.SetupError(f"{label}: {job.run_dir} holds an unfinished run without a checkpoint to resume "
                             "from; remove it to train the run again.")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", job.module, *job_arguments(job, state)]
    print(f"{label}: {'resuming' if state == 'resume' else 'training'} (log: {log_path})", flush=True)
    os.makedirs(os.path.dirname(job.run_dir), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a" if state == "resume" else "w") as log:  # a resumed run's log keeps its start
        log.write(shlex.join(command) + "\n")
        log.flush()
        returncode = run_command(command, log=log, env=env)
    result.update(returncode=returncode, wall_s=time.perf_counter() - start)
    if returncode == 0:
        result.update(status="finished", **summarize_job(job))
        shown = _percent(result["top1"] if job.transfer is None else result["metric"])
        metric = "top-1" if job.transfer is None else TRANSFER_METRICS[job.transfer.task][1]
        print(f"{label}: {metric} {shown}% in {result['wall_s']:.0f} s", flush=True)
    else:
        result.update(status="failed")
        print(f"{label}: FAILED (exit {returncode}); see {log_path}", flush=True)
    with open(summary_path, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "log"}, f, indent=2)
    return result


COMMAND = "tools/ablation.py"
REQUIRED = ("base", "epochs", "out_dir")


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("base", None, "Base flagfile of every row.", **d)
    flags.DEFINE_multi_string("row", [], "'NAME: --flag=value ...' (repeatable).", **d)
    flags.DEFINE_string("rows", None, "File of rows, one 'NAME: --flag=value ...' a line, after --row.", **d)
    flags.DEFINE_float("epochs", None, "Training budget of every row, in epochs.", **d)
    flags.DEFINE_list("seeds", [], "Seeds to run every row with (e.g. 0,1); runs in OUT/seedS/.", **d)
    flags.DEFINE_multi_string(
        "transfer", [], "'FLAGFILE[@ROWS] [--flag=value ...]': fine-tune each row's classifier with "
        "bot_keras.finetune (repeatable; @0,-1: the first and last rows only).", **d)
    flags.DEFINE_string("out_dir", None, "Where the runs, logs, tables and plots go.", **d)
    flags.DEFINE_string("title", None, "Plot title (default: the base flagfile's name).", **d)
    flags.DEFINE_bool("no_plot", False, "Skip the PNGs (no matplotlib needed).", **d)
    flags.DEFINE_bool("dry_run", False, "Validate, print the commands, train nothing, write nothing.", **d)
    flags.DEFINE_bool("no_train", False, "Write the tables and plots from the finished runs; train nothing.",
                      **d)


def _command_line(args, common):
    """The tool's command line as ablation.md records it, rebuilt from the parsed flags."""
    parts = [f"--base={args.base}", *(f"--row={row}" for row in args.row)]
    parts += [f"--rows={args.rows}"] if args.rows else []
    parts += [f"--epochs={args.epochs:g}"]
    parts += [f"--seeds={','.join(args.seeds)}"] if args.seeds else []
    parts += [f"--transfer={transfer}" for transfer in args.transfer]
    parts += [f"--out_dir={args.out_dir}"]
    parts += [f"--title={args.title}"] if args.title else []
    parts += ["--no_plot"] * args.no_plot + ["--dry_run"] * args.dry_run + ["--no_train"] * args.no_train
    parts += ["--", *common] if common else []
    return "python tools/ablation.py " + shlex.join(parts)


def _setup(args, common):
    """Rows, seeds, transfers and the planned jobs with their states, validated; SpecError when not."""
    if not os.path.isfile(args.base):
        raise SpecError(f"--base={args.base!r}: no such flagfile.")
    if not args.epochs > 0:
        raise SpecError(f"--epochs={args.epochs:g} must be positive.")
    texts, labels = list(args.row), ["--row"] * len(args.row)
    if args.rows:
        file_texts, file_labels = read_spec_lines(args.rows)
        texts, labels = texts + file_texts, labels + file_labels
    if not texts:
        raise SpecError("no rows: give --row='NAME: --flag=value ...' and/or --rows=FILE.")
    rows = parse_rows(texts, where=labels)
    common = list(parse_row("common: " + shlex.join(common), where="flags after --").flags)
    seeds = parse_seeds(args.seeds)
    transfers = [parse_transfer(text, num_rows=len(rows)) for text in args.transfer]
    if seeds != [None]:
        for what, tokens in [("the flags after --", common), *((f"row {r.name!r}", r.flags) for r in rows),
                             *((f"--transfer {t.name}", t.flags) for t in transfers)]:
            if any(token[2:].split("=", 1)[0] in ("seed", "noseed") for token in tokens):
                raise SpecError(f"{what} sets --seed; with --seeds={','.join(args.seeds)} the tool sets "
                                "every run's seed.")
    names = [t.name for t in transfers]
    if len(set(names)) != len(names):
        raise SpecError(f"two --transfer flagfiles have the same name {sorted(names)}: their runs would "
                        "share directories.")
    jobs = plan_jobs(rows, seeds, transfers, base=args.base, common=common, epochs=args.epochs,
                     out_dir=args.out_dir)
    states = {job.key: run_state(job.run_dir) for job in jobs}
    stuck = [job.run_dir for job in jobs if states[job.key] == "stuck"]
    if stuck and not args.no_train:
        raise SpecError(f"{', '.join(stuck)}: unfinished run(s) without a checkpoint to resume from; remove "
                        "them to train those runs again.")
    validate_jobs([job for job in jobs if states[job.key] != "stuck"], rows, states)
    return rows, common, seeds, transfers, jobs, states


def write_outputs(args, *, rows, seeds, transfers, jobs, results, command, common, plots):
    report = format_report(rows, seeds, transfers, jobs, results, command=command, base=args.base,
                           common=common, epochs=args.epochs)
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write(report)
    records = [{"row": rows[job.row].name, "index": job.row, "seed": job.seed,
                "transfer": job.transfer.name if job.transfer else None, "run_dir": job.run_dir,
                "arguments": list(job.arguments), **results[job.key]} for job in jobs]
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=2)
    if plots:
        title = args.title or f"{os.path.basename(args.base)}, {args.epochs:g} epochs per row"
        curves = [{"name": rows[job.row].name, **results[job.key]} for job in jobs if job.transfer is None]
        plot_curves(curves, os.path.join(args.out_dir, "ablation.png"), title=title)
        plot_rows([row.name for row in rows], seeds, results, os.path.join(args.out_dir, "ablation_rows.png"),
                  title=title, transfers=transfers)


def main(argv, f=flags.FLAGS):
    """argv[1:]: the flags after `--`, passed to every row's trainer (absl leaves them unparsed)."""
    args, common = f, list(argv[1:])
    command = _command_line(args, common)
    try:
        rows, common, seeds, transfers, jobs, states = _setup(args, common)
    except SpecError as error:
        raise cli.SetupError(str(error)) from error
    if args.dry_run:
        for job in jobs:
            arguments = job_arguments(job, states[job.key])
            status = {"finished": " (finished: reused)", "resume": " (continues a killed run)"}
            print(f"{job.label(rows)}: python -m {job.module} {shlex.join(arguments)}"
                  + status.get(states[job.key], ""))
        return 0
    if not args.no_plot:
        _pyplot()  # fail now, not after hours of training

    os.makedirs(args.out_dir, exist_ok=True)
    outputs = dict(rows=rows, seeds=seeds, transfers=transfers, jobs=jobs, command=command, common=common)
    results = {job.key: {"status": "pending"} for job in jobs}
    for job in jobs:
        backbone = results.get((job.row, job.seed, None))
        if job.transfer and backbone["status"] != "finished" and not args.no_train:
            results[job.key] = {"status": "skipped", "reason": f"the classifier run {backbone['status']}"}
            continue
        results[job.key] = run_job(job, rows=rows, out_dir=args.out_dir, train_now=not args.no_train)
        if not args.no_train:  # the tables as the ablation goes
            write_outputs(args, results=results, plots=False, **outputs)
    write_outputs(args, results=results, plots=not args.no_plot, **outputs)
    print(format_table([row.name for row in rows], seeds, results, transfers), end="")
    print(f"Wrote {os.path.join(args.out_dir, 'ablation.md')}", flush=True)
    failed = [job.label(rows) for job in jobs if results[job.key].get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=REQUIRED)
