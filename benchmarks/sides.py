"""The two sides that benchmarks.throughput times: our train_step and the PyTorch peer, each in its own process."""

from __future__ import annotations

import math

from benchmarks.setups import Setup, loss_positions
from trainer.config import OptimConfig

# Our adapter targets -> the module names of transformers' LlamaForCausalLM (what peft matches).
PEFT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class Ours:
    """Our train_step from trainer.train, with the setup's fine-tuning method and loss positions."""

    label = "ours (jax)"

    def __init__(self, setup: Setup, batches, optim_cfg: OptimConfig, lr: float):
        import jax

        from trainer import finetune
        from trainer.model import init_model
        from trainer.optim import Hyperparams, Optimizer
        from trainer.train import create_state, make_train_step

        optimizer = Optimizer.from_config(optim_cfg)
        hparams = Hyperparams.create(lr=lr, warmup=0, total_steps=1_000_000, cfg=optim_cfg)
        model, trainable = finetune.prepare(init_model(setup.shape, seed=0), setup.finetune, seed=0)
        graphdef, self.state = create_state(model, optimizer, hparams, trainable, seed=0)
        self.loss_positions = loss_positions(setup)
        self.step_fn = make_train_step(graphdef, optimizer, 1, self.loss_positions, dropout=False)
        self.trainable_params = sum(int(x.size) for x in jax.tree.leaves(self.state.params))
        self.batches = [jax.device_put(batch) for batch in batches]
        self.done = 0

    def run(self, steps: int) -> float:
        """`steps` updates; returns the last loss (after waiting for every update)."""
        import jax

        for _ in range(steps):
            self.state, metrics = self.step_fn(self.state, self.batches[self.done % len(self.batches)])
            self.done += 1
        jax.block_until_ready(self.state)
        return float(metrics["loss"])

    def xla_flops_per_step(self) -> float:
        """FLOPs of the whole step as XLA counts them (matmuls, elementwise ops, the optimizer)."""
        cost = self.step_fn.lower(self.state, self.batches[0]).cost_analysis()
        return float(cost.get("flops", math.nan)) if cost else math.nan


class Theirs:
    """The PyTorch peer: LlamaForCausalLM (+ peft LoRA) + AdamW + gradient clipping, eager.

    float32 weights and optimizer state; a setup whose shape computes in bfloat16 runs the forward
    pass and the loss under torch.autocast (bfloat16 matmuls), as PyTorch's users mix precision.
    `device="gpu"` trains on the first CUDA device, with TensorFloat-32 float32 products (the
    precision jax uses there by default), so both sides do the same arithmetic.
    """

    label = "torch (transformers)"

    def __init__(self, setup: Setup, batches, optim_cfg: OptimConfig, lr: float, device: str = "cpu"):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("device=gpu, but this torch sees no CUDA device (a CPU-only build?)")
            torch.set_float32_matmul_precision("high")
            self.device, self.device_name = "cuda", f"cuda ({torch.cuda.get_device_name()})"
        else:
            self.device, self.device_name = "cpu", "cpu"

        s = setup.shape
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
            head_dim=s.head_dim, rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta,
            max_position_embeddings=setup.seq_len, tie_word_embeddings=s.tied_embeddings,
            initializer_range=s.init_std,
        )
        self.model = LlamaForCausalLM(config).to(self.device).train()
        self.attention = self.model.config._attn_implementation
        self.num_params = sum(p.numel() for p in self.model.parameters())  # tied weights once
        self.lora = None
        if setup.finetune.method == "lora":
            import peft

            # Injects the adapters into self.model's modules in place and freezes the rest.
            peft.get_peft_model(self.model, peft.LoraConfig(
                r=setup.finetune.rank, lora_alpha=setup.finetune.alpha, lora_dropout=setup.finetune.dropout,
                target_modules=[PEFT_TARGETS[t] for t in setup.finetune.targets],
            ))
            self.lora = f"peft {peft.__version__}"
        elif setup.finetune.method != "full":
            raise ValueError(f"finetune.method={setup.finetune.method!r}: the peer models 'full' and 'lora'")
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.trainable)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
        )
        self.clip = optim_cfg.clip_grad_norm
        self.packed = setup.loss_on == "answer"
        self.batches = [
            {key: value.to(self.device) for key, value in {
                "inputs": torch.from_numpy(b["inputs"]).long(), "targets": torch.from_numpy(b["targets"]).long(),
                "positions": torch.from_numpy(b["positions"]).long(),
                "loss_mask": torch.from_numpy(b["loss_mask"] > 0)}.items()}
            for b in batches
        ]
        self.vocab_size = s.vocab_size
        self.autocast_dtype = None if s.dtype == "float32" else getattr(torch, s.dtype)
        self.done = 0

    def loss(self, batch):
        import torch.nn.functional as F

        if not self.packed:  # every token: the full logits
            logits = self.model(input_ids=batch["inputs"]).logits
            return F.cross_entropy(logits.reshape(-1, self.vocab_size).float(), batch["targets"].reshape(-1))
        # Packed rows: positions restart per example, from which transformers builds a block-diagonal
        # causal mask (it does so only without a KV cache); the head runs on the loss positions only.
        hidden = self.model.model(
            input_ids=batch["inputs"], position_ids=batch["positions"], use_cache=False
        ).last_hidden_state
        mask = batch["loss_mask"]
        logits = self.model.lm_head(hidden[mask])
        return F.cross_entropy(logits.float(), batch["targets"][mask])

    def run(self, steps: int) -> float:
        import torch

        for _ in range(steps):
            mixed = self.autocast_dtype is not None
            with torch.autocast(self.device, dtype=self.autocast_dtype or torch.bfloat16, enabled=mixed):
                loss = self.loss(self.batches[self.done % len(self.batches)])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
            self.optimizer.step()
            self.done += 1
        return float(loss.detach())
