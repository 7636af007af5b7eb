"""Which data a trial used, as params of its run: where it was found, its files' digest, its sizes.

    data.origin          how it was found: data.path=..., $ROTTEN_TOMATOES_DIR=..., or hub dataset <id>
    data.resolved_path   the folder read (for the hub, the snapshot folder, whose name is the revision)
    data.format          cornell | jsonl | parquet
    data.files           the files read, relative to that folder
    data.sha256          `cd <resolved_path> && sha256sum <files> | sha256sum`
    data.<split>_size    examples per split, as read; data.<split>_evaluated: those evaluated
                         (eval.max_examples takes a stratified subset); train examples used: the
                         metric train_examples
    data.skipped_lines   bad lines left out (data.on_bad_line=skip), when there were any

trainer.data.load_dataset finds and digests the files; this module only names what it returns.
"""

from __future__ import annotations

import sys
from typing import Any


def data_params(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The provenance params of a resolved trial config; [] when the data can't be read (the trial
    then fails on it itself, naming the problem)."""
    from omegaconf import OmegaConf

    from trainer.config import to_trial_config
    from trainer.data import DataError, load_dataset

    try:
        cfg = to_trial_config(OmegaConf.create(values))
        # Parsed once per process: the trial's own load_dataset reuses it.
        dataset = load_dataset(cfg.data)
    except DataError:
        return []
    except Exception as error:
        print(f"warning: the data's provenance was not recorded ({type(error).__name__}: {error})",
              file=sys.stderr, flush=True)
        return []
    params: dict[str, Any] = {
        "data.origin": dataset.origin, "data.resolved_path": dataset.folder, "data.format": dataset.data_format,
        "data.files": ",".join(dataset.files), "data.sha256": dataset.sha256,
        **{f"data.{split}_size": len(examples) for split, examples in dataset.splits.items()},
    }
    if any(dataset.skipped.values()):  # data.on_bad_line=skip
        params["data.skipped_lines"] = sum(dataset.skipped.values())
    for split in cfg.eval.splits:
        size = len(dataset.splits.get(split, ()))
        limit = cfg.eval.max_examples
        params[f"data.{split}_evaluated"] = size if limit is None else min(size, int(limit))
    return [(key, str(value)) for key, value in params.items()]


__all__ = ["data_params"]
