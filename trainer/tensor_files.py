"""A Hugging Face checkpoint's tensors, read one at a time: safetensors or PyTorch .bin, single
or sharded (trainer/checkpoint.py maps them into `Llama`). A damaged or cut-short file is a
`CheckpointError` naming it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or loaded; the message names the file or tensor."""


def _to_numpy_torch(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes'
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _shard_files(folder: Path, index_name: str) -> dict[str, Path]:
    with open(folder / index_name) as f:
        weight_map = json.load(f)["weight_map"]
    return {name: folder / file for name, file in weight_map.items()}


@contextlib.contextmanager
def tensor_readers(folder: str | Path) -> Iterator[dict[str, Callable[[], np.ndarray]]]:
    """Tensor name -> a function that reads that one tensor; files stay open (memory-mapped) inside."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        if (folder / "model.safetensors.index.json").is_file():
            files = _shard_files(folder, "model.safetensors.index.json")
            yield _safetensors_readers(files, stack)
        elif (folder / "model.safetensors").is_file():
            path = folder / "model.safetensors"
            yield _safetensors_readers(dict.fromkeys(_safetensors_keys(path), path), stack)
        elif list(folder.glob("*.safetensors")):
            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                files.update(dict.fromkeys(_safetensors_keys(path), path))
            yield _safetensors_readers(files, stack)
        elif (folder / "pytorch_model.bin.index.json").is_file():
            yield _torch_readers(_shard_files(folder, "pytorch_model.bin.index.json"))
        elif (folder / "pytorch_model.bin").is_file():
            path = folder / "pytorch_model.bin"
            state = _load_torch_file(path)
            yield _torch_readers(dict.fromkeys(state, path), loaded={path: state})
        else:
            raise CheckpointError(
                f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json, "
                f"pytorch_model.bin or pytorch_model.bin.index.json"
            )


def _damaged(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is damaged or incomplete ({type(error).__name__}: {error}); download or copy it again"
    )


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as error:  # SafetensorError: a bad header, a file cut short
        raise _damaged(path, error) from None


def _safetensors_readers(files: dict[str, Path], stack: contextlib.ExitStack):
    from safetensors import safe_open

    handles = {}

    def handle(path: Path):
        if path not in handles:
            # The flax framework understands bfloat16, numpy does not; keep the result on the host.
            handles[path] = stack.enter_context(safe_open(path, framework="flax"))
        return handles[path]

    def reader(name: str, path: Path) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                with jax.default_device(jax.devices("cpu")[0]):
                    return np.asarray(handle(path).get_tensor(name))
            except Exception as error:  # a tensor whose bytes lie past the end of a cut-short file
                raise _damaged(path, error) from None

        return read

    return {name: reader(name, path) for name, path in files.items()}


def _load_torch_file(path: Path) -> dict:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint and torch is not installed; pip install torch (the CPU "
            f"build is enough) or convert the checkpoint to safetensors"
        ) from err
    try:
        # mmap reads each tensor only when touched; legacy (non-zip) files cannot be mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_readers(files: dict[str, Path], loaded: dict[Path, dict] | None = None):
    loaded = loaded if loaded is not None else {}

    def reader(name: str, path: Path) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if path not in loaded:
                loaded.clear()  # one shard at a time
                loaded[path] = _load_torch_file(path)
            if name not in loaded[path]:
                raise CheckpointError(f"{path} lacks tensor {name!r} that its index file lists")
            return _to_numpy_torch(loaded[path][name])

        return read

    # Grouped by file, so reading in this order loads each PyTorch shard once.
    return {name: reader(name, path) for name, path in sorted(files.items(), key=lambda item: str(item[1]))}


def load_hf_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, by HF name, in its stored dtype (bfloat16 as ml_dtypes)."""
    with tensor_readers(folder) as readers:
        return {name: read() for name, read in readers.items()}
