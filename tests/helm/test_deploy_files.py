"""deploy/Dockerfile and deploy/ray-cluster.yaml, checked without Docker or a cloud: the image
is the official Ray GPU image of the installed Ray, torch goes in before the package, the cluster
launcher config passes Ray's own schema and uses the same base image and install steps."""

from __future__ import annotations

import re
from importlib.metadata import metadata

import ray
import yaml
from chart_render import REPO_ROOT, chart
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import validate_config

DEPLOY = REPO_ROOT / "deploy"
RAY_GPU_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<minor>\d+)-gpu$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def base_image() -> str:
    instructions = dockerfile_instructions()
    keyword, args = instructions[0]
    assert keyword == "FROM", f"the Dockerfile starts with {keyword}, not FROM"
    return args.split()[0]


def torch_version() -> str:
    args = [args for keyword, args in dockerfile_instructions() if keyword == "ARG"]
    (version,) = [arg.split("=", 1)[1] for arg in args if arg.startswith("TORCH_VERSION=")]
    return version


def test_dockerfile_starts_from_the_ray_gpu_image_of_the_installed_ray():
    match = RAY_GPU_IMAGE.match(base_image())
    assert match, f"{base_image()} is not rayproject/ray:<version>-py3XX-gpu"
    assert match["ray"] == ray.__version__
    requires = SpecifierSet(metadata("ernie-cluster")["Requires-Python"])
    assert f"3.{match['minor']}" in requires


def test_dockerfile_installs_torch_then_the_package():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if "pip install" in run and "torch" in run)
    package_step = next(
        i for i, run in enumerate(runs) if re.search(r"pip install [^&]*\s\.(\s|$)", run)
    )
    assert torch_step < package_step
    copies = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "COPY")
    assert "pyproject.toml" in copies and "ernie_cluster" in copies


def test_cluster_launcher_config_is_valid_and_uses_the_same_image():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(config)
    assert config["docker"]["image"] == base_image()
    setup = config["setup_commands"]
    assert any(f'"torch=={torch_version()}"' in command for command in setup)
    (source,) = config["file_mounts"]
    assert any(f"cd {source} && pip install" in command for command in setup)
    head = config["available_node_types"][config["head_node_type"]]
    assert "min_workers" not in head
    workers = [
        t for name, t in config["available_node_types"].items() if name != config["head_node_type"]
    ]
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]


def test_chart_matches_image_and_package_versions():
    assert chart().metadata["appVersion"] == metadata("ernie-cluster")["Version"]
    match = RAY_GPU_IMAGE.match(base_image())
    assert match and chart().values["rayVersion"] == match["ray"]


def test_serve_config_and_cluster_launcher_keep_to_loopback():
    """`serve run deploy/serve_config.yaml` serves on 127.0.0.1 unless edited, and the VM
    cluster leaves the dashboard on the head's loopback (Ray's default)."""
    serve_config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    assert serve_config["http_options"]["host"] == "127.0.0.1"
    (app,) = serve_config["applications"]
    assert "api_key" not in app["args"]
    cluster = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "dashboard-host" not in head_start
