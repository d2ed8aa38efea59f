"""Option validation: every bad value names the field, the value and what is valid."""

from __future__ import annotations

import pytest

import lightning_peft as lp
from lightning_peft.methods.lora import LoRAConfig
from tests import tiny


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "LoRAConfig.r must be a positive integer; got 0."),
        ({"r": -3}, "LoRAConfig.r must be a positive integer; got -3."),
        ({"r": 2.5}, "LoRAConfig.r must be a positive integer; got 2.5."),
        ({"alpha": 0}, "LoRAConfig.alpha must be a positive number; got 0."),
        ({"alpha": -1.0}, "LoRAConfig.alpha must be a positive number; got -1.0."),
        ({"dropout": 1.0}, "LoRAConfig.dropout must be a number in [0, 1); got 1.0."),
        ({"dropout": -0.1}, "LoRAConfig.dropout must be a number in [0, 1); got -0.1."),
        ({"init": "xavier"}, "LoRAConfig.init must be one of 'kaiming', 'gaussian', 'loftq'; got 'xavier'."),
        ({"rslora": "yes"}, "LoRAConfig.rslora must be True or False; got 'yes'."),
        ({"target_modules": []}, "LoRAConfig.target_modules must be None, a regex string"),
        ({"target_modules": ["q", 3]}, "LoRAConfig.target_modules must be None, a regex string"),
        ({"modules_to_save": "classifier"}, "LoRAConfig.modules_to_save must be None or a list of module names"),
    ],
)
def test_invalid_lora_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        LoRAConfig(**options)
    assert message in str(err.value)


def test_unknown_method_lists_registered_ones() -> None:
    model = tiny.build("llama")
    with pytest.raises(ValueError, match=r"method must be one of 'lora'.*; got 'lroa'\."):
        lp.inject(model, "lroa")


def test_unknown_option_is_an_error_not_ignored() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig has no option\(s\) 'rank'; valid options: .*alpha.*r"):
        lp.inject(tiny.build("llama"), "lora", rank=4)


def test_config_and_keywords_together_is_an_error() -> None:
    with pytest.raises(TypeError, match="either in the LoRAConfig or as keywords"):
        lp.inject(tiny.build("llama"), LoRAConfig(), r=4)


def test_user_config_is_never_mutated() -> None:
    config = LoRAConfig(r=4)
    model = lp.inject(tiny.build("llama", "classify"), config)
    assert config.target_modules is None and config.modules_to_save is None
    resolved = lp.get_info(model).config
    assert resolved.target_modules == ["q_proj", "v_proj"] and resolved.modules_to_save == ["score"]


def test_round_trip_through_dict() -> None:
    config = LoRAConfig(r=4, target_modules=("q_proj",), rslora=True)
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["target_modules"] == ["q_proj"]


def test_init_only_options_are_left_out_of_records_and_comparisons() -> None:
    from dataclasses import dataclass

    from lightning_peft.core.config import AdapterConfig, init_only

    @dataclass(kw_only=True)
    class Seeded(AdapterConfig):
        size: int = 2
        seed_text: str | None = init_only()

    config = Seeded(size=3, seed_text="hello")
    assert config.to_dict() == {"modules_to_save": None, "size": 3}
    assert Seeded.from_dict(config.to_dict()) == Seeded(size=3)
    assert config.diff(Seeded(size=3)) == {} and config.diff(Seeded(size=4)) == {"size": (3, 4)}
    assert Seeded.from_dict({"seed_text": "x"}).seed_text == "x"  # still an option one can pass
