"""Training budgets in seconds: a short timing probe on a copy of the model sets ``max_steps``.

``time_budget_s`` (recipe key) turns "train for 20 minutes" into a step count before training starts,
so the learning-rate schedule (warm-up, cosine decay) is planned for the steps that will really run
and a job never overruns a fixed slot (a cluster reservation, a device lease). The probe runs
``probe_steps`` optimizer steps on a deep copy of the model with the run's own settings and takes
the median step time after two warm-up steps; evaluation, export and the probe itself are not
counted in the budget.

``time_limit_s`` (recipe key) is the hard cap beside it: ``WallClockLimit`` stops training after the
optimizer step that crosses that many seconds (the probe can be wrong when other jobs share the
GPU), and the job goes on to merge, export and evaluate what it has. While the cap is set, the
learning-rate schedule follows the clock as well as the step count: it is evaluated at
max(step, elapsed / time_limit_s * max_steps), so a run that turns out slower than planned still
finishes its warm-up and its decay (cosine to ~0) when the cap stops it, instead of stopping at a
high learning rate part-way down the schedule. When the steps finish first nothing changes.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Trainer callback recording the wall time of every optimizer step (GPU work included)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)

    def median(self, skip: int = 2) -> float:
        steady = sorted(self.times[skip:]) or sorted(self.times)
        if not steady:
            raise RuntimeError("the timing probe ran no optimizer step")
        return steady[len(steady) // 2]


def clock_step(step: int, elapsed_s: float, limit_s: float, max_steps: int) -> int:
    """The schedule position of a time-capped run: the further along of steps and wall clock."""
    return max(int(step), min(int(max_steps), int(elapsed_s / limit_s * max_steps)))


def _follow_clock(fn, clock):
    def lr_lambda(step):  # a plain function: LambdaLR's state_dict skips it (checkpoints stay weights-only)
        return fn(clock(step))
    return lr_lambda


class WallClockLimit(TrainerCallback):
    """Stop training after the optimizer step at which ``limit_s`` seconds of training have passed, and
    (``follow_schedule``) run a ``LambdaLR`` schedule at :func:`clock_step` so it ends when the cap does."""

    def __init__(self, limit_s: float, follow_schedule: bool = True):
        if not isinstance(limit_s, (int, float)) or isinstance(limit_s, bool) or limit_s <= 0:
            raise ValueError(f"time_limit_s={limit_s!r} is not valid; allowed: seconds > 0")
        self.limit_s = float(limit_s)
        self.follow_schedule = follow_schedule
        self.hit_at_step: int | None = None
        self.followed = False

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kw):
        self._t0 = time.perf_counter()
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if self.follow_schedule and lambdas and state.max_steps > 0:
            max_steps = int(state.max_steps)

            def clock(step):
                return clock_step(step, time.perf_counter() - self._t0, self.limit_s, max_steps)
            lr_scheduler.lr_lambdas = [_follow_clock(fn, clock) for fn in lambdas]
            self.followed = True

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self._t0 >= self.limit_s and self.hit_at_step is None:
            self.hit_at_step = int(state.global_step)
            print(f"[qft train] time_limit_s={self.limit_s:.0f} reached at step {state.global_step} of "
                  f"{state.max_steps}: stopping training", flush=True)
            control.should_training_stop = True
        return control

    def report(self, state) -> dict:
        """What a run records about the cap: {} when it did not bind."""
        if self.hit_at_step is None:
            return {}
        return {"stopped_by_time_limit_at_step": self.hit_at_step, "planned_steps": int(state.max_steps),
                "schedule_followed_clock": self.followed}


def time_limit_callbacks(limit_s: float) -> list:
    """``[WallClockLimit(limit_s)]`` for a recipe's ``time_limit_s`` > 0, else ``[]``."""
    return [WallClockLimit(limit_s)] if limit_s else []


def probe_seconds_per_step(model, make_trainer, probe_steps: int) -> float:
    """Median seconds per optimizer step of ``make_trainer(copy_of_model, timer)`` run for ``probe_steps``."""
    probe = copy.deepcopy(model)
    timer = StepTimer()
    make_trainer(probe, timer).train()
    del probe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return timer.median()


def steps_for_budget(budget_s: float, seconds_per_step: float) -> int:
    """How many optimizer steps fit in ``budget_s`` seconds (at least 1)."""
    return max(1, int(budget_s / max(seconds_per_step, 1e-9)))
