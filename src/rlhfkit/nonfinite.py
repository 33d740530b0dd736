"""The non-finite guard every training loop steps its optimizers through.

No torch import: the command line catches ``TrainingDiverged`` without loading torch for ``--help``.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm: the stage stops, uncommitted."""


def _finite(value) -> bool:
    return value is None or math.isfinite(float(value))


class NonFiniteGuard:
    """Skips an update whose loss or gradient norm is NaN or infinite, counts it, and stops the stage
    (``TrainingDiverged``, naming the stage and the step) at ``max_consecutive`` skips in a row; 0 turns
    it off (no check, no extra gradient norm: the loop as it was).

    Every training loop decides through it (``training.optimizer_step``: clip, then step or skip), on
    values all processes hold alike (the global gradient norm after DDP's all-reduce, the loss reduced
    over processes), so the processes step or skip together. A skipped step zeroes the gradients and steps neither optimizer nor scheduler: weights,
    Adam's moments and the learning rate stay as they were. Under fp16 the loss scaler owns gradient
    overflow (it skips the step and lowers the scale, its normal working), so only a non-finite loss
    counts there. Its state (``state_dict``) goes into checkpoints, so counts survive a resume.
    """

    def __init__(self, stage: str, max_consecutive: int, accelerator):
        self.stage, self.max_consecutive, self.accelerator = stage, max_consecutive, accelerator
        self.skipped: list[int] = []  # the steps skipped
        self.consecutive = 0
        self.updates = 0  # steps checked (names the step when the loop passes none)

    @property
    def enabled(self) -> bool:
        return self.max_consecutive > 0

    def grad_norm(self, model, grad_clip: float):
        """The global gradient norm, clipping to ``grad_clip`` when it is > 0; None when neither is wanted.

        Without clipping the norm comes from the same call with an infinite max norm: the clip
        coefficient is then exactly 1.0, so the gradients (and the weights) are unchanged bit for bit.
        """
        if grad_clip > 0:
            return self.accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        if self.enabled:
            return self.accelerator.clip_grad_norm_(model.parameters(), math.inf)
        return None

    def step(self, step, loss, grad_norms: Sequence, updates: Sequence[tuple]) -> bool:
        """Step each (optimizer, scheduler) of ``updates`` unless ``loss`` or one of ``grad_norms`` is
        non-finite; zero the gradients either way. Returns whether the update was applied."""
        ok = self.check(step, loss, grad_norms)
        for opt, sched in updates:
            if ok:
                opt.step()
                sched.step()
            opt.zero_grad(set_to_none=True)
        return ok

    def check(self, step, loss, grad_norms: Sequence = ()) -> bool:
        """Whether step ``step`` (None: the count of checks) may update; counts a skip, raises at the limit."""
        self.updates += 1
        if not self.enabled:
            return True
        scaler = getattr(self.accelerator, "scaler", None)
        bad = [] if _finite(loss) else [f"loss {float(loss)}"]
        if scaler is None:
            bad += [f"gradient norm {float(g)}" for g in grad_norms if not _finite(g)]
        if not bad:
            self.consecutive = 0
            return True
        self.skipped.append(self.updates if step is None else step)
        self.consecutive += 1
        if scaler is not None:
            try:
                scaler.update()  # what the skipped optimizer step would have done: lower the scale, reset its state
            except AssertionError:
                pass  # no inf check was recorded this step
        where = f"optimizer step {self.updates}" if step is None else f"step {step}"
        what = f"{self.stage}: {where}: non-finite {', '.join(bad)}"
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(f"{what}; {self.consecutive} steps in a row, so the stage stops uncommitted "
                                   "(lower lr, set grad_clip, or check the data)")
        if self.accelerator.is_main_process:
            print(f"[rlhfkit] {what}; update skipped ({self.consecutive} in a row, the stage stops at "
                  f"{self.max_consecutive})", file=sys.stderr, flush=True)
        return False

    def metrics(self) -> dict:
        return {"skipped_nonfinite_steps": len(self.skipped), "skipped_nonfinite_at": list(self.skipped)}

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped), "consecutive": self.consecutive, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive, self.updates = list(state["skipped"]), state["consecutive"], state["updates"]
