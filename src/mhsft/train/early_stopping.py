"""The best checkpoint and early stopping, with transformers' and ms-swift's flags and semantics.

The most requested training feature in ms-swift's and LLaMA-Factory's trackers is keeping the best checkpoint and
stopping when validation stops improving (issue 20; ms-swift #9780: `--save_total_limit 1` deleted the best
checkpoint and `--load_best_model_at_end` then failed). transformers' Trainer does this with TrainerState and
EarlyStoppingCallback, but mhsft's loop is its own (train/sft.py says why), so the bookkeeping is here, kept
to HF's rules:

- `--metric_for_best_model` names a logged validation metric (`loss` means `eval_loss`, as in HF: a missing
  `eval_` prefix is added); `--greater_is_better` defaults to false for metrics ending in `loss`, else true.
- The patience counter (EarlyStoppingCallback.check_metric_value): an evaluation resets it when it beats the best
  evaluation so far by more than `--early_stopping_threshold`, and otherwise adds one; training stops when it
  reaches `--early_stopping_patience`.
- The best must be a checkpoint that exists: only evaluations made when a checkpoint is saved compete (each
  --save_steps, the last step, an early stop). HF's rule makes that every save: --save_steps must be a multiple of
  --eval_steps when a best-checkpoint flag is given (a one-line error otherwise).

The state (best value, its step, the counter) goes into each checkpoint's trainer_state.json, so a killed run
resumes with them intact; `best.json` in the run folder names the best for later stages (mhsft.checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mhsft.utils import UserError

EVAL_METRICS = ("eval_loss", "eval_token_acc")  # what the trainer's validation logs


def metric_name(name: str | None) -> str:
    """HF's spelling rule: `loss` -> `eval_loss`; None -> eval_loss (ms-swift's default)."""
    name = (name or "eval_loss").strip()
    return name if name.startswith("eval_") else f"eval_{name}"


def check_best_flags(args, has_validation: bool) -> list[str]:
    """One-line errors for best-checkpoint / early-stopping flags that cannot work; returns notice lines."""
    asked = [
        f"--{f}"
        for f, on in (
            ("metric_for_best_model", args.metric_for_best_model is not None),
            ("load_best_model_at_end", args.load_best_model_at_end),
            ("early_stopping_patience", args.early_stopping_patience is not None),
        )
        if on
    ]
    metric = metric_name(args.metric_for_best_model)
    if metric not in EVAL_METRICS:
        raise UserError(
            f"--metric_for_best_model {args.metric_for_best_model}: not a metric the validation logs; choose "
            f"{' or '.join(EVAL_METRICS)}"
        )
    if args.early_stopping_patience is not None and args.early_stopping_patience < 1:
        raise UserError("--early_stopping_patience must be at least 1 (evaluations without improvement)")
    if args.early_stopping_threshold < 0:
        raise UserError("--early_stopping_threshold must be >= 0")
    if asked and not has_validation:
        raise UserError(
            f"{', '.join(asked)} need a validation set: give --val_dataset or --split_dataset_ratio"
        )
    if not has_validation or args.save_steps % args.eval_steps == 0:
        return []
    if asked:
        raise UserError(
            f"{asked[0]} needs every checkpoint evaluated, so that the best is a checkpoint: --save_steps "
            f"{args.save_steps} must be a multiple of --eval_steps {args.eval_steps} (as in transformers)"
        )
    return [
        f"--save_steps {args.save_steps} is not a multiple of --eval_steps {args.eval_steps}: the best checkpoint "
        "is chosen among the evaluations made at a save (and the last step)"
    ]


@dataclass
class BestTracker:
    """The best checkpoint so far and the early-stopping counter (one per run; every rank keeps the same one,
    since validation metrics are reduced over ranks)."""

    metric: str
    greater_is_better: bool
    patience: int | None = None
    threshold: float = 0.0
    best_value: float | None = None  # the best checkpoint's
    best_step: int | None = None
    best_seen: float | None = (
        None  # the best of every evaluation (saved or not), which patience compares with
    )
    patience_counter: int = 0

    @classmethod
    def from_args(cls, args) -> BestTracker:
        metric = metric_name(args.metric_for_best_model)
        greater = args.greater_is_better
        if greater is None:
            greater = not metric.endswith("loss")
        return cls(metric, greater, args.early_stopping_patience, args.early_stopping_threshold)

    def _better(self, value: float, than: float | None) -> bool:
        if than is None:
            return math.isfinite(value)
        return value > than if self.greater_is_better else value < than

    def observe(self, value: float) -> None:
        """An evaluation: the patience counter as HF's EarlyStoppingCallback keeps it, against the best evaluation
        before this one."""
        if self._better(value, self.best_seen) and (
            self.best_seen is None or abs(value - self.best_seen) > self.threshold
        ):
            self.patience_counter = 0
        else:
            self.patience_counter += 1
        if self._better(value, self.best_seen):
            self.best_seen = float(value)

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.patience_counter >= self.patience

    def consider(self, value: float, step: int) -> bool:
        """An evaluation made where a checkpoint is saved: whether it is the new best."""
        if not self._better(value, self.best_value):
            return False
        self.best_value, self.best_step = float(value), step
        return True

    @property
    def best_checkpoint(self) -> str | None:
        return None if self.best_step is None else f"checkpoint-{self.best_step}"

    def record(self) -> dict | None:
        """best.json's content (None while no checkpoint has been evaluated)."""
        if self.best_step is None:
            return None
        return {
            "best_checkpoint": self.best_checkpoint,
            "metric": self.metric,
            "value": self.best_value,
            "greater_is_better": self.greater_is_better,
            "step": self.best_step,
        }

    def state(self) -> dict:
        """What a checkpoint's trainer_state.json keeps of it (HF's names where HF has one)."""
        return {
            "best_metric": self.best_value,
            "best_global_step": self.best_step,
            "best_model_checkpoint": self.best_checkpoint,
            "metric_for_best_model": self.metric,
            "greater_is_better": self.greater_is_better,
            "best_metric_seen": self.best_seen,
            "early_stopping_patience_counter": self.patience_counter,
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state. A run resumed with a different metric or direction starts its
        best and its counter afresh (the old values do not compare)."""
        same = (state.get("metric_for_best_model"), state.get("greater_is_better")) == (
            self.metric,
            self.greater_is_better,
        )
        if same:
            self.best_value, self.best_step = state.get("best_metric"), state.get("best_global_step")
            self.best_seen = state.get("best_metric_seen")
            self.patience_counter = int(state.get("early_stopping_patience_counter") or 0)
