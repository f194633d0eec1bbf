"""Distribution across the ranks of one model instance: collectives and expert dispatch."""

from ernie_cluster.distributed.communicator import SINGLE_RANK, Communicator

__all__ = ["SINGLE_RANK", "Communicator"]
