"""bara.trainer: option checks (one BaraError naming the flag, before anything is loaded)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bara.errors import BaraError
from bara.trainer import RULES, TrainConfig


@pytest.mark.parametrize("option, value", [
    ("epochs", 0), ("epochs", -2.0), ("epochs", math.nan), ("steps", -1), ("batch_size", 0), ("batch_size", -4),
    ("lr", -1e-3), ("lr", 0.0), ("lr", math.nan), ("lr", math.inf), ("warmup_ratio", 1.5), ("warmup_ratio", -0.1),
    ("max_grad_norm", -1.0), ("max_length", 0), ("seed", -1), ("checkpoint_every", -5), ("eval_every", -1),
    ("weight_decay", -0.1), ("steps", 2.5), ("batch_size", True),
])
def test_bad_option_is_one_error_naming_the_flag(option, value):
    config = dataclasses.replace(TrainConfig(), **{option: value})
    with pytest.raises(BaraError) as info:
        config.validate()
    message = str(info.value)
    flag = "--" + option.replace("_", "-")
    assert message.startswith(f"{flag} must be") and f"fix: pass e.g. {flag} " in message, message


@pytest.mark.parametrize("option, value", [("steps", 0), ("warmup_ratio", 1.0), ("warmup_ratio", 0.0),
                                           ("max_grad_norm", 0.0), ("epochs", 0.5), ("seed", 2**32 - 1)])
def test_edge_values_are_accepted(option, value):
    dataclasses.replace(TrainConfig(), **{option: value}).validate()


values = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=3), st.none())


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(RULES)), values, max_size=4))
def test_any_option_values_validate_or_raise_bara_error(options):
    config = dataclasses.replace(TrainConfig(), **options)
    try:
        config.validate()
    except BaraError as err:
        assert "fix:" in str(err) and "\n" not in str(err)
        return
    for name, value in options.items():  # accepted: every value is a real number inside its rule
        assert not isinstance(value, (bool, str, type(None))) and math.isfinite(value), (name, value)


def _history(nll_at: dict[int, float], steps: int) -> list[dict]:
    return [{"step": s, "loss": 1.0, **({"val_nll": nll_at[s]} if s in nll_at else {})} for s in range(1, steps + 1)]


def test_the_budget_check_reads_the_validation_nll_at_80_percent_and_at_the_end():
    from bara.trainer import check_steps, convergence

    assert check_steps(100) == (80, 100) and check_steps(12) == (10, 12) and check_steps(9) == ()
    falling = convergence(_history({80: 1.00, 100: 0.90}, 100), 10)
    assert falling["verdict"] == "still falling" and falling["change"] == pytest.approx(-0.10)
    assert falling["advice"] == ("validation NLL still falling over the last 20 % of the steps (1 -> 0.9, -10.0 %): "
                                 "more steps (--epochs / --steps) or a higher --lr may do better")
    assert convergence(_history({80: 1.00, 100: 1.05}, 100), 10)["verdict"] == "rising"
    assert convergence(_history({80: 0.100, 100: 0.095}, 100), 10)["verdict"] == "converged"  # 5 %, 0.005 nats
    stuck = convergence(_history({80: 1.10, 100: 1.09}, 100), 3)  # log 3 = 1.0986
    assert stuck["verdict"] == "not learning" and "chance level log 3" in stuck["advice"]
    assert "another --lr (3x either way" in stuck["advice"]  # a rate too high stalls there too (§20: 1e-2)
    assert convergence(_history({80: 1.00, 100: 0.99}, 100), 10) == {
        "val_nll_at_80": 1.0, "val_nll_at_end": 0.99, "change": pytest.approx(-0.01), "verdict": "converged",
        "advice": ""}
    assert convergence(_history({50: 1.0, 100: 0.5}, 100), 10) is None  # no score at step 80: nothing to say
    assert convergence(_history({}, 5), 10) is None and convergence([], 10) is None
