"""The deployment files under deploy/: they parse, pin every image, keep credentials out, and use only the
commands, options, queues and settings that READAR really has."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "dockerignore.example"
README = DEPLOY / "README.md"
K8S = DEPLOY / "k8s"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"

# The settings the deployment relies on (the team's contract); each must be a field of storage.settings.
CONTRACT_SETTINGS = frozenset({
    "READAR_BROKER_URL", "READAR_DATABASE_URL", "READAR_OBJECT_STORE_URL", "READAR_S3_ENDPOINT_URL",
    "READAR_S3_KEY", "READAR_S3_SECRET", "READAR_CHECKPOINT", "READAR_CLIP", "READAR_DEVICE",
    "READAR_BATCH_SIZE", "READAR_LEASE_SECONDS", "READAR_MAX_ATTEMPTS", "READAR_SOFT_TIME_LIMIT",
    "READAR_HARD_TIME_LIMIT", "READAR_VISIBILITY_TIMEOUT", "READAR_METRICS_PORT", "READAR_HEARTBEAT_FILE",
    "READAR_TASK_EVENTS",
    "READAR_WORK_DIR", "READAR_PATH_MAP", "READAR_SETUP_RETRY_SECONDS", "READAR_METRICS_HOST",
    "READAR_MAX_IMAGE_PIXELS",
})
SECRET_SETTINGS = frozenset({"READAR_BROKER_URL", "READAR_DATABASE_URL", "READAR_S3_KEY", "READAR_S3_SECRET"})
# The sub-commands (and their options) the deployment and the guide use.
CONTRACT_COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("--mvtec-root", "--detector", "--checkpoint", "--clip", "--device", "--batch-size", "--run-name"),
    "worker": ("--gpus", "--device", "--batch-size", "--queues", "--path-map"),
    "submit": ("--mvtec-root", "--classes", "--detector", "--checkpoint", "--clip", "--run-name"),
    "status": ("--watch",),
    "resume": (),
    "cancel": (),
    "aggregate": ("--category",),
    "reconcile": (),
    "healthcheck": ("--max-idle",),
    "runs": (),
    "results": (),
}
QUEUES = frozenset({"readar.images", "readar.aggregate"})
PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/\s:@]*:([^@\s/]+)@")
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}$")
READAR_VARIABLE = re.compile(r"\bREADAR_[A-Z0-9_]+\b")


# --- loading --------------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def k8s_documents(include_template: bool = True) -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in k8s_files():
        if path == KUSTOMIZATION or (path == SECRET_TEMPLATE and not include_template):
            continue
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name} in deploy/k8s, found {len(matches)}"
    return matches[0]


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Deployment, StatefulSet, DaemonSet, Job or CronJob (None for other kinds)."""
    kind = document["kind"]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return document["spec"]["template"]["spec"]
    if kind == "CronJob":
        return document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def k8s_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for filename, document in k8s_documents():
        spec = pod_spec(document)
        if spec is not None:
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{filename}:{container['name']}", container


def env_example() -> dict[str, str]:
    values = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f".env.example line {number} is not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk_strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def image_is_pinned(image: str) -> bool:
    """True for name:tag (tag not `latest`, not interpolated) or name@sha256:digest."""
    if "@sha256:" in image:
        return True
    last_part = image.rsplit("/", 1)[-1]
    name, separator, tag = last_part.partition(":")
    return bool(name) and bool(separator) and bool(tag) and tag != "latest" and "$" not in tag


def duration_seconds(value: str | int) -> float:
    """Compose durations such as `16m`, `960s`, `1h30m` (an integer means seconds)."""
    if isinstance(value, int):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unreadable duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def option_value(argv: list[str], option: str) -> str:
    for index, item in enumerate(argv):
        if item == option:
            return argv[index + 1]
        if item.startswith(option + "="):
            return item.split("=", 1)[1]
    raise AssertionError(f"{option} missing from {argv}")


# --- every `readar` invocation in the deployment files and the guide -------------------------------------


def _readar_in_script(script: str) -> list[list[str]]:
    """`readar <sub-command> ...` inside a shell script or a guide's code line."""
    found = []
    # `readar` in command position: line start, after ; && || | ( `do` or `--` (kubectl exec ... -- readar).
    for match in re.finditer(r"(?:^|[;&|(]\s*|\bdo\s+|\s--\s+)readar\s+(?=[a-z-])", script):
        rest = script[match.end():]
        rest = re.split(r"[;&|)\n]", rest, maxsplit=1)[0]
        found.append(shlex.split(rest, comments=True))
    return found


def _readar_argv(entrypoint: list[str] | None, command: list[str] | None) -> list[list[str]]:
    """Sub-command argvs run by a container, given its entrypoint (None = the image's `readar`)."""
    command = command or []
    if entrypoint is None or entrypoint == ["readar"]:
        return [command] if command else []
    if entrypoint[0] in {"/bin/sh", "sh", "/bin/bash", "bash"}:
        return [argv for script in command for argv in _readar_in_script(script)]
    return []


def _as_list(value: str | list[str] | None) -> list[str] | None:
    return shlex.split(value) if isinstance(value, str) else value


def readar_invocations() -> list[tuple[str, list[str]]]:
    invocations: list[tuple[str, list[str]]] = []
    compose = load_compose()
    for name, service in compose["services"].items():
        if service.get("image", "").split(":")[0] == "readar":
            for argv in _readar_argv(_as_list(service.get("entrypoint")), _as_list(service.get("command"))):
                invocations.append((f"compose {name}", argv))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "readar"]:
            invocations.append((f"compose {name} healthcheck", test[2:]))
    for where, container in k8s_containers():
        if container["image"].split(":")[0] == "readar":
            for argv in _readar_argv(container.get("command"), container.get("args")):
                invocations.append((where, argv))
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            if command[:1] == ["readar"]:
                invocations.append((f"{where} {probe}", command[1:]))
    for keyword, arguments in dockerfile_instructions():
        if keyword == "CMD":
            invocations.append(("Dockerfile CMD", json.loads(arguments)))
    in_block = False
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        for argv in _readar_in_script(line):
            invocations.append(("README", argv))
        scheduler = re.search(r"compose run --rm scheduler\s+(.*)", line)
        if scheduler:
            invocations.append(("README compose run", shlex.split(scheduler.group(1), comments=True)))
    return invocations


@pytest.fixture(scope="module")
def cli_commands() -> dict[str, click.Command]:
    from scheduler.cli import cli

    return dict(cli.commands)


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            names.update(parameter.opts)
            names.update(parameter.secondary_opts)
    return names


def positional_arguments(command: click.Command, tokens: list[str]) -> list[str]:
    """The tokens that are not options or option values."""
    flags = {name for p in command.params if isinstance(p, click.Option) and p.is_flag
             for name in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    positionals, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token.startswith("-"):
            skip = "=" not in token and token not in flags
        else:
            positionals.append(token)
    return positionals


# --- tests: the helpers themselves ----------------------------------------------------------------------


@pytest.mark.parametrize(("image", "pinned"), [
    ("redis", False), ("redis:latest", False), ("localhost:5000/readar", False), ("readar:${TAG}", False),
    ("redis:7.4.2-alpine", True), ("localhost:5000/readar:0.1.0", True), ("readar@sha256:" + "0" * 64, True),
])
def test_image_pin_rule(image: str, pinned: bool) -> None:
    assert image_is_pinned(image) is pinned


def test_invocation_scanner_finds_commands_in_scripts() -> None:
    script = "while true; do readar reconcile || echo failed; sleep 300; done"
    assert _readar_in_script(script) == [["reconcile"]]
    assert _readar_in_script("image readar:0.1.0 and queue readar.images") == []
    assert _readar_in_script("kubectl -n readar apply -k deploy/k8s") == []
    assert _readar_in_script("kubectl exec deploy/x -- readar status r1") == [["status", "r1"]]
    assert duration_seconds("16m") == 960 and duration_seconds("1h2s") == 3602


# --- tests: parsing and pinning -------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    assert isinstance(load_compose()["services"], dict)
    assert k8s_files(), "deploy/k8s holds no manifests"
    for path in k8s_files():
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, f"{path.name} is empty"
        for document in documents:
            assert isinstance(document, dict) and document.get("kind"), f"{path.name}: a document without kind"


def test_k8s_manifests_are_namespace_agnostic_and_named() -> None:
    for filename, document in k8s_documents():
        assert document.get("apiVersion"), f"{filename}: no apiVersion"
        assert document["metadata"].get("name"), f"{filename}: a {document['kind']} without a name"
        assert "namespace" not in document["metadata"], f"{filename}: hard-coded namespace"


def test_every_image_is_pinned() -> None:
    images = [(f"compose {name}", service["image"]) for name, service in load_compose()["services"].items()
              if "image" in service]
    images += [(where, container["image"]) for where, container in k8s_containers()]
    images += [("Dockerfile FROM", arguments.split()[0]) for keyword, arguments in dockerfile_instructions()
               if keyword == "FROM"]
    assert len(images) >= 8
    unpinned = [(where, image) for where, image in images if not image_is_pinned(image)]
    assert not unpinned, f"images without a pinned tag: {unpinned}"


def test_every_compose_service_has_an_image() -> None:
    missing = [name for name, service in load_compose()["services"].items() if "image" not in service]
    assert not missing, f"services built without a pinned image name: {missing}"


# --- tests: compose -------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["redis", "postgres", "seaweedfs"])
def test_compose_data_services_publish_no_ports(service: str) -> None:
    definition = load_compose()["services"][service]
    assert not definition.get("ports"), f"{service} publishes ports to the host"
    assert definition.get("network_mode") != "host"


def test_compose_published_ports_bind_to_localhost() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond 127.0.0.1"
    assert services["flower"].get("ports"), "flower should be reachable on 127.0.0.1:5555"


def test_compose_redis_persists_and_never_evicts() -> None:
    command = load_compose()["services"]["redis"]["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert option_value(command, "--appendonly") == "yes"
    assert option_value(command, "--maxmemory-policy") == "noeviction"
    assert INTERPOLATION.match(option_value(command, "--requirepass")), "redis password must come from .env"


def test_compose_worker_reserves_nvidia_gpus() -> None:
    worker = load_compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and
               ("count" in d or "device_ids" in d) for d in devices), devices


def test_compose_readar_services_read_the_env_file() -> None:
    for name, service in load_compose()["services"].items():
        if service.get("image", "").startswith("readar:"):
            env_files = service.get("env_file")
            env_files = [env_files] if isinstance(env_files, str) else env_files
            assert env_files and ".env" in env_files, f"{name} does not read .env"


def test_compose_worker_outlives_the_hard_time_limit() -> None:
    hard_limit = int(env_example()["READAR_HARD_TIME_LIMIT"])
    services = load_compose()["services"]
    for name in ("worker", "aggregator"):
        assert duration_seconds(services[name]["stop_grace_period"]) > hard_limit, name
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "readar", "healthcheck"], test
        assert float(option_value(test, "--max-idle")) > hard_limit


def test_queues_are_known_and_both_consumed() -> None:
    consumed = set()
    for where, argv in readar_invocations():
        if argv[:1] == ["worker"] and "--queues" in argv:
            queues = set(option_value(argv, "--queues").split(","))
            assert queues <= QUEUES, f"{where}: unknown queue in {sorted(queues)}"
            consumed.add((where.split()[0].split(":")[0], frozenset(queues)))
    compose_queues = set().union(*(queues for where, queues in consumed if where == "compose"))
    k8s_queues = set().union(*(queues for where, queues in consumed if where != "compose"))
    assert compose_queues == QUEUES and k8s_queues == QUEUES


# --- tests: credentials ---------------------------------------------------------------------------------


def _literal_secrets(node: Any, where: str) -> list[str]:
    problems = []
    for path, text in walk_strings(node):
        if PLACEHOLDER in text:
            problems.append(f"{where}{path}: placeholder {text!r} outside the templates")
        for password in URL_PASSWORD.findall(text):
            if not INTERPOLATION.match(password):
                problems.append(f"{where}{path}: password inside a URL")
    return problems


def _secret_named_values(environment: Any) -> Iterator[tuple[str, str]]:
    if isinstance(environment, dict):
        yield from ((str(k), str(v)) for k, v in environment.items())
    elif isinstance(environment, list):
        for item in environment:
            key, _, value = str(item).partition("=")
            yield key, value


def test_no_literal_secrets_in_compose() -> None:
    compose = load_compose()
    problems = _literal_secrets(compose, "compose")
    for name, service in compose["services"].items():
        for key, value in _secret_named_values(service.get("environment")):
            if SECRET_NAME.search(key) and not INTERPOLATION.match(value):
                problems.append(f"compose {name}: {key} is set literally")
    assert not problems, problems


def test_no_literal_secrets_in_k8s() -> None:
    problems = []
    for filename, document in k8s_documents(include_template=False):
        problems += _literal_secrets(document, filename)
        if document["kind"] == "Secret":
            problems.append(f"{filename}: a Secret outside the template")
        if document["kind"] == "ConfigMap":
            leaked = (set(document["data"]) & SECRET_SETTINGS) | {k for k in document["data"] if SECRET_NAME.search(k)}
            problems += [f"{filename}: {key} belongs in the Secret" for key in sorted(leaked)]
    for where, container in k8s_containers():
        for variable in container.get("env", []):
            if SECRET_NAME.search(variable["name"]) and "value" in variable:
                problems.append(f"{where}: {variable['name']} is set literally")
    assert not problems, problems


def test_no_secrets_in_the_dockerfile() -> None:
    for keyword, arguments in dockerfile_instructions():
        if keyword in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split()[0]]
            secret_names = [name for name in names if SECRET_NAME.search(name) or name in SECRET_SETTINGS]
            assert not secret_names, f"Dockerfile {keyword} sets {secret_names}"
    assert not URL_PASSWORD.search(DOCKERFILE.read_text())


def test_env_example_holds_only_placeholders_that_agree() -> None:
    values = env_example()
    for key, value in values.items():
        if SECRET_NAME.search(key):
            assert value.startswith(PLACEHOLDER), f"{key} should be a {PLACEHOLDER} placeholder"
    broker_password = URL_PASSWORD.findall(values["READAR_BROKER_URL"])
    database_password = URL_PASSWORD.findall(values["READAR_DATABASE_URL"])
    assert broker_password == [values["REDIS_PASSWORD"]], "broker URL and REDIS_PASSWORD differ"
    assert database_password == [values["POSTGRES_PASSWORD"]], "database URL and POSTGRES_PASSWORD differ"


def test_secret_template_holds_only_placeholders() -> None:
    documents = list(yaml.safe_load_all(SECRET_TEMPLATE.read_text()))
    assert [doc["kind"] for doc in documents] == ["Secret"]
    data = documents[0]["stringData"]
    assert set(data) == SECRET_SETTINGS
    assert all(PLACEHOLDER in value for value in data.values()), data


def test_dockerignore_example_keeps_credentials_out() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if not line.startswith("#")}
    assert {".env", ".git", ".venv", "readar-work"} <= patterns


# --- tests: settings ------------------------------------------------------------------------------------


def test_contract_settings_exist_in_settings() -> None:
    from storage.settings import Settings

    fields = {f"READAR_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(CONTRACT_SETTINGS - fields)
    assert not missing, f"storage.settings.Settings lacks the fields for {missing}"


def test_deploy_files_reference_only_contract_settings() -> None:
    unknown = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            names = set(READAR_VARIABLE.findall(path.read_text())) - CONTRACT_SETTINGS
            if names:
                unknown[str(path.relative_to(REPO))] = sorted(names)
    assert not unknown, f"READAR_* names that are not settings: {unknown}"


def test_every_setting_is_configured_in_env_example_and_k8s() -> None:
    assert {key for key in env_example() if key.startswith("READAR_")} == CONTRACT_SETTINGS
    config = k8s_named("ConfigMap", "readar-config")["data"]
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text())["stringData"]
    assert set(config) | set(secret) == CONTRACT_SETTINGS


@pytest.mark.parametrize("source", [".env.example", "ConfigMap"])
def test_time_limits_are_ordered(source: str) -> None:
    values = env_example() if source == ".env.example" else k8s_named("ConfigMap", "readar-config")["data"]
    soft, hard = int(values["READAR_SOFT_TIME_LIMIT"]), int(values["READAR_HARD_TIME_LIMIT"])
    visibility, lease = int(values["READAR_VISIBILITY_TIMEOUT"]), int(values["READAR_LEASE_SECONDS"])
    assert soft < hard < visibility, "need soft limit < hard limit < visibility timeout"
    assert visibility - hard >= 60, "the visibility timeout needs a margin above the hard limit"
    assert lease >= hard, "a lease shorter than the hard limit lets a live task be taken over"


@pytest.mark.parametrize("source", [".env.example", "k8s"])
def test_settings_accept_the_configured_values(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.settings import Settings

    if source == ".env.example":
        values = env_example()
    else:
        values = dict(k8s_named("ConfigMap", "readar-config")["data"])
        values.update(yaml.safe_load(SECRET_TEMPLATE.read_text())["stringData"])
    for key, value in values.items():
        if key.startswith("READAR_"):
            monkeypatch.setenv(key, value)
    settings = Settings()  # runs the model validators (time limits, lease, visibility timeout)
    assert settings.visibility_timeout == int(values["READAR_VISIBILITY_TIMEOUT"])


def test_probed_heartbeat_reflects_every_worker_process(tmp_path: Path) -> None:
    """`readar healthcheck` reads READAR_HEARTBEAT_FILE, which the supervisor touches only while every worker
    process it runs makes progress (each child writes its own heartbeat)."""
    import os
    import time

    from workers.supervisor import Child, children_progressing, plan_children

    probed = k8s_named("ConfigMap", "readar-config")["data"]["READAR_HEARTBEAT_FILE"]
    specs = plan_children(gpus=[0, 1], processes=1, batch_size=8, queues="readar.images", work_dir=tmp_path,
                          metrics_port=9808, loglevel="WARNING")
    child_files = [Path(spec.env["READAR_HEARTBEAT_FILE"]) for spec in specs]
    assert probed not in {str(p) for p in child_files} and len(set(child_files)) == 2
    now = time.time()
    children = [Child(spec, process=None, heartbeat=path, started=now - 5)  # type: ignore[arg-type]
                for spec, path in zip(specs, child_files, strict=True)]
    assert children_progressing(children, grace=100, now=now)  # still starting up
    for path in child_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert children_progressing(children, grace=100)
    os.utime(child_files[1], (now - 500, now - 500))  # one process stuck inside a task
    assert not children_progressing(children, grace=100)


def test_env_example_and_configmap_agree() -> None:
    values = env_example()
    config = k8s_named("ConfigMap", "readar-config")["data"]
    differing = {key: (values[key], config[key]) for key in config if values.get(key) != config[key]}
    assert not differing, f".env.example and the ConfigMap differ: {differing}"


# --- tests: Kubernetes ----------------------------------------------------------------------------------


def test_k8s_worker_deployment() -> None:
    hard_limit = int(k8s_named("ConfigMap", "readar-config")["data"]["READAR_HARD_TIME_LIMIT"])
    metrics_port = int(k8s_named("ConfigMap", "readar-config")["data"]["READAR_METRICS_PORT"])
    spec = pod_spec(k8s_named("Deployment", "readar-worker"))
    assert spec is not None
    assert spec["terminationGracePeriodSeconds"] > hard_limit
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    liveness = container["livenessProbe"]["exec"]["command"]
    assert liveness[:2] == ["readar", "healthcheck"]
    assert float(option_value(liveness, "--max-idle")) > hard_limit
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]
    sources = container["envFrom"]
    assert {"secretRef": {"name": "readar-secrets"}} in sources
    assert {"configMapRef": {"name": "readar-config"}} in sources


def test_k8s_pods_run_as_non_root_and_read_settings() -> None:
    for filename, document in k8s_documents():
        spec = pod_spec(document)
        if spec is None:
            continue
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, filename
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, filename
            assert {"secretRef": {"name": "readar-secrets"}} in container.get("envFrom", []), filename


def test_kustomization_lists_the_manifests_but_not_the_templates() -> None:
    resources = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    expected = {path.name for path in k8s_files()
                if path != KUSTOMIZATION and not path.name.endswith(".example.yaml")}
    assert set(resources) == expected


# --- tests: Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_runs_readar_as_non_root() -> None:
    instructions = dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "Dockerfile sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"
    entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["readar"]
    commands = [json.loads(arguments) for keyword, arguments in instructions if keyword == "CMD"]
    assert commands and commands[-1][0] == "worker"


def test_dockerfile_copies_files_that_exist() -> None:
    missing = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in arguments:
            missing += [source for source in arguments.split()[:-1] if not (REPO / source).exists()]
    assert not missing, f"Dockerfile copies files the repository lacks: {missing}"


# --- tests: commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(CONTRACT_COMMANDS))
def test_contract_command_exists(command: str, cli_commands: dict[str, click.Command]) -> None:
    assert command in cli_commands, f"`readar {command}` is not a command of scheduler.cli"
    missing = sorted(set(CONTRACT_COMMANDS[command]) - option_names(cli_commands[command]))
    assert not missing, f"`readar {command}` lacks {missing}"


INVOCATIONS = readar_invocations()


@pytest.mark.parametrize(("where", "argv"), INVOCATIONS,
                         ids=[f"{where}: {' '.join(argv[:1])}" for where, argv in INVOCATIONS])
def test_referenced_command_is_real(where: str, argv: list[str], cli_commands: dict[str, click.Command]) -> None:
    assert argv, f"{where}: `readar` without a sub-command"
    assert argv[0] in cli_commands, f"{where}: `readar {argv[0]}` is not a command of scheduler.cli"
    command = cli_commands[argv[0]]
    options = {item.split("=")[0] for item in argv[1:] if item.startswith("-")}
    unknown = sorted(options - option_names(command))
    assert not unknown, f"{where}: `readar {argv[0]}` has no option {unknown}"
    positionals = positional_arguments(command, argv[1:])
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    required = sum(1 for p in arguments if p.required)
    assert len(positionals) >= required, f"{where}: `readar {argv[0]}` needs {required} argument(s): {argv}"
    if all(p.nargs == 1 for p in arguments):
        assert len(positionals) <= len(arguments), f"{where}: too many arguments: {argv}"


def test_invocations_cover_the_deployment() -> None:
    commands = {argv[0] for _, argv in INVOCATIONS}
    assert {"worker", "submit", "status", "resume", "reconcile", "healthcheck", "run"} <= commands


def test_celery_app_module_for_flower_exists() -> None:
    from celery import Celery

    module = importlib.import_module("workers.celery_app")
    assert isinstance(module.app, Celery)
