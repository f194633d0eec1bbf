"""The ernie-cluster command line."""
