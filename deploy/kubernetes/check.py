"""Offline check of deploy/kubernetes (run by `make lint`): schemas and the rules the gateway needs.

Each kustomization is rendered with `kubectl kustomize` when a kubectl with kustomize 4 or later
is on PATH (no registry this project may use ships one: Debian's kubernetes-client embeds
kustomize 2.0.3, which cannot read these overlays); every rendered object is then validated
against the Kubernetes schemas bundled in kubernetes-validate (strict: unknown fields are errors)
and the pod rules below are checked. Without such a kubectl, the complete resource files (not the
overlay's patches) are checked instead, and the script says so. Each `gateway.toml` must pass
`gateway check-config`, and base/prometheusrule.yaml must be deploy/prometheus/gateway-rules.yml
(`--write` regenerates it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from gateway.cli import SEND_QUEUE_WAIT

HERE = Path(__file__).resolve().parent
KUSTOMIZATIONS = [HERE / "base", HERE / "overlays" / "postgresql"]
VERSION = "1.30.0"  # the oldest Kubernetes the manifests target (preStop `sleep` needs 1.30)
CUSTOM = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # Prometheus Operator kinds: no bundled schema
PATCHES = {"server.yaml", "no-registry-volume.yaml"}


def kustomize() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)", version)
    return [kubectl, "kustomize"] if match and int(match[1]) >= 4 else None


def rendered(command: list[str], directory: Path) -> list[dict[str, Any]]:
    answer = subprocess.run([*command, str(directory)], capture_output=True, text=True)
    if answer.returncode != 0:
        raise SystemExit(f"{directory.relative_to(HERE)}: kustomize failed: {answer.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(answer.stdout) if doc]


def raw(directory: Path) -> list[dict[str, Any]]:
    files = [f for f in sorted(directory.glob("*.yaml")) if f.name != "kustomization.yaml" and f.name not in PATCHES]
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def pod_problems(obj: dict[str, Any], shutdown_timeout: float | None) -> list[str]:
    """What a Deployment of the gateway must have: non-root, read-only root, no capabilities,
    resources, probes on the gateway's endpoints, and time to drain its streams."""
    spec = obj["spec"]["template"]["spec"]
    problems = []
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("runAsNonRoot")
    for container in spec["containers"]:
        security = container.get("securityContext", {})
        if not security.get("readOnlyRootFilesystem"):
            problems.append(f"{container['name']}: readOnlyRootFilesystem")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{container['name']}: capabilities.drop [ALL]")
        if not {"requests", "limits"} <= set(container.get("resources", {})):
            problems.append(f"{container['name']}: resources")
        if "serve" in container.get("args", []):
            if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                problems.append("readinessProbe on /readyz")
            if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                problems.append("livenessProbe on /healthz")
            pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if shutdown_timeout is None or grace < shutdown_timeout + pause + SEND_QUEUE_WAIT:
                problems.append(f"terminationGracePeriodSeconds {grace} < shutdown_timeout + preStop + send queues")
    return problems


def config_problems(name: str, config: Path) -> list[str]:
    """`gateway check-config` of the pod's config, with stand-ins for what the Secret provides."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "GATEWAY_AUTH_SECRET": "stand-in-for-the-secret-0123456789abcdef0123456789",
        "GATEWAY_REGISTRY_URL": "postgresql://gateway:password@postgresql:5432/gateway",
    }
    if "sqlite" in config.read_text():
        del env["GATEWAY_REGISTRY_URL"]
    answer = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
    )
    return [] if answer.returncode == 0 else [f"{name}: {config.name}: {answer.stderr.strip()}"]


def check(name: str, objects: list[dict[str, Any]], config: Path) -> list[str]:
    shutdown_timeout = tomllib.loads(config.read_text()).get("server", {}).get("shutdown_timeout")
    errors = []
    for obj in objects:
        what = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "PrometheusRule":
            continue  # its content is the rules file's, which promtool checks
        if obj["kind"] in CUSTOM:
            if not obj.get("spec", {}).get("selector", {}).get("matchLabels"):
                errors.append(f"{what}: no spec.selector.matchLabels")
            continue
        try:
            kubernetes_validate.validate(obj, VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
        if obj["kind"] == "Deployment":
            errors += [f"{what}: {problem}" for problem in pod_problems(obj, shutdown_timeout)]
    return errors


RULES = HERE.parent / "prometheus" / "gateway-rules.yml"
PROMETHEUS_RULE = HERE / "base" / "prometheusrule.yaml"


def prometheus_rule() -> str:
    """deploy/prometheus/gateway-rules.yml as a Prometheus Operator PrometheusRule (one source)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "media-gateway"},
        "spec": {"groups": groups},
    }
    header = "# Generated from deploy/prometheus/gateway-rules.yml: python deploy/kubernetes/check.py --write\n"
    return header + yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=120)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line expressions as `|` blocks, as in the rules file."""


_BlockDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def main() -> int:
    if sys.argv[1:] == ["--write"]:
        PROMETHEUS_RULE.write_text(prometheus_rule())
        return 0
    command = kustomize()
    errors = []
    if PROMETHEUS_RULE.read_text() != prometheus_rule():
        errors.append(f"{PROMETHEUS_RULE.name} differs from {RULES.name}: run `python {Path(__file__).name} --write`")
    for directory in KUSTOMIZATIONS:
        name = str(directory.relative_to(HERE))
        objects = rendered(command, directory) if command is not None else raw(directory)
        errors += check(name, objects, directory / "gateway.toml") + config_problems(name, directory / "gateway.toml")
        print(f"deploy/kubernetes/{name}: {len(objects)} objects {'rendered' if command else 'as files'}, checked")
    if command is None:
        print("deploy/kubernetes: no kubectl with kustomize >= 4 on PATH: files checked without rendering")
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
