"""register's decisions as pure functions: every case of promotion, duplicates and the challenger alias,
without a server (the same decisions against a real `mlflow server`: tests/test_gate_and_promotion.py)."""

import itertools

import pytest

from components.artifacts.reports import Verdict
from components.artifacts.run_record import RunRecord
from components.register import challenger_moves, decide_promotion, duplicate_reason
from helpers import register_cfg

AUTO, MANUAL = register_cfg("m"), register_cfg("m", promotion="manual")
RUN = RunRecord("r1", "a run", "sqlite:///x.db")


def _verdict(seen, comparison, not_compared=""):
    return Verdict(True, [], seen, comparison, not_compared, RUN)


def _expected(seen, comparison, now, version, cfg):
    """The rule, written out case by case."""
    if now == version:
        return True
    if cfg.promotion == "manual" or comparison == "not_comparable":
        return False
    if comparison == "disabled":
        return True
    return now == seen


@pytest.mark.parametrize("seen, comparison, now, cfg", [
    (seen, comparison, now, cfg)
    for seen, comparison, now, cfg in itertools.product([None, "1"], ["compared", "no_champion", "disabled",
                                                                       "not_comparable"], [None, "1", "2", "3"],
                                                         [AUTO, MANUAL])
    if (seen is None) == (comparison == "no_champion") or comparison == "disabled"])
def test_promotion_in_every_case(seen, comparison, now, cfg):
    promoted, why = decide_promotion(_verdict(seen, comparison, "other classes"), "3", now, cfg)
    assert promoted == _expected(seen, comparison, now, "3", cfg), why
    if promoted and now != "3":
        assert why.startswith("@champion moved from ")
    if not promoted:
        assert why.startswith(("not promoted", "register.promotion is manual"))


def test_the_reasons_say_what_happened():
    assert decide_promotion(_verdict("1", "compared"), "2", "3", AUTO) == (
        False, "not promoted: @champion moved from v1 to v3 after validation")
    assert decide_promotion(_verdict(None, "no_champion"), "1", "2", AUTO) == (
        False, "not promoted: @champion moved from nobody to v2 after validation")
    assert decide_promotion(_verdict("1", "compared"), "2", "1", AUTO) == (True, "@champion moved from v1")
    assert decide_promotion(_verdict("1", "disabled"), "2", "1", AUTO) == (
        True, "@champion moved from v1 on the thresholds alone (validate.compare_with_champion is false)")
    promoted, why = decide_promotion(_verdict("1", "not_comparable", "champion v1 has classes ['a']"), "2", "1", AUTO)
    assert not promoted and why.startswith("not promoted: champion v1 has classes ['a']; to replace it anyway: ")
    assert "set_registered_model_alias('m', 'champion', 2)" in why
    assert decide_promotion(_verdict("1", "compared"), "2", "2", MANUAL) == (True, "already @champion")


def test_a_version_holding_the_same_weights_makes_a_new_one_pointless():
    assert duplicate_reason(None, "ab" * 32, "1", "champion") is None
    assert duplicate_reason("1", "ab" * 32, "1", "champion") == \
        "weights identical to v1 (@champion), sha256 abababababab: nothing new to register"
    assert duplicate_reason("2", "ab" * 32, None, "champion") == \
        "weights identical to v2, sha256 abababababab: nothing new to register"


@pytest.mark.parametrize("now, version, moves", [(None, "1", True), ("1", "2", True), ("2", "2", False),
                                                 ("3", "2", False), ("9", "10", True)])
def test_the_challenger_alias_only_moves_forward(now, version, moves):
    assert challenger_moves(now, version) == moves
