"""The vectorised launcher plugin (see vectorized_launcher.py); hydra_plugins/ itself has no __init__.py."""
