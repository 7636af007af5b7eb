"""Search beyond grids: `hydra/sweeper=optuna` asks an Optuna study for trials and tells it how each ended.

    python -m sweeper -m sweep=search_cpu
    python -m sweeper -m hydra/sweeper=optuna hydra.sweeper.n_trials=12 \
        'lr=tag(log,interval(1e-5,1e-2))' 'warmup=range(0,400,50)' 'ratio=choice(0.5,0.7,0.9,1.0)'

The plugin (hydra_plugins/optuna_sweeper) only holds the settings; the work is here. Trials are
asked in batches of `n_jobs`, sent to whatever launcher is configured, and each is still a
trial of the sweep: its own child run under the parent, resume-skipped when its exact config
finished before. The study (sweeper/study.py) is continued by the same command run again. With a
pruner, trials report validation accuracy every `eval.every_steps` (trainer/periodic_eval.py)
through `eval_hook`, and stop when the pruner says they can't catch up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from sweeper import state, tracking
from sweeper import study as study_lib
from sweeper.search_space import overrides_for
from sweeper.study import SearchConfigError, Settings, checked, counted, open_storage, open_study, retire, running
from sweeper.study import study_location, trials_to_run

SEARCH_FILE = "sweeper_search.json"  # in the sweep folder: the study, and which study trial each job runs
PERIODIC_METRIC = "periodic_validation_accuracy"


@dataclass
class SearchFile:
    """sweeper_search.json: what a job needs to report to its study trial."""

    storage: str
    study_name: str
    settings: dict
    jobs: dict = field(default_factory=dict)  # job number (str) -> study trial number

    def write(self, sweep_dir: Path) -> None:
        state._write_json(sweep_dir / SEARCH_FILE, asdict(self))


def objective_value(outcome: Optional[state.Outcome], settings: Settings, tracking_uri: str) -> float:
    if outcome is None or outcome.status not in ("finished", "skipped"):
        return math.nan
    if settings.objective == "validation_accuracy":
        return outcome.validation_accuracy
    if not outcome.run_id:
        return math.nan
    metrics = tracking.MlflowClient(tracking_uri=tracking_uri).get_run(outcome.run_id).data.metrics
    if settings.objective not in metrics:
        raise SearchConfigError(f"hydra.sweeper.objective={settings.objective} is not a metric of the trial runs "
                                f"(they have e.g. {', '.join(sorted(metrics)[:8])})")
    return float(metrics[settings.objective])


def tell(study, trial, outcome: Optional[state.Outcome], settings: Settings, sweep: state.SweepState) -> str:
    """Tell the study how the job ended: complete (its objective), pruned, or failed (NaN, an error)."""
    from optuna.trial import TrialState

    status = outcome.status if outcome is not None else "failed"
    trial.set_user_attr("status", status)
    if outcome is not None and outcome.run_id:
        trial.set_user_attr("run_id", outcome.run_id)
        if status != "skipped":  # a skipped trial's run belongs to an earlier sweep
            try:
                client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
                client.set_tag(outcome.run_id, "search.study", study.study_name)
                client.set_tag(outcome.run_id, "search.trial", str(trial.number))
            except Exception as error:  # the store is away; the study still learns the result
                print(f"warning: could not tag run {outcome.run_id} with its study trial: {error}", flush=True)
    if status == "pruned":
        study_lib.tell(study, trial, state=TrialState.PRUNED)
        return "pruned"
    if status == "interrupted":  # stopped by a signal: it doesn't count, and runs again next time
        retire(study, trial, "the trial was interrupted")
        return "interrupted; asked again when the search continues"
    value = objective_value(outcome, settings, sweep.tracking_uri)
    if math.isnan(value):
        study_lib.tell(study, trial, state=TrialState.FAIL)
        return "failed"
    study_lib.tell(study, trial, value)
    return f"{settings.objective} {value:.4f}"


def run_search(config: DictConfig, hydra_context, task_function) -> list:
    """Ask, launch, tell until the study holds n_trials; returns the launcher's JobReturns per batch."""
    from hydra.core.plugins import Plugins

    settings, space = checked(config)
    sweep_dir = Path(config.hydra.runtime.cwd) / str(config.hydra.sweep.dir)
    sweep = state.read_state(sweep_dir)
    study = open_study(config, settings, space)
    for stale in running(study):
        retire(study, stale, "left running by an earlier sweep that stopped")
    for params in settings.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    todo = trials_to_run(study, settings, space)
    storage, name = study_location(config, settings, space)
    print(f"search: study {name!r} in {storage} holds {counted(study)} trial(s); asking {todo} more "
          f"({settings.sampler} sampler, pruner {settings.pruner}, {settings.n_jobs} at a time)", flush=True)
    launcher = Plugins.instance().instantiate_launcher(
        config=config, hydra_context=hydra_context, task_function=task_function)
    search_file = SearchFile(storage, name, asdict(settings))
    returns: list = []
    launched = 0
    while launched < todo:
        batch = [study.ask(space.distributions) for _ in range(min(settings.n_jobs, todo - launched))]
        try:
            for offset, trial in enumerate(batch):
                search_file.jobs[str(launched + offset + 1)] = trial.number
            search_file.write(sweep_dir)
            results = launcher.launch([overrides_for(space, t.params) for t in batch], initial_job_idx=launched)
            outcomes = {o.trial: o for o in state.read_summary(sweep_dir, 0).outcomes}
            for offset, trial in enumerate(batch):
                said = tell(study, trial, outcomes.get(launched + offset + 1), settings, sweep)
                print(f"search: trial {launched + offset + 1} (study #{trial.number}): {said}; "
                      f"{best_line(study, settings)}", flush=True)
        except BaseException:  # interrupted, or the launcher raised: the batch's unfinished trials run again later
            asked = {trial.number for trial in batch}
            for trial in running(study):
                if trial.number in asked:
                    retire(study, trial, "the sweep stopped while it ran")
            raise
        returns.append(results)
        launched += len(batch)
    log_best(study, settings, sweep, storage)
    return returns


def best_line(study, settings: Settings) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "no complete trial yet"
    return f"best {settings.objective} {best.value:.4f} (study #{best.number})"


def log_best(study, settings: Settings, sweep: state.SweepState, storage: str) -> None:
    """The study's best params and value on the sweep's parent run (the study may predate this sweep)."""
    from mlflow.entities import Metric, Param

    client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
    run_id = sweep.parent_run_id
    tags = {"search.study": study.study_name, "search.storage": storage, "search.sampler": settings.sampler,
            "search.pruner": settings.pruner, "search.objective": settings.objective,
            "search.direction": settings.direction}
    metrics = {"study_trials": float(len(study.trials))}
    params = []
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:
        metrics[f"study_best_{settings.objective}"] = float(best.value)
        tags["search.best_trial"] = str(best.number)
        tags["search.best_run_id"] = str(best.user_attrs.get("run_id", ""))
        params = [Param(f"best.{key}", str(value)) for key, value in best.params.items()]
    now = int(time.time() * 1000)
    try:
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=params,
                         tags=tracking.tags(tags))
    except Exception as error:  # the study holds the result whatever the store does
        print(f"warning: could not log the study's best on parent run {run_id}: {error}", flush=True)
    print(f"search: study {study.study_name!r}: {best_line(study, settings)}"
          + (f", params {best.params}" if best is not None else ""), flush=True)


class _Reporter:
    """The job's side: reports each periodic validation accuracy to its study trial, asks the pruner."""

    def __init__(self, search_file: SearchFile, trial_number: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        settings = Settings(**search_file.settings)
        storage = open_storage(search_file.storage)
        self.study = optuna.load_study(study_name=search_file.study_name, storage=storage, pruner=settings.make_pruner())
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.pruner = settings.pruner

    @classmethod
    def attach(cls, sweep_dir: Path, job_number: int) -> Optional["_Reporter"]:
        path = sweep_dir / SEARCH_FILE
        if not path.is_file():
            return None
        search_file = SearchFile(**json.loads(path.read_text()))
        number = search_file.jobs.get(str(job_number))
        return None if number is None else cls(search_file, int(number))

    def __call__(self, record) -> Optional[str]:
        self.trial.report(record.validation_accuracy, record.step)
        if self.trial.should_prune():
            return (f"pruned at step {record.step}: validation accuracy {record.validation_accuracy:.4f} on "
                    f"{record.examples} examples is behind the study's other trials ({self.pruner} pruner)")
        return None


def eval_hook(trial) -> Optional[Callable[[Any], Optional[str]]]:
    """run_trial's on_eval for a tracked trial: log each periodic validation accuracy as a step metric
    of its run and, in a search, report it to the study trial, whose pruner may stop it. None
    without eval.every_steps."""
    if not (trial.values.get("eval") or {}).get("every_steps"):
        return None
    reporter = _Reporter.attach(trial.job.sweep_dir, trial.job.number)

    def on_eval(record) -> Optional[str]:
        tracking.log_metrics(trial.outbox, trial.run_id, {PERIODIC_METRIC: record.validation_accuracy}, step=record.step)
        return reporter(record) if reporter is not None else None

    return on_eval


__all__ = ["PERIODIC_METRIC", "SEARCH_FILE", "eval_hook", "run_search", "tell"]
