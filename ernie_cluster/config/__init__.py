"""Configuration: model architecture (config.json) and engine settings."""

from ernie_cluster.config.model_config import ErnieMoeConfig

__all__ = ["ErnieMoeConfig"]
