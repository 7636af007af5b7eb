"""The Optuna search sweeper plugin (see optuna_sweeper.py); hydra_plugins/ itself has no __init__.py."""
