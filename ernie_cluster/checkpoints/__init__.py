"""The demo checkpoint that ships with the package (`demo.py`, data in `demo_checkpoint/`)."""
