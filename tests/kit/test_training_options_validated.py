"""Every numeric option of training and fine-tuning is validated where recipes are read, all errors at once."""

import pytest

from pfgdf_plugin.config import ConfigError
from pfgdf_plugin.quantize import QuantizeConfig
from pfgdf_plugin.recipe import recipe_from_dict
from pfgdf_plugin.train import TrainConfig

BAD = [
    ({"train": {"label_smoothing": 1.5}}, "train.label_smoothing must be in [0, 1), got 1.5"),
    ({"finetune": {"label_smoothing": 1}}, "finetune.label_smoothing must be in [0, 1), got 1.0"),
    ({"train": {"lr": 0}}, "train.lr must be > 0, got 0.0"),
    ({"finetune": {"lr": ".nan"}}, "finetune.lr must be float, got '.nan'"),
    ({"finetune": {"lr": float("inf")}}, "finetune.lr must be a finite number, got inf"),
    ({"train": {"momentum": 1.0}}, "train.momentum must be in [0, 1), got 1.0"),
    ({"train": {"momentum": -0.1}}, "train.momentum must be in [0, 1), got -0.1"),
    ({"finetune": {"weight_decay": -1e-4}}, "finetune.weight_decay must be >= 0, got -0.0001"),
    ({"train": {"epochs": -1}}, "train.epochs must be >= 0, got -1.0"),
    ({"finetune": {"distill_weight": 2}}, "finetune.distill_weight must be in [0, 1], got 2.0"),
    ({"finetune": {"distill_temperature": 0}}, "finetune.distill_temperature must be > 0, got 0.0"),
    ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1, got 0"),
    ({"report": {"batch_sizes": ["a"]}}, "report.batch_sizes[0] must be int, got 'a'"),
    ({"report": {"batch_sizes": [1, 2.5]}}, "report.batch_sizes[1] must be int, got 2.5"),
    ({"report": {"batch_sizes": [1, 0]}}, "report.batch_sizes[1] must be >= 1, got 0"),
    ({"report": {"batch_sizes": []}}, "report.batch_sizes must list at least one batch size, got []"),
    ({"report": {"warmup": -1}}, "report.warmup must be >= 0, got -1"),
    ({"report": {"repeats": 0}}, "report.repeats must be >= 1, got 0"),
    ({"report": {"threads": 0}}, "report.threads must be >= 1 or null, got 0"),
    ({"quantize": {"lr": -1}}, "quantize.lr must be > 0, got -1.0"),
    ({"quantize": {"epochs": 0}}, "quantize.epochs must be > 0, got 0.0"),
    ({"quantize": {"calibration_batches": 0}}, "quantize.calibration_batches must be >= 1, got 0"),
    ({"quantize": {"targets": ["weight", 3]}}, "quantize.targets[1] must be str, got 3"),
    ({"seed": -1}, "seed must be in [0, 2**32), got -1"),
    ({"model": {"width": 1e9}}, "model.width must be <= 64, got 1000000000.0"),
    ({"checkpoint_every": -5}, "checkpoint_every must be >= 0, got -5"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split(" ")[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_a_bad_numeric_option_is_a_config_error_naming_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(data)
    assert e.value.errors == [message]


def test_every_bad_option_is_listed_at_once():
    data = {}
    for d, _ in BAD:
        for section, value in d.items():
            if isinstance(value, dict):
                data.setdefault(section, {}).update(value)
            else:
                data[section] = value
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(data)
    keys = {m.split(" ")[0].split("[")[0] for m in e.value.errors}
    # a key given twice above keeps its last value; every key still appears once at least
    assert keys >= {m.split(" ")[0].split("[")[0] for _, m in BAD} - {"report.batch_sizes"}
    assert len(e.value.errors) >= 20


def test_train_and_quantize_configs_built_in_python_are_checked_the_same_way():
    assert TrainConfig(lr="fast", momentum=None).validate("t") == [
        "t.lr must be a finite number > 0, got 'fast'", "t.momentum must be a finite number in [0, 1), got None"]
    assert QuantizeConfig(bits=True, calibration_batches=2.0).validate("q") == [
        "q.bits must be in 2..8, got True", "q.calibration_batches must be an int >= 1, got 2.0"]
    assert TrainConfig().validate() == [] and QuantizeConfig().validate() == []


def test_good_edges_are_accepted():
    recipe_from_dict({"train": {"label_smoothing": 0.0, "momentum": 0.0, "weight_decay": 0, "epochs": 0},
                      "finetune": {"label_smoothing": 0.999, "distill_weight": 1}, "seed": 2**32 - 1,
                      "report": {"batch_sizes": [1], "warmup": 0, "repeats": 1, "threads": 1}})
