"""Render helm/ernie-cluster with Helm's own engine and validate what it renders.

helm-python-sdk binds Helm's Go SDK (no `helm` binary), so lint, schema checks and templates run
exactly as `helm lint` / `helm template` do. Built-in kinds are checked against the Kubernetes
OpenAPI schemas that kubernetes-validate ships, the RayService against KubeRay's CRD schema in
<repo>/../shared/reference/kuberay. Validation is strict: an unknown field is an error.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "ernie-cluster"
EXAMPLES = sorted((CHART_DIR / "examples").glob("*.yaml"))
KUBERAY_DIR = REPO_ROOT.parent / "shared" / "reference" / "kuberay"
KUBE_VERSION = "1.32"
RELEASE = "ernie"
NAMESPACE = "llm"

K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
POD_TEMPLATE = {"$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
LABEL_SELECTOR = {
    "$ref": f"{K8S_DEFS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
}

helm.disable_logging()


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_manifests(
    values: dict[str, Any] | None = None, release: str = RELEASE
) -> dict[str, str]:
    """template path -> rendered text (NOTES.txt included), as `helm template` sees it."""
    return chart().render(values, name=release, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with `values` over the defaults."""
    objects = []
    for path, text in sorted(render_manifests(values, release).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayService's serveConfigV2, a YAML string, parsed."""
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")


# --- Names: the API server checks these, the OpenAPI schemas do not ---

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# KubeRay names Services after the RayService (`<name>-serve-svc`, `<name>-head-svc`), and a
# Service name is a DNS-1035 label of at most 63 characters.
MAX_RAYSERVICE_NAME = 63 - len("-serve-svc")


def validate_names(obj: dict[str, Any]) -> None:
    name, kind = obj["metadata"]["name"], obj["kind"]
    if kind in ("Service", "RayService"):
        limit = 63 if kind == "Service" else MAX_RAYSERVICE_NAME
        assert DNS1035_LABEL.match(name) and len(name) <= limit, f"bad {kind} name {name!r}"
    else:
        assert DNS1123_SUBDOMAIN.match(name) and len(name) <= 253, f"bad {kind} name {name!r}"
    for value in obj["metadata"].get("labels", {}).values():
        assert LABEL_VALUE.match(value) and len(value) <= 63, f"bad label value {value!r}"


# --- Kubernetes schemas -------------------------------------------------------------------


@functools.cache
def _k8s_registry() -> Registry:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads(
        (folder / f"v{KUBE_VERSION}.0-local-strict" / "_definitions.json").read_text()
    )
    assert defs["$id"] == K8S_DEFS_ID
    return Registry().with_resource(K8S_DEFS_ID, Resource.from_contents(defs))


def validate_builtin(obj: dict[str, Any]) -> None:
    """A built-in kind against the Kubernetes OpenAPI schema (strict: no unknown fields)."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def validate_pod_template(template: dict[str, Any]) -> None:
    """KubeRay turns each group's template into Pods: check it as a core/v1 PodTemplateSpec."""
    validator = jsonschema.Draft202012Validator(POD_TEMPLATE, registry=_k8s_registry())
    validator.validate(template)


# --- KubeRay CRD schema -------------------------------------------------------------------


def _int_or_string(validator, enabled, instance, schema):
    if enabled and (isinstance(instance, bool) or not isinstance(instance, int | str)):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _cel_rules(validator, rules, instance, schema):
    # NOTE: CEL rules need the API server. Fail on any field that carries them rather than pass
    # it unchecked; the chart sets none of those fields today.
    yield jsonschema.ValidationError(
        "field has CEL rules (x-kubernetes-validations) that cannot be checked offline: "
        + "; ".join(rule["rule"] for rule in rules)
    )


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-validations": _cel_rules},
)


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 CRD schema as strict JSON Schema: objects with declared properties reject
    unknown fields (like `kubectl apply --validate=strict`) unless they preserve unknown fields;
    `nullable` admits null."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _structural(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _structural(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_structural(sub) for sub in out[key]]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crd_file: str, api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema of one served version of a CRD in shared/reference/kuberay."""
    crd = yaml.load(
        (KUBERAY_DIR / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] and not entry.get("deprecated"), f"{api_version} is not served"
    return entry["schema"]["openAPIV3Schema"]


@functools.cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    schema = _structural(crd_schema("ray.io_rayservices.yaml", "ray.io/v1"))
    # The CRD leaves metadata open; the API server checks it as ObjectMeta.
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    CRDValidator.check_schema(schema)
    return CRDValidator(schema, registry=_k8s_registry())


def validate_rayservice(obj: dict[str, Any]) -> None:
    validate_names(obj)
    rayservice_validator().validate(obj)
    cluster = obj["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        validate_pod_template(group["template"])


# --- ServiceMonitor -----------------------------------------------------------------------

# NOTE: the Prometheus Operator CRD is not in shared/reference, so this is a hand-written subset
# of monitoring.coreos.com/v1 ServiceMonitor: the fields the chart uses, with its Duration
# pattern; anything else is rejected.
DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                        },
                    },
                },
            },
        },
    },
}


def validate_service_monitor(obj: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=_k8s_registry())
    validator.validate(obj)


BUILTIN_API_VERSIONS = {"v1", "apps/v1", "networking.k8s.io/v1", "policy/v1"}


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one rendered object by its kind; an object no schema covers is an error."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    validate_names(obj)
    if api_version in BUILTIN_API_VERSIONS:
        validate_builtin(obj)
    elif (api_version, kind) == ("ray.io/v1", "RayService"):
        validate_rayservice(obj)
    elif (api_version, kind) == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        validate_service_monitor(obj)
    else:
        raise AssertionError(f"no schema to validate {api_version} {kind} against")
