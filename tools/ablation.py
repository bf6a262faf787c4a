"""Run an ablation: one base flagfile, a list of rows of flag overrides, each trained for the same budget.

    python tools/ablation.py --base=configs/cifar10/ablation_base.flags \\
        --rows=configs/cifar10/ablation_rows.txt --epochs=3 --out_dir=runs/ablation_cifar10 \\
        -- --dataset=folder:/data/cifar10

Each row is one `python -m bot_keras.train` subprocess, run one after another, with the arguments

    --flagfile=BASE --verbose=2 [flags after `--`] [the row's flags] --epochs=BUDGET --model_dir=OUT/NN_row

so a row's flags override the base and the common flags, and every row trains for --epochs (a row may
not set --epochs, --model_dir or --resume). A row is `NAME: --flag=value --flag2=value ...` (shell-style
quoting); a NAME that starts with '+' adds its flags to the previous row's, the way the paper's tables read
("+ cosine decay" keeps everything above it). Rows come from repeated --row arguments and/or a --rows file
(one row a line, '#' comments, blank lines ignored). Every row's command line is parsed and validated with
the trainer's own flags before anything trains, so a typo fails in seconds.

What it writes in --out_dir: each row's run directory (NN_row/, the trainer's flags.txt, logs/training.csv,
final_metrics.json, model.keras), its console log (NN_row.log) and summary (NN_row.json);
`ablation.md`, a markdown table (row, validation top-1 and top-5 after the last epoch, Δ top-1 against the
first row in percentage points, wall time of the subprocess, mean training images/s from the CSV log),
followed by every row's command; `ablation.png`, validation top-1 per epoch for every row (needs
matplotlib: `pip install -e ".[tools]"`; --no_plot skips it). A row whose run directory already holds
final_metrics.json is not trained again (its summary is reused), so an interrupted ablation continues
where it stopped; a run directory without it (a row that died) must be removed by hand.
"""

import csv
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # `python tools/ablation.py` in a checkout: the trainer's flags come from it

from bot_keras import cli, train  # noqa: E402 - after the path set-up above

RESERVED_FLAGS = ("epochs", "model_dir", "resume")  # the tool owns the budget and the run directories


class SpecError(ValueError):
    """A row or spec file that cannot be run; the message names the row (and file line)."""


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    flags: tuple  # the row's own overrides, including those inherited through '+' names


# --- rows ------------------------------------------------------------------------------------------------


def parse_row(text, *, previous=None, where="--row"):
    """`"NAME: --a=1 --b"` → Row. A NAME starting with '+' inherits the flags of `previous`."""
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not colon or not name:
        raise SpecError(f"{where}: {text!r} is not 'NAME: --flag=value ...' (a name and a colon are needed).")
    try:
        tokens = shlex.split(rest)
    except ValueError as error:
        raise SpecError(f"{where}: row {name!r}: cannot split {rest.strip()!r}: {error}.") from None
    for token in tokens:
        if not token.startswith("--"):
            raise SpecError(f"{where}: row {name!r}: {token!r} is not a --flag or --flag=value.")
        flag = token[2:].split("=", 1)[0]
        if flag in RESERVED_FLAGS or flag in ("no" + f for f in RESERVED_FLAGS):
            raise SpecError(
                f"{where}: row {name!r} sets {token!r}; the budget (--epochs) and the run directories are "
                "the same for every row and are set by tools/ablation.py."
            )
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


def row_dir_name(index, name):
    """`01_label_smoothing` for row 1 named '+ label smoothing'."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "row"
    return f"{index:02d}_{slug}"


def row_arguments(row, *, base, common, epochs, run_dir):
    """The trainer arguments of one row (see the module docstring for the order and why)."""
    return [f"--flagfile={base}", "--verbose=2", *common, *row.flags, f"--epochs={epochs:g}",
            f"--model_dir={run_dir}"]


def validate_rows(rows, *, base, common, epochs, out_dir, skip=()):
    """Parses and validates every row's arguments with the trainer's flags; raises SpecError listing all."""
    problems = []
    for i, row in enumerate(rows):
        if i in skip:
            continue
        run_dir = os.path.join(out_dir, row_dir_name(i, row.name))
        args = row_arguments(row, base=base, common=common, epochs=epochs, run_dir=run_dir)
        flag_values = flags.FlagValues()  # a fresh set of the trainer's flags for every row
        train.define_flags(flag_values)
        try:
            flag_values(["train", *args])
            train.validate_flags(flag_values)
        except (flags.Error, train.FlagError) as error:
            problems.append(f"row {row.name!r}: {error}")
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


def summarize_run(run_dir):
    """Per-epoch validation top-1 and the last epoch's numbers of a finished run, read from its CSV log."""
    log = read_csv_log(os.path.join(run_dir, "logs", "training.csv"))
    if not log.get("epoch"):
        raise ValueError(f"{run_dir}/logs/training.csv has no epoch rows.")
    speeds = [v for v in log.get("images_per_sec", []) if v is not None and v > 0]
    return {
        "epochs": [e + 1 for e in log["epoch"]],  # 1-based: after the first epoch
        "val_top1": log.get("val_top1", [None] * len(log["epoch"])),
        "top1": log.get("val_top1", [None])[-1],
        "top5": log.get("val_top5", [None])[-1],
        "images_per_sec": sum(speeds) / len(speeds) if speeds else None,
    }


def _percent(value):
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_table(results):
    """Markdown table of the rows; Δ top-1 is in percentage points against the first row."""
    lines = [
        "| Row | Top-1 (%) | Top-5 (%) | Δ top-1 (pp) | Wall time | Images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = results[0].get("top1") if results else None
    for i, result in enumerate(results):
        top1 = result.get("top1")
        if i == 0:
            delta = "—" if top1 is not None else "n/a"
        elif top1 is None or reference is None:
            delta = "n/a"
        else:
            delta = f"{100 * (top1 - reference):+.2f}"
        if result.get("returncode"):
            name = f"{result['name']} (failed: exit {result['returncode']}, see {result['log']})"
        else:
            name = result["name"]
        wall = result.get("wall_s")
        wall_text = "n/a" if wall is None else f"{wall / 60:.1f} min"
        speed = result.get("images_per_sec")
        speed_text = "n/a" if speed is None else f"{speed:.0f}"
        top5 = _percent(result.get("top5"))
        lines.append(f"| {name} | {_percent(top1)} | {top5} | {delta} | {wall_text} | {speed_text} |")
    return "\n".join(lines) + "\n"


def format_report(results, *, command, base, common, epochs):
    """ablation.md: the table, then how it was made and every row's exact trainer command."""
    text = [
        "# Ablation\n",
        f"Budget: {epochs:g} epochs per row. Base flagfile: `{base}`."
        + (f" Flags for every row: `{' '.join(common)}`." if common else ""),
        "Top-1/top-5: validation accuracy after the last epoch. Δ top-1: against the first row, in "
        "percentage points. Wall time: the whole training subprocess (start-up, data indexing, training, "
        "per-epoch evaluation, saving). Images/s: training throughput, the mean over epochs of the "
        "trainer's CSV log.\n",
        format_table(results),
        f"Command: `{command}`\n",
        "Rows (each `python -m bot_keras.train` with):\n",
    ]
    for result in results:
        text.append(f"- {result['name']}: `{' '.join(result['arguments'])}`")
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
    """PNG of validation top-1 (%) against the epoch, one line per row."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in results:
        curve = zip(result.get("epochs", []), result.get("val_top1", []), strict=True)
        points = [(epoch, 100 * top1) for epoch, top1 in curve if top1 is not None]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=result["name"])
    axes.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- running ---------------------------------------------------------------------------------------------


def run_row(index, row, *, base, common, epochs, out_dir):
    """Trains one row in a subprocess (or reuses its finished run); returns its summary dict."""
    dir_name = row_dir_name(index, row.name)
    run_dir = os.path.join(out_dir, dir_name)
    log_path = os.path.join(out_dir, dir_name + ".log")
    summary_path = os.path.join(out_dir, dir_name + ".json")
    arguments = row_arguments(row, base=base, common=common, epochs=epochs, run_dir=run_dir)
    result = {"name": row.name, "arguments": arguments, "run_dir": run_dir, "log": os.path.basename(log_path)}
    if os.path.exists(os.path.join(run_dir, "final_metrics.json")):
        print(f"[{index + 1}] {row.name}: already finished in {run_dir}; reusing it.", flush=True)
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                return {**result, **json.load(f)}
        return {**result, "returncode": 0, "wall_s": None, **summarize_run(run_dir)}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "bot_keras.train", *arguments]
    print(f"[{index + 1}] {row.name}: training (log: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    result.update(returncode=returncode, wall_s=time.perf_counter() - start)
    if returncode == 0:
        result.update(summarize_run(run_dir))
        print(f"[{index + 1}] {row.name}: top-1 {_percent(result['top1'])}%, "
              f"top-5 {_percent(result['top5'])}% in {result['wall_s']:.0f} s", flush=True)
    else:
        print(f"[{index + 1}] {row.name}: FAILED (exit {returncode}); see {log_path}", flush=True)
    with open(summary_path, "w") as f:
        json.dump({k: v for k, v in result.items() if k not in ("name", "arguments", "run_dir", "log")}, f,
                  indent=2)
    return result


COMMAND = "tools/ablation.py"
REQUIRED = ("base", "epochs", "out_dir")


def define_flags(fv):
    d = dict(flag_values=fv)
    flags.DEFINE_string("base", None, "Base flagfile of every row.", **d)
    flags.DEFINE_multi_string("row", [], "'NAME: --flag=value ...' (repeatable).", **d)
    flags.DEFINE_string("rows", None, "File of rows, one 'NAME: --flag=value ...' a line, after --row.", **d)
    flags.DEFINE_float("epochs", None, "Training budget of every row, in epochs.", **d)
    flags.DEFINE_string("out_dir", None, "Where the runs, logs, table and plot go.", **d)
    flags.DEFINE_string("title", None, "Plot title (default: the base flagfile's name).", **d)
    flags.DEFINE_bool("no_plot", False, "Skip the PNG (no matplotlib needed).", **d)
    flags.DEFINE_bool("dry_run", False, "Validate, print the commands, train nothing.", **d)


def _command_line(args, common):
    """The tool's command line as ablation.md records it, rebuilt from the parsed flags."""
    parts = [f"--base={args.base}", *(f"--row={row}" for row in args.row)]
    parts += [f"--rows={args.rows}"] if args.rows else []
    parts += [f"--epochs={args.epochs:g}", f"--out_dir={args.out_dir}"]
    parts += [f"--title={args.title}"] if args.title else []
    parts += ["--no_plot"] * args.no_plot + ["--dry_run"] * args.dry_run
    parts += ["--", *common] if common else []
    return "python tools/ablation.py " + shlex.join(parts)


def main(argv, f=flags.FLAGS):
    """argv[1:]: the flags after `--`, passed to every row's trainer (absl leaves them unparsed)."""
    args, common = f, list(argv[1:])
    command = _command_line(args, common)
    try:
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
        finished = set()
        for i, row in enumerate(rows):
            run_dir = os.path.join(args.out_dir, row_dir_name(i, row.name))
            if os.path.exists(os.path.join(run_dir, "final_metrics.json")):
                finished.add(i)
            elif os.path.isdir(run_dir) and os.listdir(run_dir):
                raise SpecError(f"row {row.name!r}: {run_dir} holds an unfinished run (no "
                                "final_metrics.json); remove it to train the row again.")
        validate_rows(rows, base=args.base, common=common, epochs=args.epochs,
                      out_dir=args.out_dir, skip=finished)
    except SpecError as error:
        raise cli.SetupError(str(error)) from error
    if args.dry_run:
        for i, row in enumerate(rows):
            run_dir = os.path.join(args.out_dir, row_dir_name(i, row.name))
            arguments = row_arguments(row, base=args.base, common=common, epochs=args.epochs, run_dir=run_dir)
            print(f"{row.name}: python -m bot_keras.train {shlex.join(arguments)}")
        return 0
    if not args.no_plot:
        _pyplot()  # fail now, not after hours of training

    os.makedirs(args.out_dir, exist_ok=True)
    results = [run_row(i, row, base=args.base, common=common, epochs=args.epochs, out_dir=args.out_dir)
               for i, row in enumerate(rows)]
    report = format_report(results, command=command, base=args.base, common=common, epochs=args.epochs)
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if not args.no_plot:
        plot_curves(results, os.path.join(args.out_dir, "ablation.png"),
                    title=args.title or f"{os.path.basename(args.base)}, {args.epochs:g} epochs per row")
    print(format_table(results), end="")
    print(f"Wrote {os.path.join(args.out_dir, 'ablation.md')}", flush=True)
    failed = [r["name"] for r in results if r.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main, define_flags, command=COMMAND, required=REQUIRED)
