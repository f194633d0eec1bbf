"""Random demo and test checkpoints in the Hugging Face hub layout."""
