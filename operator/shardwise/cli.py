"""The `shardwise` command: `plan` (offline layout planning) and `presets`; one function per subcommand."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml

from shardwise.jobspec import SpecError, architecture_spec, request_from_spec, spec_from_manifest
from shardwise.metrics.limits import DEFAULT_STATS_MAX_BYTES
from shardwise.metrics.progress import DEFAULT_PROGRESS_INTERVAL_SECONDS
from shardwise.planner import GPUS, PRESETS, ModelSpec, PlanInputError, PlanResult, parse_hf_config, plan
from shardwise.planner.overlap import matmul_efficiency
from shardwise.planner.units import GIB, gib, parse_count, parse_size
from shardwise.resources.layout_file import layout_document_for
from shardwise.status_command import add_status_command

EXIT_OK = 0
EXIT_INFEASIBLE = 1
EXIT_BAD_INPUT = 2


class CliError(Exception):
    """Bad input: printed as one line `shardwise: error: ...`, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _progress_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 1 and 3600 seconds, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except PlanInputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def _count(text: str) -> int:
    try:
        return parse_count(text)
    except PlanInputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("count: ")) from None


# --- plan ---------------------------------------------------------------------------------------


def add_plan_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan a layout (TP x PP x DP, ZeRO, micro-batch, checkpointing, offload) for a job",
        description="Plan a layout for a ParallelTrainingJob manifest and/or flags (flags override it). "
        "Exit 0 feasible, 1 infeasible (a diagnosis is printed), 2 bad input.",
    )
    p.add_argument("job", nargs="?", metavar="JOB.yaml", help="a ParallelTrainingJob manifest")
    p.add_argument(
        "--model", metavar="PRESET|CONFIG.json", help="a preset name or a Hugging Face config.json"
    )
    p.add_argument("--params", type=_count, metavar="N", help="parameter count only (e.g. 7e9, 70B)")
    p.add_argument("--gpus", type=_positive_int, metavar="N", help="total GPUs (up to 8 per node)")
    p.add_argument("--nodes", type=_positive_int, metavar="N")
    p.add_argument("--gpus-per-node", type=_positive_int, metavar="G")
    p.add_argument("--gpu", metavar="NAME", help="catalog name or GFD label, e.g. NVIDIA-H100-80GB-HBM3")
    p.add_argument("--gpu-memory", type=_size, metavar="SIZE", help="GPU memory, e.g. 24GiB, 80GB, bytes")
    p.add_argument("--node-memory", type=_size, metavar="SIZE", help="host memory per node (offload checks)")
    p.add_argument("--tp", type=_positive_int, metavar="T", help="pin the tensor-parallel degree")
    p.add_argument("--pp", type=_positive_int, metavar="P", help="pin the pipeline-parallel degree")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), metavar="Z", help="pin the ZeRO stage (0-3)")
    p.add_argument(
        "--expert", type=_positive_int, metavar="E", help="pin the expert-parallel degree (MoE models)"
    )
    p.add_argument("--method", choices=("full", "lora", "qlora", "freeze", "inference"))
    p.add_argument("--precision", choices=("bf16", "fp16", "bf16-pure", "fp32"))
    p.add_argument("--lora-rank", type=_positive_int, metavar="R")
    p.add_argument("--seq", type=_positive_int, metavar="S", help="sequence length (tokens)")
    p.add_argument("--global-batch", type=_positive_int, metavar="B")
    p.add_argument(
        "--micro-batch", type=_non_negative_int, metavar="B", help="pin the micro-batch (0 = plan)"
    )
    p.add_argument("--checkpointing", choices=("none", "selective", "full", "auto"))
    p.add_argument(
        "--sequence-parallel",
        choices=("on", "off", "auto"),
        help="pin sequence parallelism on or off; auto (the default) lets the planner decide",
    )
    p.add_argument("--offload", choices=("none", "optimizer", "all", "auto"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--layout-out", metavar="FILE", help="write the layout.json the operator would use")
    p.add_argument(
        "--manifest-out",
        metavar="FILE",
        help="write a ParallelTrainingJob manifest of this plan's input: the manifest and flags, with "
        "--model CONFIG.json turned into spec.model.architecture (one step from a config.json to a job)",
    )
    p.set_defaults(handler=run_plan)


def _read_manifest(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise CliError(f"{path}: malformed manifest: {first}") from None
    try:
        return dict(copy.deepcopy(spec_from_manifest(doc)))
    except SpecError as exc:
        raise CliError(f"{path}: {exc}") from None


def _read_model(arg: str) -> ModelSpec | None:
    """A config.json path becomes a ModelSpec; a preset name stays in the spec (None here)."""
    path = Path(arg)
    if not (arg.endswith(".json") or path.is_file()):
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"--model {arg}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"--model {arg}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise CliError(f"--model {arg}: expected a JSON object")
    try:
        notes: list[str] = []
        arch = parse_hf_config(config, notes)
        return ModelSpec(name=path.stem, architecture=arch, notes=tuple(notes))
    except PlanInputError as exc:
        raise CliError(f"--model {arg}: {exc}") from None


def _apply_flags(spec: dict[str, Any], args: argparse.Namespace) -> ModelSpec | None:
    """Flags override the manifest (camelCase job-spec fields); returns a config.json model."""
    model_override = None
    if args.model is not None and args.params is not None:
        raise CliError("give --model or --params, not both")
    if args.model is not None:
        model_override = _read_model(args.model)
        spec["model"] = {"preset": args.model} if model_override is None else {"preset": "config.json"}
    elif args.params is not None:
        spec["model"] = {"parameters": args.params}
    training = dict(spec.get("training") or {})
    if args.sequence_parallel == "auto":
        training.pop("sequenceParallel", None)
    elif args.sequence_parallel is not None:
        training["sequenceParallel"] = args.sequence_parallel == "on"
    for flag, key in (
        ("method", "method"),
        ("precision", "precision"),
        ("seq", "sequenceLength"),
        ("global_batch", "globalBatchSize"),
        ("micro_batch", "microBatchSize"),
        ("checkpointing", "activationCheckpointing"),
        ("offload", "offload"),
        ("lora_rank", "loraRank"),
    ):
        value = getattr(args, flag)
        if value is not None:
            training[key] = value
    spec["training"] = training
    parallelism = dict(spec.get("parallelism") or {})
    for flag, key in (("tp", "tensor"), ("pp", "pipeline"), ("zero", "zeroStage"), ("expert", "expert")):
        if getattr(args, flag) is not None:
            parallelism[key] = getattr(args, flag)
    spec["parallelism"] = parallelism
    resources = dict(spec.get("resources") or {})
    if args.gpus is not None and (args.nodes is not None or args.gpus_per_node is not None):
        args.nodes, args.gpus_per_node = _nodes_for(args.gpus, args.nodes, args.gpus_per_node)
    elif args.gpus is not None:
        for key in ("nodes", "gpusPerNode"):
            resources.pop(key, None)
        resources["gpus"] = args.gpus
    if args.nodes is not None or args.gpus_per_node is not None:
        resources.pop("gpus", None)
        resources["nodes"] = args.nodes if args.nodes is not None else resources.get("nodes", 1)
        resources["gpusPerNode"] = (
            args.gpus_per_node if args.gpus_per_node is not None else resources.get("gpusPerNode", 1)
        )
    if args.gpu is not None:
        resources["gpuProduct"] = args.gpu
        resources.pop("gpuMemory", None)
    if args.gpu_memory is not None:
        resources["gpuMemory"] = args.gpu_memory
    if args.node_memory is not None:
        resources["nodeMemory"] = args.node_memory
    spec["resources"] = resources
    return model_override


def _nodes_for(gpus: int, nodes: int | None, per_node: int | None) -> tuple[int, int]:
    """--gpus N with --gpus-per-node G (and/or --nodes): the node shape, when they agree."""
    if per_node is not None:
        if gpus % per_node:
            raise CliError(f"--gpus {gpus} is not a multiple of --gpus-per-node {per_node}")
        if nodes is not None and nodes * per_node != gpus:
            raise CliError(f"--gpus {gpus} != --nodes {nodes} x --gpus-per-node {per_node}")
        return gpus // per_node, per_node
    nodes = nodes or 1
    if gpus % nodes:
        raise CliError(f"--gpus {gpus} is not a multiple of --nodes {nodes}")
    return nodes, gpus // nodes


def run_plan(args: argparse.Namespace, out: TextIO) -> int:
    spec: dict[str, Any] = _read_manifest(args.job) if args.job else {}
    model = _apply_flags(spec, args)
    if "model" not in spec:
        raise CliError("no model: give JOB.yaml, --model PRESET|CONFIG.json or --params N")
    request = request_from_spec(spec, model=model)
    # The CLI explores: it plans expert parallelism the trainer does not run yet, with a note.
    settings = dataclasses.replace(request.settings, plan_expert_parallel_beyond_runtime=True)
    result = plan(dataclasses.replace(request, settings=settings))
    if args.manifest_out:
        _write_manifest(args, spec, model)
    if args.layout_out:
        if result.feasible:
            document = layout_document_for(result)
            try:
                Path(args.layout_out).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                raise CliError(f"--layout-out {args.layout_out}: cannot write ({exc.strerror})") from None
        else:
            print(f"shardwise: not writing {args.layout_out}: no layout fits", file=sys.stderr)
    if args.json:
        out.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        out.write(render_plan(result))
    return EXIT_OK if result.feasible else EXIT_INFEASIBLE


def manifest_for(name: str, spec: dict[str, Any], model: ModelSpec | None) -> dict[str, Any]:
    """A ParallelTrainingJob manifest of a spec; a config.json model becomes its architecture block."""
    body = copy.deepcopy(spec)
    if model is not None and model.architecture is not None:
        body["model"] = {"architecture": architecture_spec(model.architecture)}
    for key in ("parallelism", "resources"):
        if not body.get(key):
            body.pop(key, None)
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


def _write_manifest(args: argparse.Namespace, spec: dict[str, Any], model: ModelSpec | None) -> None:
    name = "job"
    if model is not None:
        name = re.sub(r"[^a-z0-9-]+", "-", Path(args.model).parent.name.lower() or "job").strip("-") or "job"
    doc = manifest_for(name[:63], spec, model)
    try:
        Path(args.manifest_out).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--manifest-out {args.manifest_out}: cannot write ({exc.strerror})") from None


def _g(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:9.2f} GiB"


def render_plan(result: PlanResult) -> str:
    """Human-readable plan: layout, per-GPU memory table, alternatives, rejections, diagnosis."""
    r = result.request
    lines: list[str] = []
    arch = r.model.architecture
    shape = (
        f"{arch.layers} layers, h={arch.hidden_size}, {arch.heads} heads / {arch.kv_heads} kv"
        if arch is not None
        else "parameter count only"
    )
    if arch is not None and arch.moe:
        shape += (
            f"; MoE {arch.experts} experts top-{arch.experts_per_token}, "
            f"{arch.active_params / 1e9:.2f} B active"
        )
    t = r.training
    count = r.model.parameters
    size = f"{count / 1e9:.2f} B" if count >= 10**9 else f"{count / 1e6:.2f} M"
    lines.append(f"model      {r.model.name}: {size} parameters ({shape})")
    lines.append(
        f"training   {t.method}, {t.precision}, sequence {r.sequence_length}, "
        f"global batch {r.global_batch_size}"
    )
    c = r.cluster
    lines.append(
        f"cluster    {c.nodes} node(s) x {c.gpus_per_node} {c.gpu.name} ({gib(c.gpu.memory_bytes)} each)"
        + (f", {gib(c.node_memory_bytes)} host memory per node" if c.node_memory_bytes else "")
    )
    choice = result.choice
    verdict = "FEASIBLE" if result.feasible else "INFEASIBLE"
    if choice is None:
        lines.append(f"result     {verdict}: no valid layout")
    else:
        label = "layout    " if result.feasible else "closest   "
        lines.append(f"result     {verdict}")
        lines.append(f"{label} {choice.layout.describe()} on {choice.layout.nodes} node(s)")
        m = choice.memory
        lines.append(f"memory per GPU (worst pipeline stage {choice.worst_stage}):")
        lines.append(f"  parameters        {_g(m.parameters)}")
        lines.append(f"  gradients         {_g(m.gradients)}")
        lines.append(f"  optimizer states  {_g(m.optimizer_states)}")
        lines.append(f"  activations       {_g(m.activations)}")
        detail = ", ".join(f"{name} {v / GIB:.2f}" for name, v in m.overhead_terms)
        lines.append(f"  overhead          {_g(m.overhead)}  ({detail})")
        lines.append(f"  total             {_g(m.total)}")
        lines.append(f"  capacity          {_g(choice.capacity)}")
        lines.append(f"  headroom          {(choice.capacity - m.total) / GIB:9.2f} GiB")
        if choice.cpu_memory_per_node:
            lines.append(f"host memory per node for offload: {gib(choice.cpu_memory_per_node)}")
        st = choice.step_time
        lines.append(
            f"step time  {st.total:.4g} s (compute {st.compute:.4g}, bubble {st.pipeline_bubble:.4g}, "
            f"TP {st.tensor_parallel:.4g}, PP {st.pipeline_p2p:.4g}, DP {st.data_parallel:.4g}, "
            f"offload {st.offload:.4g}"
            + (f", expert all-to-all {st.expert_all_to_all:.4g}" if st.expert_all_to_all else "")
            + ")"
        )
        lines.append(
            f"  assumes matmuls at {matmul_efficiency(arch, r.settings):.0%} of peak, DP / ZeRO traffic "
            "bucketed behind the backward (ZeRO-3 prefetch behind compute), TP / PP traffic and the "
            f"bubble exposed, {r.settings.inter_node_bandwidth / 1e9:.4g} GB/s per GPU between nodes "
            "(docs/planner.md)"
        )
    if result.alternatives:
        lines.append("next best:")
        reasons = result.alternative_reasons or ("",) * len(result.alternatives)
        for i, (alt, why) in enumerate(zip(result.alternatives, reasons, strict=True), 1):
            lines.append(
                f"  {i}. {alt.layout.describe()}: {gib(alt.memory.total)} per GPU, "
                f"{alt.step_time.total:.4g} s" + (f" — {why}" if why else "")
            )
    if result.rejected:
        lines.append(f"rejected ({result.layouts_considered} layout families considered):")
        for rej in result.rejected:
            line = f"  {rej.count:5d} x {rej.reason}"
            if rej.example is not None and rej.shortfall_bytes is not None:
                line += f" (closest: {rej.example.describe()}, short by {gib(rej.shortfall_bytes)})"
            lines.append(line)
    if result.diagnosis is not None:
        d = result.diagnosis
        lines.append("diagnosis:")
        lines.append(f"  {d.message}")
        if d.ways_out:
            lines.append("  ways out, cheapest first (GPU-seconds per million tokens):")
            for i, way in enumerate(d.ways_out, 1):
                lines.append(f"  {i}. [{way.cost_gpu_seconds_per_million_tokens:.1f}] {way.description}")
        else:
            lines.append("  no way out found within the search limits")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# --- presets ------------------------------------------------------------------------------------


def add_presets_command(subparsers: Any) -> None:
    p = subparsers.add_parser("presets", help="list model presets and the GPU catalog")
    p.set_defaults(handler=run_presets)


def run_presets(args: argparse.Namespace, out: TextIO) -> int:
    del args
    out.write("model presets:\n")
    for name, preset in PRESETS.items():
        a = preset.architecture
        moe = ""
        if a.moe:
            moe = (
                f"  MoE {a.experts}x{a.expert_ffn_hidden_size} top-{a.experts_per_token}, "
                f"{a.active_params / 1e9:.2f} B active"
            )
        out.write(
            f"  {name:16s} {a.total_params / 1e9:8.2f} B  L={a.layers:<4d} h={a.hidden_size:<6d} "
            f"heads={a.heads:<4d} kv={a.kv_heads:<4d} ffn={a.ffn_hidden_size:<6d} vocab={a.vocab_size:<7d} "
            f"{a.mlp}{' MLA' if a.mla else ''}{moe}\n"
        )
    out.write("GPUs:\n")
    for g in GPUS:
        out.write(
            f"  {g.name:15s} {g.memory_bytes / GIB:7.2f} GiB  {g.peak_flops / 1e12:6.1f} TFLOP/s  "
            f"{g.intra_node_bandwidth / 1e9:4.0f} GB/s {g.interconnect}; labels: {', '.join(g.labels)}\n"
        )
    return EXIT_OK


# --- operator -----------------------------------------------------------------------------------


def add_operator_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "operator",
        help="run the ParallelTrainingJob operator (kopf) against the current kubeconfig or in-cluster",
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    p.add_argument(
        "--metrics-port", type=_non_negative_int, default=8080, help="Prometheus /metrics port (0: off)"
    )
    p.add_argument("--metrics-address", default="0.0.0.0", help="address the metrics endpoint binds to")
    p.add_argument("--liveness-port", type=_non_negative_int, default=0, help="kopf /healthz port (0: off)")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, then in-cluster)"
    )
    p.add_argument("--workers", type=_positive_int, default=16, help="concurrent reconcile workers")
    p.add_argument(
        "--restart-backoff-seconds",
        type=float,
        default=10.0,
        help="first gang-restart / scheduling-retry backoff; doubles per failure, capped at 300 s",
    )
    p.add_argument(
        "--stats-max-bytes",
        type=_positive_int,
        default=DEFAULT_STATS_MAX_BYTES,
        metavar="BYTES",
        help="largest trainer stats page read per pod and scrape; a larger one is refused "
        f"(default {DEFAULT_STATS_MAX_BYTES})",
    )
    p.add_argument(
        "--progress-interval",
        type=_progress_interval,
        default=DEFAULT_PROGRESS_INTERVAL_SECONDS,
        metavar="SECONDS",
        help="least seconds between two status.progress writes of one job (1-3600, default "
        f"{DEFAULT_PROGRESS_INTERVAL_SECONDS:.0f})",
    )
    p.add_argument(
        "--topology-label",
        default="nvidia.com/gpu.clique",
        metavar="LABEL",
        help="node label naming each node's NVLink domain: a job's pods prefer one domain when "
        "nodes carry it (default nvidia.com/gpu.clique, GPU Feature Discovery's; empty disables)",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(handler=run_operator_command)


def run_operator_command(args: argparse.Namespace, out: TextIO) -> int:
    del out
    # Imported here so `shardwise plan` never loads kopf or a Kubernetes client.
    from shardwise.handlers.run import run_operator  # noqa: PLC0415

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handled watch event at INFO; our own reconcile log says what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    run_operator(
        namespaces=list(args.namespace),
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        kubeconfig=args.kubeconfig,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
        workers=args.workers,
        restart_backoff_seconds=args.restart_backoff_seconds,
        stats_max_bytes=args.stats_max_bytes,
        progress_interval=args.progress_interval,
        topology_label=args.topology_label,
    )
    return EXIT_OK


# Adding a subcommand = one `add_<name>_command(subparsers)` function appended here.
COMMANDS: list[Callable[[Any], None]] = [
    add_plan_command,
    add_presets_command,
    add_operator_command,
    add_status_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardwise", description="Plan and run large-model training layouts.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the `shardwise` console script; returns the exit code."""
    stream = out if out is not None else sys.stdout
    try:
        args = build_parser().parse_args(argv)
        handler: Callable[[argparse.Namespace, TextIO], int] = args.handler
        return handler(args, stream)
    except (CliError, PlanInputError) as exc:
        print(f"shardwise: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
