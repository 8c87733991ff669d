"""The deployment files (docker/) without Docker: every YAML file parses, the compose file and
the Kubernetes manifests hold the parts the service needs, and every `autocompress` command in
them and in docker/README.md is a real command with real flags (parsed by the CLI's parser)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autocompress.cli import build_parser
from autocompress.service import cli_worker, client, store

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGE = "autocompress"
_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def _expand(text: str) -> str:
    """Compose's ``${VAR:-default}`` as its default (``${VAR:?message}``: a placeholder)."""
    return _VAR.sub(lambda m: m.group(2) if m.group(2) and "?" not in m.group(0)
                    else "value", text)


def _parses(argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`autocompress {shlex.join(argv)}` does not parse (exit {exc.code})")
    assert args.command == argv[0]


def _compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())


def _manifests() -> Iterator[dict[str, Any]]:
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield doc


def test_compose_runs_postgres_minio_serve_and_workers() -> None:
    services = _compose("compose.yaml")["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["minio"]["image"].startswith("minio/minio")
    bucket = " ".join(services["createbucket"]["entrypoint"])
    assert "mc mb --ignore-existing local/autocompress" in bucket
    for name in ("serve", "worker"):
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["createbucket"]["condition"] == \
            "service_completed_successfully"
        env = service["environment"]
        # the names the code reads, so the containers really find the database and bucket
        assert env[store.ENV_SERVICE_DB].startswith("postgresql://")
        assert env[cli_worker.ENV_ARTIFACTS] == "s3://autocompress/artifacts"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        _parses([_expand(str(a)) for a in service["command"]])
    assert services["serve"]["command"][0] == "serve"
    assert services["worker"]["command"][0] == "worker"
    assert _expand(str(services["worker"]["deploy"]["replicas"])) == "3"


def test_the_search_compose_file_still_parses() -> None:
    services = _compose("compose.search.yaml")["services"]
    for name in ("worker", "dashboard"):
        _parses([_expand(str(a)) for a in services[name]["command"]])


def test_kubernetes_manifests_are_namespace_free_and_consistent() -> None:
    docs = list(_manifests())
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        assert {"apiVersion", "kind"} <= set(doc)
        assert "namespace" not in doc.get("metadata", {}), doc["metadata"]
        by_kind.setdefault(doc["kind"], []).append(doc)
    secret = {d["metadata"]["name"]: d for d in by_kind["Secret"]}
    config = {d["metadata"]["name"]: d for d in by_kind["ConfigMap"]}
    assert store.ENV_SERVICE_DB in secret["autocompress-secrets"]["stringData"]
    assert cli_worker.ENV_ARTIFACTS in config["autocompress-config"]["data"]
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert deployments["autocompress-worker"]["spec"]["replicas"] == 3
    for deployment in [*deployments.values(), *by_kind["StatefulSet"]]:
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for container in spec["template"]["spec"]["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef")
                assert ref["name"] in {**secret, **config}
            if container["image"] == IMAGE:
                _parses(container["args"])
    server = deployments["autocompress-server"]["spec"]["template"]
    (service,) = [s for s in by_kind["Service"] if s["metadata"]["name"] == "autocompress"]
    assert service["spec"]["selector"].items() <= server["metadata"]["labels"].items()
    port = server["spec"]["containers"][0]["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    listed = yaml.safe_load((DOCKER / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert all((DOCKER / "k8s" / name).is_file() for name in listed)


def test_the_image_installs_the_postgres_and_s3_extras() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert 'pip install ".[postgres,s3]"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]", 1)[1]
    assert re.search(r"^postgres = ", extras, re.M) and re.search(r"^s3 = ", extras, re.M)


def _readme_commands() -> Iterator[list[str]]:
    """Every `autocompress ...` command in docker/README.md's shell blocks (the part after
    `exec serve` / `exec deploy/... --`, cut at `&&`, `#` and `|`)."""
    blocks = re.findall(r"```bash\n(.*?)```", (DOCKER / "README.md").read_text(), re.S)
    for line in "\n".join(blocks).splitlines():
        line = line.split(" #", 1)[0].strip()
        for part in re.split(r"&&|\|", line):
            words = shlex.split(part.replace("ac admin", "autocompress admin"))
            if "autocompress" in words and words[0] != "pip" and (
                    words[0] not in ("docker", "kubectl") or "exec" in words):
                # the last one: `kubectl -n autocompress exec ... -- autocompress admin ...`
                yield words[len(words) - words[::-1].index("autocompress"):]


def test_every_command_in_the_readme_is_real() -> None:
    commands = list(_readme_commands())
    assert len(commands) >= 10, commands
    for argv in commands:
        _parses([w.replace("JOB", "0123456789ab").replace("TOKEN_ID", "abc") for w in argv])
    assert client.ENV_TOKEN in (DOCKER / "README.md").read_text()
