"""values.schema.json: Helm rejects bad values before rendering; the templates reject the
cross-field mistakes a per-field schema cannot see. Enums stay in step with ServeAppConfig."""

from __future__ import annotations

import json
import typing

import helm_python as helm
import jsonschema
import pytest
from chart_render import CHART_DIR, EXAMPLES, chart, load_values

from ernie_cluster.serving.parsers import REASONING_PARSERS, TOOL_PARSERS
from ernie_cluster.serving.ray_serve.config import ServeAppConfig

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())

BAD_VALUES = {
    "negative-min-replicas": ({"serve": {"autoscaling": {"minReplicas": -1}}}, "minReplicas"),
    "negative-max-replicas": ({"serve": {"autoscaling": {"maxReplicas": -2}}}, "maxReplicas"),
    "zero-max-replicas": ({"serve": {"autoscaling": {"maxReplicas": 0}}}, "maxReplicas"),
    "negative-upscale-delay": ({"serve": {"autoscaling": {"upscaleDelayS": -1}}}, "upscaleDelayS"),
    "negative-downscale-delay": (
        {"serve": {"autoscaling": {"downscaleDelayS": -0.5}}},
        "downscaleDelayS",
    ),
    "string-upscale-delay": ({"serve": {"autoscaling": {"upscaleDelayS": "30s"}}}, "upscaleDelayS"),
    "negative-ingress-replicas": ({"serve": {"ingressReplicas": -1}}, "ingressReplicas"),
    "negative-gpus-per-pod": ({"worker": {"gpusPerPod": -8}}, "gpusPerPod"),
    "tp-3-does-not-divide-4-kv-heads": ({"serve": {"tensorParallelSize": 3}}, "tensorParallelSize"),
    "tp-8-does-not-divide-4-kv-heads": ({"serve": {"tensorParallelSize": 8}}, "tensorParallelSize"),
    "tp-0": ({"serve": {"tensorParallelSize": 0}}, "tensorParallelSize"),
    "ep-3": ({"serve": {"expertParallelSize": 3}}, "expertParallelSize"),
    "no-model-name": ({"model": {"name": None}}, "name"),
    "empty-model-name": ({"model": {"name": ""}}, "name"),
    "no-model": ({"model": None}, "model"),
    "unknown-parser": ({"serve": {"reasoningParser": "deepseek_r1"}}, "reasoningParser"),
    "unknown-key": ({"serve": {"tensorParalelSize": 2}}, "tensorParalelSize"),
    "bad-memory": ({"worker": {"memory": "lots"}}, "memory"),
    "bad-cache-type": ({"modelCache": {"type": "s3"}}, "type"),
    "api-key-as-a-value": ({"auth": {"apiKey": "sk-x"}}, "apiKey"),
    "empty-secret-key": ({"auth": {"secretKey": ""}}, "secretKey"),
    "network-policy-peer-not-a-list": (
        {"networkPolicy": {"apiFrom": {"podSelector": {}}}},
        "apiFrom",
    ),
    "security-context-not-an-object": ({"securityContext": "restricted"}, "securityContext"),
}


def _python_errors(values: dict) -> list[str]:
    merged = chart().merge_values(values)
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [error.message for error in validator.iter_errors(merged)]


def test_schema_is_valid_draft7():
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert chart().schema == SCHEMA


@pytest.mark.parametrize("path", [None, *EXAMPLES], ids=["defaults", *(p.stem for p in EXAMPLES)])
def test_schema_accepts_shipped_values(path):
    values = load_values(path) if path else {}
    chart().validate_schema(values)
    assert _python_errors(values) == []


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_schema_rejects(name):
    values, field = BAD_VALUES[name]
    with pytest.raises(helm.HelmValuesError, match=field):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        chart().render(values)
    assert _python_errors(values), "jsonschema accepted what Helm rejected"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"serve": {"expertParallelSize": 2}}, r"expertParallelSize \(2\) must equal"),
        (
            {"serve": {"autoscaling": {"minReplicas": 3}}},
            r"minReplicas \(3\) must be <= maxReplicas",
        ),
        ({"worker": {"gpusPerPod": 6}}, r"gpusPerPod \(6\) must be a multiple of .*\(4\)"),
        ({"worker": {"gpusPerPod": 8, "cpus": 9}}, r"worker.cpus \(9\) is too small: .* needs 10"),
    ],
)
def test_templates_reject_cross_field_mistakes(values, message):
    chart().validate_schema(values)
    with pytest.raises(helm.HelmRenderError, match=message):
        chart().render(values)


def _enum(prop: dict) -> set:
    return set(prop["enum"])


def test_enums_follow_serve_app_config():
    serve = SCHEMA["properties"]["serve"]["properties"]
    assert _enum(serve["reasoningParser"]) == set(REASONING_PARSERS) | {None}
    assert _enum(serve["toolCallParser"]) == set(TOOL_PARSERS) | {None}
    fields = ServeAppConfig.model_fields
    assert _enum(serve["placementStrategy"]) == set(
        typing.get_args(fields["placement_strategy"].annotation)
    )
    model = SCHEMA["properties"]["model"]["properties"]
    assert _enum(model["dtype"]) == set(typing.get_args(fields["dtype"].annotation))
