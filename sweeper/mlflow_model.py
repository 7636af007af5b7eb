"""A trial's saved model in MLflow: logged as a pyfunc (`runs:/<run id>/model`), and `train.save_model`.

The trainer writes a finished trial's Hugging Face folder into `<output_dir>/model`
(trainer/export.py); after each trial's outcome is written (`after_trial`) and at the sweep's
end (`finish_sweep`), working from the outcome files in the sweep folder:

- `train.save_model=all`: each trial's folder is logged as its run's MLflow model when it ends.
- `train.save_model=best` (the default): after each trial, the folders of this sweep's trials that
  are not the best so far by validation accuracy are deleted (the earlier trial wins a tie), so
  at most two are on disk at once; at the sweep's end the best one is logged into its run and
  the parent run is tagged `sweeper.best_model`. Only trials trained in this sweep compete (a
  resumed sweep's skipped trials keep what they had); a trial without validation accuracy never
  wins, and when no trial has one every folder is kept and none is logged.
- `train.save_model=none`: nothing is written.

The weights are logged once, inside the MLflow model (the folder is its artifact `hf_model`),
never as plain run artifacts too; the best trial's folder stays in its output_dir as well. Run
tags say what happened (`sweeper.model`: saved, logged or pruned; `sweeper.model_dir`). Nothing
here raises into the sweep: a model that cannot be logged leaves a warning and the tag
`sweeper.model_error`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

from sweeper import state, tracking

MODEL_NAME = "model"
MODEL_TAG = "sweeper.model"
MODEL_DIR_TAG = "sweeper.model_dir"
PYFUNC_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
TRAINER_CODE = Path(__file__).resolve().parents[1] / "trainer"
# What the pyfunc imports when it loads (trainer/ and this package's pyfunc_model.py), pinned to
# the versions that logged it; `--env-manager local` serves with whatever is installed.
REQUIREMENTS = ("mlflow", "jax", "jaxlib", "flax", "numpy", "ml_dtypes", "pandas", "safetensors",
                "sentencepiece", "tokenizers", "hydra-core", "omegaconf", "gguf")
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
EXAMPLE_REVIEWS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés ."]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "prefix_text", required=False)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )


def input_example():
    import pandas as pd

    return pd.DataFrame({"text": EXAMPLE_REVIEWS})


def pip_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the process-wide tracking URI; set it for the call only."""
    import mlflow

    previous, bar = mlflow.get_tracking_uri(), os.environ.get(PROGRESS_BAR)
    mlflow.set_tracking_uri(uri)
    os.environ[PROGRESS_BAR] = "false"  # MLflow's own re-reading of the model it just wrote
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar


def logged_model(client, run_id: str):
    """The run's complete MLflow model named `model` (an mlflow LoggedModel), or None."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run_id}'")
    return next((m for m in found if m.source_run_id == run_id and m.status == LoggedModelStatus.READY), None)


def log_model(tracking_uri: str, run_id: str, model_dir: str | Path):
    """Log the Hugging Face folder as the run's pyfunc model `runs:/<run id>/model`; returns the LoggedModel."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    # Created here so it belongs to the run's experiment (MLflow would pick the active one).
    created = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                         model_type="sentiment-classifier")
    try:
        with _tracking_uri(tracking_uri):
            Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=created.model_id,
                python_model=str(PYFUNC_CODE), artifacts={"hf_model": str(model_dir)}, code_paths=[str(TRAINER_CODE)],
                signature=signature(), input_example=input_example(), pip_requirements=pip_requirements(),
            )
    except BaseException:
        with contextlib.suppress(Exception):  # a half-written model is never taken for a logged one
            client.finalize_logged_model(created.model_id, "FAILED")
        raise
    model = client.finalize_logged_model(created.model_id, "READY")
    client.set_tag(run_id, MODEL_TAG, "logged")
    client.set_tag(run_id, "sweeper.model_uri", f"runs:/{run_id}/{MODEL_NAME}")
    return model


def _rank(outcome) -> float:
    value = outcome.validation_accuracy
    return value if isinstance(value, float) and math.isfinite(value) else -math.inf


def _same(a: float, b) -> bool:
    return (math.isnan(a) and b is None) or a == b


def _candidates(sweep_dir: Path, num_trials: int) -> list[tuple[Any, Path, str]]:
    """(outcome, model folder, train.save_model) of this sweep's finished trials that saved a model, by trial.

    A folder counts only if its metadata holds the trial's own accuracies: one that an earlier run
    left in a reused output_dir is never taken for this trial's model.
    """
    from trainer.export import METADATA_FILE, MODEL_DIR, read_metadata

    found = []
    for outcome in state.read_summary(sweep_dir, num_trials).outcomes:
        folder = Path(outcome.output_dir or "-") / MODEL_DIR
        if outcome.status != "finished" or not outcome.run_id or not (folder / METADATA_FILE).is_file():
            continue
        metadata = read_metadata(folder)
        saved = metadata.get("metrics", {})
        if _same(outcome.validation_accuracy, saved.get("validation_accuracy")) and \
                _same(outcome.test_accuracy, saved.get("test_accuracy")):
            found.append((outcome, folder, metadata.get("save_model", "best")))
    return sorted(found, key=lambda c: c[0].trial)


def keep_best(client, sweep_dir: Path, num_trials: int):
    """The best (outcome, folder) by validation accuracy, the earlier trial among equals (None when no
    trial has one); under train.save_model=best every other trial's folder is deleted."""
    candidates = _candidates(sweep_dir, num_trials)
    ranked = [c for c in candidates if _rank(c[0]) > -math.inf]
    if not ranked:
        return None
    best = max(ranked, key=lambda c: _rank(c[0]))  # max keeps the first of equals
    for outcome, folder, policy in candidates:
        if outcome is best[0] or policy != "best":
            continue
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(Exception):  # the tag is a courtesy; the folder is what counts
            client.set_tag(outcome.run_id, MODEL_TAG, "pruned")
            client.set_tag(outcome.run_id, "sweeper.model_pruned",
                           f"validation_accuracy {outcome.validation_accuracy:.4f} below trial {best[0].trial}'s "
                           f"{best[0].validation_accuracy:.4f}; train.save_model=best keeps one model")
    return best[:2]


def _warn(client, run_id: Optional[str], what: str, error: Exception) -> None:
    message = f"{what}: {type(error).__name__}: {error}"
    print(f"warning: {message}", file=sys.stderr, flush=True)
    traceback.print_exc()
    if run_id is not None:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "sweeper.model_error", message[: tracking.MAX_TAG_CHARS])


def _ensure_logged(client, sweep, run_id: str, folder: Path) -> None:
    if logged_model(client, run_id) is None:
        log_model(sweep.tracking_uri, run_id, folder)
    client.set_tag(run_id, MODEL_DIR_TAG, str(folder))


def after_trial(sweep_dir: Path, sweep, outcome) -> None:
    """After a trial's outcome is written: log its model now (train.save_model=all), or delete the
    folders of this sweep's trials that are not the best so far (best). Never raises."""
    from mlflow import MlflowClient

    client = None
    try:
        if outcome.status != "finished" or not outcome.run_id:
            return
        client = MlflowClient(tracking_uri=sweep.tracking_uri)
        mine = [c for c in _candidates(sweep_dir, sweep.num_trials) if c[0].trial == outcome.trial]
        if not mine:
            return  # train.save_model=none, a baseline, or a trial that was not trained here
        _, folder, policy = mine[0]
        client.set_tag(outcome.run_id, MODEL_DIR_TAG, str(folder))
        client.set_tag(outcome.run_id, MODEL_TAG, "saved")
        if policy == "all":
            _ensure_logged(client, sweep, outcome.run_id, folder)
        else:
            keep_best(client, sweep_dir, sweep.num_trials)
    except Exception as error:  # the trial's metrics stand; only its model is missing
        _warn(client, outcome.run_id, f"trial {outcome.trial}'s model was not logged", error)


def finish_sweep(sweep_dir: Path, sweep) -> Optional[str]:
    """At the sweep's end: keep the best trial's model and log it if it isn't yet; its model URI. Never raises."""
    from mlflow import MlflowClient

    client, run_id = None, None
    try:
        client = MlflowClient(tracking_uri=sweep.tracking_uri)
        best = keep_best(client, sweep_dir, sweep.num_trials)
        if best is None:
            if _candidates(sweep_dir, sweep.num_trials):
                print("note: no trial has a validation accuracy (eval.splits without validation?): every saved "
                      "model stays in its trial folder and none is logged", file=sys.stderr, flush=True)
            return None
        outcome, folder = best
        run_id = outcome.run_id
        _ensure_logged(client, sweep, run_id, folder)
        uri = f"runs:/{run_id}/{MODEL_NAME}"
        client.set_tag(sweep.parent_run_id, "sweeper.best_model", uri)
        print(f"best model: trial {outcome.trial} {outcome.name or ''} (validation accuracy "
              f"{outcome.validation_accuracy:.2%}), {uri}, Hugging Face folder {folder}\n"
              f"  register it: python -m sweeper.results register --sweep {sweep.parent_run_id} --name NAME",
              flush=True)
        return uri
    except Exception as error:
        _warn(client, run_id, "the sweep's best model was not logged", error)
        return None
