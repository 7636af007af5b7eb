"""Smoke runs of every benchmark (`--quick`, in a subprocess) and checks of the arithmetic they report.

No assertion is on speed: a shared 2-core machine makes timings vary by 10x. The runs prove
each script still drives the current trainer and sweeper and prints its figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]




def run_quick(env: dict[str, str], name: str, *flags: str, timeout: float = 240) -> str:
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_throughput_quick_prints_both_sides_ratio_and_mfu(sweeper_env):
    from benchmarks.common import cpu_flags

    # smollm2_lora needs peft; it has a test of its own below.
    out = run_quick(sweeper_env, "throughput", "--setups", "easylm_debug", "tiny", "smollm2_full")
    assert f"({cpu_flags()})" in out and "torch 2." in out
    assert "matmul peaks (benchmarks/peak.py)" in out and "MFU divides by the best float32 matmul rate" in out
    for library in ("| numpy ", "| torch ", "| jax "):
        assert library in out
    for setup in ("easylm_debug", "tiny", "smollm2_full"):
        assert f"-- {setup}" in out
    assert out.count("| ours (jax) ") == 3 and out.count("| torch (transformers)") == 3  # a table row each
    # Ours with the peer's malloc beside ours as users run it, and both ratios.
    assert out.count("| ours (jax), glibc malloc") == 3
    assert out.count("ratio ours/theirs, each as its users run it") == 3
    assert out.count("ratio ours/theirs, the same allocator on both (glibc defaults)") == 3
    assert "timed windows per side of 0.05 s or more" in out
    assert "MFU" in out and "FLOPs/token = 6*" in out
    assert out.count("loss on every token") == 2
    assert "full fine-tuning: all 11,799,360 params train" in out  # SmolLM2's structure, 2 layers, vocab 8192
    assert "loss on each example's answer token and EOS" in out and "(loss tokens)" in out


def test_throughput_quick_lora_setup_against_peft(sweeper_env):
    pytest.importorskip("peft", reason="the PyTorch side of smollm2_lora uses peft: pip install -e '.[bench]'")
    out = run_quick(sweeper_env, "throughput", "--setups", "smollm2_lora")
    assert "-- smollm2_lora" in out and out.count("| ours (jax) ") == 1 and out.count("| torch (transformers)") == 1
    assert "LoRA rank 8, alpha 16, dropout 0 on q,k,v,o,gate,up,down: 162,816 adapter params train" in out
    assert "LoraConfig, AdamW over the adapters only" in out and "peft 0." in out
    assert "frozen weights count 4 (no weight gradient), not 6" in out
    assert "ratio ours/theirs, each as its users run it" in out


def test_throughput_quick_bfloat16_against_torch_autocast(sweeper_env):
    out = run_quick(sweeper_env, "throughput", "--setups", "easylm_debug", "--dtype", "bfloat16", "--no-same-malloc")
    peaks = out.split("matmul peaks (benchmarks/peak.py)")[1].split("MFU divides")[0]
    assert "| bfloat16 " in peaks and "| float32 " in peaks  # the float32 peak is printed beside
    assert "MFU divides by the best bfloat16 matmul rate" in out
    assert "bfloat16 compute, float32 weights and optimizer state (torch: autocast bfloat16)" in out
    assert "glibc malloc" not in out.split("-- easylm_debug")[1].split("ratio")[0]
    assert out.count("ratio ours/theirs, each as its users run it") == 1


def test_epoch_quick_prints_both_layouts_padding_and_ratio(sweeper_env):
    out = run_quick(sweeper_env, "epoch")
    assert "packed rows of 128" in out and "padded to the longest" in out
    assert "padding" in out and "epoch wall time ratio theirs/ours:" in out


def test_evaluate_quick_prints_both_modes(sweeper_env):
    out = run_quick(sweeper_env, "evaluate")
    assert "eval.mode=score" in out and "eval.mode=generate" in out
    assert "examples/s warm" in out


def test_step_profile_quick_prints_parts_and_xla_ops(sweeper_env):
    out = run_quick(sweeper_env, "step_profile")
    assert "train_step (all of it)" in out and "head + cross-entropy forward + backward" in out
    assert "XLA ops by thread time" in out
    assert "the same, summed by kind" in out and "| ynn_fusion " in out  # the products, by kind


def test_op_kinds_sum_ops_that_differ_only_by_number():
    from benchmarks.step_profile import op_kinds

    ops = [("ynn_fusion.936", 2.0), ("transpose_copy_fusion.3", 4.0), ("ynn_fusion", 1.0), ("wrapped_convert.12", 0.5)]
    assert op_kinds(ops) == [("transpose_copy_fusion", 1, 4.0), ("ynn_fusion", 2, 3.0), ("wrapped_convert", 1, 0.5)]


@pytest.mark.slow
def test_sweep_overhead_quick_accounts_for_the_sweep(sweeper_env):
    out = run_quick(sweeper_env, "sweep_overhead")
    assert "python -m sweeper -m lr=" in out
    for phase in ("startup, teardown, between trials", "compilation (first step)", "data prep",
                  "eval before training", "tracking (MLflow) around run_trial", "total (subprocess wall)"):
        assert phase in out
    assert "sweep wall / (N x pure training) =" in out


# --- the arithmetic behind the figures ----------------------------------------------------


def test_flops_per_token_of_easylm_debug_by_hand():
    from benchmarks.setups import easylm_debug_shape, flops_per_token, matmul_params

    shape = easylm_debug_shape()
    # Per layer q, k, v, o (4 x 128 x 128) and gate, up, down (3 x 128 x 256); the output head 128 x 1024.
    assert matmul_params(shape) == 2 * (4 * 128 * 128 + 3 * 128 * 256) + 128 * 1024 == 458_752
    assert flops_per_token(shape, 256) == 6 * 458_752 + 12 * 2 * 256 * 128


def test_peak_is_the_best_rate_of_any_library_and_size_of_that_dtype():
    from benchmarks.peak import best_peak

    measured = [
        {"library": "numpy", "results": [{"dtype": "float32", "size": 1024, "gflops": 90.0, "runs": [90.0]}]},
        {"library": "jax", "results": [{"dtype": "float32", "size": 2048, "gflops": 280.0, "runs": [200.0, 280.0]},
                                       {"dtype": "bfloat16", "size": 2048, "gflops": 150.0, "runs": [150.0]}]},
        {"library": "torch", "results": [{"dtype": "float32", "size": 4096, "gflops": 185.0, "runs": [185.0]},
                                         {"dtype": "bfloat16", "size": 1024, "gflops": 400.0, "runs": [400.0]}]},
    ]
    assert best_peak(measured, "float32") == (280.0, "jax 2048")
    assert best_peak(measured, "bfloat16") == (400.0, "torch 1024")
    with pytest.raises(ValueError, match="no float16 matmul was timed"):
        best_peak(measured, "float16")


def test_peak_worker_times_each_size_in_its_own_process():
    from benchmarks.peak import measure_peaks

    (measured,) = measure_peaks(sizes=(64, 128), repeats=2, min_seconds=0.01, libraries=("numpy",))
    assert measured["info"].startswith("numpy ")
    timed = [(r["dtype"], r["size"], len(r["runs"])) for r in measured["results"]]
    assert timed == [("float32", 64, 2), ("float32", 128, 2)]
    assert all(r["gflops"] == max(r["runs"]) > 0 for r in measured["results"])


def test_cpu_flags_name_the_matmul_units_and_a_missing_amx(monkeypatch):
    from benchmarks import common

    fields = {"flags": "fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni", "model name": "AMD EPYC"}
    monkeypatch.setattr(common, "cpu_info_field", lambda name: fields.get(name, ""))
    assert common.cpu_flags() == "avx2 fma avx512f avx512_vnni avx512_bf16 (no AMX)"
    fields["flags"] += " amx_tile amx_bf16"
    assert common.cpu_flags() == "avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16"


def test_smollm2_setups_train_as_the_preset_on_its_real_shape():
    from benchmarks.setups import make_setups

    setups = make_setups(quick=False)
    full, lora = setups["smollm2_full"], setups["smollm2_lora"]
    for setup in (full, lora):
        s = setup.shape
        assert (s.vocab_size, s.hidden_size, s.intermediate_size, s.num_layers) == (49152, 576, 1536, 30)
        assert (s.num_heads, s.num_kv_heads, s.head_dim, s.tied_embeddings) == (9, 3, 64, True)
        assert (s.rope_theta, s.rms_norm_eps) == (100000.0, 1e-5)
        assert s.num_params() == 134_515_008  # SmolLM2-135M
        assert (setup.seq_len, setup.batch_size, setup.loss_on) == (128, 16, "answer")
        assert (setup.optim.b1, setup.optim.b2, setup.optim.weight_decay, setup.optim.clip_grad_norm) == (
            0.9, 0.999, 0.0, 1.0)
    assert full.finetune.method == "full"
    f = lora.finetune
    assert (f.method, f.rank, f.alpha, f.dropout) == ("lora", 8, 16.0, 0.0)
    assert f.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    # --layers scales every setup down, and says so.
    scaled = make_setups(quick=False, layers=2)["smollm2_lora"]
    assert scaled.shape.num_layers == 2 and "not the real shape" in scaled.source


def test_answer_batches_pack_like_the_presets_train_split():
    """The synthetic rows match what trainer.packing.pack made of the real split with SmolLM2's tokenizer:
    2,315 rows, 3.68 reviews and 7.37 loss tokens per row, 1.3% padding, loss-position bound 32."""
    from benchmarks.setups import loss_positions, make_setups, packed_rows, token_batches

    setup = make_setups(quick=False)["smollm2_full"]
    rows = packed_rows(setup)
    assert 2200 <= rows.num_rows <= 2400 and rows.padding_fraction < 0.03
    assert 3.4 <= rows.num_examples / rows.num_rows <= 4.0
    assert 6.8 <= rows.loss_mask.sum(axis=1).mean() <= 8.0
    assert loss_positions(setup) == 32
    for batch in token_batches(setup, count=2):
        assert batch["inputs"].shape == (16, 128)
        for row in range(16):
            segments = batch["segment_ids"][row]
            for segment in set(segments[segments > 0].tolist()):
                where = np.flatnonzero(segments == segment)
                assert (batch["positions"][row, where] == np.arange(len(where))).all()  # restart per example
                # The answer token and EOS are the example's last two targets, and carry its whole loss.
                assert (batch["loss_mask"][row, where] == (np.arange(len(where)) >= len(where) - 2)).all()
            assert (batch["loss_mask"][row, segments == 0] == 0).all()


def test_flops_of_lora_count_frozen_weights_four_times_and_adapters_six():
    import jax
    from flax import nnx

    from benchmarks.setups import adapter_params, body_matmul_params, flops_per_token, matmul_params
    from trainer import finetune
    from trainer.config import FinetuneConfig
    from trainer.model import LlamaShape, LoRAParam, init_model

    shape = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                       num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e5, tied_embeddings=True)
    lora = FinetuneConfig(method="lora", rank=4, alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    # q: 48 -> 48, k and v: 48 -> 16, o: 48 -> 48, gate and up: 48 -> 80, down: 80 -> 48; rank 4.
    per_layer = 4 * ((48 + 48) + 2 * (48 + 16) + (48 + 48) + 2 * (48 + 80) + (80 + 48))
    assert adapter_params(shape, lora) == 2 * per_layer
    model, _ = finetune.prepare(init_model(shape, seed=0), lora, seed=0)
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    assert ours == adapter_params(shape, lora)
    # The tied head is the embedding's transpose: its weights count once, as the head.
    assert matmul_params(shape) == shape.num_params() - (2 * 2 + 1) * 48 == body_matmul_params(shape) + 96 * 48
    attention = 12 * 2 * 64 * 48
    assert flops_per_token(shape, 64, lora, loss_share=0.25) == (
        4 * body_matmul_params(shape) + 4 * 96 * 48 * 0.25 + 6 * adapter_params(shape, lora) + attention)
    assert flops_per_token(shape, 64, FinetuneConfig(method="full")) == 6 * matmul_params(shape) + attention


def test_peft_adapters_match_ours_in_count():
    pytest.importorskip("peft")
    from benchmarks.common import optim_preset
    from benchmarks.setups import Setup, adapter_params, token_batches
    from benchmarks.sides import Theirs
    from trainer.config import FinetuneConfig
    from trainer.model import LlamaShape

    shape = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                       num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e5, tied_embeddings=True)
    lora = FinetuneConfig(method="lora", rank=4, alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    setup = Setup("t", shape, 64, 2, "test", optim_preset(), finetune=lora, loss_on="answer", examples=20)
    theirs = Theirs(setup, token_batches(setup, count=1), setup.optim, lr=1e-3)
    assert theirs.num_params == shape.num_params()
    assert theirs.trainable_params == adapter_params(shape, lora)


def test_peer_attends_within_each_packed_example():
    """transformers turns restarting position_ids into a block-diagonal mask (without a KV cache):
    each example's hidden states in a packed row equal those of the example alone."""
    import torch

    from benchmarks.common import optim_preset
    from benchmarks.setups import Setup, token_batches
    from benchmarks.sides import Theirs
    from trainer.model import LlamaShape

    shape = LlamaShape(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                       num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e5, tied_embeddings=True)
    setup = Setup("t", shape, 64, 4, "test", optim_preset(), loss_on="answer", examples=40)
    batch = token_batches(setup, count=1)[0]
    theirs = Theirs(setup, [batch], setup.optim, lr=1e-3)
    inputs, positions = (torch.from_numpy(batch[k]).long() for k in ("inputs", "positions"))
    with torch.no_grad():
        packed = theirs.model.model(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state
        checked = 0
        for row in range(setup.batch_size):
            segments = batch["segment_ids"][row]
            for segment in set(segments[segments > 0].tolist()):
                where = np.flatnonzero(segments == segment)
                alone = theirs.model.model(input_ids=inputs[row : row + 1, where], use_cache=False).last_hidden_state
                np.testing.assert_allclose(packed[row, where].numpy(), alone[0].numpy(), atol=1e-5, rtol=1e-5)
                checked += segment > 1  # an example that does not start its row
    assert checked > 0


def test_padded_batches_pad_to_the_longest_and_mask_padding_labels():
    from benchmarks.epoch import padded_batches
    from trainer.packing import TokenizedSplit

    prompts = [np.array([1, 5, 6, 7]), np.array([1, 5]), np.array([1, 8, 9])]
    tokenized = TokenizedSplit(prompts, [np.array([3])] * 3, np.array([0, 1, 0]), [np.array([3]), np.array([4])])
    padded = padded_batches(tokenized, batch_size=2, max_length=5, eos_id=2, pad_id=0, seed=0)
    assert len(padded.batches) == 2 and padded.num_truncated == 1  # 1 5 6 7 3 2 is cut to 5 tokens
    lengths = [len(p) + 2 for p in prompts]
    assert padded.real_tokens == sum(min(n, 5) for n in lengths)
    for input_ids, attention_mask, labels in padded.batches:
        assert input_ids.shape[1] == attention_mask.sum(axis=1).max()  # padded to the longest
        assert (labels == np.where(attention_mask == 1, input_ids, -100)).all()
    assert padded.padding_fraction == pytest.approx(1 - padded.real_tokens / padded.slots)


def test_peer_on_gpu_without_cuda_fails_naming_the_cause():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the peer would train there")
    from benchmarks.setups import make_setups, token_batches
    from benchmarks.sides import Theirs

    setup = make_setups(quick=True)["easylm_debug"]
    with pytest.raises(RuntimeError, match="device=gpu, but this torch sees no CUDA device"):
        Theirs(setup, token_batches(setup, count=1), setup.optim, 1e-3, device="gpu")


def test_gpu_peaks_leave_numpy_out_and_cpu_workers_keep_jax_on_the_host(monkeypatch):
    from benchmarks.peak import LIBRARIES, libraries_for, worker_env

    assert libraries_for("cpu") == LIBRARIES and libraries_for("gpu") == ("torch", "jax")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert worker_env("cpu")["JAX_PLATFORMS"] == "cpu"
    assert "JAX_PLATFORMS" not in worker_env("gpu")
