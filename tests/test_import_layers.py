"""The package's layering, read from the source: no runtime module imports from a layer above
its own, and the runtime imports nothing from the tooling package (`ernie_cluster_tools`).

Imports are read with `ast` from every module, function-level (lazy) imports included, so a
dependency cannot hide inside a function. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME = "ernie_cluster"
TOOLING = "ernie_cluster_tools"

LAYERS: list[tuple[str, ...]] = [
    ("config", "checkpoints", "triton_env", "triton_rounding", "cpu_bf16"),
    ("tokenizer", "sampling_params", "outputs", "step_io"),
    ("structured_output",),
    ("inputs",),
    ("attention", "distributed", "quantization"),
    ("model",),
    ("loader",),
    ("sample", "worker"),
    ("executor",),
    ("engine",),
    ("entrypoints",),
    ("serving",),
    ("bench", "cli"),
]
"""Top-level parts of `ernie_cluster`, lowest first."""

TOOL_COMMANDS = f"{TOOLING}.cli"
"""The one tooling module the runtime may reach: the CLI's `make-tiny` / `train-demo`
subcommands, imported lazily by `ernie_cluster/cli` only."""

PUBLIC_API = {
    "LLM": "entrypoints",
    "SamplingParams": "sampling_params",
    "StructuredOutputsParams": "sampling_params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
}
"""Names `ernie_cluster/__init__.py` exports (lazily), by the part that defines them."""

LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def _part(repo: Path, path: Path) -> str:
    """The top-level part of `ernie_cluster` that a source file belongs to."""
    relative = path.relative_to(repo / RUNTIME).with_suffix("")
    return relative.parts[0]


def _imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, relative ones resolved."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([name] if name else []))
            found.append((node.lineno, name))
            # `from ernie_cluster import serving` imports a part; `import LLM` the public API.
            if name in (RUNTIME, TOOLING):
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
                continue
    return found


def _runtime_files(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / RUNTIME).rglob("*.py") if "__pycache__" not in p.parts)


def _violations(repo: Path = REPO) -> list[str]:
    problems = []
    for path in _runtime_files(repo):
        source_part = _part(repo, path)
        if source_part == "__init__":
            continue  # the package's lazy exports reach down into any layer
        if source_part not in LAYER_OF:
            problems.append(f"{path.relative_to(repo)}: part {source_part!r} has no layer")
            continue
        module = ".".join(path.relative_to(repo).with_suffix("").parts)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in _imported_modules(tree, module):
            where = f"{path.relative_to(repo)}:{line}"
            top = name.split(".")
            if top[0] == TOOLING:
                allowed = source_part == "cli" and name == TOOL_COMMANDS
                if not allowed:
                    problems.append(f"{where}: runtime imports tooling module {name}")
                continue
            if top[0] != RUNTIME or len(top) < 2:
                continue
            target_part = top[1] if top[1] in LAYER_OF else PUBLIC_API.get(top[1], top[1])
            if target_part not in LAYER_OF:
                problems.append(f"{where}: imports {name}, whose part has no layer")
                continue
            if LAYER_OF[target_part] > LAYER_OF[source_part]:
                problems.append(
                    f"{where}: {source_part} (layer {LAYER_OF[source_part]}) imports {name} "
                    f"(layer {LAYER_OF[target_part]})"
                )
    return problems


def test_no_runtime_module_imports_upward_or_from_tooling():
    problems = _violations()
    assert not problems, "\n".join(problems)


def test_every_runtime_part_has_a_layer():
    parts = {_part(REPO, path) for path in _runtime_files(REPO)} - {"__init__"}
    assert parts == set(LAYER_OF), (
        f"parts without a layer: {sorted(parts - set(LAYER_OF))}; "
        f"layers naming no part: {sorted(set(LAYER_OF) - parts)}"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ernie_cluster.serving.api import X\n", "imports ernie_cluster.serving.api"),
        ("def f():\n    import ernie_cluster_tools.fixtures.make_tiny\n", "tooling module"),
        ("from .. import serving\n", "imports ernie_cluster.serving"),
    ],
)
def test_the_checker_sees_upward_and_tooling_imports(tmp_path, source, expected):
    """The checker itself: an engine module importing serving (also lazily, also relatively)
    or tooling is reported."""
    engine = tmp_path / RUNTIME / "engine"
    engine.mkdir(parents=True)
    (engine / "bad.py").write_text(source)
    problems = _violations(tmp_path)
    assert any(expected in problem for problem in problems), problems
