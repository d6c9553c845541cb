"""What train.py does before it trains: claim its output folders, and start a data-parallel run.

Output folders (``claim_output_folders``): checked, locked for this run, and never written over
when an earlier run is there (refused unless --resume or --start-over).

Data-parallel (``start_world``): ``mpiexec -n N python train.py ...`` starts N copies of train.py;
each finds its place in the MPI world (minitensor/distributed.py), checks that the machine has a
core or a GPU for every rank, and on GPUs takes GPU number ``local_rank``. Rank 0 alone claims the
folders and generates a missing data set (``on_rank_zero``), while the others wait without
spinning; if it fails, every rank ends with its exit status, and rank 0 alone prints why.
"""
from __future__ import annotations

import os

from minitensor import backend
from minitensor.checkpoint import read_checkpoint
from minitensor.cpu_runtime import usable_cores
from minitensor.distributed import DistributedError, make_world
from minitensor.files import ModelFileError

from .folders import (FolderLock, OutputFolderError, check_apart, check_writable_folder, predicted_mask_files,
                      run_files)
from .tensorboard_log import event_files, require_writer
from .trainer import RESUME_FILE


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that waited for rank 0's set-up when it failed: ``status`` is rank 0's exit
    status, and rank 0 has printed the message."""

    def __init__(self, status):
        super().__init__(f"rank 0 failed with exit status {status}")
        self.status = status


def describe_run(weights_dir, files):
    """A few words on the earlier run whose ``files`` these are, for the message that refuses it."""
    resume_path = os.path.join(weights_dir, RESUME_FILE)
    words = []
    if resume_path in files:
        try:
            epochs = read_checkpoint(resume_path).extra.get("epoch")
            words.append(f"{RESUME_FILE} after {epochs} finished epoch{'s' if epochs != 1 else ''}")
        except ModelFileError:
            words.append(f"{RESUME_FILE}, unreadable")
    others = [os.path.basename(path) for path in files if path != resume_path]
    if others:
        words.append(", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else ""))
    return "; ".join(words)


def claim_output_folders(args, stack, test_ids, log=print):
    """Check the output folders, lock them for this run (released when ``stack`` closes) and make
    sure that nothing of an earlier run is written over: refuse, unless --resume or --start-over."""
    outputs = {"--weights-dir": args.weights_dir, "--results-dir": args.results_dir}
    if args.tensorboard:
        require_writer()
        outputs["--tensorboard"] = args.tensorboard
    check_apart(outputs, args.data)
    for flag, folder in outputs.items():
        check_writable_folder(folder, flag)
    locked = set()
    for flag, folder in outputs.items():
        if os.path.realpath(folder) not in locked:
            stack.callback(FolderLock(folder, flag).acquire().release)
            locked.add(os.path.realpath(folder))
    if args.resume:
        return
    files = run_files(args.weights_dir, args.results_dir)
    if files and not args.start_over:
        raise OutputFolderError(f"--weights-dir {args.weights_dir} / --results-dir {args.results_dir} hold an earlier "
                         f"run ({describe_run(args.weights_dir, files)}), which this run would write over. "
                         f"Continue it with --resume (and its settings), give this run another --weights-dir and "
                         f"--results-dir, or pass --start-over to delete that run and begin again")
    events = event_files(args.tensorboard) if args.tensorboard else []
    if events and not args.start_over:
        raise OutputFolderError(f"--tensorboard {args.tensorboard}: holds an earlier run's events ({len(events)} event "
                         f"files), which TensorBoard would show mixed with this run's. Continue that run with "
                         f"--resume, give this run another --tensorboard folder, or pass --start-over to delete them")
    if args.start_over:
        files += predicted_mask_files(args.results_dir, test_ids) + events
        for path in files:
            os.remove(path)
        if files:
            log(f"--start-over: deleted the earlier run's {len(files)} files in {args.weights_dir} and "
                f"{args.results_dir}" + (f" and {args.tensorboard}" if events else ""))


def start_world(distributed, device):
    """This process's world (one process, or its rank under mpiexec), checked against the machine.

    A DistributedError says what is wrong and how to launch instead: mpi4py missing, more ranks on
    this machine than cores (on the CPU) or than GPUs (on the GPU). On the GPU, this rank's GPU is
    made current (number ``local_rank``: ranks on different machines count from 0 on each).
    """
    world = make_world(distributed)
    if world.size == 1:
        return world
    if device == backend.GPU:
        gpus = backend.require_gpu().cuda.runtime.getDeviceCount()
        if world.local_size > gpus:
            raise DistributedError(f"{world.local_size} ranks on this machine but {gpus} GPU"
                                   f"{'s' if gpus != 1 else ''}: one GPU per rank; run mpiexec -n {gpus} (or "
                                   f"--device cpu)")
        backend.require_gpu().cuda.Device(world.local_rank).use()
    elif world.local_size > usable_cores():
        raise DistributedError(f"{world.local_size} ranks on this machine but {usable_cores()} cores: one core or "
                               f"more per rank (each rank runs its share of every step); run mpiexec -n "
                               f"{usable_cores()} or fewer")
    return world


def on_rank_zero(world, work, status_of):
    """Run ``work()`` on rank 0 only, while the other ranks wait; returns its result on rank 0.

    If it raised, rank 0 re-raises and every other rank raises OtherRankFailed with the exit
    status that ``status_of(error)`` gave on rank 0, so that all end together, with one message.
    """
    failure, result = None, None
    if world.rank == 0:
        try:
            result = work()
        except BaseException as error:       # noqa: BLE001 (re-raised below, after telling the others)
            failure = error
    world.barrier()
    status = world.broadcast(None if failure is None else status_of(failure))
    if failure is not None:
        raise failure
    if status is not None:
        raise OtherRankFailed(status)
    return result
