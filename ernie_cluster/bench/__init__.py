"""Load generation and load tests: `ernie-cluster bench serve | autoscale | long-session`."""
