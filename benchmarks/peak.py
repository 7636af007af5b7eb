"""The machine's matmul peak: the best FLOP/s that numpy, torch and jax reach on square matmuls.

    python -m benchmarks.peak [--sizes 1024 2048 4096] [--repeats 5] [--dtypes float32 bfloat16]

What model FLOP utilisation divides by (benchmarks.throughput). One library's figure at one size
understates what the machine can do (torch's float32 4096 x 4096 matmul ran at 212 GFLOP/s on
the 2-core AMD EPYC where jax's reached 424, 2026-11-30), and an understated peak inflates MFU;
so every library is timed at every size and the best rate of all is the peak. Each library runs
in a process of its own, so another library's idle threads (PyTorch's OpenMP threads spin for a
while after each call) never share the cores with it; each figure is the best of `--repeats`
timed runs, each run calling the matmul for at least `--min-seconds`. numpy has no bfloat16 matmul
of its own, so bfloat16 is timed in torch and jax only (jax's with a float32 result, as
trainer/matmul.py multiplies). On a GPU (`--device gpu`, the default where JAX's default backend
is one) torch and jax run there, numpy is left out, and float32 products are TensorFloat-32 on both
(jax's default precision on GPUs; torch with `set_float32_matmul_precision("high")`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LIBRARIES = ("numpy", "torch", "jax")
DEFAULT_SIZES = (1024, 2048, 4096)
GPU_SIZES = (4096, 8192)


def libraries_for(device: str) -> tuple[str, ...]:
    """numpy multiplies on the host only: on a GPU the peak is torch's and jax's."""
    return LIBRARIES if device == "cpu" else ("torch", "jax")


def worker_env(device: str) -> dict[str, str]:
    """The environment of a process that must run JAX on `device` ('cpu' keeps it off an accelerator)."""
    env = dict(os.environ)
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def matmul_function(library: str, dtype: str, size: int, device: str = "cpu"):
    """A zero-argument callable that computes one size x size product on `device` and waits for it, or None."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    if library == "numpy":
        if dtype != "float32":
            return None
        return lambda: a @ b
    if library == "torch":
        import torch

        where = "cuda" if device == "gpu" else "cpu"
        ta, tb = (torch.from_numpy(x).to(device=where, dtype=getattr(torch, dtype)) for x in (a, b))
        if where == "cpu":
            return lambda: torch.matmul(ta, tb)

        def on_gpu():
            torch.matmul(ta, tb)
            torch.cuda.synchronize()

        return on_gpu
    import jax
    import jax.numpy as jnp

    ja, jb = (jnp.asarray(x, dtype=dtype) for x in (a, b))
    # A float32 result, as the model's products have (trainer/matmul.py): XLA's CPU backend runs a
    # bfloat16 product natively only then (a bfloat16 result takes the float32 path).
    product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return lambda: jax.block_until_ready(product(ja, jb))


def timed_rate(fn, flops: float, min_seconds: float) -> float:
    """FLOP/s of one run: fn() called until at least `min_seconds` have passed."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * flops / elapsed


def library_info(library: str, device: str = "cpu") -> str:
    if library == "numpy":
        import numpy as np

        return f"numpy {np.__version__}"
    if library == "torch":
        import torch

        if device == "gpu":
            return (f"torch {torch.__version__} ({torch.cuda.get_device_name()}, float32 matmul precision "
                    f"{torch.get_float32_matmul_precision()!r})")
        return f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    import jax

    return f"jax {jax.__version__} ({jax.default_backend()})"


def measure_library(library: str, sizes, dtypes, repeats: int, min_seconds: float, threads: int | None,
                    device: str = "cpu") -> dict:
    """{library, info, results: [{dtype, size, gflops (best), runs}]} for one library, in this process."""
    if library == "torch":
        import torch

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        if device == "gpu":
            torch.set_float32_matmul_precision("high")  # TensorFloat-32, as jax's default precision there
    results = []
    for dtype in dtypes:
        for size in sizes:
            fn = matmul_function(library, dtype, size, device)
            if fn is None:
                continue
            fn()  # compile (jax), allocate, wake the threads
            runs = [timed_rate(fn, 2.0 * size**3, min_seconds) / 1e9 for _ in range(repeats)]
            results.append({"dtype": dtype, "size": size, "gflops": max(runs), "runs": runs})
    return {"library": library, "info": library_info(library, device), "results": results}


def measure_peaks(sizes=DEFAULT_SIZES, dtypes=("float32",), repeats: int = 5, min_seconds: float = 0.5,
                  threads: int | None = None, libraries=None, device: str = "cpu") -> list[dict]:
    """measure_library for each library, each in a fresh subprocess (`python -m benchmarks.peak --worker`)."""
    measured = []
    for library in libraries or libraries_for(device):
        command = [sys.executable, "-m", "benchmarks.peak", "--worker", library, "--repeats", str(repeats),
                   "--min-seconds", str(min_seconds), "--sizes", *map(str, sizes), "--dtypes", *dtypes,
                   "--device", device]
        command += ["--threads", str(threads)] if threads else []
        done = subprocess.run(command, capture_output=True, text=True, env=worker_env(device))
        if done.returncode != 0:
            raise RuntimeError(f"the {library} matmul worker exited {done.returncode}:\n{done.stderr[-2000:]}")
        measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return measured


def best_peak(measured: list[dict], dtype: str) -> tuple[float, str]:
    """(best GFLOP/s of `dtype` over every library and size, 'library size') -- what MFU divides by."""
    candidates = [(r["gflops"], f"{m['library']} {r['size']}") for m in measured for r in m["results"]
                  if r["dtype"] == dtype]
    if not candidates:
        raise ValueError(f"no {dtype} matmul was timed; time it with --dtypes {dtype}")
    return max(candidates)


def peak_rows(measured: list[dict]) -> list[list]:
    """Table rows: library, dtype, size, best GFLOP/s, min-max over the runs."""
    from benchmarks.common import spread

    return [[m["info"], r["dtype"], r["size"], r["gflops"], spread(r["runs"])] for m in measured for r in m["results"]]


PEAK_HEADERS = ["library", "dtype", "n (n x n @ n x n)", "best GFLOP/s", "GFLOP/s over runs (min-max)"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="default 1024 2048 4096; on a GPU 4096 8192")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per library and size; the best counts")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="each run calls the matmul this long at least")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--device", choices=["cpu", "gpu"],
                        help="where the products run (default: gpu where JAX's default backend is one, else cpu)")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_library(args.worker, args.sizes, args.dtypes, args.repeats, args.min_seconds,
                                         args.threads, args.device or "cpu")))
        return

    from benchmarks.common import default_device, print_header, print_table

    args.device = args.device or default_device()
    args.sizes = args.sizes or list(DEFAULT_SIZES if args.device == "cpu" else GPU_SIZES)
    print_header(f"matmul peak: {', '.join(libraries_for(args.device))} on the {args.device}, each in its own process")
    measured = measure_peaks(args.sizes, args.dtypes, args.repeats, args.min_seconds, args.threads,
                             device=args.device)
    print_table(peak_rows(measured), PEAK_HEADERS,
                title=f"best of {args.repeats} runs of at least {args.min_seconds:g} s each")
    for dtype in args.dtypes:
        gflops, where = best_peak(measured, dtype)
        print(f"{dtype} peak: {gflops:.1f} GFLOP/s ({where})")


if __name__ == "__main__":
    main()
