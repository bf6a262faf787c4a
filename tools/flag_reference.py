"""The flag reference of bot_keras' commands, as markdown tables generated from their own flag definitions.

    python tools/flag_reference.py                   # every command's table on stdout
    python tools/flag_reference.py train export      # only these
    python tools/flag_reference.py --write           # refresh the tables in docs/*.md

Each command module defines its flags in `define_flags(flag_values)` (bot_keras/cli.py), so the tables are
read off a scratch `absl.flags.FlagValues`, in definition order. docs/training.md and docs/export.md hold
them between `<!-- flags:COMMAND -->` and `<!-- /flags:COMMAND -->`; tests/test_docs.py regenerates them
and fails when a flag, default or help text changed without the docs. `known_flags()` is every flag name
our commands and tools accept, read off their `define_flags` (the docs test checks each `--flag` the docs
write against it).
"""

import importlib
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bot_keras  # noqa: E402, F401, I001 - first: it keeps TensorFlow's start-up lines off (bot_keras/console.py)
from absl import flags  # noqa: E402

from bot_keras import cli  # noqa: E402

# Command name → module with `define_flags`, in the order a run uses them.
COMMANDS = {
    "train": "bot_keras.train",
    "evaluate": "bot_keras.evaluate",
    "export": "bot_keras.export",
    "predict": "bot_keras.predict",
}
# What absl itself accepts on every command line that the docs use.
ABSL_FLAGS = ("flagfile",)
BLOCK = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags:\2 -->)", re.DOTALL)


def command_flags(module_name):
    """The `absl` Flag objects a command module defines, in definition order."""
    flag_values = flags.FlagValues()
    importlib.import_module(module_name).define_flags(flag_values)
    return [flag_values[name] for name in flag_values]


def _default(flag):
    value = flag.default
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text):
    return " ".join(text.split()).replace("|", "\\|")


def table(command):
    """The markdown table (Flag | Default | Meaning) of one command of COMMANDS."""
    rows = ["| Flag | Default | Meaning |", "| --- | --- | --- |"]
    for flag in command_flags(COMMANDS[command]):
        name = f"`--{flag.name}`" + (f" (`--no{flag.name}`)" if flag.boolean else "")
        rows.append(f"| {name} | {_default(flag)} | {_cell(flag.help)} |")
    return "\n".join(rows) + "\n"


def refresh(text):
    """`text` with every `<!-- flags:COMMAND -->` block replaced by the command's current table."""

    def replace(match):
        if match.group(2) not in COMMANDS:
            known = ", ".join(COMMANDS)
            raise ValueError(f"<!-- flags:{match.group(2)} -->: unknown command; known: {known}")
        return match.group(1) + table(match.group(2)) + match.group(4)

    return BLOCK.sub(replace, text)


def _cli_modules():
    """Every bot_keras and tools/ module that defines command-line flags (by its module-level
    `def define_flags(`; the task Protocol's method of that name in tasks.py is not one)."""
    for path in sorted((ROOT / "bot_keras").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py")):
        if re.search(r"^def define_flags\(", path.read_text(), re.MULTILINE):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts)


def known_flags():
    """Every flag name our commands and tools accept: absl flags (booleans also as `noNAME`) and absl's
    own ABSL_FLAGS."""
    names = set(ABSL_FLAGS)
    for module_name in _cli_modules():
        for flag in command_flags(module_name):
            names.add(flag.name)
            if flag.boolean:
                names.add(f"no{flag.name}")
    return names


def define_flags(fv):
    flags.DEFINE_bool("write", False, "Refresh the flag tables in docs/*.md in place.", flag_values=fv)


def main(argv, f=flags.FLAGS):
    """argv[1:]: the commands to print (default: all of COMMANDS)."""
    unknown = [name for name in argv[1:] if name not in COMMANDS]
    if unknown:
        raise cli.SetupError(f"unknown command {', '.join(unknown)}; known: {', '.join(COMMANDS)}")
    if f.write:
        for path in sorted((ROOT / "docs").glob("*.md")):
            text = path.read_text()
            if refresh(text) != text:
                path.write_text(refresh(text))
                print(f"updated {os.path.relpath(path, ROOT)}")
        return
    for command in argv[1:] or COMMANDS:
        print(f"### `python -m {COMMANDS[command]}`\n\n{table(command)}")


if __name__ == "__main__":
    cli.run(main, define_flags, command="flag_reference")
