"""Checkpoint discovery and weight loading."""

from ernie_cluster.loader.checkpoint_files import CheckpointError, resolve_model_path
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.loader.safetensors_loader import load_weights

__all__ = ["CheckpointError", "load_model", "load_weights", "resolve_model_path"]
