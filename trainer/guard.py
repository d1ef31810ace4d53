"""The divergence guard: a run whose loss is not finite, or stays far above where it started,
is stopped with a message instead of burning GPU-days (`--no-divergence-guard` turns it off).

- reference: the loss of the run's first step (mean over workers), kept in the resume state;
- a check every `print_freq` steps (while every worker is still in the epoch) looks at the
  mean loss since the previous check, over all workers; the check at each epoch's end looks
  at the whole epoch's mean;
- it trips on a non-finite mean, or on FACTOR x reference exceeded at PATIENCE checks in a row.

The numbers: an untrained net starts at about ln(classes) (2.3 for 10, 6.9 for 1000); a
working run never goes back to 3x that, while the paper's recipe on the 10-class sample data
reaches 4x by its fourth step and ~11x in its second epoch (docs/divergence.md explains why).
A trip ends the epoch on every rank at once; the worker writes diverged.json
(trainer.saving.report_divergence) and the driver turns it into exit status 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FACTOR = 3.0
PATIENCE = 2


@dataclass
class DivergenceGuard:
    reference: float | None = None
    bad_checks: int = 0

    def set_reference(self, loss: float) -> str | None:
        """The run's first step: its loss is the reference (a non-finite one is a reason to stop)."""
        if not math.isfinite(loss):
            return f"the training loss is {loss} at the first step"
        if self.reference is None:
            self.reference = loss
        return None

    def check(self, mean_loss: float) -> str | None:
        """The reason to stop, or None."""
        if not math.isfinite(mean_loss):
            return f"the training loss is {mean_loss}"
        if self.reference is None:
            return None
        if mean_loss > FACTOR * self.reference:
            self.bad_checks += 1
        else:
            self.bad_checks = 0
        if self.bad_checks >= PATIENCE:
            return (
                f"the training loss {mean_loss:.4g} has been above {FACTOR:g}x its starting value "
                f"{self.reference:.4g} for {self.bad_checks} checks in a row"
            )
        return None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.reference, self.bad_checks = state.get("reference"), int(state.get("bad_checks", 0))
