"""tools/bench_train.py runs at tiny sizes and prints its table and ratios (no timing is asserted)."""

import math
import re

import pytest
from absl import flags
from tools_module import load_tool

from bot_keras import cli


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_train")


def parse(bench, argv):
    """check_flags' namespace for the command line `argv` (a scratch FlagValues, as cli.call uses)."""
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    flag_values(["bench_train", *argv])
    return bench.check_flags(flag_values)


_TINY = ["--image_size=32", "--batch_sizes=4", "--num_classes=5", "--rounds=1", "--steps=2", "--warmup=0"]


def test_one_axis_at_a_time_around_the_base_and_the_whole_grid(bench):
    args = parse(
        bench,
        [
            "--models=resnet50,resnet50_d,keras:ResNet50",
            "--precisions=float32,mixed_bfloat16",
            "--jit=off,on",
        ],
    )
    configs = bench.configurations(args)
    base = configs[0]
    assert (base.model, base.precision, base.batch, base.jit, base.strategy, base.step) == (
        "resnet50",
        "float32",
        16,
        False,
        "default",
        "trainer",
    )
    # base, 2 other models, 1 other precision, jit on, mirrored, model.fit, the step in its loop
    assert len(configs) == 8 and len(set(configs)) == 8
    assert sum(c.step == "fit" for c in configs) == sum(c.step == "loop" for c in configs) == 1
    grid = bench.configurations(
        parse(bench, ["--grid", "--models=resnet50,resnet50_d", "--nofit", "--noloop"])
    )
    assert len(grid) == 2 * 3 * 1 * 2 * 2  # models x precisions x batches x jit x strategies


def test_ratios_name_what_they_divide(bench):
    base = bench.Config("resnet50", "float32", 16, False, "default")
    other = {
        bench.Config("resnet50_d", "float32", 16, False, "default"): 1.2,
        bench.Config("keras:ResNet50", "float32", 16, False, "default"): 2.0,
        bench.Config("resnet50", "float32", 32, False, "default"): 1.5,
        bench.Config("resnet50", "float32", 16, True, "default"): 0.5,
        bench.Config("resnet50", "float32", 16, False, "default", "fit"): 0.8,
        bench.Config("resnet50", "float32", 16, False, "default", "loop"): 1.1,
        bench.Config("resnet50_d", "float32", 16, True, "default"): 9.0,  # two axes changed: table only
    }
    seconds = {base: 1.0, **other}
    assert bench.ratios([base, *other], seconds, base) == {
        "step time, resnet50_d ÷ resnet50": 1.2,
        "step time, resnet50 ÷ keras:ResNet50": 0.5,
        "time per image, batch 32 ÷ batch 16": 0.75,
        "step time, xla ÷ no xla": 0.5,
        "step time, trainer ÷ model.fit": 1.25,
        "step time, trainer ÷ the same step in a while-loop": 1 / 1.1,
    }


def test_bad_flags_are_one_line_naming_them(bench, capsys):
    with pytest.raises(cli.SetupError, match="--jit='maybe'"):
        parse(bench, ["--models=resnet51", "--precisions=fp8", "--jit=maybe"])
    with pytest.raises(SystemExit) as exit_info:
        cli.call(
            bench.main,
            bench.define_flags,
            ["--models=resnet51", "--strategies=tpu", "--steps=0"],
            command=bench.COMMAND,
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "--models: unknown 'resnet51'" in err and "'tpu'" in err and "--steps=0" in err


@pytest.mark.slow  # two ResNet-18-D steps compiled and timed: ~15 s on a quiet 2-core machine
def test_tiny_run_prints_the_table_and_finite_positive_ratios(bench, capsys):
    result = bench.measure(
        parse(
            bench,
            ["--models=resnet18_d", "--precisions=float32", "--jit=off", "--strategies=default", "--noloop",
             *_TINY],
        ),
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split()[:6] == ["model", "precision", "batch", "xla", "strategy", "step"]
    rows = [line.split() for line in lines[header + 2 : header + 4]]
    assert [row[:6] for row in rows] == [
        ["resnet18_d", "float32", "4", "off", "default", "trainer"],
        ["resnet18_d", "float32", "4", "off", "default", "fit"],
    ]
    for row in rows:  # ms/step, images/s = batch / step time, ÷ base
        ms, images_per_s = float(row[6]), float(row[8])
        assert ms > 0 and images_per_s == pytest.approx(4 / (ms / 1e3), rel=0.01, abs=0.06)  # printed .1f
    assert float(rows[0][9]) == 1.0
    printed = dict(re.findall(r"^  (step time, trainer ÷ model\.fit)\s+([0-9.]+)$", out, re.M))
    assert set(printed) == set(result["ratios"]) == {"step time, trainer ÷ model.fit"}
    for value in result["ratios"].values():
        assert math.isfinite(value) and value > 0
        assert float(printed["step time, trainer ÷ model.fit"]) == pytest.approx(value, abs=1e-3)


def test_end_to_end_alternates_host_and_device_and_reports_their_ratio_and_bytes(bench, tmp_path, monkeypatch,
                                                                                 capsys):
    (tmp_path / "train").mkdir()
    args = parse(bench, [*_TINY, f"--end_to_end={tmp_path}", "--end_to_end_rounds=3"])
    calls = []

    def fake_run(root, base, args, augment_on):
        calls.append(augment_on)
        rates = {"host": [10.0, 30.0, 11.0], "device": [12.0, 13.0, 50.0]}[augment_on]
        command = ["python", "-m", "bot_keras.train", f"--augment_on={augment_on}"]
        return rates[calls.count(augment_on) - 1], command

    monkeypatch.setattr(bench, "end_to_end_images_per_second", fake_run)
    monkeypatch.setattr(bench, "input_images_per_second", lambda root, args, batches, on: 100.0)
    base = bench.configurations(args)[0]
    result = bench.end_to_end(args, base, 20.0)
    assert calls == ["host", "device"] * 3  # alternating, so that load falls on both alike
    assert result["images/s end to end, augment_on device ÷ host"] == pytest.approx(13.0 / 11.0)  # medians
    assert result["images/s, end to end (device) ÷ step alone"] == pytest.approx(13.0 / 20.0)
    out = capsys.readouterr().out
    # 4 images of 32x32x3: uint8 for device, float32 for host.
    assert "--augment_on=device: 13.0 images/s" in out and "per batch: 12,288 bytes" in out
    assert "--augment_on=host: 11.0 images/s" in out and "per batch: 49,152 bytes" in out
    with pytest.raises(cli.SetupError, match="--augment_on: 'gpu'"):
        parse(bench, ["--augment_on=gpu"])
