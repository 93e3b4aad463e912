"""DeepSpeed config dict (ds_config.json) built from a planned layout; pure, no deepspeed import.

Keys checked against the installed deepspeed 0.19.8 (runtime/constants.py, runtime/zero/config.py,
runtime/zero/offload_config.py, runtime/precision_config.py,
runtime/activation_checkpointing/config.py, runtime/tensor_parallel/config.py).
"""

from __future__ import annotations

from typing import Any

from shardwise.planner import Layout, PlannerSettings, PlanRequest

GRADIENT_CLIPPING = 1.0
STEPS_PER_PRINT = 10
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.0


def deepspeed_config(
    layout: Layout,
    precision: str,
    settings: PlannerSettings | None = None,
    method: str = "full",
    learning_rate: float = LEARNING_RATE,
) -> dict[str, Any]:
    """The DeepSpeed config for a layout and precision (bf16 | fp16 | bf16-pure | fp32).

    The bucket sizes are the planner's, so the memory the planner counted for them is the memory
    DeepSpeed allocates. `train_batch_size` = micro-batch x accumulation x DP, DeepSpeed's own
    identity (it rejects a config where they disagree)."""
    s = settings or PlannerSettings()
    zero: dict[str, Any] = {"stage": layout.zero_stage}
    if layout.zero_stage >= 1:
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": True,
                "reduce_scatter": True,
                "reduce_bucket_size": s.reduce_bucket_elements,
            }
        )
    if layout.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = s.allgather_bucket_elements
    if layout.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = s.prefetch_bucket_elements
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if layout.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if layout.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": layout.micro_batch * layout.grad_accum * layout.dp,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": learning_rate, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WEIGHT_DECAY},
        },
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Mixed precision, fp32 master weights and optimizer states (the planner's K = 12).
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision == "bf16-pure" and layout.zero_stage >= 1:
        # bf16 weights are the master copy, AdamW moments in bf16 (the planner's K = 4). DeepSpeed
        # allows these two keys only with ZeRO >= 1, and the second only with the first.
        config["bf16"] = {
            "enabled": True,
            "bf16_master_weights_and_grads": True,
            "bf16_optimizer_states": True,
        }
    # bf16-pure with ZeRO-0 has no precision section: the trainer casts the model to bf16 and the
    # plain optimizer keeps bf16 moments. fp32 has none either.
    if layout.checkpointing != "none":
        config["activation_checkpointing"] = {
            "partition_activations": layout.tp > 1,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    if layout.tp > 1:
        # DeepSpeed AutoTP training (runtime/tensor_parallel/config.py, key "autotp_size").
        config["tensor_parallel"] = {"autotp_size": layout.tp}
    if method == "inference":
        config.pop("optimizer")
        config.pop("gradient_clipping")
    return config


def deepspeed_config_for(request: PlanRequest, layout: Layout) -> dict[str, Any]:
    """deepspeed_config() with the request's precision, method and planner settings."""
    training = request.training
    return deepspeed_config(
        layout, training.precision, request.settings, training.method, training.learning_rate
    )
