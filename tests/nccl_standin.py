"""A strict stand-in for ``cupy.cuda.nccl`` over MPI, so the data-parallel GPU path runs without GPUs (test-only).

It has the names of CuPy's NCCL module that minitensor/distributed.py uses, with their signatures
(``get_unique_id()``, ``NcclCommunicator(ndev, unique_id, rank)``, ``allReduce(sendbuf, recvbuf,
count, datatype, op, stream)`` on raw device pointers) and refuses what NCCL refuses:

* a communicator whose ranks disagree on the unique id, on the number of ranks, or whose rank
  numbers do not match the MPI ranks that call it;
* two ranks on one GPU ("Duplicate GPU detected": NCCL needs one device per rank on a machine);
* a datatype or operation that is not one of NCCL's constants, a stream that is not a pointer,
  a buffer pointer that is not the start of a live device array of the stand-in with at least
  ``count`` elements of that datatype.

The sum itself is MPI's Allreduce on the host memory behind the stand-in's device arrays, in place
when ``sendbuf == recvbuf`` as NCCL allows. ``install()`` puts it, the device arrays' ``.data.ptr``
and ``cupy.cuda.get_current_stream`` into the stand-in (tests/cupy_standin.py).
"""
from __future__ import annotations

import ctypes
import sys
import types
import weakref

import numpy as np

import cupy_standin

NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0            # the values of nccl.h's ncclFloat32, ncclFloat64, ncclSum
_TYPES = {NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
_LIVE = weakref.WeakValueDictionary()                     # address -> the NumPy array behind a device array
COUNTS = cupy_standin.COUNTS


class NcclError(RuntimeError):                            # cupy_backends.cuda.libs.nccl.NcclError
    pass


def get_unique_id():
    return tuple(int(b) for b in np.random.default_rng().integers(-128, 128, size=128))


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


class NcclCommunicator:
    def __init__(self, ndev, commId, rank):               # noqa: N803 (CuPy's names)
        comm = _world()
        if not isinstance(commId, tuple) or len(commId) != 128:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: the unique id must be the 128-byte tuple get_unique_id gives")
        seen = comm.allgather((tuple(commId), int(ndev), int(rank), comm.Get_rank(),
                               cupy_standin._CURRENT["device"], cupy_standin.DEVICE_COUNT))
        if len({entry[0] for entry in seen}) != 1 or len({entry[1] for entry in seen}) != 1:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: the ranks passed different unique ids or rank counts")
        if int(ndev) != comm.Get_size() or any(entry[2] != entry[3] for entry in seen):
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: ranks {[e[2] for e in seen]} of {ndev} do not match the "
                            f"{comm.Get_size()} processes that joined")
        devices = [entry[4] for entry in seen]
        if len(set(devices)) != len(devices):
            raise NcclError(f"NCCL_ERROR_INVALID_USAGE: Duplicate GPU detected: ranks use devices {devices}")
        self._comm, self.rank, self.size = comm, int(rank), int(ndev)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):   # noqa: N802 (CuPy's name)
        from mpi4py import MPI
        if datatype not in _TYPES or op != NCCL_SUM:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: datatype {datatype} / op {op} (the stand-in has "
                            f"float32, float64 and sum)")
        if not isinstance(stream, int):
            raise TypeError(f"stream must be a stream pointer (an int), got {type(stream).__name__}")
        send, receive = (_array_at(pointer, count, _TYPES[datatype]) for pointer in (sendbuf, recvbuf))
        COUNTS["calls"] += 1
        COUNTS["allreduce"] += 1
        self._comm.Allreduce(MPI.IN_PLACE if sendbuf == recvbuf else send, receive, op=MPI.SUM)


def _array_at(pointer, count, dtype):
    """The ``count`` elements of ``dtype`` at ``pointer``, which must start a live stand-in device array."""
    data = _LIVE.get(pointer)
    if data is None:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: {pointer:#x} is not the start of a device array")
    if data.dtype != dtype or data.size < count or not data.flags.c_contiguous:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: {count} x {np.dtype(dtype)} at {pointer:#x}, which holds "
                        f"{data.size} x {data.dtype} (contiguous: {data.flags.c_contiguous})")
    return np.ctypeslib.as_array((ctypes.c_byte * data.nbytes).from_address(pointer)).view(dtype)[:count]


def _data(array):
    """``device_array.data``: a MemoryPointer-like record whose ``ptr`` is the array's first byte."""
    pointer = array._data.ctypes.data
    _LIVE[pointer] = array._data           # known while the array lives
    return types.SimpleNamespace(ptr=pointer)


_NULL_STREAM = types.SimpleNamespace(ptr=0)


def install(monkeypatch=None):
    """``import cupy.cuda.nccl`` answers with this module; device arrays get ``.data``; the stand-in's
    ``cupy.cuda`` gets ``get_current_stream`` (the null stream: the stand-in runs everything at once)."""
    module = sys.modules[__name__]
    setter = monkeypatch.setitem if monkeypatch else (lambda mapping, key, value: mapping.__setitem__(key, value))
    setter(sys.modules, "cupy.cuda.nccl", module)
    if monkeypatch:
        monkeypatch.setattr(cupy_standin.ndarray, "data", property(_data), raising=False)
        monkeypatch.setattr(cupy_standin.cuda, "get_current_stream", lambda: _NULL_STREAM, raising=False)
    else:
        cupy_standin.ndarray.data = property(_data)
        cupy_standin.cuda.get_current_stream = lambda: _NULL_STREAM
    return module
