"""The processes of a data-parallel run, and what they say to each other: MPI on CPUs, NCCL between GPUs.

A ``World`` is the group of processes ("ranks") that train one model together. Every rank holds
the whole model; ``minitensor/data_parallel.py`` makes each step's gradient the sum of the ranks'
shares, with one ``allreduce_sum`` of a flat buffer. The rest is small host-side agreement:
whether to stop (a signal seen by one rank stops all of them after the same batch), what rank 0
decided (``broadcast``), everyone's piece of a result (``allgather``).

Two worlds, one interface:

* ``SingleProcess``: one rank; every collective returns its input. This is the world of a plain
  ``python train.py`` and the one a learner reads first.
* ``MPIWorld``: the ranks ``mpiexec -n N`` started (mpi4py, any MPI: MPICH, Open MPI). Host
  buffers are summed with ``MPI_Allreduce``; device buffers (CuPy) with NCCL, whose communicator
  is set up once from a unique id that rank 0 draws and MPI broadcasts.

What an Allreduce costs: in the ring algorithm (NCCL's, and MPI's for big buffers) each of the N
ranks sends and receives 2 (N - 1) / N of the buffer (a reduce-scatter, then an all-gather), so
the time per rank barely grows with N: about 2 x buffer bytes / link bandwidth. docs/data_parallel.md
works it out for small_unet and the original U-Net.

Nothing here imports mpi4py or CuPy until a world that needs them is made.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

#: Environment variables by which MPI launchers tell a process how many ranks there are.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
#: Seconds a rank waits between flushing its output and MPI_Abort (MPIWorld.abort says why).
ABORT_GRACE_S = 1.0


class DistributedError(RuntimeError):
    """A data-parallel run cannot start or go on (mpi4py missing, too many ranks, ranks that disagree)."""


def launched_ranks(environ=None) -> int:
    """How many ranks the MPI launcher started, read from its environment (1 outside mpiexec).

    Read without importing mpi4py, so ``python train.py`` never pays for MPI, and a run under
    ``mpiexec`` is recognised even where mpi4py is missing (to say so, rather than train N
    unrelated copies of the model).
    """
    environ = os.environ if environ is None else environ
    for name in SIZE_VARIABLES[:3]:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 1


def launched_rank(environ=None) -> int:
    """This process's rank as the MPI launcher set it (0 outside mpiexec), without importing mpi4py."""
    environ = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 0


class SingleProcess:
    """The world of one process: every collective is the identity."""

    size, rank, local_rank, local_size = 1, 0, 0, 1
    is_writer = True     # rank 0 writes checkpoints, logs and results; here it is the only rank
    is_distributed = False   # True for an MPI world, even of one rank (mpiexec -n 1 --distributed)

    def __repr__(self):
        return "SingleProcess()"

    def allreduce_sum(self, buffer):
        """Sum ``buffer`` over the ranks, in place (a NumPy or CuPy array)."""
        return buffer

    def max_over_ranks(self, value: int) -> int:
        """The largest of the ranks' ints, on every rank (host-side; a few microseconds under MPI)."""
        return value

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        return value

    def allgather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def barrier(self):
        pass

    def abort(self, status: int):
        """End every rank of the job at once with ``status`` (here: only this process)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class MPIWorld(SingleProcess):
    """The ranks of ``mpiexec -n N``, through mpi4py; NCCL for device buffers.

    ``local_rank`` / ``local_size`` count the ranks on this machine (MPI's shared-memory split):
    on GPUs, rank ``local_rank`` of a machine drives its GPU number ``local_rank``.
    """

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise DistributedError(f"this run was started by mpiexec with {launched_ranks()} ranks, but mpi4py "
                                   f"cannot be imported ({error}); install it with: python -m pip install -e "
                                   f"'.[mpi]' (mpi4py and an MPI from wheels), then run mpiexec from the same "
                                   f"environment") from None
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.is_writer, self.is_distributed = self.rank == 0, True
        self._nccl = None

    def __repr__(self):
        return f"MPIWorld(rank {self.rank} of {self.size}, local {self.local_rank} of {self.local_size})"

    def allreduce_sum(self, buffer):
        if type(buffer).__module__.startswith("cupy"):
            if self._nccl is None:
                self._nccl = NCCLCommunicator(self)
            self._nccl.allreduce_sum(buffer)
        else:
            self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)
        return buffer

    def max_over_ranks(self, value: int) -> int:
        return int(self.comm.allreduce(int(value), op=self._MPI.MAX))

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def allgather(self, value) -> list:
        return self.comm.allgather(value)

    def barrier(self):
        """Wait for every rank, asleep: MPI's own barrier spins a core, and ranks may wait here for
        minutes (rank 0 generating a data set) on the cores that rank 0 needs."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(0.005)

    def abort(self, status: int):
        """MPI_Abort: mpiexec ends every rank, including those waiting in a collective for this one.

        The launcher forwards a rank's output on its own time, and an abort can end the job before the
        rank's last lines (its error message) have gone through: a fresh-clone CI run lost one so. Hence
        the pause of ABORT_GRACE_S between the flush and the abort, on this error path only."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(status)


class NCCLCommunicator:
    """Sums CuPy buffers across the ranks' GPUs with NCCL (``cupy.cuda.nccl``), on the current stream.

    Set up once per run: rank 0 draws NCCL's unique id, MPI broadcasts it, and every rank joins
    with its rank number. Each rank must have made its own GPU current before (NCCL refuses two
    ranks on one GPU): train.py picks GPU ``local_rank``.
    """

    def __init__(self, world):
        try:
            self.nccl = importlib.import_module("cupy.cuda.nccl")
        except ImportError as error:
            raise DistributedError(f"summing GPU gradients needs NCCL, which CuPy cannot load ({error}); install "
                                   f"it with: python -m pip install nvidia-nccl-cu12 (or -cu13, as your CuPy), "
                                   f"or train on the CPU with --device cpu") from None
        unique_id = self.nccl.get_unique_id() if world.rank == 0 else None
        self.comm = self.nccl.NcclCommunicator(world.size, world.broadcast(unique_id), world.rank)
        self._types = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64}

    def allreduce_sum(self, buffer):
        cupy = importlib.import_module("cupy")
        if buffer.dtype.name not in self._types or not buffer.flags.c_contiguous:
            raise DistributedError(f"NCCL sums contiguous float32 or float64 buffers, got {buffer.dtype} "
                                   f"(contiguous: {buffer.flags.c_contiguous})")
        self.comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self._types[buffer.dtype.name],
                            self.nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)


def make_world(distributed=None):
    """The world this process belongs to.

    ``distributed=None`` decides from the launcher's environment (``mpiexec -n N`` with N > 1 makes
    an MPIWorld); True demands one (a DistributedError says how to launch when there is none);
    False is one process, whatever the environment.
    """
    ranks = launched_ranks()
    if distributed is False:
        return SingleProcess()
    if distributed and ranks == 1 and not any(name in os.environ for name in SIZE_VARIABLES):
        raise DistributedError("--distributed: this process was not started by an MPI launcher; run it as "
                               "mpiexec -n N python train.py ... (after python -m pip install -e '.[mpi]')")
    return MPIWorld() if distributed or ranks > 1 else SingleProcess()
