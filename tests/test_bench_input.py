"""tools/bench_input.py runs at tiny sizes and prints its tables (no timing is asserted)."""

import re

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tools_module import load_tool

from bot_keras import cli


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_input")


def _run(bench, argv):
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    flag_values(["bench_input", *argv])
    bench.main(["bench_input"], flag_values)


def _rows(text):
    """{path: [numbers...]} of the markdown rows `| name | a | b | ... |`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 3 and re.fullmatch(r"[0-9.]+", cells[-1]):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow  # ~20 tiny pipelines traced and timed once
def test_folder_tables_and_waterfall_at_tiny_size(bench, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(8):
        class_dir = tmp_path / "train" / f"c{i % 2}"
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        (class_dir / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(pixels).numpy())
    _run(bench, [f"--folder={tmp_path}", "--num_images=0", "--small_images=0", "--rounds=1",
                 "--timed_images=8", "--batch_size=4", "--image_size=32"])
    out = capsys.readouterr().out
    assert "8 JPEGs" in out and "mean 48x64 px" in out
    rows = _rows(out)
    paths = ["decode_jpeg (whole file)", "minimal fused chain, paper's crop", "train, host for device",
             "train, crop + flip", "train, Section 2.1", "train, unfused",
             "validation", "paper sampler in the minimal chain", "+ colour jitter",
             "make_dataset, all Section 2.1", "train, host for device, RandAugment 2,9",
             "train, Section 2.1, RandAugment 2,9",
             "train, host for device, keras.layers.RandAugment per image"]
    assert set(paths) <= set(rows), sorted(rows)
    assert rows["minimal fused chain"][-1] == "1.00"  # the main table's and the waterfall's reference
    for name in paths:  # ratio to the minimal chain, and images/s or µs per image: positive numbers
        assert float(rows[name][0]) > 0 and float(rows[name][-1]) > 0, name
    summary = r"host pipeline of --augment_on=device / minimal chain with the paper's crop: [0-9.]+"
    assert re.search(summary, out)
    # Bytes a batch moves to the accelerator: 4 images of 32x32x3 as uint8 or float32, + 4x2 float32 labels.
    assert "train, host for device: 12,320" in out and "train, Section 2.1: 49,184" in out
    assert re.search(r"train, host for device, RandAugment 2,9 / train, host for device: [0-9.]+", out)
    # Waterfall: µs per image ÷ the row above = the difference printed.
    assert float(rows["+ normalise"][1]) == pytest.approx(
        float(rows["+ normalise"][0]) - float(rows["paper sampler in the minimal chain"][0]), abs=1.01
    )


def test_a_missing_folder_is_one_line_before_anything_runs(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.call(bench.main, bench.define_flags, [f"--folder={tmp_path / 'nope'}"], command=bench.COMMAND)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nope" in err
