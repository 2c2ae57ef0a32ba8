"""The deployment files under deploy/. Real tools check syntax and schemas: yamllint, hadolint (with its
built-in ShellCheck), check-jsonschema's bundled Compose specification and kubernetes-validate's strict
Kubernetes schemas. The other tests check what no linter knows: that the files use READAR's real commands,
settings and queues, keep credentials out, run as non-root and outlast the task time limits."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from dotenv import dotenv_values

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SECRET_TEMPLATE = DEPLOY / "k8s" / "secret.example.yaml"
MANIFESTS = sorted(path for path in (DEPLOY / "k8s").glob("*.yaml") if path.name != "kustomization.yaml")
# The settings the deployment relies on (the team's contract); each must be a field of storage.settings.
SECRET_SETTINGS = frozenset({"READAR_BROKER_URL", "READAR_DATABASE_URL", "READAR_S3_KEY", "READAR_S3_SECRET"})
CONTRACT_SETTINGS = SECRET_SETTINGS | {f"READAR_{name}" for name in (
    "OBJECT_STORE_URL", "S3_ENDPOINT_URL", "CHECKPOINT", "CLIP", "DEVICE", "BATCH_SIZE", "LEASE_SECONDS",
    "MAX_ATTEMPTS", "SOFT_TIME_LIMIT", "HARD_TIME_LIMIT", "VISIBILITY_TIMEOUT", "METRICS_PORT",
    "METRICS_HOST", "HEARTBEAT_FILE", "TASK_EVENTS", "WORK_DIR", "PATH_MAP", "SETUP_RETRY_SECONDS",
    "MAX_IMAGE_PIXELS")}
# The sub-commands and options that the deployment and its guide rely on, as command lines click must accept.
CONTRACT_COMMANDS = [
    "run --mvtec-root D --detector read --checkpoint C --clip C --device cpu --batch-size 8 --run-name R",
    "worker --gpus 0,1 --batch-size 8 --queues readar.images --path-map /a=/b", "worker --device cpu",
    "submit --mvtec-root D --classes bottle --detector read --checkpoint C --clip C --run-name R",
    "status R --watch", "aggregate R --category bottle", "healthcheck --max-idle 1200", "resume R",
    "cancel R", "reconcile", "runs", "results R"]
QUEUES = {"readar.images", "readar.aggregate"}
PLACEHOLDER = "change-me"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/\s:@]*:([^@\s/]+)@")
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}$")
# `readar SUB ...` where a shell runs a command (line start, after ; & | ( = do exec or `--`), possibly by
# its full path, or `docker compose run --rm scheduler SUB ...`; the arguments end at an operator or comment.
READAR_CALL = re.compile(r"(?:(?:^|[;&|(=]|\bdo|\bexec|\s--)\s*(?:/\S+/)?readar|compose run --rm scheduler)"
                         r"\s+([a-z][^;&|)'#\n]*)", re.MULTILINE)
LINTERS = {
    "yamllint": ["yamllint", "--strict", "--format", "parsable", "--config-data",
                 "{extends: default, rules: {line-length: disable, document-start: disable}}", "deploy"],
    # DL3008: apt packages come with the pinned CUDA base image's Ubuntu release; DL3003: `cd /` only to
    # delete the build folder within the same RUN layer.
    "hadolint": ["hadolint", "--no-color", "--ignore=DL3008", "--ignore=DL3003", "deploy/Dockerfile"],
    "compose-spec": ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml"],
    "kubernetes-validate": ["kubernetes-validate", "--strict", "--quiet", *map(str, MANIFESTS)],
}


@pytest.mark.parametrize("linter", sorted(LINTERS))
def test_linter_accepts_the_deploy_files(linter: str) -> None:
    name, *arguments = LINTERS[linter]
    executable = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    assert executable, f"{name} is not installed: pip install -e '.[dev]'"
    result = subprocess.run([executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode:
        pytest.fail(f"{linter} rejects the deploy files:\n{result.stdout}{result.stderr}")


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document.get("spec", {})
    return spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})  # {}: no pods


def yaml_documents(path: Path) -> list[Any]:
    with path.open() as stream:  # a stream, so that the parser's errors name the file
        return [document for document in yaml.safe_load_all(stream) if document]


# The files, read once (a file that YAML cannot read fails the collection with the parser's message).
(COMPOSE,) = yaml_documents(DEPLOY / "compose.yaml")
K8S = [(path.name, document) for path in MANIFESTS for document in yaml_documents(path)]
CONTAINERS = [(f"{filename}:{container['name']}", container) for filename, document in K8S
              for container in pod_spec(document).get("containers", [])]
ENV = {key: value or "" for key, value in dotenv_values(DEPLOY / ".env.example", interpolate=False).items()}
SECRET = yaml_documents(SECRET_TEMPLATE)[0]["stringData"]


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in K8S if (doc["kind"], doc["metadata"]["name"]) == (kind, name)]
    return found


CONFIG = k8s_named("ConfigMap", "readar-config")["data"]


def dockerfile(keyword: str) -> list[str]:  # the arguments of every one-line `keyword` instruction
    return re.findall(rf"^{keyword}\s+(.+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def strings(node: Any) -> list[str]:
    if isinstance(node, dict | list):
        return [s for value in (node.values() if isinstance(node, dict) else node) for s in strings(value)]
    return [node] if isinstance(node, str) else []


def shell_calls(script: str) -> list[list[str]]:
    return [shlex.split(match) for match in READAR_CALL.findall(script.replace("\\\n", " "))]


def container_calls(entrypoint: list[str] | None, command: list[str] | None) -> list[list[str]]:
    if entrypoint in (None, ["readar"]):
        return [command] if command else []
    shell = entrypoint[0].endswith("sh")
    return [argv for script in command or [] for argv in shell_calls(script)] if shell else []


def readar_invocations() -> list[tuple[str, list[str]]]:
    """Every `readar` command line in the deployment files and the guide's code blocks."""
    found = [("Dockerfile CMD", json.loads(arguments)) for arguments in dockerfile("CMD")]
    for name, service in COMPOSE["services"].items():
        if service["image"].startswith("readar:"):
            found += [(f"compose {name}", argv)
                      for argv in container_calls(service.get("entrypoint"), service.get("command"))]
        if (test := service.get("healthcheck", {}).get("test", []))[:2] == ["CMD", "readar"]:
            found.append((f"compose {name} healthcheck", test[2:]))
    for where, container in CONTAINERS:
        if container["image"].startswith("readar:"):
            argvs = container_calls(container.get("command"), container.get("args"))
            found += [(where, argv) for argv in argvs]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if (command := container.get(probe, {}).get("exec", {}).get("command", []))[:1] == ["readar"]:
                found.append((f"{where} {probe}", command[1:]))
    guide = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"^```.*?\n(.*?)^```", guide, re.MULTILINE | re.DOTALL):
        found += [("README", argv) for argv in shell_calls(block)]
    return found


INVOCATIONS = readar_invocations()


@pytest.mark.parametrize(("where", "argv"), [("contract", shlex.split(line)) for line in CONTRACT_COMMANDS]
                         + INVOCATIONS, ids=lambda value: value if isinstance(value, str) else value[0])
def test_command_parses(where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """click parses each command line: unknown commands or options, missing or extra arguments and bad values
    fail. Paths exist only in the containers and callbacks import the detectors (seconds): neither runs."""
    from scheduler.cli import cli

    assert argv and argv[0] in cli.commands, f"{where}: `readar {shlex.join(argv)}` is not a command"
    monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)
    for parameter in cli.commands[argv[0]].params:
        monkeypatch.setattr(parameter, "callback", None)
    try:
        cli.commands[argv[0]].make_context(f"readar {argv[0]}", argv[1:])
    except click.ClickException as error:
        pytest.fail(f"{where}: `readar {shlex.join(argv)}`: {error.format_message()}")


def test_invocations_cover_the_deployment_and_both_queues() -> None:
    commands = {argv[0] for _, argv in INVOCATIONS}
    assert {"worker", "submit", "status", "resume", "reconcile", "healthcheck", "run", "runs"} <= commands
    assert sum(where == "README" for where, _ in INVOCATIONS) >= 10, "the README's commands are not found"
    consumed: dict[str, set[str]] = {"compose": set(), "k8s": set()}
    for where, argv in INVOCATIONS:
        if argv[0] == "worker" and "--queues" in argv and not where.startswith(("README", "Dockerfile")):
            queues = set(option(argv, "--queues").split(","))
            assert queues <= QUEUES, f"{where}: unknown queue in {sorted(queues)}"
            consumed["compose" if where.startswith("compose") else "k8s"] |= queues
    assert consumed == {"compose": QUEUES, "k8s": QUEUES}


def test_flower_loads_the_celery_app() -> None:
    """`celery -A NAME flower` in compose and k8s: NAME resolves the way the celery command resolves it."""
    from celery import Celery
    from celery.app.utils import find_app

    (k8s_flower,) = pod_spec(k8s_named("Deployment", "readar-flower"))["containers"]
    for command in (COMPOSE["services"]["flower"]["entrypoint"], k8s_flower["command"]):
        assert command[:2] == ["celery", "-A"] and "flower" in command, command
        assert isinstance(find_app(command[2]), Celery), f"celery -A {command[2]} finds no Celery app"


def test_every_image_is_pinned() -> None:
    """hadolint checks the Dockerfile's FROM (DL3006, DL3007); this checks compose and the manifests."""
    images = [(f"compose {name}", service["image"]) for name, service in COMPOSE["services"].items()]
    images += [(where, container["image"]) for where, container in CONTAINERS]
    pinned = re.compile(r".*@sha256:[0-9a-f]{64}|[^:]*(:\d+/[^:]+)?:(?!latest$)\w[\w.-]*")
    unpinned = [(where, image) for where, image in images if not pinned.fullmatch(image)]
    assert len(images) >= 8 and not unpinned, f"images without a pinned tag: {unpinned}"


def test_dockerfile_runs_readar_as_non_root_and_copies_files_that_exist() -> None:
    users = dockerfile("USER")
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "the last USER must be a non-root uid"
    assert [json.loads(entry) for entry in dockerfile("ENTRYPOINT")][-1:] == [["readar"]]
    sources = [source for line in dockerfile("COPY") if "--from" not in line for source in line.split()[:-1]]
    assert sources and not [source for source in sources if not (REPO / source).exists()], sources


def test_compose_services() -> None:
    services = COMPOSE["services"]
    assert not [name for name, service in services.items() if service.get("network_mode") == "host"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"flower": ["127.0.0.1:5555:5555"]}, "publish Flower alone, on 127.0.0.1"
    redis = services["redis"]["command"]
    assert option(redis, "--appendonly") == "yes" and option(redis, "--maxmemory-policy") == "noeviction"
    assert INTERPOLATION.match(option(redis, "--requirepass")), "the Redis password must come from .env"
    for name, service in services.items():
        assert not service["image"].startswith("readar:") or service["env_file"] in (".env", [".env"]), name
    (gpus,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"], gpus
    hard_limit = int(ENV["READAR_HARD_TIME_LIMIT"])
    for name in ("worker", "aggregator"):
        grace = re.fullmatch(r"(\d+)m", services[name]["stop_grace_period"])
        assert grace and int(grace[1]) * 60 > hard_limit, f"{name}: stop_grace_period (minutes) too short"
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "readar", "healthcheck"] and int(option(test, "--max-idle")) > hard_limit


def test_k8s_manifests() -> None:
    pods = [(filename, spec) for filename, document in K8S if (spec := pod_spec(document))]
    assert len(pods) >= 5
    for filename, spec in pods:
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"], f"{filename} may run as root"
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, filename
            assert {"secretRef": {"name": "readar-secrets"}} in container["envFrom"], filename
            assert {"configMapRef": {"name": "readar-config"}} in container["envFrom"], filename
    assert not [filename for filename, document in K8S if "namespace" in document["metadata"]]
    resources = yaml_documents(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"]
    assert set(resources) == {path.name for path in MANIFESTS if not path.name.endswith(".example.yaml")}
    hard_limit = int(CONFIG["READAR_HARD_TIME_LIMIT"])
    spec = pod_spec(k8s_named("Deployment", "readar-worker"))
    assert spec["terminationGracePeriodSeconds"] > hard_limit
    (container,) = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    for probe in ("startupProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["readar", "healthcheck"] and int(option(command, "--max-idle")) > hard_limit
    port = int(CONFIG["READAR_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]


def test_no_literal_secrets() -> None:
    documents = [("compose.yaml", COMPOSE)] + [d for d in K8S if d[0] != SECRET_TEMPLATE.name]
    problems = [f"{where}: {text!r}" for where, document in documents for text in strings(document)
                if PLACEHOLDER in text or any(not INTERPOLATION.match(p) for p in URL_PASSWORD.findall(text))]
    problems += [f"compose {name}: {key}" for name, service in COMPOSE["services"].items()
                 for key, value in service.get("environment", {}).items()
                 if SECRET_NAME.search(key) and not INTERPOLATION.match(str(value))]
    problems += [f"{where}: {variable['name']}" for where, container in CONTAINERS
                 for variable in container.get("env", []) if SECRET_NAME.search(variable["name"])
                 and "value" in variable]
    problems += [f"{where}: a Secret" for where, doc in documents if doc.get("kind") == "Secret"]
    problems += [f"ConfigMap: {key}" for key in CONFIG if key in SECRET_SETTINGS or SECRET_NAME.search(key)]
    dockerfile_text = (DEPLOY / "Dockerfile").read_text()  # hadolint's DL3064 checks secret-like ENV and ARG
    problems += [f"Dockerfile: {text}" for text in URL_PASSWORD.findall(dockerfile_text)
                 + [name for name in SECRET_SETTINGS if name in dockerfile_text]]
    assert not problems, f"credentials outside .env and the Secret: {problems}"


def test_templates_hold_only_placeholders_that_agree() -> None:
    assert all(value.startswith(PLACEHOLDER) for key, value in ENV.items() if SECRET_NAME.search(key))
    assert URL_PASSWORD.findall(ENV["READAR_BROKER_URL"]) == [ENV["REDIS_PASSWORD"]]
    assert URL_PASSWORD.findall(ENV["READAR_DATABASE_URL"]) == [ENV["POSTGRES_PASSWORD"]]
    assert [document["kind"] for document in yaml_documents(SECRET_TEMPLATE)] == ["Secret"]
    assert set(SECRET) == SECRET_SETTINGS
    assert all(PLACEHOLDER in value for value in SECRET.values())
    ignored = set((DEPLOY / "dockerignore.example").read_text().splitlines())
    assert {".env", ".git", ".venv", "readar-work"} <= ignored, "the image must not take credentials or state"


def test_deploy_files_configure_exactly_the_contract_settings() -> None:
    from storage.settings import Settings

    missing = sorted(CONTRACT_SETTINGS - {f"READAR_{name.upper()}" for name in Settings.model_fields})
    assert not missing, f"storage.settings.Settings lacks the fields for {missing}"
    unknown = {path.name: sorted(names) for path in sorted(DEPLOY.rglob("*")) if path.is_file()
               if (names := set(re.findall(r"\bREADAR_[A-Z0-9_]+\b", path.read_text())) - CONTRACT_SETTINGS)}
    assert not unknown, f"READAR_* names that are not settings: {unknown}"
    assert {key for key in ENV if key.startswith("READAR_")} == CONTRACT_SETTINGS
    assert set(CONFIG) | set(SECRET) == CONTRACT_SETTINGS
    differing = {key: (ENV.get(key), value) for key, value in CONFIG.items() if ENV.get(key) != value}
    assert not differing, f".env.example and the ConfigMap differ: {differing}"


@pytest.mark.parametrize("source", [".env.example", "k8s"])
def test_settings_accept_the_configured_values(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings' own validators order the time limits: soft < hard < lease <= visibility timeout."""
    from storage.settings import Settings

    values = ENV if source == ".env.example" else {**CONFIG, **SECRET}
    for key, value in values.items():
        if key.startswith("READAR_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.visibility_timeout == int(values["READAR_VISIBILITY_TIMEOUT"])
    assert settings.visibility_timeout - settings.hard_time_limit >= 60, "visibility timeout without margin"


def test_probed_heartbeat_reflects_every_worker_process(tmp_path: Path) -> None:
    """`readar healthcheck` reads READAR_HEARTBEAT_FILE, which the supervisor touches only while every worker
    process it runs makes progress (each child writes its own heartbeat)."""
    from workers.supervisor import Child, children_progressing, plan_children

    specs = plan_children(gpus=[0, 1], processes=1, batch_size=8, queues="readar.images", work_dir=tmp_path,
                          metrics_port=9808, loglevel="WARNING")
    files = [Path(spec.env["READAR_HEARTBEAT_FILE"]) for spec in specs]
    assert CONFIG["READAR_HEARTBEAT_FILE"] not in set(map(str, files)) and len(set(files)) == 2
    now = time.time()
    children = [Child(spec, process=None, heartbeat=path, started=now - 5)  # type: ignore[arg-type]
                for spec, path in zip(specs, files, strict=True)]
    assert children_progressing(children, grace=100, now=now)  # still starting up
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert children_progressing(children, grace=100)
    os.utime(files[1], (now - 500, now - 500))  # one process stuck inside a task
    assert not children_progressing(children, grace=100)
