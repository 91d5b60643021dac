"""The `sweep` section: which trial of which study a training run is, set by `inatpipe sweep run` for each trial.

Left at their defaults (study "", trial -1) a run is no trial. They are params, not environment, so that a trial's
run has a run-cache key of its own: a run its pruner stopped early can never be restored for a plain run, or for
another trial, with the same hyperparameters.
"""

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar

from inatpipe.params.schema import Rule, Section, at_least, fail

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SweepParams(Section):
    SECTION: ClassVar[str] = "sweep"

    study: Annotated[
        str, Rule(lambda v: v == "" or bool(STUDY_NAME.match(v)), "empty or letters, digits, '-', '_', '.'")
    ]
    trial: Annotated[int, at_least(-1, note="(-1: not a trial)")]

    def check(self) -> None:
        if self.trial >= 0 and not self.study:
            fail("sweep.study", "the study's name when sweep.trial is set", self.study)

    @property
    def is_trial(self) -> bool:
        return self.trial >= 0
