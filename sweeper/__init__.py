"""Many trials: expand a Hydra grid, launch the trials, track each one in MLflow.

    python -m sweeper -m sweep=quick_cpu                      # a named sweep (conf/sweep/)
    python -m sweeper -m lr=2e-3,2e-4 warmup=0,184 ratio=0.5,0.7,0.9,1.0
    python -m sweeper -m sweep=quick_cpu preview=true         # list the trials, run nothing
    python -m sweeper -m sweep=quick_cpu hydra/launcher=joblib hydra.launcher.n_jobs=2

Launchers: Hydra's basic launcher (the default) runs the trials one after another in this
process, so trials 2..N reuse the tokenized data, base weights and compiled step that
trainer.trial memoises; the joblib launcher runs them in worker processes, each paying for
its own first compile; `hydra/launcher=vectorized hydra.launcher.group_size=K` trains up to K
trials that differ only in optimizer numbers and data subset together, one vmapped program,
each still its own child run (sweeper/vectorized.py, trainer/vectorized.py);
`hydra/launcher=ray` runs each trial as a Ray task, on a Ray started for the sweep or a cluster
(hydra.launcher.address), across several hosts if hydra.launcher.hosts > 1 (sweeper/ray_launch.py).

Tracking (tracking.uri): by default the SQLite store `mlflow.db` with artifacts in
`mlartifacts/`, both in the directory the command is run from (`mlflow ui
--backend-store-uri sqlite:///mlflow.db` shows them); or a server, tracking.uri=http://host:port.
One parent run per sweep, one child run per trial; a trial whose exact config already
finished in the experiment is skipped (resume=false trains it again). The command prints
"N trials: a finished, b failed, c diverged, d skipped" and exits 1 if any trial failed.

Modules: config (typed schema), expand (the trials of a grid), callbacks (opens and closes a
sweep), app (one trial as a Hydra job), vectorized (groups of trials for the vectorised
launcher), tracking (MLflow), state (files in the sweep folder), progress (terminal output);
for a search (hydra/sweeper=optuna): search (ask, launch, tell), study (the Optuna study),
search_space (Hydra override syntax as distributions), search_plots (for sweeper.results);
for the Ray launcher: ray_launch (the driver), ray_task (what a worker runs), ray_gang (a
multi-host trial's placement group and processes).
"""
