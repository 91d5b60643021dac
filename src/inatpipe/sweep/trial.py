"""A training run's side of a sweep trial: report each epoch's validation accuracy to the trial, and stop when the
study's pruner says so.

`sweep run` starts every trial as a DVC experiment with the params sweep.study and sweep.trial set and the storage
URL in the environment; the training stage passes `trial_judges(params.sweep)` to the tracked run, which asks them
after every epoch, as it asks early stopping. A run that is no trial gets no judge and no optuna import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tqdm import tqdm

from inatpipe.errors import UserError
from inatpipe.params.sweep import SweepParams

if TYPE_CHECKING:
    from inatpipe.training.loop import EpochMetrics

# How a trial's training stage finds its study: `sweep run` sets it for the `dvc exp run` of each trial. An
# environment variable, not a param, so that a password in the URL never lands in params.yaml or a git ref.
STORAGE_ENV = "INATPIPE_SWEEP_STORAGE"
PRUNED_AT = "pruned_at_epoch"  # the trial's user attribute a pruned run leaves, read by `sweep run`


class TrialJudge:
    """Reports epoch after epoch to one running trial; says "pruned" when the study's pruner would stop it."""

    def __init__(self, trial, where: str):
        self.trial, self.where, self.broken = trial, where, False

    def __call__(self, m: EpochMetrics) -> str | None:
        if self.broken:
            return None
        try:
            self.trial.report(m.val_accuracy, m.epoch)
            if not self.trial.should_prune():
                return None
            self.trial.set_user_attr(PRUNED_AT, m.epoch)
            return "pruned"
        except Exception as e:  # the trial was failed meanwhile (its worker was lost), or the storage went away
            self.broken = True
            tqdm.write(f"note: stopped reporting to {self.where} ({str(e).splitlines()[0]}); training on in full")
            return None


def trial_judges(sweep: SweepParams) -> Sequence[TrialJudge]:
    if not sweep.is_trial:
        return ()
    url = os.environ.get(STORAGE_ENV)
    if not url:
        tqdm.write(
            f"note: sweep.trial is {sweep.trial}, but {STORAGE_ENV} is not set (only `inatpipe sweep run` sets it): "
            "training in full, reporting to no study"
        )
        return ()
    import optuna

    from inatpipe.sweep.study import StudySettings, load_study, open_storage, quiet_optuna, shown

    quiet_optuna()
    storage = open_storage(url)
    study = load_study(sweep.study, storage, url)
    settings = StudySettings.of(study)
    if settings is None:
        raise UserError(f"study {sweep.study!r} in {shown(url)} was not created by `inatpipe sweep run`")
    study.pruner = settings.pruner_object()
    study_id = storage.get_study_id_from_name(sweep.study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, sweep.trial)
    where = f"trial {sweep.trial} of study {sweep.study}"
    return (TrialJudge(optuna.trial.Trial(study, trial_id), where),)
