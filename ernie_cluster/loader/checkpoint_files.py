"""Finding a checkpoint's files: a local directory or a Hugging Face repo id, and its shards.

Owns path resolution (huggingface_hub download into the normal cache for repo ids) and the
validation of `model.safetensors.index.json`. It never reads tensor data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "*.txt"]
WEIGHT_PATTERNS = ["*.safetensors"]


class CheckpointError(ValueError):
    """The checkpoint on disk is inconsistent (missing file, broken index, bad tensor)."""


def resolve_model_path(
    model: str | Path, revision: str | None = None, include_weights: bool = True
) -> Path:
    """A local checkpoint directory as is, else a hub repo id downloaded into the HF cache
    (without the safetensors shards when `include_weights` is False: an HTTP front end only
    needs the config, tokenizer and template)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model {name!r} is neither a checkpoint directory nor a Hugging Face repo id "
            "of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub (cached after the first time)", name)
    patterns = HUB_PATTERNS + (WEIGHT_PATTERNS if include_weights else [])
    return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns))


def weight_map(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it, validated against the files themselves."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        return _read_index(index_path)
    single = model_dir / SINGLE_FILE
    files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {model_dir}")
    from safetensors import safe_open

    mapping: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in mapping:
                    raise CheckpointError(f"tensor {name!r} is in both {mapping[name]} and {file}")
                mapping[name] = file
    return mapping


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"broken index {index_path}: not valid JSON ({exc})") from exc
    raw_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(raw_map, dict) or not raw_map:
        raise CheckpointError(f"broken index {index_path}: no 'weight_map' object")
    from safetensors import safe_open

    mapping = {name: index_path.parent / str(file) for name, file in raw_map.items()}
    by_file: dict[Path, list[str]] = {}
    for name, file in mapping.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not file.is_file():
            raise CheckpointError(
                f"broken index {index_path}: tensor {names[0]!r} is mapped to {file.name}, "
                "which does not exist"
            )
        with safe_open(file, framework="pt") as handle:
            present = set(handle.keys())
        for name in names:
            if name not in present:
                raise CheckpointError(
                    f"broken index {index_path}: tensor {name!r} is mapped to {file.name}, "
                    "which does not contain it"
                )
    return mapping
