"""Run under ``mpiexec -n N`` by tests/test_data_parallel.py: train.py with one fault on one rank.

    mpiexec -n 2 python tests/mpi_programs/train_with_fault.py FAULT RANK BATCH -- <train.py flags>

FAULT happens on rank RANK only, when it reads (``unreadable``) or has trained (``sigint``) its
BATCH-th training batch (1-based, counted over the run):

* ``unreadable``: its image reader fails as it does on a file that cannot be decoded (DatasetError);
* ``sigint``: the process sends itself SIGINT, as if Ctrl-C had reached this rank alone.
"""
import os
import signal
import sys

import minitensor  # noqa: F401  (before NumPy)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from minitensor.distributed import launched_rank  # noqa: E402
from unet import batches  # noqa: E402
from unet.data import DatasetError  # noqa: E402


def main():
    fault, rank, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1:]
    counts = {"read": 0, "trained": 0}
    on_batch_end = None
    if launched_rank() == rank and fault == "unreadable":
        real_read = batches.BatchLoader.read_labels

        def read_labels(self, ids):
            if self.shuffle:                          # the training loader (validation's does not shuffle)
                counts["read"] += 1
                if counts["read"] == batch:
                    path = os.path.join(self.images_dir, f"{ids[0]}.jpg")
                    raise DatasetError([(path, "cannot be decoded as an image (a damaged or truncated file?)")])
            return real_read(self, ids)
        batches.BatchLoader.read_labels = read_labels
    elif launched_rank() == rank and fault == "sigint":
        def on_batch_end(trainer):
            counts["trained"] += 1
            if counts["trained"] == batch:
                os.kill(os.getpid(), signal.SIGINT)
    sys.exit(train.main(argv, on_batch_end=on_batch_end))


if __name__ == "__main__":
    main()
