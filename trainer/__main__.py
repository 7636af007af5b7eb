"""`python -m trainer lr=2e-4 warmup=184 ratio=0.9`: one trial, printed."""

from __future__ import annotations

import gc
import sys

from trainer.hostmem import tune_malloc

tune_malloc()  # before JAX starts its threads

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.report import format_summary, print_step

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.trial import run_trial

    try:
        result = run_trial(cfg, callback=print_step(cfg.train.log_every))
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(result))
    if result.status != "finished":
        sys.exit(3)
    return result.metrics.get("validation_accuracy", float("nan"))


if __name__ == "__main__":
    from trainer import interrupt

    interrupt.install()  # SIGTERM / Ctrl-C: the train state is checkpointed at the next step boundary
    try:
        main()
    except KeyboardInterrupt as error:
        print(f"stopped ({error}); run the same command again to resume from the checkpoint", file=sys.stderr)
        sys.exit(interrupt.exit_code(error))
    finally:
        gc.freeze()  # spares the interpreter's last collection a walk over every object (~1 s)
