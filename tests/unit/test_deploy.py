"""docker-compose.yml, the Dockerfile and deploy/ checked against the code, without Docker.

No Docker engine runs here, so these files are read as data: every ``INFERLANE_*`` name must
be a setting and every service's environment must validate; every ``inferlane ...`` command
must exist in the CLI; ports, health checks and Prometheus targets must match the ports the
settings give each process; images must be pinned; the Grafana dashboard may only query
metrics the code exports.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from pipeline.cli import app
from pipeline.dev.demo import WORKER_LAYOUT
from pipeline.metrics import REGISTRY
from pipeline.settings import KNOWN_LANES, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
PROMETHEUS_PATH = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
PREFIX = "INFERLANE_"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
WORKERS = ("worker-realtime", "worker-history", "worker-batch")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_PATH.read_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE_PATH.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def _image_env() -> dict[str, str]:
    """``ENV`` of the image's final stage (compose's environment is applied over it)."""
    env: dict[str, str] = {}
    for instruction, args in _dockerfile_instructions():
        if instruction == "FROM":
            env = {}
        elif instruction == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(args)))
    return env


def _env(service: dict[str, Any]) -> dict[str, str]:
    """The environment a container of ``service`` runs with (image ENV + compose)."""
    env = _image_env() if service.get("image", "").startswith("inferlane:") else {}
    env.update({key: str(value) for key, value in (service.get("environment") or {}).items()})
    return env


def _settings(env: dict[str, str]) -> Settings:
    return load_settings(**{key[len(PREFIX):].lower(): value for key, value in env.items()
                            if key.startswith(PREFIX)})


def _inferlane_command(argv: list[str]) -> tuple[list[str], Any]:
    """Resolve ``inferlane <sub> ... <command> [options]`` in the typer app; the command path
    and the (typer-vendored click) command. Fails when a word names no command or an option is
    unknown."""
    assert argv[0] == "inferlane", argv
    command = typer.main.get_command(app)
    path: list[str] = []
    rest = argv[1:]
    while hasattr(command, "commands"):  # a group
        assert rest, f"{argv}: {' '.join(path) or 'inferlane'} needs a sub-command"
        sub = command.commands.get(rest[0])
        assert sub is not None, f"{argv}: no command {rest[0]!r} in {sorted(command.commands)}"
        path.append(rest.pop(0))
        command = sub
    command.make_context(" ".join(path), list(rest))  # parses (rejects unknown) options
    return path, command


def _inferlane_services() -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Services that run an ``inferlane`` command: name -> (command path, service)."""
    return {name: (_inferlane_command(service["command"])[0], service)
            for name, service in _services().items()
            if isinstance(service.get("command"), list) and service["command"][:1] == ["inferlane"]}


def _listen_port(path: list[str], settings: Settings) -> int:
    """The HTTP port a process running ``inferlane <path>`` listens on."""
    ports = {("worker",): settings.web_port, ("serve", "fraud-check"): settings.fraud_check_port,
             ("serve", "recommendations"): settings.reco_service_port}
    return ports[tuple(path)]


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    found = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test)
    assert found, test
    return f"{found.group(1)}{found.group(2)}"


def test_every_inferlane_name_in_compose_and_dockerfile_is_a_setting() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    for path in (COMPOSE_PATH, DOCKERFILE_PATH):
        # The raw text: anchors, merged blocks and comments included.
        names = set(re.findall(rf"{PREFIX}([A-Z0-9_]+)", path.read_text()))
        assert names, path
        assert names <= fields, {path.name: sorted(names - fields)}


def test_every_inferlane_service_environment_validates() -> None:
    services = _inferlane_services()
    assert {"topics-init", *WORKERS, "fraud-check", "recommendations"} <= set(services)
    for name, (_, service) in services.items():
        settings = _settings(_env(service))
        assert settings.kafka_bootstrap == "kafka:9092", name
        assert settings.s3_endpoint_url == "http://minio:9000", name
        assert settings.model_registry == "/app/models", name


def test_every_inferlane_command_exists() -> None:
    paths = {name: path for name, (path, _) in _inferlane_services().items()}
    assert paths["topics-init"] == ["topics", "create"]
    assert paths["fraud-check"] == ["serve", "fraud-check"]
    assert paths["recommendations"] == ["serve", "recommendations"]
    assert all(paths[name] == ["worker"] for name in WORKERS)


def test_unknown_commands_and_options_are_refused() -> None:
    with pytest.raises(AssertionError, match="no command 'publish'"):
        _inferlane_command(["inferlane", "topics", "publish"])
    with pytest.raises(Exception, match="No such option: --budget") as refused:
        _inferlane_command(["inferlane", "serve", "fraud-check", "--budget", "5"])
    assert type(refused.value).__name__ == "NoSuchOption"
    with pytest.raises(AssertionError, match="needs a sub-command"):
        _inferlane_command(["inferlane", "serve"])


def test_workers_split_the_lanes_and_scale() -> None:
    services = _services()
    lanes = {name: _settings(_env(services[name])).lanes for name in WORKERS}
    assert set(lanes["worker-realtime"]) == {"fraud", "reco"}
    assert lanes["worker-history"] == ("history",)
    assert lanes["worker-batch"] == ("archive", "batch")
    # The demo runs the same layout.
    assert [tuple(served.split(",")) for _, served in WORKER_LAYOUT] == [
        lanes[name] for name in WORKERS]
    assert sorted(lane for served in lanes.values() for lane in served) == sorted(KNOWN_LANES)
    for name in WORKERS:
        service = services[name]
        # Replicas need distinct static member ids (the hostname default) and no host port.
        assert f"{PREFIX}WORKER_ID" not in _env(service), name
        assert not {"hostname", "container_name", "ports"} & set(service), name


def test_ports_and_health_checks_match_the_settings() -> None:
    for name, (path, service) in _inferlane_services().items():
        if name == "topics-init":
            assert service["healthcheck"] == {"disable": True}
            continue
        settings = _settings(_env(service))
        port = _listen_port(path, settings)
        if path == ["worker"]:
            assert [str(p) for p in service["expose"]] == [str(port)], name
            # /health: 503 while a lane restarts (docs/operations.md)
            assert _healthcheck_url(service) == f"{port}/health", name
        else:
            assert settings.service_host == "0.0.0.0", name  # noqa: S104 - in a container
            assert service["ports"] == [f"{port}:{port}"], name
            assert _healthcheck_url(service) == f"{port}/readyz", name


def test_depends_on_names_services_with_valid_conditions() -> None:
    services = _services()
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, (name, target)
            condition = spec["condition"]
            assert condition in CONDITIONS, (name, target, condition)
            check = services[target].get("healthcheck")
            if condition == "service_healthy":
                assert check and not check.get("disable"), (name, target)
            if condition == "service_completed_successfully":
                assert "restart" not in services[target], (name, target)  # a one-shot
    for name, (path, service) in _inferlane_services().items():
        if path != ["topics", "create"]:
            assert service["depends_on"]["topics-init"] == {
                "condition": "service_completed_successfully"}, name
    assert services["topics-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_images_are_pinned_and_the_project_image_is_built() -> None:
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found
    version = found.group(1)
    services = _services()
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag != "latest" and re.search(r"\d", tag), (name, image)
        if repository == "inferlane":
            assert tag == version, (name, image)
    assert [name for name, s in services.items() if "build" in s] == ["topics-init"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper


def test_prometheus_scrapes_every_inferlane_process() -> None:
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {(host, int(sd["port"])) for host in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        assert job.get("metrics_path", "/metrics") == "/metrics"
    for name, (path, service) in _inferlane_services().items():
        if name != "topics-init":
            assert (name, _listen_port(path, _settings(_env(service)))) in targets, name
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in _services()[
        "prometheus"]["volumes"]


def _exported_metric_names() -> set[str]:
    from pipeline.services.fraudcheck import FraudCheckService
    from pipeline.services.recommendations import RecommendationService

    settings = load_settings(kafka_bootstrap="127.0.0.1:9")
    registries = [REGISTRY, FraudCheckService(settings).registry,
                  RecommendationService(settings).registry]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "info": ("_info",)}
    return {family.name + suffix for registry in registries for family in registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    exported = _exported_metric_names()
    assert "inferlane_fraud_check_answers_total" in exported
    dashboard = json.loads((GRAFANA / "dashboards" / "inferlane.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\binferlane_[a-z0-9_]+", expr)}
    assert used and used <= exported, sorted(used - exported)
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert _services()["prometheus"]["ports"] == ["9090:9090"]
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {datasource["uid"]}


def test_dockerfile_builds_a_pinned_non_root_image_with_models() -> None:
    steps = _dockerfile_instructions()
    for instruction, args in steps:
        if instruction == "FROM":
            assert re.match(r"python:3\.11\.\d+-slim", args), args
    final = steps[max(i for i, (ins, _) in enumerate(steps) if ins == "FROM"):]
    kinds = [ins for ins, _ in final]
    users = [args for ins, args in final if ins == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert kinds.index("USER") < kinds.index("CMD")
    assert ("COPY", "models /app/models") in final
    installs = [args for ins, args in steps if ins == "RUN" and "pip install" in args]
    assert installs and not any("[" in args or " -e " in args for args in installs)
    path, _ = _inferlane_command(json.loads(dict(final)["CMD"]))
    assert path == ["worker"]
    settings = _settings(_image_env())
    assert f"EXPOSE {settings.web_port}" in [f"{ins} {args}" for ins, args in final]
    assert (ROOT / settings.model_registry.removeprefix("/app/")).joinpath(
        "fraud", "card.json").is_file()


def test_dockerignore_keeps_local_state_out_and_the_package_in() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".inferlane", "bench-results"} <= ignored
    copied = {source for ins, args in _dockerfile_instructions()
              if ins == "COPY" and not args.startswith("--from") for source in args.split()[:-1]}
    assert copied and not copied & ignored, copied & ignored
