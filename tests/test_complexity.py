"""Parameter and multiply-accumulate counts: a hand-computed toy model, the paper's Table 5, the tool."""

import keras
import pytest

from bot_keras import cli
from bot_keras.models import build_model
from bot_keras.models.complexity import count_macs, count_trainable_params
from tools import model_table


def test_hand_computed_toy_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)  # 4×4×4 outputs × 3·3·3 = 1,728
    x = keras.layers.BatchNormalization()(x)  # not counted
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 4×4×4 × 3·3 = 576
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # 4×4×6 × 1·1·4/2 = 192
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)  # 6·5 = 30
    model = keras.Model(inputs, outputs)
    assert count_macs(model) == 1_728 + 576 + 192 + 30
    # Params: 3·3·3·4 + 4 | BN γ, β | 3·3·4 + 4 | 1·1·2·6 + 6 | 6·5 + 5
    assert count_trainable_params(model) == 112 + 8 + 40 + 18 + 35


@pytest.mark.parametrize(
    "name, gmacs",
    # The paper's Table 5 lists 3.9 / 4.1 / 4.3 / 4.3 GFLOPs (multiply-accumulates) for these.
    [("resnet50", 3.86), ("resnet50_b", 4.09), ("resnet50_c", 4.33), ("resnet50_d", 4.33)],
)
def test_resnet50_family_macs_match_table5(name, gmacs):
    model = build_model(name, num_classes=1000)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_model_table_tool_prints_one_row_per_model(capsys):
    cli.call(
        model_table.main,
        model_table.define_flags,
        ["--models", "resnet18,resnet18_c", "--image-size", "224"],
        command=model_table.COMMAND,
    )
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split()[:3] == ["model", "params", "GMACs"]
    # ResNet-18: 11,689,512 parameters and 1.81 G MACs (torchvision's figures); -C adds the deep stem.
    assert rows[1].split() == ["resnet18", "11,689,512", "1.814"]
    assert rows[2].split() == ["resnet18_c", "11,708,744", "2.054"]
