"""The Ray launcher plugin (see ray_launcher.py); hydra_plugins/ itself has no __init__.py."""
