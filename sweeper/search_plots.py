"""The plots of a search sweep for `python -m sweeper.results`: optimisation history, parameter importance.

A search's parent run carries the tags `search.study` and `search.storage` (sweeper/search.py);
the study is read from that storage, never written. The plots cover the whole study, which a
re-run of the same command continues, so they may hold trials of earlier sweeps.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

STUDY_TAG = "search.study"
STORAGE_TAG = "search.storage"
OBJECTIVE_TAG = "search.objective"


def load_study(tags: dict):
    """The study a search sweep's parent run names in its tags; None for a grid sweep (or a study gone)."""
    if STUDY_TAG not in tags:
        return None
    import optuna

    from sweeper.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=tags[STUDY_TAG], storage=open_storage(tags[STORAGE_TAG]))
    except (KeyError, OSError, RuntimeError, ValueError) as error:
        print(f"note: the sweep's study {tags[STUDY_TAG]!r} in {tags.get(STORAGE_TAG)} can't be read ({error}); "
              "its search plots are skipped", file=sys.stderr)
        return None


def write_search_plots(tracking_uri: str, parent_run_id: str, out_dir: Path) -> list[Path]:
    """optimization_history.png and param_importances.png of the sweep's study; [] for a grid sweep."""
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri).get_run(parent_run_id).data.tags
    study = load_study(tags)
    if study is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    objective = tags.get(OBJECTIVE_TAG, "objective")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written: list[Path] = []
    plots = [("optimization_history", lambda: optuna_plots.plot_optimization_history(study, target_name=objective))]
    if len(complete) >= 2:
        plots.append(("param_importances", lambda: optuna_plots.plot_param_importances(study, target_name=objective)))
    else:
        print("note: parameter importance needs 2 complete trials; param_importances.png skipped", file=sys.stderr)
    for name, draw in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = draw()
            except (ValueError, RuntimeError) as error:
                print(f"note: {name}.png skipped: {error}", file=sys.stderr)
                continue
        figure = axes.get_figure()
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")  # the history's legend sits outside the axes
        plt.close(figure)
        written.append(path)
    return written


__all__ = ["load_study", "write_search_plots"]
