"""The ``inferlane`` command line (typer): stack, topics, acls, models, schemas, settings, worker,
demo, serve, bench.

Every command reads settings from the environment (``INFERLANE_*``) unless an option says
otherwise, and exits non-zero with a one-line reason on a known error (no traceback).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pipeline.bench.cli import bench_app
from pipeline.errors import InferlaneError
from pipeline.services.cli import serve_app
from pipeline.settings import load_settings

if TYPE_CHECKING:
    from pipeline.kafka.acls import Grant

__all__ = ["app", "main"]

app = typer.Typer(help="inferlane: serve INT8 ONNX models on Kafka streams.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
stack_app = typer.Typer(help="The embedded local stack (broker + S3) for demos and tests.",
                        no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)
models_app = typer.Typer(help="Model artifacts (train, export, quantize).", no_args_is_help=True)
schemas_app = typer.Typer(help="Event schemas.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(models_app, name="models")
app.add_typer(schemas_app, name="schemas")
app.add_typer(bench_app, name="bench")
batch_app = typer.Typer(help="Bulk scoring jobs over S3 objects.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(serve_app, name="serve")

console = Console()
# Messages for people go to stderr where stdout is meant for a shell (`eval "$(... stack up)"`).
err_console = Console(stderr=True)
_DEFAULT_STACK_DIR = Path(".inferlane") / "stack"

StackDir = Annotated[Path, typer.Option("--dir", help="Where the stack keeps data, logs, state.")]


@stack_app.command("up")
def stack_up(
    root: StackDir = _DEFAULT_STACK_DIR,
    kafka_port: Annotated[int, typer.Option(
        help="Port of the first Kafka node (0 = free ones); node N listens on port+N-1.")] = 0,
    s3_port: Annotated[int, typer.Option(help="S3 server port (0 = a free one).")] = 0,
    fresh: Annotated[bool, typer.Option(help="Wipe the brokers' data first.")] = False,
    brokers: Annotated[int, typer.Option(
        min=1, max=5, help="Kafka nodes (KRaft, broker+controller each); 3 = replicated.")] = 1,
    jit: Annotated[str | None, typer.Option(
        help="Broker JIT: quick (C1, fast first seconds) or peak (C1+C2, for long runs); "
             "default INFERLANE_STACK_KAFKA_JIT or quick.")] = None,
    warm_up: Annotated[bool, typer.Option(
        help="Send a burst of real requests before returning, so the first events meet a "
             "warm broker.")] = True,
    secure: Annotated[bool, typer.Option(
        help="TLS listener with SCRAM users and the standard authorizer (ACLs); the exports "
             "are the stack admin's, for `inferlane topics create` and `stack user`.")] = False,
) -> None:
    """Start Apache Kafka (KRaft) and the S3 server in the background; print the environment.

    The broker's jars come from `make install` (Maven, cached in ~/.cache/inferlane); Java 17+
    runs them. Logs: <root>/logs; data: <root>/kafka; a secure stack's CA: <root>/tls/ca.pem.
    """
    from pipeline.dev.kafkanode import JIT_MODES
    from pipeline.dev.stack import LocalStack

    if jit is not None and jit not in JIT_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(sorted(JIT_MODES))}",
                                 param_hint="--jit")
    if (existing := LocalStack.attach(root)) is not None:
        raise InferlaneError(f"a stack already runs from {root}: `inferlane stack down` first")
    stack = LocalStack(root, kafka_port=kafka_port, s3_port=s3_port, fresh=fresh,
                       brokers=brokers, jit=jit, warm_up=warm_up, secure=secure)
    stack.start()
    del existing
    err_console.print(f"[green]stack up[/] (state in {root / 'stack.json'}); exports on stdout, "
                      f'so `eval "$(inferlane stack up)"` sets them:')
    if secure:
        err_console.print(f"secure: applications connect to {stack.tls_bootstrap} (SASL_SSL) "
                          "as users of `inferlane stack user NAME --role ROLE`; these exports "
                          "are the stack admin's")
    _print_exports(stack.operator_env())


def _print_exports(env: dict[str, str]) -> None:
    for key, value in env.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@stack_app.command("user")
def stack_user(
    name: Annotated[str, typer.Argument(help="The SCRAM user to create (or reset).")],
    role: Annotated[str, typer.Option(
        help="Its ACL set (`inferlane acls`): worker, services, producer or batch-client")],
    lanes: Annotated[str, typer.Option(
        help="A worker's lanes, comma-separated (default: INFERLANE_LANES)")] = "",
    root: StackDir = _DEFAULT_STACK_DIR,
) -> None:
    """On a secure stack: create SCRAM-SHA-512 user NAME with a new password and the ACLs of
    ROLE for the current INFERLANE_* settings; print the exports that connect as it."""
    from pipeline.dev.stack import LocalStack
    from pipeline.kafka.acls import acl_arguments

    stack = LocalStack.attach(root)
    if stack is None or stack.secured is None:
        raise InferlaneError(f"no secure stack runs from {root}: `inferlane stack up --secure`")
    grants = _role_grants(role, lanes)
    env = stack.add_user(name, acl_arguments(f"User:{name}", grants))
    err_console.print(f"[green]user {name}[/]: SCRAM-SHA-512, {len(grants)} ACLs of role {role}")
    _print_exports(env)


@stack_app.command("down")
def stack_down(root: StackDir = _DEFAULT_STACK_DIR) -> None:
    """Stop the processes that `stack up` started (and only those)."""
    from pipeline.dev.stack import LocalStack

    stack = LocalStack.attach(root)
    if stack is None:
        console.print(f"no stack runs from {root}")
        return
    stack.stop()
    console.print("[green]stack down[/]")


@stack_app.command("status")
def stack_status(root: StackDir = _DEFAULT_STACK_DIR) -> None:
    """Show whether the Kafka node(s) and S3 server run and answer; exit 1 if not."""
    from pipeline.dev.stack import LocalStack

    stack = LocalStack.attach(root)
    if stack is None:
        console.print(f"no stack runs from {root}")
        raise typer.Exit(1)
    status = stack.status()
    typer.echo(json.dumps(status, indent=2))
    kafka, s3 = status["kafka"], status["s3"]
    assert isinstance(kafka, dict) and isinstance(s3, dict)  # noqa: S101 - shape of status()
    healthy = (not kafka["error"] and all(n["alive"] for n in kafka["nodes"].values())
               and kafka["under_replicated"] == [] and s3["alive"] and not s3["error"])
    raise typer.Exit(0 if healthy else 1)


_NODE_ACTIONS = ("stop", "kill", "start")


@stack_app.command("node")
def stack_node(
    action: Annotated[str, typer.Argument(
        help="stop (SIGTERM: controlled shutdown), kill (SIGKILL: a crash) or start (again, on "
             "its data and ports; waits until the cluster answers).")],
    node_id: Annotated[int, typer.Argument(help="Node id, 1..N (see `stack status`).")],
    root: StackDir = _DEFAULT_STACK_DIR,
) -> None:
    """Stop, kill or start one Kafka node of a running stack, e.g. to try failover."""
    from pipeline.dev.stack import LocalStack

    if action not in _NODE_ACTIONS:
        raise typer.BadParameter(f"choose one of {', '.join(_NODE_ACTIONS)}", param_hint="ACTION")
    stack = LocalStack.attach(root)
    if stack is None:
        raise InferlaneError(f"no stack runs from {root}: `inferlane stack up` first")
    {"stop": stack.stop_broker, "kill": stack.kill_broker, "start": stack.start_broker}[action](
        node_id)
    console.print(f"node {node_id}: {action} done; controller leader: "
                  f"{stack.controller_leader()}")


@topics_app.command("create")
def topics_create() -> None:
    """Create every missing topic (partitions and configs from pipeline/kafka/topics.py)."""
    from pipeline.kafka.topics import ensure_topics

    settings = load_settings()
    created = asyncio.run(ensure_topics(settings))
    console.print(f"created {created}" if created else "all topics exist")


@topics_app.command("list")
def topics_list() -> None:
    """Print the declared topics with the current prefix and partition counts."""
    from pipeline.kafka.topics import TOPICS

    settings = load_settings()
    for spec in TOPICS:
        partitions = spec.partitions or settings.realtime_partitions
        typer.echo(f"{settings.topic(spec.name)}\tpartitions={partitions}\tlane={spec.lane}")


@app.command("acls")
def acls(
    role: Annotated[str, typer.Argument(
        help="worker, services, producer or batch-client")],
    principal: Annotated[str, typer.Option(
        help="The Kafka principal of the process, e.g. User:inferlane-worker")],
    lanes: Annotated[str, typer.Option(
        help="A worker's lanes, comma-separated (default: INFERLANE_LANES)")] = "",
    bootstrap: Annotated[str, typer.Option(
        help="--bootstrap-server of the printed commands")] = "$BOOTSTRAP",
    command_config: Annotated[str, typer.Option(
        help="--command-config of the printed commands: an admin's client properties")
    ] = "admin.properties",
) -> None:
    """Print the least-privilege ACLs of one process as kafka-acls.sh commands (topic names,
    groups and transactional ids from the current INFERLANE_* settings; docs/security.md)."""
    from pipeline.kafka.acls import kafka_acls_commands

    typer.echo(kafka_acls_commands(principal, _role_grants(role, lanes), bootstrap=bootstrap,
                                   command_config=command_config))


def _role_grants(role: str, lanes: str) -> list[Grant]:
    """The ACL grants of ``role`` for the current settings (a worker's ``lanes`` if given)."""
    from pipeline.kafka.acls import ROLES, role_grants

    if role not in ROLES:
        raise InferlaneError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if lanes and role != "worker":
        raise InferlaneError("--lanes is for the worker role only")
    return role_grants(role, load_settings(**({"lanes": lanes} if lanes else {})))


@models_app.command("build")
def models_build(
    model: Annotated[str, typer.Option(
        help="fraud, fraud-v2, reco, or all (every committed model folder).")] = "all",
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default models/<model>; only with a single model).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of data and training (default: the committed model's).")] = None,
) -> None:
    """Generate data, train, export FP32 + INT8 ONNX, measure, write card.json and CARD.md."""
    from pipeline.training.build import BUILDS, build_models

    names = list(BUILDS) if model == "all" else [model]
    unknown = [n for n in names if n not in BUILDS]
    if unknown:
        raise InferlaneError(f"unknown model {unknown[0]!r}: one of {', '.join(BUILDS)} or all")
    if out is not None and len(names) > 1:
        raise InferlaneError("--out needs a single --model")
    build_models(names, console, out=out, seed=seed)


@models_app.command("list")
def models_list(
    registry: Annotated[str | None, typer.Option(
        help="Registry folder or s3://bucket/prefix (default INFERLANE_MODEL_REGISTRY).")] = None,
) -> None:
    """Every model version in the registry, and which one ``latest`` selects."""
    from pipeline.inference.registry import ModelRegistry, RegistryEntry, version_key

    settings = load_settings()
    entries = asyncio.run(ModelRegistry(settings, registry).entries())
    latest: dict[str, RegistryEntry] = {}
    for entry in entries:
        if entry.name not in latest or version_key(entry.version) > version_key(
                latest[entry.name].version):
            latest[entry.name] = entry
    for entry in sorted(entries, key=lambda e: (e.name, version_key(e.version))):
        mark = "latest" if latest[entry.name] == entry else ""
        typer.echo(f"{entry.name}\t{entry.version}\t{mark}\t{entry.location}")


@models_app.command("publish")
def models_publish(
    source: Annotated[Path, typer.Argument(help="Model folder (card.json + its files).")],
    registry: Annotated[str | None, typer.Option(
        help="Registry folder or s3://bucket/prefix (default INFERLANE_MODEL_REGISTRY).")] = None,
    folder: Annotated[str | None, typer.Option(
        help="Folder name in the registry (default <name>-<version>).")] = None,
    version: Annotated[str | None, typer.Option(
        help="Publish under this version instead of the card's (e.g. v3).")] = None,
) -> None:
    """Check a model folder's sha256s and copy it into the registry, card last: running
    workers that follow ``latest`` pick it up, verify it, warm it and swap it in."""
    from pipeline.inference.registry import publish

    where = asyncio.run(publish(load_settings(), source, registry, folder, version))
    console.print(f"[green]published[/] {source} -> {where}")


@schemas_app.command("export")
def schemas_export(
    out: Annotated[Path, typer.Argument(help="Folder for <Shape>.schema.json files.")] = Path(
        "schemas/json"),
) -> None:
    """Write the JSON Schema of every event shape."""
    from schemas import export_json_schemas

    for path in export_json_schemas(out):
        typer.echo(str(path))


@batch_app.command("submit")
def batch_submit(
    job_id: Annotated[str, typer.Option(help="Job id (also the output folder name).")],
    input_uri: Annotated[str, typer.Option("--input", help="s3://bucket/key or prefix/.")],
    output_uri: Annotated[str | None, typer.Option(
        "--output", help="s3://bucket/prefix/ (default s3://<bucket>/batch/<job-id>/).")] = None,
    model: Annotated[str, typer.Option(help="Model to score with.")] = "fraud",
    wait: Annotated[bool, typer.Option(help="Follow batch.results until the job ends.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 3600,
) -> None:
    """Submit a job to batch.jobs (and by default follow it to its end)."""
    import msgspec

    from pipeline.clients.batchclient import submit_job, wait_for_job
    from pipeline.dev.loadgen import snapshot_end_offsets
    from schemas import BatchJob

    settings = load_settings()
    try:
        job = msgspec.convert({"job_id": job_id, "model": model, "input_uri": input_uri,
                               "output_uri": output_uri}, BatchJob)
    except msgspec.ValidationError as exc:
        raise InferlaneError(f"invalid job: {exc}") from exc

    async def run() -> dict[str, object] | None:
        start = await snapshot_end_offsets(settings, settings.topic("batch.results"))
        await submit_job(settings, job)
        if not wait:
            return None
        return await wait_for_job(settings, job.job_id, start, timeout_s=timeout,
                                  on_event=lambda e: typer.echo(json.dumps(e)))

    final = asyncio.run(run())
    if final is not None and final.get("status") != "completed":
        raise typer.Exit(1)


@app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked)."""
    settings = load_settings()
    typer.echo(settings.model_dump_json(indent=2))


@app.command("worker", context_settings={"allow_extra_args": True,
                                         "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run `faust -A agents worker -l info` (extra arguments are passed to faust)."""
    load_settings()  # fail fast with a clear message on bad settings
    argv = [sys.executable, "-m", "faust", "-A", "agents", "worker", "-l", "info", *ctx.args]
    os.execv(sys.executable, argv)  # noqa: S606 - replaces this process by the worker


@app.command("demo")
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of traffic.", envvar="DURATION")] = 30,
    rate: Annotated[float, typer.Option(help="Events per second.", envvar="RATE")] = 500,
    invalid: Annotated[float, typer.Option(help="Fraction of invalid events.")] = 0.03,
    reco_rate: Annotated[float | None, typer.Option(
        help="Recommendation requests per second (default: a fifth of --rate; 0 = none).")
    ] = None,
    root: Annotated[Path, typer.Option("--dir", help="Working folder (wiped).")] = Path(
        ".inferlane/demo"),
) -> None:
    """Run the fraud and reco lanes end to end on the local stack and print a summary."""
    from pipeline.dev.demo import render_summary, run_demo

    # SIGTERM unwinds like Ctrl-C, so the demo always stops the stack and worker it started.
    signal.signal(signal.SIGTERM, _interrupt)
    summary = run_demo(root, duration_s=duration, rate_per_s=rate, invalid_fraction=invalid,
                       console=console,
                       reco_rate_per_s=rate / 5 if reco_rate is None else reco_rate)
    console.print(render_summary(summary, duration, rate, load_settings().fraud_budget_ms))
    if not summary.ok:
        console.print("[red]demo FAILED: not every event is accounted for[/]")
        raise typer.Exit(1)
    console.print("[green]demo OK[/]: every event and request was answered or dead-lettered, "
                  "and archived")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """Entry point: run the CLI, turning known errors into a one-line message and exit 2."""
    try:
        app()
    except InferlaneError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
