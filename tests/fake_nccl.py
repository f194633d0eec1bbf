"""A CPU stand-in for libnccl, called through real ctypes function pointers.

Each NCCL function is a C callback with the signature nccl.h gives it (written here, apart
from the bindings under test), reached through a function pointer on which the bindings set
their own restype and argtypes: a call first checks those declarations against nccl.h, then
ctypes marshals the arguments as it would into libnccl (the 128-byte unique id by value, the
communicator through a pointer). Calls are recorded with their plain values. Buffers are host
memory: an all-reduce reads `count` elements at the send pointer, reduces them with
`reduce_peers` (none: one rank; a gloo group: the real sum over processes) and writes them at
the receive pointer. `fail` makes a function return an error code once.
"""

from __future__ import annotations

import ctypes
import os

import torch


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_uint8 * 128)]  # NCCL_UNIQUE_ID_BYTES


_P = ctypes.POINTER
_VOID = ctypes.c_void_p
_INT = ctypes.c_int
_SIZE = ctypes.c_size_t

# nccl.h: name -> (result type, argument types). Enums and ncclResult_t are C ints;
# ncclComm_t and cudaStream_t are pointers.
NCCL_H = {
    "ncclGetErrorString": (ctypes.c_char_p, [_INT]),
    "ncclGetVersion": (_INT, [_P(_INT)]),
    "ncclGetUniqueId": (_INT, [_P(UniqueId)]),
    "ncclCommInitRank": (_INT, [_P(_VOID), _INT, UniqueId, _INT]),
    "ncclCommDestroy": (_INT, [_VOID]),
    "ncclAllReduce": (_INT, [_VOID, _VOID, _SIZE, _INT, _INT, _VOID, _VOID]),
    "ncclAllGather": (_INT, [_VOID, _VOID, _SIZE, _INT, _VOID, _VOID]),
    "ncclReduceScatter": (_INT, [_VOID, _VOID, _SIZE, _INT, _INT, _VOID, _VOID]),
    "ncclBroadcast": (_INT, [_VOID, _VOID, _SIZE, _INT, _INT, _VOID, _VOID]),
    "ncclSend": (_INT, [_VOID, _SIZE, _INT, _INT, _VOID, _VOID]),
    "ncclRecv": (_INT, [_VOID, _SIZE, _INT, _INT, _VOID, _VOID]),
    "ncclGroupStart": (_INT, []),
    "ncclGroupEnd": (_INT, []),
}

# nccl.h's ncclResult_t strings (ncclGetErrorString).
ERROR_STRINGS = {
    1: b"unhandled cuda error",
    2: b"unhandled system error",
    3: b"internal error",
    4: b"invalid argument",
    5: b"invalid usage",
    6: b"remote process exited or there was a network error",
}

# ncclDataType_t -> the torch dtype of its elements (nccl.h's enum order).
NCCL_TO_TORCH = {0: torch.int8, 1: torch.uint8, 2: torch.int32, 4: torch.int64}
NCCL_TO_TORCH |= {6: torch.float16, 7: torch.float32, 8: torch.float64, 9: torch.bfloat16}

VERSION_CODE = 22105  # 2.21.5


def same_c_type(declared, expected) -> bool:
    """Structs match by size (the bindings name their own 128-byte id), pointers by target."""
    if isinstance(expected, type) and issubclass(expected, ctypes.Structure):
        return (
            isinstance(declared, type)
            and issubclass(declared, ctypes.Structure)
            and ctypes.sizeof(declared) == ctypes.sizeof(expected)
        )
    if isinstance(expected, type) and issubclass(expected, ctypes._Pointer):
        return (
            isinstance(declared, type)
            and issubclass(declared, ctypes._Pointer)
            and same_c_type(declared._type_, expected._type_)
        )
    return declared is expected


def _callback_type(c_type):
    """The ABI-equal type a Python callback receives: pointers (and the returned string) as
    plain addresses."""
    if c_type is ctypes.c_char_p or (
        isinstance(c_type, type) and issubclass(c_type, ctypes._Pointer)
    ):
        return _VOID
    return c_type


class FakeFunction:
    """What `getattr(CDLL, name)` returns: restype/argtypes are set by the caller, then calls
    go through a real ctypes function pointer into the fake's C callback."""

    def __init__(self, name: str, address: int) -> None:
        self.name = name
        self.address = address
        self.restype = ctypes.c_int  # ctypes' default before the bindings declare theirs
        self.argtypes = None

    def __call__(self, *args):
        restype, argtypes = NCCL_H[self.name]
        assert self.argtypes is not None and len(self.argtypes) == len(argtypes), self.name
        for i, (declared, expected) in enumerate(zip(self.argtypes, argtypes, strict=True)):
            assert same_c_type(declared, expected), f"{self.name} argument {i}: {declared}"
        assert same_c_type(self.restype, restype), f"{self.name} result: {self.restype}"
        pointer = ctypes.CFUNCTYPE(ctypes.c_int)(self.address)
        pointer.restype, pointer.argtypes = self.restype, self.argtypes
        return pointer(*args)


class FakeNccl:
    """A libnccl whose calls land in Python (one per process; `reduce_peers` sums over ranks)."""

    def __init__(self, reduce_peers=None) -> None:
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}
        self.generated_ids: list[bytes] = []
        self.reduce_peers = reduce_peers or (lambda tensor, op: None)
        self._callbacks = []  # the C callbacks must outlive every call
        self._strings = {code: ctypes.create_string_buffer(s) for code, s in ERROR_STRINGS.items()}
        self._unknown = ctypes.create_string_buffer(b"unknown result")
        for name, (restype, argtypes) in NCCL_H.items():
            prototype = ctypes.CFUNCTYPE(
                _callback_type(restype), *[_callback_type(t) for t in argtypes]
            )
            callback = prototype(getattr(self, "_" + name))
            self._callbacks.append(callback)
            address = ctypes.cast(callback, ctypes.c_void_p).value
            setattr(self, name, FakeFunction(name, address))

    def calls_of(self, name: str) -> list[tuple]:
        return [call[1:] for call in self.calls if call[0] == name]

    def _result(self, name: str, *args) -> int:
        self.calls.append((name, *args))
        return self.fail.pop(name, 0)

    # ---------------------------------------------------------------- the C callbacks

    def _ncclGetErrorString(self, code):
        return ctypes.addressof(self._strings.get(code, self._unknown))

    def _ncclGetVersion(self, version_address):
        ctypes.c_int.from_address(version_address).value = VERSION_CODE
        return self._result("ncclGetVersion")

    def _ncclGetUniqueId(self, id_address):
        data = os.urandom(128)
        self.generated_ids.append(data)
        ctypes.memmove(id_address, data, 128)
        return self._result("ncclGetUniqueId")

    def _ncclCommInitRank(self, comm_address, nranks, unique_id, rank):
        ctypes.c_void_p.from_address(comm_address).value = 0xC0DE00 + rank
        return self._result("ncclCommInitRank", bytes(unique_id), nranks, rank)

    def _ncclCommDestroy(self, comm):
        return self._result("ncclCommDestroy", comm)

    def _ncclAllReduce(self, send, recv, count, dtype, op, comm, stream):
        result = self._result("ncclAllReduce", send, recv, count, dtype, op, comm, stream)
        if result == 0 and dtype in NCCL_TO_TORCH:
            values = torch.empty(count, dtype=NCCL_TO_TORCH[dtype])
            nbytes = count * values.element_size()
            ctypes.memmove(values.data_ptr(), send, nbytes)
            self.reduce_peers(values, op)
            ctypes.memmove(recv, values.data_ptr(), nbytes)
        return result

    def _ncclAllGather(self, send, recv, count, dtype, comm, stream):
        return self._result("ncclAllGather", send, recv, count, dtype, comm, stream)

    def _ncclReduceScatter(self, send, recv, count, dtype, op, comm, stream):
        return self._result("ncclReduceScatter", send, recv, count, dtype, op, comm, stream)

    def _ncclBroadcast(self, send, recv, count, dtype, root, comm, stream):
        return self._result("ncclBroadcast", send, recv, count, dtype, root, comm, stream)

    def _ncclSend(self, send, count, dtype, peer, comm, stream):
        return self._result("ncclSend", send, count, dtype, peer, comm, stream)

    def _ncclRecv(self, recv, count, dtype, peer, comm, stream):
        return self._result("ncclRecv", recv, count, dtype, peer, comm, stream)

    def _ncclGroupStart(self):
        return self._result("ncclGroupStart")

    def _ncclGroupEnd(self):
        return self._result("ncclGroupEnd")
