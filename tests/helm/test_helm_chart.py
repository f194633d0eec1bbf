"""helm/ernie-cluster: lint, render with the defaults and every example, validate every object,
and check that the objects point at each other (selectors, ports, claims, secrets)."""

from __future__ import annotations

import copy
import math

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
from chart_render import (
    EXAMPLES,
    KUBERAY_DIR,
    chart,
    lint,
    load_values,
    only,
    render,
    render_manifests,
    serve_config,
    validate_object,
    validate_rayservice,
    validate_service_monitor,
)

# Every optional object and the volume/secret branches the examples leave out.
ALL_OPTIONAL = {
    "huggingface": {"token": "hf_test"},
    "modelCache": {"type": "emptyDir"},
    "rayAutoscaler": {"enabled": False},
    "ingress": {"enabled": True, "tls": [{"hosts": ["ernie.example.com"], "secretName": "tls"}]},
    "serviceMonitor": {"enabled": True},
    "auth": {"existingSecret": "ernie-api-key"},
    "networkPolicy": {
        "enabled": True,
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}],
        "extraIngress": [{"ports": [{"port": 8080}]}],
    },
}
VALUE_SETS = {
    "defaults": {},
    **{path.stem: load_values(path) for path in EXAMPLES},
    "all-optional": ALL_OPTIONAL,
}
needs_kuberay = pytest.mark.skipif(
    not KUBERAY_DIR.is_dir(),
    reason=f"KubeRay CRDs not found at {KUBERAY_DIR} (shared/reference beside the repository)",
)


@pytest.fixture(params=sorted(VALUE_SETS), ids=sorted(VALUE_SETS))
def values(request) -> dict:
    return copy.deepcopy(VALUE_SETS[request.param])


def test_examples_present():
    assert {path.stem for path in EXAMPLES} >= {"one-node-8gpu", "single-gpu-dev"}


def test_lint_clean(values):
    report = lint(values)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_bad_values():
    report = lint({"serve": {"tensorParallelSize": 3}})
    assert report["errors"], report


def test_renders_kinds(values):
    kinds = sorted(obj["kind"] for obj in render(values))
    merged = chart().merge_values(values)
    expected = ["RayService", "Service"]
    expected += ["PersistentVolumeClaim"] if merged["modelCache"]["type"] == "pvc" else []
    expected += ["PodDisruptionBudget"] if merged["podDisruptionBudget"]["enabled"] else []
    expected += ["Ingress"] if merged["ingress"]["enabled"] else []
    expected += ["ServiceMonitor"] if merged["serviceMonitor"]["enabled"] else []
    expected += ["Secret"] if merged["huggingface"]["token"] else []
    expected += ["NetworkPolicy"] if merged["networkPolicy"]["enabled"] else []
    assert kinds == sorted(expected)


def test_objects_validate(values):
    for obj in render(values):
        if obj["kind"] != "RayService":  # against the CRD below
            validate_object(obj)


@needs_kuberay
def test_rayservice_validates_against_crd(values):
    validate_rayservice(only(render(values), "RayService"))


@needs_kuberay
@pytest.mark.parametrize(
    "path, bad",
    [
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 4),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "two"),
        (("spec", "rayClusterConfig", "headGroupSpec", "serviceTypo"), "ClusterIP"),
        (("spec", "serveConfigV2"), {"applications": []}),
        (("metadata", "name"), "Not_A_DNS_Name"),
        (
            ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers"),
            [{"name": "ray-worker", "image": "x", "resourcez": {}}],
        ),
    ],
)
def test_crd_validation_rejects(path, bad):
    rayservice = only(render(), "RayService")
    node = rayservice
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_rayservice(rayservice)


def test_builtin_validation_rejects():
    service = only(render(), "Service")
    service["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(service)
    pdb = only(render(), "PodDisruptionBudget")
    pdb["spec"]["maxUnavailablez"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(pdb)


def test_service_monitor_validation_rejects():
    monitor = only(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_service_monitor(monitor)


@needs_kuberay
def test_longest_release_name_gives_valid_names():
    release = "a" * 53  # Helm's limit
    for obj in render(ALL_OPTIONAL, release=release):
        validate_object(obj)


def test_unknown_kind_is_an_error():
    with pytest.raises(AssertionError, match="no schema"):
        validate_object(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
        )


@pytest.mark.parametrize(
    "tp, gpus_per_pod, min_replicas, max_replicas, autoscaler, pods",
    [
        (4, None, 1, 2, True, (1, 1, 2)),  # one replica per pod
        (4, 8, 1, 2, True, (1, 1, 1)),  # 8-GPU node: two replicas in one pod
        (1, 8, 0, 10, True, (0, 0, 2)),  # ceil(10 * 1 / 8) = 2
        (2, 4, 3, 5, True, (2, 2, 3)),  # ceil(3 / 2), ceil(5 / 2)
        (2, 4, 3, 5, False, (3, 3, 3)),  # no Ray autoscaler: always the most
    ],
)
def test_worker_group_sizing(tp, gpus_per_pod, min_replicas, max_replicas, autoscaler, pods):
    values = {
        "serve": {
            "tensorParallelSize": tp,
            "autoscaling": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
        },
        "worker": {"gpusPerPod": gpus_per_pod, "cpus": 64},
        "rayAutoscaler": {"enabled": autoscaler},
    }
    cluster = only(render(values), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is autoscaler
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == pods
    gpus = gpus_per_pod or tp
    assert group["maxReplicas"] == math.ceil(max_replicas * tp / gpus)
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert group["rayStartParams"]["num-gpus"] == str(gpus)


def _subset(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_objects_reference_each_other(values):
    objects = render(values)
    rayservice = only(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    (worker_group,) = cluster["workerGroupSpecs"]
    worker = worker_group["template"]
    http_port = serve_config(rayservice)["http_options"]["port"]

    # The API Service: the head pod once KubeRay labels its Serve proxy ready.
    service = only(objects, "Service")
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"
    assert _subset(selector, head["metadata"]["labels"])
    assert not _subset(selector, worker["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    for template in (head, worker):
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[port["targetPort"]] == http_port

    # GPUs only on workers.
    (head_container,) = head["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"

    for obj in objects:
        if obj["kind"] == "PodDisruptionBudget":
            match = obj["spec"]["selector"]["matchLabels"]
            assert _subset(match, worker["metadata"]["labels"])
            assert not _subset(match, head["metadata"]["labels"])
        elif obj["kind"] == "ServiceMonitor":
            assert _subset(obj["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
            assert obj["spec"]["endpoints"][0]["port"] == port["name"]
            assert obj["spec"]["endpoints"][0]["path"] == "/metrics"
        elif obj["kind"] == "Ingress":
            for rule in obj["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    assert backend["name"] == service["metadata"]["name"]
                    assert backend["port"]["name"] == port["name"]

    claims = [obj["metadata"]["name"] for obj in objects if obj["kind"] == "PersistentVolumeClaim"]
    secrets = {
        obj["metadata"]["name"]: set(obj["stringData"])
        for obj in objects
        if obj["kind"] == "Secret"
    }
    merged = chart().merge_values(values)
    for template in (head, worker):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        cache = volumes["model-cache"]
        if "persistentVolumeClaim" in cache:
            assert cache["persistentVolumeClaim"]["claimName"] in claims
        (container,) = template["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"model-cache": merged["modelCache"]["mountPath"], "dshm": "/dev/shm"}
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HOME"]["value"].startswith(merged["modelCache"]["mountPath"] + "/")
        api_key = env.get("ERNIE_CLUSTER_API_KEY")
        if merged["auth"]["existingSecret"]:
            ref = api_key["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (
                merged["auth"]["existingSecret"],
                merged["auth"]["secretKey"],
            )
        else:
            assert api_key is None
        if "HF_TOKEN" in env:
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            if not merged["huggingface"]["existingSecret"]:
                assert ref["key"] in secrets[ref["name"]]
            else:
                assert ref["name"] == merged["huggingface"]["existingSecret"]


def test_notes_say_how_to_reach_the_api():
    service = only(render(), "Service")["metadata"]["name"]
    notes = render_manifests()["ernie-cluster/templates/NOTES.txt"]
    assert f"port-forward svc/{service} 8000:8000" in notes
    assert "/v1" in notes and "baidu/ERNIE-4.5-21B-A3B-Thinking" in notes
    with_ingress = render_manifests({"ingress": {"enabled": True}})
    assert "http://ernie.example.com/v1" in with_ingress["ernie-cluster/templates/NOTES.txt"]


def test_ray_start_params_keep_the_gpu_counts():
    values = {
        "head": {"rayStartParams": {"num-gpus": "2", "metrics-export-port": "8080"}},
        "worker": {"rayStartParams": {"num-gpus": "1", "object-store-memory": "1000000000"}},
    }
    cluster = only(render(values), "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head == {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-gpus": "0"}
    worker = cluster["workerGroupSpecs"][0]["rayStartParams"]
    assert worker == {"num-gpus": "4", "object-store-memory": "1000000000"}


# ------------------------------------------------------------------------------ security
def _pods(objects: list[dict]) -> list[dict]:
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]


def test_pods_run_restricted(values):
    """Non-root, no privilege escalation, no capabilities, the runtime's seccomp profile: the
    Kubernetes "restricted" Pod Security Standard, on every Ray pod and container."""
    objects = render(values)
    for template in _pods(objects):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in template["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:  # KubeRay's autoscaler sidecar in the head pod
        assert cluster["autoscalerOptions"]["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_api_key_comes_from_the_secret_never_the_serve_config(monkeypatch):
    from ernie_cluster.serving.ray_serve.config import API_KEY_ENV, ServeAppConfig

    values = {"auth": {"existingSecret": "ernie-api-key", "secretKey": "token"}}
    objects = render(values)
    rayservice = only(objects, "RayService")
    assert "api_key" not in rayservice["spec"]["serveConfigV2"]
    for template in _pods(objects):
        (container,) = template["spec"]["containers"]
        (env,) = [e for e in container["env"] if e["name"] == API_KEY_ENV]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "ernie-api-key", "key": "token"}
    # What build_app does with the rendered args in a pod that has the Secret's value.
    (app,) = serve_config(rayservice)["applications"]
    monkeypatch.setenv(API_KEY_ENV, "sk-from-secret")
    config = ServeAppConfig.model_validate(app["args"]).with_api_key_resolved()
    assert config.api_key == "sk-from-secret"


def test_api_key_in_extra_args_is_refused():
    with pytest.raises(helm.HelmRenderError, match=r"auth\.existingSecret"):
        render({"serve": {"extraArgs": {"api_key": "sk-oops"}}})


def test_dashboard_host_is_an_explicit_value():
    """KubeRay's operator needs the dashboard on the pod network and its probes need it on
    loopback, so 0.0.0.0 stays the default, but only as a value one can change."""
    head = only(render(), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    values = {"head": {"dashboardHost": "127.0.0.1"}}
    head = only(render(values), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_network_policy_admits_the_release_the_api_and_the_operator():
    objects = render({"networkPolicy": {"enabled": True}})
    policy = only(objects, "NetworkPolicy")
    validate_object(policy)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in _pods(objects):
        assert _subset(selector, template["metadata"]["labels"])
    own, api, dashboard = policy["spec"]["ingress"]
    assert own["from"] == [{"podSelector": {"matchLabels": selector}}] and "ports" not in own
    assert api["ports"] == [{"port": 8000, "protocol": "TCP"}] and "from" not in api
    assert dashboard["ports"] == [{"port": 8265, "protocol": "TCP"}]
    (operator,) = dashboard["from"]
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}

    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]
    values = {"networkPolicy": {"enabled": True, "apiFrom": peers, "dashboardFrom": []}}
    own, api = only(render(values), "NetworkPolicy")["spec"]["ingress"]
    assert api["from"] == peers


def test_notes_warn_about_a_published_api_without_a_key():
    def notes(values: dict) -> str:
        return render_manifests(values)["ernie-cluster/templates/NOTES.txt"]

    assert "WARNING" not in notes({})
    for published in ({"ingress": {"enabled": True}}, {"service": {"type": "LoadBalancer"}}):
        text = notes(published)
        assert "WARNING: the API is published" in text and "auth.existingSecret" in text
        guarded = notes({**published, "auth": {"existingSecret": "ernie-api-key"}})
        assert "WARNING" not in guarded
        assert 'Authorization: Bearer $KEY"' in guarded and "get secret ernie-api-key" in guarded
