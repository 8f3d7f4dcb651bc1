"""The Kubernetes deployment: every documented kustomize combination renders, passes the Kubernetes schemas,
is hardened, grants exactly the documented RBAC, and the Ensemble CRD accepts every example we ship.

Renders come from the real ``kubectl kustomize``; objects are checked with ``kubernetes-validate`` (strict:
an unknown field is an error) against Kubernetes 1.30, and the kinds it cannot know (cert-manager, Prometheus
Operator) against the fields their controllers require.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ensemble_core import settings as settings_module
from tests import kubectl_support
from tests.conftest import tls_files

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kustomize"
DOCS = ROOT / "docs" / "kubernetes.md"
SHARED = ROOT.parent / "shared"
KUBECTL = kubectl_support.kubectl()
KUBERNETES_VERSION = "1.30"

pytestmark = pytest.mark.skipif(KUBECTL is None, reason=kubectl_support.missing())

#: Every combination docs/kubernetes.md documents: name → components over the base.
COMBINATIONS: dict[str, list[str]] = {
    "base": [],
    "tls-own-secret": ["tls"],
    "tls-cert-manager": ["tls", "tls-cert-manager"],
    "nats-auth": ["nats-auth"],
    "network-policy": ["network-policy"],
    "monitoring": ["monitoring"],
    "ha": ["ha"],
    "sidecar-tls": ["sidecar-tls"],
    "nats-cluster": ["nats-cluster"],
    "everything": [
        "tls",
        "tls-cert-manager",
        "nats-auth",
        "network-policy",
        "monitoring",
        "ha",
        "sidecar-tls",
        "nats-cluster",
    ],
}
RENDERS = [*COMBINATIONS, "overlays/production"]
SERVICES = ("creator", "poller", "decider", "actuator")
#: Secrets the user creates (docs/kubernetes.md), with the combinations that need them.
USER_SECRETS = {"ensemble-sidecar-token", "ensemble-nats-auth", "nats-tls"}

#: The RBAC contract: service → {(API group, resource): verbs}. docs/kubernetes.md holds the same table.
RBAC: dict[str, dict[tuple[str, str], set[str]]] = {
    "creator": {
        ("ensemble.flux-framework.org", "ensembles"): {"get", "list", "watch"},
        ("ensemble.flux-framework.org", "ensembles/status"): {"patch"},
        ("ensemble.flux-framework.org", "ensembles/finalizers"): {"update"},
        ("flux-framework.org", "miniclusters"): {"create", "get", "delete"},
        ("", "pods"): {"list", "watch"},
        ("", "secrets"): {"create"},
        ("", "events"): {"create"},
        ("coordination.k8s.io", "leases@ensemble-system"): {"get", "create", "patch"},
    },
    "actuator": {
        ("flux-framework.org", "miniclusters"): {"get", "delete"},
        ("flux-framework.org", "miniclusters/scale"): {"patch"},
        ("ensemble.flux-framework.org", "ensembles"): {"get"},
        ("ensemble.flux-framework.org", "ensembles/status"): {"patch"},
        ("", "events"): {"create"},
    },
    "poller": {("flux-framework.org", "miniclusters"): {"list", "watch"}},
    "decider": {},
}
#: What components/sidecar-tls adds: the creator may read the one Secret it copies, in ensemble-system only.
SIDECAR_TLS_RBAC = {"creator": {("", "secrets:ensemble-sidecar-tls@ensemble-system"): {"get"}}}

#: What the controllers of the custom kinds we render require (they are not Kubernetes built-ins).
CUSTOM_KINDS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["port", "path"]},
                    },
                },
            }
        },
    },
    "Certificate": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string"},
                    "issuerRef": {"type": "object", "required": ["name", "kind"]},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                },
            }
        },
    },
    "Issuer": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "minProperties": 1,
                "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object", "required": ["secretName"]}},
            }
        },
    },
}


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize`` renders for a combination (or an overlay directory)."""
    if name in COMBINATIONS:
        with tempfile.TemporaryDirectory() as directory:
            # kustomize refuses absolute paths to bases and components: point at them relatively
            relative = os.path.relpath(KUSTOMIZE, directory)
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{relative}/base"],
                "components": [f"{relative}/components/{c}" for c in COMBINATIONS[name]],
            }
            Path(directory, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            out = subprocess.run([KUBECTL or "kubectl", "kustomize", directory], capture_output=True, text=True)
    else:
        out = subprocess.run([KUBECTL or "kubectl", "kustomize", str(KUSTOMIZE / name)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The rendered objects of one kind (and name)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def workloads(objects: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    """Every Deployment and StatefulSet."""
    yield from (o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def deployment(objects: tuple[dict[str, Any], ...], service: str) -> dict[str, Any]:
    """The Deployment of one service."""
    (found,) = find(objects, "Deployment", service)
    return found


def crd_schema() -> dict[str, Any]:
    """The Ensemble CRD's openAPIV3Schema, as the base renders it."""
    (crd,) = find(render("base"), "CustomResourceDefinition", "ensembles.ensemble.flux-framework.org")
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema, with the API server's behaviour.

    ``x-kubernetes-int-or-string`` becomes anyOf integer/string; an object with properties and without
    ``x-kubernetes-preserve-unknown-fields`` rejects other fields, as ``kubectl apply`` does with strict
    field validation; other ``x-kubernetes-*`` keywords have no JSON Schema meaning and are dropped.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties"):
            converted[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            converted[key] = to_json_schema(value)
        else:
            converted[key] = value
    if node.get("x-kubernetes-int-or-string"):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        converted["additionalProperties"] = False
    return converted


def ensemble_errors(document: Any) -> list[str]:
    """Why the CRD rejects ``document`` (empty when it is accepted)."""
    validator = jsonschema.Draft7Validator(to_json_schema(crd_schema()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# --- rendering and Kubernetes schemas ------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_every_object_passes_the_kubernetes_schemas(name: str) -> None:
    for obj in render(name):
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CUSTOM_KINDS:
            jsonschema.validate(obj, CUSTOM_KINDS[obj["kind"]])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize("name", RENDERS)
def test_everything_namespaced_lands_in_ensemble_system(name: str) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in render(name):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == "ensemble-system", f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("name", RENDERS)
def test_every_reference_resolves(name: str) -> None:
    """A pod that names a missing ConfigMap, ServiceAccount or Secret never starts."""
    objects = render(name)
    config_maps = {o["metadata"]["name"] for o in find(objects, "ConfigMap")}
    accounts = {o["metadata"]["name"] for o in find(objects, "ServiceAccount")}
    issued = {o["spec"]["secretName"] for o in find(objects, "Certificate")}
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        if workload["kind"] == "Deployment":
            assert pod["serviceAccountName"] in accounts
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in USER_SECRETS | issued
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for env in container.get("env", []):
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    assert secret["name"] in USER_SECRETS
                    assert secret["optional"] is False, "a missing Secret must stop the pod, not run it without auth"


@pytest.mark.parametrize("name", RENDERS)
def test_variable_references_are_defined_before_use(name: str) -> None:
    """Kubernetes expands $(NAME) only from variables defined earlier; otherwise the text stays literal."""
    objects = render(name)
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "ConfigMap")}
    for workload in workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            defined = {k for s in container.get("envFrom", []) for k in config_maps[s["configMapRef"]["name"]]}
            for env in container.get("env", []):
                for used in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                    assert used in defined, f"{workload['metadata']['name']}: {env['name']} uses $({used}) too early"
                defined.add(env["name"])


# --- the Ensemble CRD ------------------------------------------------------------------------------


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[{key}]")


def test_crd_schema_is_structural() -> None:
    """The API server refuses a CRD whose schema gives a field no type (outside int-or-string)."""
    for path, node in _walk(crd_schema(), "openAPIV3Schema"):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: both"
        for key in ("x-kubernetes-list-map-keys",):
            for field in node.get(key, []):
                assert field in node["items"]["required"], f"{path}: list-map key {field} must be required"


def example_files() -> list[Path]:
    """Every Ensemble we ship or were given: the original's examples, the GKE recordings', ours."""
    files = [
        *sorted((SHARED / "reference" / "seed-examples").glob("*.yaml")),
        *sorted((SHARED / "data" / "seed-gke").glob("*/ensemble.yaml")),
        *sorted((ROOT / "examples").glob("*.yaml")),
    ]
    assert len(files) >= 8, f"expected the shared examples beside the clone, found {files}"
    return files


@pytest.mark.parametrize("path", example_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_crd_accepts_every_example(path: Path) -> None:
    assert ensemble_errors(yaml.safe_load(path.read_text())) == []


def _hello() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "hello-world.yaml").read_text())
    return document


def _size_as_string(d: dict[str, Any]) -> None:
    d["spec"]["members"][0]["minicluster"]["spec"]["size"] = "three"


def _no_jobs(d: dict[str, Any]) -> None:
    del d["spec"]["members"][0]["jobs"]


def _jobs_not_a_list(d: dict[str, Any]) -> None:
    d["spec"]["members"][0]["jobs"] = {"name": "wide", "command": "sleep 3"}


def _job_without_command(d: dict[str, Any]) -> None:
    del d["spec"]["members"][0]["jobs"][0]["command"]


def _misspelt_field(d: dict[str, Any]) -> None:
    d["spec"]["checkSecond"] = d["spec"].pop("checkSeconds")


def _zero_nodes(d: dict[str, Any]) -> None:
    d["spec"]["members"][0]["jobs"][0]["nodes"] = 0


def _no_minicluster(d: dict[str, Any]) -> None:
    del d["spec"]["members"][0]["minicluster"]


def _no_members(d: dict[str, Any]) -> None:
    d["spec"]["members"] = []


def _option_as_list(d: dict[str, Any]) -> None:
    d["spec"]["members"][0]["algorithm"]["options"]["order"] = ["descending"]


@pytest.mark.parametrize(
    ("breakage", "field"),
    [
        (_size_as_string, "spec.members.0.minicluster.spec.size"),
        (_no_jobs, "spec.members.0"),
        (_no_minicluster, "spec.members.0"),
        (_jobs_not_a_list, "spec.members.0.jobs"),
        (_job_without_command, "spec.members.0.jobs.0"),
        (_misspelt_field, "spec"),
        (_zero_nodes, "spec.members.0.jobs.0.nodes"),
        (_no_members, "spec.members"),
        (_option_as_list, "spec.members.0.algorithm.options.order"),
    ],
)
def test_crd_rejects_a_broken_ensemble_at_the_field(breakage: Any, field: str) -> None:
    document = _hello()
    assert ensemble_errors(document) == []
    breakage(document)
    errors = ensemble_errors(document)
    assert errors and all(e.startswith(f"{field}:") for e in errors), errors


def test_printer_columns_show_fields_the_status_has() -> None:
    """`kubectl get ensembles` shows a blank column when a jsonPath names no status field."""
    (crd,) = find(render("base"), "CustomResourceDefinition")
    (version,) = crd["spec"]["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Members", "Size", "Done", "Jobs", "Phase"} <= set(columns)
    for column in columns.values():
        if column["jsonPath"].startswith(".status."):
            field = column["jsonPath"].removeprefix(".status.")
            assert status[field]["type"] == column["type"], column
    assert "status" in version["subresources"]


def documented_ensembles() -> list[dict[str, Any]]:
    """The Ensembles shown in docs/kubernetes.md."""
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)]
    return [b for b in blocks if isinstance(b, dict) and b.get("kind") == "Ensemble"]


def test_documented_ensembles_are_accepted() -> None:
    assert len(documented_ensembles()) >= 2
    for document in documented_ensembles():
        assert ensemble_errors(document) == []


def documented_status() -> dict[str, Any]:
    """The example Ensemble with a status in docs/kubernetes.md (the yaml block that has one)."""
    (with_status,) = [d for d in documented_ensembles() if "status" in d]
    return with_status


def test_documented_status_is_the_crd_status() -> None:
    """The status shape the services write is the one docs/kubernetes.md shows, field for field."""
    document = documented_status()
    assert ensemble_errors(document) == []
    status = crd_schema()["properties"]["status"]
    assert set(document["status"]) == set(status["properties"])
    member_fields = set(status["properties"]["members"]["items"]["properties"])
    assert set().union(*(m.keys() for m in document["status"]["members"])) == member_fields
    condition_types = set(status["properties"]["conditions"]["items"]["properties"]["type"]["enum"])
    assert condition_types == {"Ready", "Scaling", "Completed", "Failed"}
    assert {c["type"] for c in document["status"]["conditions"]} == condition_types


# --- hardening, RBAC, settings -----------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_every_container_is_hardened(name: str) -> None:
    for workload in workloads(render(name)):
        pod = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert "livenessProbe" in container and "readinessProbe" in container, where
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, where
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: image {image} is not pinned"


def test_services_probe_the_health_port_contract() -> None:
    """Probes and ENSEMBLE_HEALTH_PORT agree: /healthz live, /readyz ready, on 8080."""
    objects = render("base")
    (settings_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("ensemble-settings")]
    assert settings_map["data"]["ENSEMBLE_HEALTH_PORT"] == "8080"
    for service in SERVICES:
        (container,) = deployment(objects, service)["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8080}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def rendered_rbac(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[tuple[str, str], set[str]]]:
    """service account → {(group, resource): verbs} granted by the rendered roles and bindings."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("Role", "ClusterRole")}
    granted: dict[str, dict[tuple[str, str], set[str]]] = {
        o["metadata"]["name"]: {} for o in find(objects, "ServiceAccount")
    }
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        for subject in binding["subjects"]:
            assert subject["namespace"] == "ensemble-system"
            for rule in role["rules"]:
                # a grant narrowed to named objects or to one namespace is its own entry
                scope = ":" + ",".join(rule["resourceNames"]) if rule.get("resourceNames") else ""
                if role["kind"] == "Role":
                    scope += "@" + role["metadata"]["namespace"]
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted[subject["name"]].setdefault((group, resource + scope), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("name", RENDERS)
def test_rbac_grants_exactly_the_contract(name: str) -> None:
    objects = render(name)
    expected = copy.deepcopy(RBAC)
    if any(o["kind"] == "Certificate" and o["metadata"]["name"] == "ensemble-sidecar" for o in objects):
        for service, grants in SIDECAR_TLS_RBAC.items():
            expected[service].update(grants)
    assert rendered_rbac(objects) == expected
    for service in SERVICES:
        pod = deployment(objects, service)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == service
        # no Kubernetes credentials at all where no role is bound
        assert pod.get("automountServiceAccountToken", True) is bool(RBAC[service]), service


def test_documented_rbac_is_the_contract() -> None:
    section = DOCS.read_text().split("## RBAC", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, dict[tuple[str, str], set[str]]] = {service: {} for service in SERVICES}
    for row in re.findall(r"^\|(.+)\|\s*$", section, re.M):
        cells = [c.strip().strip("`") for c in row.split("|")]
        if cells[0] in SERVICES:
            group = "" if cells[1] in ('""', "(core)") else cells[1]
            documented[cells[0]][(group, cells[2])] = {v.strip() for v in cells[3].split(",")}
    assert documented == RBAC


def test_settings_config_map_is_accepted_by_the_services() -> None:
    """A bad or misspelt ENSEMBLE_* value would make every service exit at start."""
    for name in RENDERS:
        (settings_map,) = [
            o for o in find(render(name), "ConfigMap") if o["metadata"]["name"].startswith("ensemble-settings")
        ]
        data = settings_map["data"]
        known = {settings_module.env_name(field) for field in settings_module.Settings.__struct_fields__}
        assert {k for k in data if k.startswith("ENSEMBLE_")} <= known, f"{name}: unknown settings"
        settings_module.load(data)


@pytest.mark.parametrize("name", RENDERS)
def test_operator_secret_reaches_only_the_creator_and_the_actuator(name: str) -> None:
    objects = render(name)
    for service in SERVICES:
        (container,) = deployment(objects, service)["spec"]["template"]["spec"]["containers"]
        names = {e["name"] for e in container.get("env", [])}
        assert ("ENSEMBLE_SIDECAR_TOKEN" in names) is (service in ("creator", "actuator")), service


def test_every_service_runs_the_one_image_with_its_command() -> None:
    images = set()
    for service in SERVICES:
        (container,) = deployment(render("base"), service)["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [service]
        images.add(container["image"])
    assert images == {"ghcr.io/flux-framework/ensemble-operator:0.1.0"}


# --- NATS ------------------------------------------------------------------------------------------


def nats_files(name: str) -> dict[str, str]:
    """The NATS configuration files of a render."""
    (config,) = [o for o in find(render(name), "ConfigMap") if o["metadata"]["name"].startswith("nats-config")]
    files: dict[str, str] = config["data"]
    return files


def check_nats_config(files: dict[str, str], directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``nats-server -t`` on the configuration with its paths moved under ``directory``."""
    for name, text in files.items():
        moved = text.replace("/data/jetstream", str(directory / "jetstream")).replace("/etc/nats-tls", str(directory))
        (directory / name).write_text(moved)
    binary = Path(sys.executable).parent / "nats-server"
    return subprocess.run(
        [str(binary), "-t", "-c", str(directory / "nats.conf")],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "nats-0", **env},
    )


#: The environment nats-auth gives the server: each service's password (keys of ensemble-nats-auth).
NATS_PASSWORDS = {f"NATS_{service.upper()}_PASSWORD": "x" * 24 for service in SERVICES}


@pytest.mark.parametrize("name", ["base", "nats-auth"])
def test_nats_accepts_its_configuration(name: str, tmp_path: Path) -> None:
    result = check_nats_config(nats_files(name), tmp_path, NATS_PASSWORDS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_nats_refuses_to_start_without_a_services_password(tmp_path: Path, service: str) -> None:
    missing = {k: v for k, v in NATS_PASSWORDS.items() if k != f"NATS_{service.upper()}_PASSWORD"}
    result = check_nats_config(nats_files("nats-auth"), tmp_path, missing)
    assert result.returncode != 0 and f"NATS_{service.upper()}_PASSWORD" in result.stderr


def test_the_nats_server_gets_every_services_password_from_the_secret() -> None:
    (nats,) = find(render("nats-auth"), "StatefulSet", "nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    for service in SERVICES:
        reference = secrets[f"NATS_{service.upper()}_PASSWORD"]
        assert (reference["name"], reference["key"], reference["optional"]) == ("ensemble-nats-auth", service, False)


def test_production_nats_configuration_with_tls_and_auth_is_accepted(tmp_path: Path) -> None:
    tls_files(tmp_path, "nats.ensemble-system.svc")
    files = nats_files("overlays/production")
    assert "tls {" in files["tls.conf"] and "authorization {" in files["auth.conf"]
    result = check_nats_config(files, tmp_path, NATS_PASSWORDS)
    assert result.returncode == 0, result.stderr


def test_production_services_trust_the_nats_ca_and_authenticate() -> None:
    objects = render("overlays/production")
    (settings_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("ensemble-settings")]
    ca_file = Path(settings_map["data"]["SSL_CERT_FILE"])
    (server_cert,) = [c for c in find(objects, "Certificate") if c["spec"]["secretName"] == "nats-tls"]
    for service in SERVICES:
        pod = deployment(objects, service)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        url = env["ENSEMBLE_NATS_URL"]["value"]
        assert url.startswith(f"nats://{service}:$(NATS_PASSWORD)@"), url  # each service its own user
        password = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (password["name"], password["key"]) == ("ensemble-nats-auth", service)
        host = url.rsplit("@", 1)[1].split(":")[0]
        assert host in server_cert["spec"]["dnsNames"], f"the server certificate does not name {host}"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(ca_file.parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"] == {
            "secretName": "nats-tls",
            "optional": False,
            "items": [{"key": ca_file.name, "path": ca_file.name}],
        }


@pytest.mark.parametrize("name", ["sidecar-tls", "overlays/production"])
def test_sidecar_tls_settings_name_the_issued_secret_and_the_mounted_ca(name: str) -> None:
    objects = render(name)
    (settings_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("ensemble-settings")]
    data = settings_map["data"]
    namespace, secret = data["ENSEMBLE_SIDECAR_TLS_SECRET"].split("/")
    (certificate,) = [c for c in find(objects, "Certificate") if c["spec"]["secretName"] == secret]
    assert certificate["metadata"]["namespace"] == namespace
    assert certificate["spec"]["dnsNames"] == [data["ENSEMBLE_SIDECAR_TLS_NAME"]]
    ca_path = Path(data["ENSEMBLE_SIDECAR_CA"])
    for service in SERVICES:
        pod = deployment(objects, service)["spec"]["template"]["spec"]
        volumes = [v for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == secret]
        if service not in ("poller", "actuator"):
            assert volumes == [], f"{service} needs no sidecar certificate"
            continue
        # the CA certificate only, where ENSEMBLE_SIDECAR_CA points: never the sidecar's key
        (volume,) = volumes
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca_path.name}]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == str(ca_path.parent) and mount["readOnly"] is True


def test_nats_keeps_its_store_on_a_claim() -> None:
    (nats,) = find(render("base"), "StatefulSet", "nats")
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    (data,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert "store_dir: " + data["mountPath"] in nats_files("base")["nats.conf"].replace("/jetstream", "")


# --- components ------------------------------------------------------------------------------------


def test_ha_replicates_every_service_with_a_disruption_budget() -> None:
    objects = render("ha")
    budgets = {
        b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for b in find(objects, "PodDisruptionBudget")
    }
    for service in SERVICES:
        spec = deployment(objects, service)["spec"]
        assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate" and service in budgets
    # the base runs one of each
    for service in SERVICES:
        assert deployment(render("base"), service)["spec"]["replicas"] == 1


def test_the_creator_elects_its_leader_with_a_lease_in_its_own_namespace() -> None:
    (container,) = deployment(render("ha"), "creator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["ENSEMBLE_LEADER_LEASE"]["value"] == "$(POD_NAMESPACE)/ensemble-creator"


@pytest.mark.parametrize("name", ["nats-cluster", "overlays/production"])
def test_nats_cluster_is_three_servers_with_routes_to_each_a_claim_each_and_three_replicas(
    name: str, tmp_path: Path
) -> None:
    objects = render(name)
    (nats,) = find(objects, "StatefulSet", "nats")
    spec = nats["spec"]
    assert (spec["replicas"], spec["podManagementPolicy"]) == (3, "Parallel")
    assert spec["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    (headless,) = find(objects, "Service", "nats-headless")
    assert headless["spec"]["clusterIP"] == "None" and spec["serviceName"] == "nats-headless"
    assert {"port": 6222, "targetPort": "cluster", "name": "cluster"} in headless["spec"]["ports"]
    files = nats_files(name)
    routes = re.findall(r"nats://([a-z0-9-]+)\.([a-z0-9-]+):6222", files["cluster.conf"])
    assert routes == [(f"nats-{i}", "nats-headless") for i in range(3)]
    (settings_map,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith("ensemble-settings")]
    assert settings_map["data"]["ENSEMBLE_NATS_REPLICAS"] == "3"
    (budget,) = [b for b in find(objects, "PodDisruptionBudget") if b["metadata"]["name"] == "nats"]
    assert budget["spec"]["maxUnavailable"] == 1
    if name == "overlays/production":
        tls_files(tmp_path, "nats.ensemble-system.svc")
    result = check_nats_config(files, tmp_path, NATS_PASSWORDS)
    assert result.returncode == 0, result.stderr


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


#: What an egress rule without ports may reach: any port, but only of our MiniClusters' pods (a member's
#: sidecar.port is its own).
SIDECAR_PODS = "any port of pods labelled ensemble.flux-framework.org/ensemble"


def egress_ports(objects: tuple[dict[str, Any], ...], labels: dict[str, str]) -> set[int | str]:
    """The ports the network policies let a pod with ``labels`` connect to (anywhere), and
    :data:`SIDECAR_PODS` for a rule open on every port of the MiniCluster pods."""
    ports: set[int | str] = set()
    for policy in find(objects, "NetworkPolicy"):
        if _selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get("egress", []):
                if "ports" in rule:
                    ports.update(p["port"] for p in rule["ports"])
                    continue
                # every port: only ever towards the pods of our MiniClusters
                for to in rule["to"]:
                    expressions = to["podSelector"]["matchExpressions"]
                    assert expressions == [{"key": "ensemble.flux-framework.org/ensemble", "operator": "Exists"}]
                ports.add(SIDECAR_PODS)
    return ports


def test_network_policies_allow_only_what_each_service_needs() -> None:
    objects = render("network-policy")
    (deny,) = find(objects, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    needs: dict[str, set[int | str]] = {
        "creator": {53, 4222, 443, 6443},
        "poller": {53, 4222, 443, 6443, SIDECAR_PODS},
        "decider": {53, 4222},
        "actuator": {53, 4222, 443, 6443, SIDECAR_PODS},
    }
    for service, ports in needs.items():
        labels = deployment(objects, service)["spec"]["template"]["metadata"]["labels"]
        assert egress_ports(objects, labels) == ports, service
    nats_labels = find(objects, "StatefulSet", "nats")[0]["spec"]["template"]["metadata"]["labels"]
    assert egress_ports(objects, nats_labels) == {53}


def test_service_monitor_scrapes_every_service() -> None:
    objects = render("monitoring")
    (monitor,) = find(objects, "ServiceMonitor")
    (service,) = [s for s in find(objects, "Service") if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    for name in SERVICES:
        template = deployment(objects, name)["spec"]["template"]
        assert _selects({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"]), name
        (container,) = template["spec"]["containers"]
        assert {"name": "http", "containerPort": 8080} in container["ports"]


def test_the_api_server_egress_is_one_address_the_user_sets_never_anywhere(tmp_path: Path) -> None:
    for name in ("network-policy", "overlays/production"):
        (policy,) = find(render(name), "NetworkPolicy", "api-server")
        blocks = [to["ipBlock"]["cidr"] for rule in policy["spec"]["egress"] for to in rule["to"]]
        assert blocks == ["198.51.100.1/32"], name  # a documentation address until set: reaches nothing
    # the overlay patch components/network-policy/README.md shows, with the user's address
    readme = (KUSTOMIZE / "components" / "network-policy" / "README.md").read_text()
    snippet = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    overlay = tmp_path / "mine"
    overlay.mkdir()
    relative = os.path.relpath(KUSTOMIZE, overlay)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{relative}/base"],
        "components": [f"{relative}/components/network-policy"],
        **snippet,
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run([KUBECTL or "kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    (policy,) = [d for d in rendered if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "api-server"]
    assert policy["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "10.0.0.2/32"}}]
