"""The study a search worker drives: Optuna's ``Study`` that reports a lost database in one
line, survives its trial being failed by another worker, hands out queued trials asked for
now first, and fails dead workers' trials."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from autocompress.errors import StudyError
from autocompress.study.records import STALE_REASON
from autocompress.study.resilient import ResilientStorage, log

# A queued trial's user attribute: run it before the plans a search queued for later.
QUEUE_FIRST_ATTR = "queue_first"


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped beating, and queue their retry.

    Optuna does this at the start of every trial; calling it when a worker starts and after
    its last trial means a dead worker's trial never lingers as RUNNING.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class WorkerStudy(optuna.Study):
    """The study a search worker drives.

    ``optimize`` reports a lost database as the storage's one-line ``StudyError``: once the
    storage has given up, Optuna's own clean-up of the running trial fails too and can end in
    an unrelated error. A worker whose heartbeats arrived too late (a long outage, a paused
    machine) finds its trial failed and re-queued by another worker: it logs that and goes on
    with its remaining trials instead of crashing. After the last trial it fails stale trials
    once more, so a dead worker's trial does not linger as RUNNING.
    """

    resilient: ResilientStorage | None = None
    # called when a trial starts and nothing is queued; True when it queued a plan
    on_empty_queue: Callable[[], bool] | None = None

    def optimize(self, func: Callable[[optuna.Trial], Any], n_trials: int | None = None,
                 **kwargs: Any) -> None:
        calls = 0
        running: list[int] = []  # the number of the trial this worker runs now

        def counted(trial: optuna.Trial) -> Any:
            nonlocal calls
            calls += 1
            running[:] = [trial.number]
            return func(trial)

        try:
            while n_trials is None or calls < n_trials:
                left = None if n_trials is None else n_trials - calls
                try:
                    super().optimize(counted, n_trials=left, **kwargs)
                    break
                except ValueError:
                    if self._lost() is not None or not self._finished_elsewhere(running):
                        raise
                    log.warning("this worker's trial was failed by another worker (its "
                                "heartbeats came too late) and will be run again; going on")
            fail_stale_trials(self)
            self._say_queued_retries()
        except Exception as exc:
            lost = self._lost()
            if lost is not None and not (isinstance(exc, StudyError) and str(exc) == str(lost)):
                raise StudyError(str(lost)) from None
            raise

    def _say_queued_retries(self) -> None:
        """A dead worker's trial re-queued when this run ends is not lost: say so."""
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(TrialState.WAITING,))
        for t in waiting:
            failed = t.system_attrs.get("failed_trial")
            if isinstance(failed, int):
                log.warning("trial %d is queued to run trial %d again (%s); the next "
                            "`autocompress search --study %s` runs it", t.number, failed,
                            STALE_REASON, self.study_name)

    def _lost(self) -> StudyError | None:
        return self.resilient.lost if self.resilient is not None else None

    def _finished_elsewhere(self, running: list[int]) -> bool:
        """Optuna refused to finish this worker's trial: was it finished by someone else
        (another worker's stale-heartbeat check failed it)? Read back from the database,
        not from the error's wording."""
        if not running:
            return False
        trial = next((t for t in self.get_trials(deepcopy=False) if t.number == running[0]),
                     None)
        return trial is not None and trial.state.is_finished()

    def _pop_waiting_trial_id(self) -> int | None:
        """Optuna's queue, oldest first, except that trials queued with QUEUE_FIRST_ATTR (a
        promotion, a refine: asked for now) go before the plans a search queued for later
        (warm starts and guided plans a time limit left waiting)."""
        for attempt in range(2):
            waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                                   states=(TrialState.WAITING,))
            for trial in sorted(waiting, key=lambda t: (not t.user_attrs.get(QUEUE_FIRST_ATTR),
                                                        t.number)):
                try:  # claim it; another worker may have been faster
                    if not self._storage.set_trial_state_values(trial._trial_id,
                                                                state=TrialState.RUNNING):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                return trial._trial_id
            # Nothing queued: the search's proposer (when one is set) may queue the next
            # plan now, when the trial starts, so a run that ends leaves no stale proposal.
            if attempt or self.on_empty_queue is None or not self.on_empty_queue():
                return None
        return None
