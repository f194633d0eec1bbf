"""Tooling around the ernie_cluster runtime: the demo-model trainer, test-fixture checkpoint
and tokenizer generators, and the step diagnostics (sync recorder, kernel counter, collective
census) that tests and benchmarks use. It may import the runtime; the runtime never imports it
(except the `ernie-cluster` CLI, which registers `make-tiny` and `train-demo` from `cli.py`).
"""
