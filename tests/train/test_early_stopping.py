"""mhsft/train/early_stopping.py: transformers' best-metric and patience rules, the flag checks, and the state a
checkpoint keeps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mhsft.train.early_stopping import BestTracker, check_best_flags, metric_name
from mhsft.utils import UserError


def flags(**kw) -> SimpleNamespace:
    base = {"metric_for_best_model": None, "greater_is_better": None, "load_best_model_at_end": False,
            "early_stopping_patience": None, "early_stopping_threshold": 0.0, "save_steps": 10, "eval_steps": 10}  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def hf_counter(values: list[float], threshold: float, greater: bool) -> list[int]:
    """transformers' EarlyStoppingCallback.check_metric_value, with state.best_metric updated after each
    evaluation as Trainer._determine_best_metric does: the counter after each evaluation."""
    best, counter, out = None, 0, []
    for v in values:
        better = best is None or (v > best if greater else v < best)
        if best is None or (better and abs(v - best) > threshold):
            counter = 0
        else:
            counter += 1
        if better:
            best = v
        out.append(counter)
    return out


@pytest.mark.parametrize("greater", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_patience_counter_matches_transformers(greater, threshold):
    values = [1.0, 0.9, 0.93, 0.88, 0.87, 0.95, 0.87, 0.5, 0.6, 0.6, 0.49]
    t = BestTracker.from_args(flags(early_stopping_patience=3, early_stopping_threshold=threshold,
                                    greater_is_better=greater))  # fmt: skip
    got = []
    for v in values:
        t.observe(v)
        got.append(t.patience_counter)
    assert got == hf_counter(values, threshold, greater)
    assert t.should_stop == (got[-1] >= 3)


def test_best_is_among_saved_evaluations_and_state_round_trips():
    t = BestTracker.from_args(flags(metric_for_best_model="token_acc", early_stopping_patience=2))
    assert t.metric == "eval_token_acc" and t.greater_is_better  # HF: not *loss -> greater is better
    for step, value, saved in [(5, 0.1, True), (10, 0.4, False), (15, 0.3, True), (20, 0.2, True)]:
        t.observe(value)
        if saved:
            t.consider(value, step)
    # 0.4 was not saved, so checkpoint-15 is the best checkpoint; patience counts against 0.4 (HF)
    assert t.record() == {"best_checkpoint": "checkpoint-15", "metric": "eval_token_acc", "value": 0.3,
                          "greater_is_better": True, "step": 15}  # fmt: skip
    assert t.patience_counter == 2 and t.should_stop
    again = BestTracker.from_args(flags(metric_for_best_model="eval_token_acc", early_stopping_patience=2))
    again.restore(t.state())
    assert again == t
    other = BestTracker.from_args(flags())  # eval_loss: the saved token-accuracy values do not compare
    other.restore(t.state())
    assert other.best_step is None and other.patience_counter == 0
    nan = BestTracker.from_args(flags())
    nan.observe(float("nan"))
    assert not nan.consider(float("nan"), 5) and nan.record() is None and nan.patience_counter == 1


@pytest.mark.parametrize(
    ("kw", "has_val", "message"),
    [
        ({"load_best_model_at_end": True}, False, "--load_best_model_at_end need a validation set"),
        ({"early_stopping_patience": 2}, False, "--val_dataset or --split_dataset_ratio"),
        ({"metric_for_best_model": "rouge"}, True, "choose eval_loss or eval_token_acc"),
        ({"early_stopping_patience": 0}, True, "at least 1"),
        ({"load_best_model_at_end": True, "save_steps": 5, "eval_steps": 2}, True, "must be a multiple of --eval_steps 2"),
    ],
)  # fmt: skip
def test_flags_that_cannot_work_are_one_line_errors(kw, has_val, message):
    with pytest.raises(UserError, match=message) as e:
        check_best_flags(flags(**kw), has_val)
    assert "\n" not in str(e.value)


def test_default_tracking_with_uneven_steps_is_a_notice():
    assert check_best_flags(
        flags(save_steps=10, eval_steps=20), True
    )  # a notice, no error: nothing was asked
    assert check_best_flags(flags(save_steps=20, eval_steps=10, load_best_model_at_end=True), True) == []
    assert check_best_flags(flags(), False) == [] and metric_name("loss") == "eval_loss"


def test_ms_swift_spelling_of_the_patience():
    from mhsft.args import parse_args
    from mhsft.train.sft import SftArguments

    a = parse_args(
        SftArguments, ["--early_stop_interval", "3", "--metric_for_best_model", "loss"], "mhsft sft"
    )
    assert a.early_stopping_patience == 3 and a.metric_for_best_model == "loss"
