"""ctypes bindings of libnccl: finding and loading the library, its C types and enums, and one
checked Python call per NCCL function used here.

Owns the C side only: argument and result types as nccl.h declares them, the torch dtype and
reduce-op to NCCL enum maps, and turning a non-zero ncclResult_t into a RuntimeError. Never
checks tensors or picks streams (nccl/communicator.py does).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

NCCL_SO_ENV = "ERNIE_NCCL_SO"
"""Path of the libnccl to load, tried before the pip package's and the system loader's."""
SONAME = "libnccl.so.2"

ncclResult_t = ctypes.c_int
ncclComm_t = ctypes.c_void_p  # an opaque pointer (struct ncclComm*)
ncclDataType_t = ctypes.c_int
ncclRedOp_t = ctypes.c_int
cudaStream_t = ctypes.c_void_p
buffer_t = ctypes.c_void_p


class ncclUniqueId(ctypes.Structure):
    """NCCL_UNIQUE_ID_BYTES (128) opaque bytes, passed BY VALUE to ncclCommInitRank."""

    _fields_ = [("internal", ctypes.c_byte * 128)]


UNIQUE_ID_BYTES = ctypes.sizeof(ncclUniqueId)

# ncclDataType_t values of nccl.h. NOTE: the two float8 types exist only in newer NCCL
# releases; an older library rejects them with ncclInvalidArgument (a RuntimeError here).
_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
for _name, _value in (
    ("uint32", 3),
    ("uint64", 5),
    ("float8_e4m3fn", 10),
    ("float8_e5m2", 11),
):
    if hasattr(torch, _name):  # not every torch release has these dtypes
        _DTYPES[getattr(torch, _name)] = _value

# ncclRedOp_t values of nccl.h.
_REDUCE_OPS = {
    dist.ReduceOp.SUM: 0,
    dist.ReduceOp.PRODUCT: 1,
    dist.ReduceOp.MAX: 2,
    dist.ReduceOp.MIN: 3,
    dist.ReduceOp.AVG: 4,
}


def nccl_dtype(dtype: torch.dtype) -> int:
    """The ncclDataType_t of a torch dtype; ValueError for one NCCL has no type for."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"NCCL has no data type for {dtype}") from None


def nccl_reduce_op(op) -> int:
    """The ncclRedOp_t of a torch.distributed ReduceOp; ValueError for the bitwise ones."""
    try:
        return _REDUCE_OPS[op]
    except (KeyError, TypeError):
        raise ValueError(f"NCCL has no reduction for {op}") from None


# send buffer, receive buffer, count, dtype, op, comm, stream (all-reduce, reduce-scatter)
_REDUCE_ARGUMENTS = [
    buffer_t,
    buffer_t,
    ctypes.c_size_t,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
]

# name -> (restype, argtypes), as nccl.h declares them.
_SIGNATURES: dict[str, tuple[object, list]] = {
    "ncclGetErrorString": (ctypes.c_char_p, [ncclResult_t]),
    "ncclGetVersion": (ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    "ncclGetUniqueId": (ncclResult_t, [ctypes.POINTER(ncclUniqueId)]),
    # NOTE: ncclComm_t is itself a pointer: the init writes it through a pointer to one.
    "ncclCommInitRank": (
        ncclResult_t,
        [ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int],
    ),
    "ncclCommDestroy": (ncclResult_t, [ncclComm_t]),
    "ncclAllReduce": (
        ncclResult_t,
        _REDUCE_ARGUMENTS,
    ),
    "ncclAllGather": (
        ncclResult_t,
        [buffer_t, buffer_t, ctypes.c_size_t, ncclDataType_t, ncclComm_t, cudaStream_t],
    ),
    "ncclReduceScatter": (
        ncclResult_t,
        _REDUCE_ARGUMENTS,
    ),
    "ncclBroadcast": (
        ncclResult_t,
        [
            buffer_t,
            buffer_t,
            ctypes.c_size_t,
            ncclDataType_t,
            ctypes.c_int,
            ncclComm_t,
            cudaStream_t,
        ],
    ),
    "ncclSend": (
        ncclResult_t,
        [buffer_t, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t],
    ),
    "ncclRecv": (
        ncclResult_t,
        [buffer_t, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t],
    ),
    "ncclGroupStart": (ncclResult_t, []),
    "ncclGroupEnd": (ncclResult_t, []),
}


def candidate_paths() -> list[str]:
    """Where libnccl is looked for, in order: $ERNIE_NCCL_SO when set (alone: an explicit
    choice that fails is an error, not a reason to load another NCCL), else the
    nvidia-nccl-cu12/-cu13 pip package's lib/ (the one torch's CUDA wheels ship), else the
    system loader's search for the soname."""
    explicit = os.environ.get(NCCL_SO_ENV)
    if explicit:
        return [explicit]
    paths = []
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ImportError:  # no `nvidia` namespace package at all
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "lib" / SONAME
        if path.is_file():
            paths.append(str(path))
    return [*paths, SONAME]


class NcclLibrary:
    """One loaded libnccl with its functions declared; every call checks its ncclResult_t."""

    def __init__(self, path: str | None = None, dlopen: Callable[[str], object] = ctypes.CDLL):
        """`path`: load exactly this file; None: the first of `candidate_paths()` that loads.
        `dlopen`: how a path becomes a library object (ctypes.CDLL; tests inject a fake)."""
        tried = [path] if path else candidate_paths()
        errors = []
        for candidate in tried:
            try:
                self.lib = dlopen(candidate)
                self.path = candidate
                break
            except OSError as error:
                errors.append(f"{candidate}: {error}")
        else:
            raise RuntimeError(
                "could not load libnccl; tried, in order: "
                + "; ".join(errors)
                + f" (set {NCCL_SO_ENV} to the path of {SONAME}, or install nvidia-nccl-cu12)"
            )
        self._functions = {}
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(self.lib, name)
            function.restype = restype
            function.argtypes = argtypes
            self._functions[name] = function

    def call(self, name: str, *args) -> None:
        """Call NCCL function `name`; a non-zero result raises RuntimeError with its string."""
        result = self._functions[name](*args)
        if result != 0:
            raise RuntimeError(f"NCCL error {result} in {name}: {self.error_string(result)}")

    def error_string(self, result: int) -> str:
        text = self._functions["ncclGetErrorString"](result)
        return text.decode("utf-8", "replace") if text else "unknown error"

    def version(self) -> tuple[int, int, int]:
        """(major, minor, patch); NCCL >= 2.9 encodes it as major * 10000 + minor * 100 + patch."""
        code = ctypes.c_int()
        self.call("ncclGetVersion", ctypes.byref(code))
        return code.value // 10000, code.value // 100 % 100, code.value % 100

    def unique_id(self) -> ncclUniqueId:
        uid = ncclUniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return uid

    def comm_init_rank(self, world_size: int, uid: ncclUniqueId, rank: int) -> ncclComm_t:
        comm = ncclComm_t()
        self.call("ncclCommInitRank", ctypes.byref(comm), world_size, uid, rank)
        return comm


def unique_id_from_bytes(data: bytes) -> ncclUniqueId:
    if len(data) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(data)}")
    uid = ncclUniqueId()
    ctypes.memmove(ctypes.byref(uid), data, UNIQUE_ID_BYTES)
    return uid
