"""Crash safety under chaos: 20 jobs while the operator is SIGKILLed and restarted 30 times.

The operator runs as a real subprocess against the real control plane (KWOK GPU nodes, real
scheduler and garbage collector). While it is killed at random moments (seeded; gaps of
0.1–2 s, so kills land in the middle of reconcile passes, pod creation and restart decisions),
the test injects retryable pod failures (exit 137, as a kubelet reports an OOM kill) into some
jobs, some while the operator is up and some while it is down, and records them per job.

A failure is only injected into a job when it is counted-up-to-date (status.restarts equals the
failures injected so far) and its current attempt's pod is Running, so every injected failure
must turn into exactly one restart. Two more jobs are deleted mid-chaos: none of their children
may survive (a stale operator must not leave or recreate any). After the chaos the operator runs
undisturbed until every job is quiescent; then every job must have exactly its pods (one per
node rank of the current attempt, none duplicated, none lost, no pod of an old attempt left), no
ConfigMap / Service / Pod may be an orphan, and status.restarts must equal the failures injected
into that job.

The figures go to benchmarks/results/chaos.md (no assertion on timings).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.jobs import Kubectl, job_manifest, wait_for
from tests.operator_process import OperatorProcess, running_operator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"
RESULTS = REPO / "benchmarks" / "results" / "chaos.md"

SEED = int(os.environ.get("SHARDWISE_CHAOS_SEED", "20261122"))  # another seed: another chaos
JOBS = 20
KILLS = 30
GPUS_PER_JOB = 4
NODES = 12  # 8 GPUs each: 96 GPUs for 80 + 8 (the victims) requested, a little slack
VICTIMS = 2  # extra jobs deleted mid-chaos: their children must all be garbage-collected
DELETE_AT_KILL = 10
PRODUCT = "NVIDIA-CHAOS-80GB"  # a product no other test uses: the jobs land only on these nodes
TAINT_KEY = "shardwise.dev/chaos"  # and other tests' jobs never land on them
MAX_FAILURES_PER_JOB = 3
MAX_RESTARTS = 10  # the budget is never the limit here
SETTLE_TIMEOUT = 150.0

LABEL_JOB = "shardwise.dev/job-name"
LABEL_ATTEMPT = "shardwise.dev/attempt"
LABEL_RANK = "shardwise.dev/node-rank"


@dataclass
class Injection:
    job: str
    pod: str
    attempt: int
    operator_up: bool
    at: float


@dataclass
class Chaos:
    """What the chaos did, for the assertions and the report."""

    kills: int = 0
    kill_gaps: list[float] = field(default_factory=list)
    busy_kills: int = 0  # kills of a process that had logged reconcile work
    injections: list[Injection] = field(default_factory=list)
    failed_annotations: int = 0
    final_window: int = 0  # failures injected after the last kill
    seconds: float = 0.0

    def injected(self, job: str) -> int:
        return sum(1 for i in self.injections if i.job == job)


@pytest.fixture(scope="module")
def chaos_nodes(cluster: Any, kubectl: Kubectl) -> Iterator[list[str]]:
    names: list[str] = cluster.add_gpu_nodes(
        NODES, gpus_per_node=8, gpu_product=PRODUCT, gpu_memory_mib=81559, prefix="chaos"
    )
    kubectl("taint", "nodes", *names, f"{TAINT_KEY}=true:NoSchedule", "--overwrite")
    yield names
    kubectl("delete", "nodes", *names, "--wait=false")


@pytest.fixture(scope="module")
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"chaos-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def chaos_job(name: str, namespace: str) -> dict[str, Any]:
    job = job_manifest(
        name,
        namespace,
        resources={
            "nodes": 1,
            "gpusPerNode": GPUS_PER_JOB,
            "gpuProduct": PRODUCT,
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        },
        runPolicy={"maxRestarts": MAX_RESTARTS},
        # Checkpoints on, as a real job has them: storage mounted into every attempt's pods.
        checkpoint={"path": f"/checkpoints/{name}", "volume": {"name": "ckpt"}, "everySteps": 100, "keep": 2},
    )
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "ckpt", "emptyDir": {}}]
    return job


def snapshot(kubectl: Kubectl, namespace: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    jobs = {j["metadata"]["name"]: j for j in kubectl.json("get", "ptj", "-n", namespace)["items"]}
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", LABEL_JOB)["items"]
    return jobs, list(pods)


def eligible(
    jobs: dict[str, dict[str, Any]], pods: list[dict[str, Any]], chaos: Chaos, targets: dict[str, int]
) -> list[tuple[str, str, int]]:
    """(job, pod, attempt) that may take a failure now and must count it exactly once.

    The job's earlier failures are all counted (restarts == injected), no restart is pending,
    and its current attempt's pod is Running: the next failure can only become one restart.
    """
    by_job: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        by_job.setdefault(pod["metadata"]["labels"][LABEL_JOB], []).append(pod)
    out = []
    for name, job in sorted(jobs.items()):
        if name not in targets:
            continue  # a victim, deleted mid-chaos
        status = job.get("status") or {}
        done = chaos.injected(name)
        if done >= targets[name] or int(status.get("restarts") or 0) != done:
            continue
        if status.get("phase") != "Running" or status.get("nextAttemptTime"):
            continue
        attempt = int(status.get("attempt") or 0)
        if any(i.job == name and i.attempt == attempt for i in chaos.injections):
            continue
        mine = by_job.get(name, [])
        if len(mine) != 1:
            continue
        pod = mine[0]
        if (
            pod["metadata"]["labels"].get(LABEL_ATTEMPT) == str(attempt)
            and not pod["metadata"].get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") == "Running"
            and not (pod["metadata"].get("annotations") or {}).get("kwok.shardwise.dev/exit-code")
        ):
            out.append((name, pod["metadata"]["name"], attempt))
    return out


def inject(
    kubectl: Kubectl,
    namespace: str,
    rng: random.Random,
    chaos: Chaos,
    targets: dict[str, int],
    *,
    operator_up: bool,
    count: int,
) -> None:
    jobs, pods = snapshot(kubectl, namespace)
    candidates = eligible(jobs, pods, chaos, targets)
    for job, pod, attempt in rng.sample(candidates, min(count, len(candidates))):
        try:
            kubectl.exit_pod(namespace, pod, 137, "OOMKilled")
        except subprocess.CalledProcessError:
            chaos.failed_annotations += 1  # the pod went away in between: nothing was injected
            continue
        chaos.injections.append(Injection(job, pod, attempt, operator_up, time.monotonic()))


def reconcile_lines(log: Path) -> int:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if "ParallelTrainingJob " in line)


@dataclass
class Verdict:
    """What the final state looks like, job by job."""

    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    missing_children: list[str] = field(default_factory=list)
    restarts: dict[str, tuple[int, int]] = field(default_factory=dict)  # job: (expected, actual)
    not_running: list[str] = field(default_factory=list)
    #: Current pods without the job's checkpoint directory (env + the volume mounted at it).
    no_checkpoint: list[str] = field(default_factory=list)

    @property
    def counter_mismatches(self) -> dict[str, tuple[int, int]]:
        return {k: v for k, v in self.restarts.items() if v[0] != v[1]}


def judge(kubectl: Kubectl, namespace: str, chaos: Chaos) -> Verdict:
    verdict = Verdict()
    jobs, pods = snapshot(kubectl, namespace)
    uids = {j["metadata"]["uid"]: name for name, j in jobs.items()}

    def controller(obj: dict[str, Any]) -> str | None:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("controller"):
                return str(ref.get("uid"))
        return None

    children: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in ("configmap", "service"):
        for obj in kubectl.json("get", kind, "-n", namespace, "-l", LABEL_JOB)["items"]:
            children[(kind, obj["metadata"]["name"])] = obj
            owner = controller(obj)
            if owner not in uids or uids[owner] != obj["metadata"]["labels"][LABEL_JOB]:
                verdict.orphans.append(f"{kind}/{obj['metadata']['name']}")
    for pod in pods:
        owner = controller(pod)
        if owner not in uids or uids[owner] != pod["metadata"]["labels"][LABEL_JOB]:
            verdict.orphans.append(f"pods/{pod['metadata']['name']}")

    for name, job in sorted(jobs.items()):
        status = job.get("status") or {}
        attempt = str(status.get("attempt"))
        layout = status.get("layout") or {}
        expected = int(layout.get("nodes") or 0)
        mine = [p for p in pods if p["metadata"]["labels"].get(LABEL_JOB) == name]
        current = [p for p in mine if p["metadata"]["labels"].get(LABEL_ATTEMPT) == attempt]
        verdict.stale += [p["metadata"]["name"] for p in mine if p not in current]
        ranks = Counter(p["metadata"]["labels"].get(LABEL_RANK) for p in current)
        verdict.duplicates += [f"{name} rank {r} x{n}" for r, n in ranks.items() if n > 1]
        verdict.lost += [f"{name} rank {r}" for r in range(expected) if str(r) not in ranks]
        verdict.unexpected += [
            p["metadata"]["name"]
            for p in current
            if p["metadata"]["name"] != f"{name}-node-{p['metadata']['labels'].get(LABEL_RANK)}"
            or int(p["metadata"]["labels"].get(LABEL_RANK, -1)) not in range(expected)
        ]
        if status.get("phase") != "Running" or any(
            (p.get("status") or {}).get("phase") != "Running" or p["metadata"].get("deletionTimestamp")
            for p in current
        ):
            verdict.not_running.append(f"{name}: {status.get('phase')} {status.get('message', '')}")
        verdict.restarts[name] = (chaos.injected(name), int(status.get("restarts") or 0))
        for pod in current:
            [trainer] = pod["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in trainer.get("env") or []}
            directory = env.get("SHARDWISE_CHECKPOINT_DIR") or ""
            mounted = any(directory.startswith(m["mountPath"]) for m in trainer.get("volumeMounts") or [])
            if not directory.endswith(f"/checkpoints/{name}") or not mounted:
                verdict.no_checkpoint.append(pod["metadata"]["name"])
        uid = job["metadata"]["uid"]
        for kind, child in (("service", name), ("configmap", f"{name}-layout")):
            obj = children.get((kind, child))
            if obj is None or controller(obj) != uid:
                verdict.missing_children.append(f"{kind}/{child}")
    return verdict


def quiescent(kubectl: Kubectl, namespace: str, chaos: Chaos) -> Verdict | None:
    verdict = judge(kubectl, namespace, chaos)
    settled = not (
        verdict.not_running
        or verdict.stale
        or verdict.lost
        or verdict.duplicates
        or verdict.counter_mismatches
        or verdict.missing_children
        or verdict.orphans
        or verdict.no_checkpoint
    )
    return verdict if settled else None


def restarting_events(kubectl: Kubectl, namespace: str) -> Counter[str]:
    events = kubectl.json("get", "events", "-n", namespace, "--field-selector", "reason=Restarting")["items"]
    return Counter(e["involvedObject"]["name"] for e in events)


def status_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Jobs whose object changed between two reads, with the status fields that differ."""
    out = {}
    for name, old in before.items():
        new = after.get(name) or {}
        if old["metadata"].get("resourceVersion") != (new.get("metadata") or {}).get("resourceVersion"):
            a, b = old.get("status") or {}, new.get("status") or {}
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if "conditions" in fields:
                olds = {c["type"]: c for c in a.get("conditions") or []}
                news = {c["type"]: c for c in b.get("conditions") or []}
                fields.remove("conditions")
                if [c["type"] for c in a.get("conditions") or []] != [
                    c["type"] for c in b.get("conditions") or []
                ]:
                    fields.append("conditions order")
                fields += [
                    f"conditions[{t}].{k}"
                    for t in sorted(set(olds) | set(news))
                    for k in sorted(set(olds.get(t, {})) | set(news.get(t, {})))
                    if olds.get(t, {}).get(k) != news.get(t, {}).get(k)
                ]
            if not fields:
                fields = [
                    f"metadata.{k}"
                    for k in sorted(set(old["metadata"]) | set(new["metadata"]))
                    if k not in ("resourceVersion", "managedFields")
                    and old["metadata"].get(k) != new["metadata"].get(k)
                ]
                managers = {
                    (m.get("manager"), m.get("subresource", ""), m.get("operation"))
                    for m in new["metadata"].get("managedFields") or []
                    if m not in (old["metadata"].get("managedFields") or [])
                }
                fields += [f"managedFields {m}/{sub} {op}" for m, sub, op in sorted(managers, key=str)]
            out[name] = ", ".join(fields) or "resourceVersion only"
    return out


def write_results(
    chaos: Chaos, verdict: Verdict, events: Counter[str], *, settle: float, jobs: int, idle: dict[str, str]
) -> None:
    up = sum(1 for i in chaos.injections if i.operator_up)
    down = len(chaos.injections) - up
    lines = [
        "# Chaos: operator SIGKILLed and restarted while jobs run and fail",
        "",
        "`tests/integration/test_chaos.py` against the local control plane (real kube-apiserver,",
        "etcd, scheduler, garbage collector; KWOK GPU nodes), operator as a subprocess with",
        f"`--restart-backoff-seconds 1`, seed {SEED}, on a shared 2-core machine.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| jobs (1 node × {GPUS_PER_JOB} GPUs each) | {jobs} |",
        f"| extra jobs deleted mid-chaos (their children must be garbage-collected) | {VICTIMS} |",
        f"| operator kills (SIGKILL) and restarts | {chaos.kills} |",
        f"| kills of a process that had logged reconcile work | {chaos.busy_kills} |",
        f"| gaps before a kill (s, min / mean / max) | {min(chaos.kill_gaps):.2f} / "
        f"{sum(chaos.kill_gaps) / len(chaos.kill_gaps):.2f} / {max(chaos.kill_gaps):.2f} |",
        f"| retryable failures injected (exit 137) | {len(chaos.injections)} |",
        f"| … while the operator was up / down | {up} / {down} |",
        f"| … of which after the last kill (the final operator must catch up) | {chaos.final_window} |",
        f"| duplicate pods found | {len(verdict.duplicates)} |",
        f"| lost pods found | {len(verdict.lost)} |",
        f"| pods of an old attempt left | {len(verdict.stale)} |",
        f"| orphan ConfigMaps / Services / Pods | {len(verdict.orphans)} |",
        f"| current pods without the job's checkpoint directory mounted (checkpoints on) | "
        f"{len(verdict.no_checkpoint)} |",
        f"| jobs whose status.restarts differs from the failures injected | "
        f"{len(verdict.counter_mismatches)} |",
        f"| restart counters, sum expected / sum actual | {sum(e for e, _ in verdict.restarts.values())} / "
        f"{sum(a for _, a in verdict.restarts.values())} |",
        f"| `Restarting` Events posted (informational: an Event is posted after the status write, "
        f"so a kill in between loses it) | {sum(events.values())} |",
        f"| chaos phase (s) | {chaos.seconds:.0f} |",
        f"| settling after the last restart (s) | {settle:.0f} |",
        f"| jobs written to in 5 s while quiescent (informational) | {len(idle)} "
        f"({'; '.join(sorted(set(idle.values()))) or '-'}) |",
        "",
        "| job | failures injected | status.restarts | Restarting Events |",
        "|---|---|---|---|",
    ]
    for name, (expected, actual) in sorted(verdict.restarts.items()):
        lines.append(f"| {name} | {expected} | {actual} | {events.get(name, 0)} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def test_operator_killed_30_times_converges_to_exact_children_and_counters(
    cluster: Any,
    kubectl: Kubectl,
    chaos_nodes: list[str],
    namespace: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    names = [f"chaos-{i:02d}" for i in range(JOBS)]
    victims = [f"victim-{i}" for i in range(VICTIMS)]
    targets = {name: rng.randint(0, MAX_FAILURES_PER_JOB) for name in names}
    chaos = Chaos()
    logs: list[Path] = []

    def start(stack: contextlib.ExitStack) -> OperatorProcess:
        log = tmp_path / f"operator-{len(logs):02d}.log"
        logs.append(log)
        return stack.enter_context(
            running_operator(cluster.kubeconfig, log, "--restart-backoff-seconds", "1")
        )

    started = time.monotonic()
    for kill in range(KILLS):
        with contextlib.ExitStack() as stack:
            op = start(stack)
            if kill == 0:
                items = [chaos_job(name, namespace) for name in [*names, *victims]]
                kubectl(
                    "apply",
                    "-f",
                    "-",
                    stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}),
                )
            gap = rng.uniform(0.1, 2.0)
            deadline = time.monotonic() + gap
            if rng.random() < 0.5:
                inject(kubectl, namespace, rng, chaos, targets, operator_up=True, count=rng.randint(1, 2))
            if kill == DELETE_AT_KILL:
                kubectl("delete", "ptj", *victims, "-n", namespace, "--wait=false")
            time.sleep(max(0.0, deadline - time.monotonic()))
            chaos.kill_gaps.append(gap)
            op.process.kill()
            op.process.wait()
            chaos.kills += 1
            if reconcile_lines(logs[-1]):
                chaos.busy_kills += 1
        # Down: failures that happen now must still be counted exactly once after the restart.
        # The last window always gets some, so that the final operator has failures to catch up on.
        if kill == KILLS - 1:
            # Beyond the planned figures (which may all be spent by now): one more failure each.
            extra = {name: chaos.injected(name) + 1 for name in names}
            before = len(chaos.injections)
            inject(kubectl, namespace, rng, chaos, extra, operator_up=False, count=3)
            chaos.final_window = len(chaos.injections) - before
        elif rng.random() < 0.6:
            inject(kubectl, namespace, rng, chaos, targets, operator_up=False, count=rng.randint(1, 2))
        time.sleep(rng.uniform(0.0, 0.5))
    chaos.seconds = time.monotonic() - started

    with contextlib.ExitStack() as stack:
        op = start(stack)
        settle_started = time.monotonic()
        settle = SETTLE_TIMEOUT
        idle: dict[str, str] = {}
        verdict: Verdict | None = None
        try:
            wait_for(
                "every job quiescent with exact pods and counters",
                lambda: quiescent(kubectl, namespace, chaos),
                timeout=SETTLE_TIMEOUT,
                interval=2.0,
            )
            settle = time.monotonic() - settle_started
            # Still exact a little later: nothing is still being torn down or recreated. Also
            # note which jobs were written to meanwhile (an idle pass should write nothing).
            before, _ = snapshot(kubectl, namespace)
            time.sleep(5)
            verdict = judge(kubectl, namespace, chaos)
            after, _ = snapshot(kubectl, namespace)
            idle = status_changes(before, after)
            assert op.process.poll() is None, "the final operator died"
        finally:
            final = verdict or judge(kubectl, namespace, chaos)
            events = restarting_events(kubectl, namespace)
            write_results(chaos, final, events, settle=settle, jobs=len(names), idle=idle)
            if verdict is None:
                print(op.log()[-20000:])

    print(json.dumps({"injections": [i.__dict__ for i in chaos.injections]}, default=str)[:4000])
    assert verdict is not None
    assert chaos.kills == KILLS
    assert len(chaos.injections) >= JOBS // 2, "too few failures were injected to mean anything"
    assert any(not i.operator_up for i in chaos.injections), "no failure was injected while down"
    assert chaos.final_window, "no failure was left for the final operator to catch up on"
    assert verdict.duplicates == []
    assert verdict.lost == []
    assert verdict.stale == []
    assert verdict.unexpected == []
    assert verdict.orphans == []
    assert verdict.missing_children == []
    assert verdict.no_checkpoint == []
    assert verdict.not_running == []
    assert verdict.counter_mismatches == {}
