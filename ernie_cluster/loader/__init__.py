"""Checkpoint discovery (checkpoint_files: torch-free, the ingress uses it) and weight loading
(model_loader, safetensors_loader). Nothing is imported here, so finding a checkpoint never
loads torch."""
