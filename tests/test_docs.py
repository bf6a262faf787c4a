"""README.md and docs/*.md against the code: generated flag tables are current, every `--flag` they write
exists, every relative link (and its #anchor) resolves."""

import pathlib
import re

import pytest
from tools_module import load_tool

ROOT = pathlib.Path(__file__).resolve().parent.parent
flag_reference = load_tool("flag_reference")

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Options of other programs that the docs show on their command lines.
OUTSIDE_FLAGS = {
    "logdir",  # tensorboard
    "dir", "all",  # saved_model_cli show
    "local-dir",  # huggingface-cli download
    "no-deps",  # pip install
    "help",  # every command's own (absl)
}
FLAG = re.compile(r"(?<![\w-])--([a-z][\w-]*)")  # upper case: a placeholder (--FLAG=v)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _doc_id(path):
    return str(path.relative_to(ROOT))


def test_generated_flag_tables_are_current():
    blocks = {}
    for path in DOCS:
        text = path.read_text()
        assert flag_reference.refresh(text) == text, (
            f"{_doc_id(path)}: a flag table is stale; run `python tools/flag_reference.py --write`"
        )
        blocks.update((name, _doc_id(path)) for name in re.findall(r"<!-- flags:(\w+) -->", text))
    assert blocks == {"train": "docs/training.md", "evaluate": "docs/training.md",
                      "export": "docs/export.md", "predict": "docs/export.md"}


def test_refresh_rewrites_a_changed_table():
    table = flag_reference.table("export")
    assert "| `--format` | `savedmodel` |" in table and table.count("\n| `--") == 7
    stale = "<!-- flags:export -->\n" + table.replace("`savedmodel`", "`keras`", 1) + "<!-- /flags:export -->"
    assert flag_reference.refresh(stale) != stale
    assert flag_reference.refresh(flag_reference.refresh(stale)) == flag_reference.refresh(stale)
    with pytest.raises(ValueError, match="flags:nosuch"):
        flag_reference.refresh("<!-- flags:nosuch -->\n<!-- /flags:nosuch -->")


def test_known_flags_cover_absl_negations_and_tool_options():
    known = flag_reference.known_flags()
    assert {"base_lr", "noskip_corrupt", "nono_bias_decay", "export_dir", "top_k", "flagfile"} <= known
    assert {"rows", "dry_run", "image-size", "num-classes", "shards", "nofit"} <= known  # tools/ flags
    assert "nobase_lr" not in known and "resnet50_d" not in known  # negation only for booleans


def test_every_flag_the_docs_write_is_defined():
    known = flag_reference.known_flags() | OUTSIDE_FLAGS
    unknown = sorted({f"{_doc_id(path)}: --{name}" for path in DOCS
                      for name in FLAG.findall(path.read_text()) if name not in known})
    assert unknown == []
    assert FLAG.findall("run `--base_lr=0.4 --nosuch --FLAG=v` | --- | --a-b") == ["base_lr", "nosuch", "a-b"]


def _anchor(heading):
    """GitHub's id for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    return {_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{_doc_id(path)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{_doc_id(path)}: {target} (no such heading)")
    assert broken == []
    assert _anchor("Backbones: `build_backbone`") == "backbones-build_backbone"
