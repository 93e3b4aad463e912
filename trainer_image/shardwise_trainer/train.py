"""The training run: layout -> process groups -> model -> DeepSpeed engine -> steps, stats, checkpoints.

Output on stdout (rank 0 only, one JSON object per line, each with an ``event`` key; anything
else on stdout is library chatter):

* ``{"event": "step", "step": 3, "loss": 4.1, "tokens_per_s": 812.5, "step_seconds": 0.31}``
  after every optimizer step (``tokens_per_s``: the global batch's tokens / the step's time);
* ``{"event": "rank", "rank": 1, "model_state_bytes": ..., "peak_memory_bytes": ..., ...}``
  once per rank at the end (gathered to rank 0);
* ``{"event": "data", "format": "messages", "rows": 120, "cached": false, ...}`` once, before
  the first step, for record data (data/source.py);
* ``{"event": "eval", "step": 10, "loss": 2.3}`` every ``--eval-every`` steps and at the end
  when there is a validation split;
* ``{"event": "done", "steps": 10, "resumed_from": 0}``.

``--steps K`` is the total number of optimizer steps of the run: a resumed attempt continues from
the checkpoint's step up to K.
"""

# Lazy imports on purpose: DeepSpeed reads DS_ACCELERATOR when imported, and layout errors
# must be reported before torch (seconds to import) is loaded.
# ruff: noqa: PLC0415
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from shardwise_trainer import contract, failures, pretrained  # imports transformers only when called
from shardwise_trainer.contract import Layout
from shardwise_trainer.runopts import RunOptions, data_options
from shardwise_trainer.straggle import parse_slow_rank

log = logging.getLogger("shardwise_trainer")


def _single_process_env() -> None:
    """Allow ``python -m shardwise_trainer`` without torchrun (one process, world size 1)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
    ):
        os.environ.setdefault(key, value)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def run(opts: RunOptions) -> int:
    """Train the layout; returns the process exit code."""
    layout = contract.load_layout(opts.layout_file)
    ds_config = contract.load_ds_config(layout, opts.ds_config_file)
    if opts.hf_model:  # capability table, model dir, weights, remote-code opt-in: before torch loads
        pretrained.check_model_dir(layout, opts.hf_model, trust_remote_code=opts.trust_remote_code)
        pretrained.force_offline()
    else:
        refused = contract.runtime_refusal(layout, pretrained=False)
        if refused:
            raise contract.ContractError(refused, contract.REASON_UNSUPPORTED)
        if opts.output_dir:
            raise contract.ContractError(
                "--output-dir saves a model in Hugging Face format: it needs --hf-model (the built-in "
                "model has no Hugging Face class; its DeepSpeed checkpoints are in --checkpoint-dir)"
            )
    record_opts = data_options(opts, layout)
    slow = parse_slow_rank(os.environ.get(contract.ENV_TEST_SLOW_RANK))
    _single_process_env()

    import torch  # heavy imports after argument / layout errors are reported

    from shardwise_trainer import commtime

    # Before DeepSpeed binds torch.distributed's functions (its comm backend keeps some).
    comm_timer = commtime.install()

    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # DeepSpeed picks its accelerator at import time
        os.environ.setdefault(contract.ENV_DS_ACCELERATOR, "cpu")
    # The model's config is checked against the layout on every rank before any process group
    # exists, so a mismatch exits 2 everywhere instead of hanging the others.
    hf_config = (
        pretrained.load_config(opts.hf_model, layout, trust_remote_code=opts.trust_remote_code)
        if opts.hf_model
        else None
    )
    prepared = None
    if record_opts is not None:  # tokenized once per node (local rank 0), the others wait
        from shardwise_trainer.data import source as record_source

        prepared = record_source.prepare(record_opts, builder=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    import deepspeed
    import torch.distributed as dist

    from shardwise_trainer import build, checkpointing, dsconfig, evaluation, metrics, outputs, stats
    from shardwise_trainer.data import TokenSource
    from shardwise_trainer.model import PipelineNames, mark_for_grad_norm
    from shardwise_trainer.topology import build_topology

    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    backend = "gloo" if on_cpu else "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_cpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    topo = build_topology(layout.tp, layout.pp, layout.dp, layout.sp)
    rank = topo.rank
    device = torch.device("cpu") if on_cpu else torch.device("cuda", local_rank)
    # Same seed on the ranks of a TP group (dropout masks of replicated activations agree).
    torch.manual_seed(opts.seed + 7919 * topo.dp_rank + 104729 * topo.pp_rank)

    adapted = dsconfig.adapt(ds_config, layout, on_cpu=on_cpu, lr=opts.lr, autotp=bool(opts.hf_model))
    cadence = checkpointing.Cadence(opts.checkpoint_every, opts.checkpoint_every_minutes)
    arch = layout.architecture
    ckpt = checkpointing.Checkpointer(
        opts.checkpoint_dir,
        cadence,
        keep=opts.checkpoint_keep,
        layout=layout,
        rank=rank,
        device=device,
        names=None if opts.hf_model else PipelineNames(arch.layers, arch.tied_embeddings),
    )
    t_resume = time.perf_counter()
    resume = ckpt.prepare_resume(adapted.config)  # before initialize: universal loading is a config key
    if rank == 0:
        for change in adapted.changes:
            log.warning("DeepSpeed config adapted: %s", change)
    arch = layout.architecture
    built = build.build_model(layout, topo, adapted.config, seed=opts.seed, hf_model_dir=opts.hf_model,
                              hf_config=hf_config, trust_remote_code=opts.trust_remote_code)  # fmt: skip
    model, hf_model, mpu = built.model, built.hf_model, built.mpu
    if rank == 0:
        _emit(
            {
                "event": "model",
                "parameters": built.parameters,
                "trainable_parameters": built.trainable_parameters,
                "weights_4bit": built.weights_4bit,
                "source": "pretrained" if opts.hf_model else "builtin",
            }
        )
    declared = int((layout.raw.get(contract.K_MODEL) or {}).get(contract.K_MODEL_PARAMETERS) or 0)
    if rank == 0 and declared and abs(built.parameters - declared) > 0.01 * declared:
        log.warning("layout declares %d parameters, the trainer's model has %d", declared, built.parameters)
    # Under SP DeepSpeed's "model-parallel" group is the SP group: replicated parameters count once.
    mark_for_grad_norm(
        model, tp_rank=topo.tp_rank or topo.sp_rank, pipeline_stage=topo.pp_rank if layout.pp > 1 else None
    )
    engine, _optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=adapted.config,
        mpu=mpu,
    )
    meter = stats.StateMeter(engine)
    dev = stats.device_for(local_rank)

    start_step = 0
    if resume is not None:
        ckpt.load(engine, resume)
        start_step = resume.step
        if rank == 0:
            log.warning(
                "resumed from %s at step %d (saved by %s)", resume.tag, start_step, resume.saved_layout
            )
            _emit({"event": "resume", "step": start_step, "tag": resume.tag, "universal": resume.universal,
                   "saved_layout": resume.saved_layout, "convert_seconds": resume.convert_seconds,
                   "seconds": time.perf_counter() - t_resume})  # fmt: skip

    source: Any
    if prepared is not None:
        from shardwise_trainer.data.source import RecordSource

        positions = opts.packing == "pack" and pretrained.reads_packed_positions(hf_config)
        if rank == 0 and opts.packing == "pack" and not positions:
            log.warning(
                "packed rows without per-sample attention: the model is not known to read packed position ids"
            )
        source = RecordSource(prepared.train, seed=opts.seed, with_positions=positions)
        if rank == 0:
            _emit({"event": "data", **prepared.meta, "cached": prepared.cached, "seconds": prepared.seconds})
    else:
        source = TokenSource(
            vocab_size=arch.vocab_size,
            sequence_length=layout.sequence_length,
            seed=opts.seed,
            path=None if opts.synthetic else opts.data_file,
            token_dtype=opts.token_dtype,
        )
    validation = prepared.validation if prepared is not None else None
    validation_loss: float | None = None
    env = os.environ
    node_rank = contract.env_int(contract.ENV_NODE_RANK)
    labels = {
        "namespace": contract.env(contract.ENV_NAMESPACE) or "",
        "job": contract.env(contract.ENV_JOB_NAME) or "",
        "pod": contract.env(contract.ENV_POD_NAME) or socket.gethostname(),
        "node": contract.env(contract.ENV_NODE_NAME) or socket.gethostname(),
        "rank": str(rank),
        "local_rank": str(local_rank),
        "gpu": dev.name,
        "stage": str(topo.pp_rank),
    }
    stats_dir = (
        Path(opts.stats_dir)
        if opts.stats_dir
        else metrics.default_stats_dir(
            labels["pod"], int(env.get("GROUP_RANK", node_rank)), env.get("TORCHELASTIC_RUN_ID", "none")
        )
    )
    server = None
    if local_rank == 0 and opts.metrics_port:
        try:
            server = metrics.MetricsServer(opts.metrics_host, opts.metrics_port, stats_dir)
            log.warning("serving per-rank stats on %s:%d/metrics", opts.metrics_host, server.port)
        except OSError as exc:  # training matters more than its stats: say so loudly, go on
            log.error(
                "cannot serve stats on %s:%d (%s); training continues without the endpoint "
                "(several pods on one host? set %s)",
                opts.metrics_host,
                opts.metrics_port,
                exc,
                contract.ENV_POD_IP,
            )
    predicted = layout.predicted_model_state_bytes(topo.pp_rank)
    fault = failures.parse_fault(env.get(contract.ENV_TEST_FAULT))
    clock = commtime.clock_for(on_cpu, comm_timer)
    slowed = None
    if slow and slow[0] == rank and slow[1] > 1.0:  # test-only straggler: extra work in forward
        from shardwise_trainer.straggle import SlowCompute

        slowed = SlowCompute(slow[1], forwards_per_step=layout.grad_accum)
        slowed.attach(engine.module)

    global_tokens = layout.global_batch_size * layout.sequence_length
    replica_tokens = layout.micro_batch * layout.grad_accum * layout.sequence_length
    loss_value = float("nan")
    # What the trainer adds to a plain DeepSpeed loop, timed: model-state sampling, the loss
    # all-reduce, the end-of-step barrier, the stats file and the JSON line.
    bookkeeping = 0.0
    stats_written = 0.0
    loop_start = time.perf_counter()
    for step in range(start_step, opts.steps):
        if fault is not None:
            fault.maybe_raise(rank, step + 1)
        clock.begin_step()
        if slowed is not None:
            slowed.begin_step()
        batches = source.step_iter(
            step=step,
            grad_accum=layout.grad_accum,
            dp_rank=topo.dp_rank,
            dp=layout.dp,
            micro_batch=layout.micro_batch,
            global_batch=layout.global_batch_size,
            device=device,
        )
        if layout.pp > 1:
            with clock.phase("pipeline"):
                loss_t = engine.train_batch(data_iter=batches).detach().float()
        else:
            total = torch.zeros((), device=device)
            for batch in batches:  # (ids, labels) or, packed records, (ids, labels, position_ids)
                with clock.phase("forward"):
                    loss = engine(*batch)
                with clock.phase("backward"):
                    engine.backward(loss)
                meter.sample()
                with clock.phase("optimizer"):
                    engine.step()
                total += loss.detach().float()
            loss_t = total / layout.grad_accum
        times = clock.end_step()
        if slowed is not None:
            slowed.end_step(times.compute_seconds)
        t1 = time.perf_counter()
        # One collective closes the step: every rank waits here for the slowest (``wait``; with
        # data or tensor parallelism most waiting already happened inside the step's collectives,
        # which is why the straggler analysis reads compute time, not this), and without pipeline
        # stages the same all-reduce averages the loss over the replicas (TP ranks hold equal
        # losses: the world mean is the DP mean; SP ranks hold shares that add up to it).
        if topo.world_size > 1 and layout.pp == 1:
            dist.all_reduce(loss_t)
            loss_t /= topo.world_size // layout.sp
        elif topo.world_size > 1:
            dist.barrier()
        wait = time.perf_counter() - t1
        loss_value = float(loss_t)
        step_seconds = times.step_seconds
        done = step + 1
        evaluated = validation is not None and (
            done == opts.steps or bool(opts.eval_every and done % opts.eval_every == 0)
        )
        if evaluated:
            assert validation is not None
            validation_loss = evaluation.evaluate(
                engine, source, validation, layout=layout, dp_rank=topo.dp_rank, device=device
            )
            if rank == 0:
                _emit({"event": "eval", "step": done, "loss": validation_loss, "rows": len(validation)})
        t_stats = time.perf_counter()
        # The stats file is what the pod's endpoint serves and the operator scrapes every few
        # seconds: refreshing it more often than that only costs step time.
        if (
            evaluated
            or done in (start_step + 1, opts.steps)
            or t_stats - stats_written >= opts.stats_refresh_seconds
        ):
            stats_written = t_stats
            mem = dict(dev.memory())
            peak = meter.peak
            mem.update(
                parameters=peak.parameters, gradients=peak.gradients, optimizer_states=peak.optimizer_states
            )
            metrics.write_rank_stats(
                stats_dir,
                rank,
                {
                    "labels": labels,
                    "step": done,
                    "total_steps": opts.steps,
                    "tokens_per_step": global_tokens,
                    "samples_per_step": layout.global_batch_size,
                    "step_seconds": step_seconds,
                    "wait_seconds": wait,
                    "compute_seconds": times.compute_seconds,
                    "communication_seconds": times.communication_seconds,
                    "tokens_per_second": replica_tokens / step_seconds,
                    "loss": loss_value,
                    "validation_loss": validation_loss,
                    "memory_bytes": mem,
                    "model_state_bytes": peak.total,
                    "predicted_model_state_bytes": predicted,
                    "last_update_timestamp_seconds": time.time(),
                    "checkpoint": ckpt.last,
                    "checkpoint_step": ckpt.last["step"] if ckpt.last else None,
                    "checkpoint_timestamp_seconds": ckpt.last["time"] if ckpt.last else None,
                },
            )
        if rank == 0:
            _emit(
                {
                    "event": "step",
                    "step": done,
                    "loss": loss_value,
                    "tokens_per_s": global_tokens / (step_seconds + wait),
                    "step_seconds": step_seconds + wait,
                    "time": time.time(),
                }
            )
        bookkeeping += wait + time.perf_counter() - t_stats
        if ckpt.enabled and (ckpt.due(done) or done == opts.steps):
            saved_ckpt = ckpt.save(engine, done)
            if rank == 0:
                _emit({"event": "checkpoint", "dir": opts.checkpoint_dir, **saved_ckpt})
            metrics.update_rank_stats(stats_dir, rank, checkpoint=saved_ckpt, checkpoint_step=done,
                                      checkpoint_timestamp_seconds=saved_ckpt["time"])  # fmt: skip

    loop_seconds = time.perf_counter() - loop_start
    if opts.output_dir and hf_model is not None:
        probe_ids, probe_labels = source.micro_batch(
            step=0, micro=0, dp_rank=0, dp=1, micro_batch=layout.micro_batch, global_batch=layout.micro_batch
        )[:2]
        sp_group = built.mpu.get_sequence_parallel_group() if layout.sp > 1 else None
        probe = outputs.probe_loss(engine, probe_ids.to(device), probe_labels.to(device), sp_group=sp_group)
        saved = outputs.save(
            engine,
            hf_model,
            method=layout.method,
            zero_stage=layout.zero_stage,
            model_dir=opts.hf_model or "",
            out_dir=opts.output_dir,
            prefix=pretrained.WRAPPED_PREFIX,
        )
        if rank == 0:
            # probe_loss: the saved model's loss on samples 0 … micro_batch-1 (eval mode), which a
            # fresh process loading the output reproduces.
            _emit({"event": "output", "path": saved, "method": layout.method, "probe_loss": probe})
            if saved:
                contract.write_termination_message(contract.success_message(saved))
    peak = meter.peak
    summary = {
        "event": "rank",
        "rank": rank,
        "stage": topo.pp_rank,
        "tp_rank": topo.tp_rank,
        "dp_rank": topo.dp_rank,
        "model_state_bytes": peak.total,
        "parameters_bytes": peak.parameters,
        "gradients_bytes": peak.gradients,
        "optimizer_states_bytes": peak.optimizer_states,
        "predicted_model_state_bytes": predicted,
        "peak_memory_bytes": dev.peak_bytes(),
        "load_peak_bytes": built.load_peak_bytes,
        "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
    }
    gathered: list[Any] = [None] * topo.world_size
    dist.all_gather_object(gathered, summary)
    if rank == 0:
        for item in gathered:
            _emit(item)
        _emit(
            {
                "event": "done",
                "steps": opts.steps,
                "resumed_from": start_step,
                "loss": loss_value,
                "loop_seconds": loop_seconds,
                "bookkeeping_seconds": bookkeeping + meter.seconds,
            }
        )
    if slowed is not None:
        slowed.detach()
    if server is not None:
        if opts.linger_seconds > 0:
            time.sleep(opts.linger_seconds)
        server.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def layout_summary(layout: Layout) -> str:
    """One line naming the layout (for logs)."""
    return (
        f"tp={layout.tp} pp={layout.pp} dp={layout.dp} zero={layout.zero_stage} "
        f"micro_batch={layout.micro_batch} grad_accum={layout.grad_accum} "
        f"checkpointing={layout.checkpointing}"
    )
