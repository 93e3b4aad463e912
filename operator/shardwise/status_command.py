"""`shardwise status JOB [-n NS] [--watch] [-o json]`: read a job (and the operator's metrics) and show it."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def add_status_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="one job's layout, progress, ETA, loss and per-rank figures",
        description="Reads the ParallelTrainingJob from the API server (status.progress, status.layout, "
        "status.latestCheckpoint) and, with --metrics-url, the operator's metrics endpoint for the "
        "per-rank table (step time, compute time, memory against plan, straggler score).",
    )
    p.add_argument("job", help="the ParallelTrainingJob's name")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig path (default: $KUBECONFIG, ~/.kube/config)"
    )
    p.add_argument(
        "--metrics-url",
        default=None,
        help="the operator's metrics endpoint, e.g. http://localhost:9090/metrics (skipped when unreachable)",
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="text (default) or json")
    p.add_argument("-w", "--watch", action="store_true", help="refresh until the job finishes (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.set_defaults(handler=run_status)


async def _metrics(url: str | None) -> str | None:
    if not url:
        return None
    import aiohttp  # noqa: PLC0415 - only this command reads the endpoint

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None  # the table is optional: the status alone still tells progress


async def _view(kube: Any, args: argparse.Namespace) -> dict[str, Any]:
    from shardwise.resources.names import API_VERSION, KIND  # noqa: PLC0415
    from shardwise.statusview import job_view  # noqa: PLC0415

    job = await kube.get(API_VERSION, KIND, args.namespace, args.job)
    return job_view(job, await _metrics(args.metrics_url))


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from shardwise.kube.client import Kube, KubeError  # noqa: PLC0415
    from shardwise.statusview import render  # noqa: PLC0415

    kube = await Kube.connect(args.kubeconfig)
    try:
        try:
            view = await _view(kube, args)
        except KubeError as exc:
            what = "not found" if exc.status == 404 else exc.message
            print(
                f"shardwise: error: ParallelTrainingJob {args.namespace}/{args.job}: {what}", file=sys.stderr
            )
            return EXIT_BAD_INPUT
        console = Console(file=out, width=None if out.isatty() else 120)
        if args.output == "json":
            # --watch: one JSON document per line and refresh (for scripts).
            out.write(json.dumps(view, indent=None if args.watch else 2, sort_keys=True) + "\n")
        elif not args.watch:
            console.print(render(view))
        if not args.watch:
            return EXIT_OK
        live = Live(render(view), console=console, transient=False) if args.output == "text" else None
        if live is not None:
            live.start()
        try:
            while view.get("phase") not in ("Succeeded", "Failed"):
                await asyncio.sleep(args.interval)
                try:
                    view = await _view(kube, args)
                except KubeError as exc:
                    print(f"shardwise: error: {exc.message}", file=sys.stderr)
                    return EXIT_BAD_INPUT
                if live is not None:
                    live.update(render(view))
                else:
                    out.write(json.dumps(view, sort_keys=True) + "\n")
        finally:
            if live is not None:
                live.stop()
        return EXIT_OK
    finally:
        await kube.close()


def run_status(args: argparse.Namespace, out: TextIO) -> int:
    try:
        return asyncio.run(_run(args, out))
    except KeyboardInterrupt:
        return EXIT_OK
