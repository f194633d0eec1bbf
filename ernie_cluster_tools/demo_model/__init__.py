"""The demo model: a small ernie4_5_moe checkpoint trained on CPU to think, answer and call
tools; its checkpoint ships as runtime package data (`ernie_cluster/checkpoints/demo_checkpoint/`,
see `ernie_cluster.checkpoints.demo`) and scripts/demo.sh serves it.

Submodules: lexicon, phrasings and tool_schemas (the words), conversations (the data),
tokenizer_builder, dataset, architecture, settings, trainer, export, pipeline (the build) and
evaluate (held-out scores). Importing this package loads neither torch nor transformers.
"""
