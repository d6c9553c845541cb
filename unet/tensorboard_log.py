"""train.py --tensorboard DIR: the run as TensorBoard shows it (``tensorboard --logdir DIR``), as Keras's
TensorBoard callback would have written it for the post's ``fit``.

What is written, at step = the epoch's number (1-based, as the epoch lines count):

* every epoch: ``loss``, ``val_loss``, ``learning_rate`` and ``images_per_second``, from the row the
  trainer adds to its history (unet/trainer.py), after the epoch's checkpoint is written;
* at the end, after the test set is predicted: the first few test images, each beside its true
  mask and its predicted mask (``test_images/<id>``, the colours of the result masks), at the last
  epoch's step.

With ``--resume``, steps continue and none is shown twice. The checkpoint's history is the record
of the finished epochs, so the writer starts by writing it all again, after a purge event from
step 1 on (``purge_step``: TensorBoard's reader drops what the folder holds from that step on, as
it does after any restarted run). That covers every way the folder and the checkpoint can
differ: an epoch logged and then trained again (a stop before its checkpoint, or a resume from an
older checkpoint copied to last.npz), an epoch checkpointed but never logged (killed between the
two), the test images of a finished run that is resumed to predict again, and a first run made
without --tensorboard. Only the rewritten epochs' wall times are those of the resume.

The events are written by tensorboardX (``pip install 'minitensor[tensorboard]'``), TensorBoard's
event format without TensorFlow; train.py checks that it can be imported before any work.
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np

from .data import NUM_CLASSES, PALETTE, colorize_mask, load_mask, read_bgr

EVENT_FILES = "events.out.tfevents.*"
SHOWN_TEST_IMAGES = 3
SCALARS = (("loss", "loss"), ("val_loss", "val_loss"), ("learning_rate", "lr"),
           ("images_per_second", "images_per_second"))     # (TensorBoard tag, history column)


class TensorBoardUnavailable(RuntimeError):
    """--tensorboard was given but no event writer can be imported; the message says what to install."""


def require_writer():
    """tensorboardX's SummaryWriter, or TensorBoardUnavailable naming the install command."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable("--tensorboard needs tensorboardX to write the events (and tensorboard to "
                                     "view them): pip install 'minitensor[tensorboard]'") from None
    return SummaryWriter


def event_files(folder):
    """The TensorBoard event files in ``folder`` (an earlier run's, which a new run must not mix with)."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), EVENT_FILES)))


def _wait_for_a_new_second(folder):
    """tensorboardX names an event file by the second it opens it in and truncates a file of that name,
    and TensorBoard reads a folder's files in name order: a run resumed within the second its
    predecessor opened its file waits for the next one, so it neither destroys that file nor is read first."""
    while any(os.path.basename(path).startswith(f"events.out.tfevents.{str(time.time())[:10]}.")
              for path in event_files(folder)):
        time.sleep(0.05)


class TensorBoardLog:
    """The event writer of one train.py session; ``history`` is the checkpoint's (empty for a new run).

    ``epoch_end(trainer)`` is the trainer's ``on_epoch_end`` hook; ``test_images`` comes once at the
    end; ``close`` flushes and closes the file (train.py's exit stack calls it however the run ends).
    """

    def __init__(self, folder, history):
        SummaryWriter = require_writer()
        self.folder = os.fspath(folder)
        _wait_for_a_new_second(self.folder)
        self.writer = SummaryWriter(self.folder, purge_step=1 if history else None, flush_secs=30)
        for row in history:
            self._scalars(row)
        self.writer.flush()

    def _scalars(self, row):
        for tag, column in SCALARS:
            self.writer.add_scalar(tag, float(row[column]), row["epoch"])

    def epoch_end(self, trainer):
        """The epoch just finished (and checkpointed): its row of the history, flushed to disk at once."""
        self._scalars(trainer.state.history[-1])
        self.writer.flush()

    def test_images(self, step, test_ids, dirs, results_dir):
        """The first few test images beside their true and predicted masks, read from the files the
        run wrote (results_dir/<id>.png), as RGB panels at ``step``."""
        for index in list(test_ids)[:SHOWN_TEST_IMAGES]:
            panels = [read_bgr(os.path.join(dirs.test_images, f"{index}.jpg"))]
            truth = os.path.join(dirs.test_masks, f"{index}.png")
            if os.path.exists(truth):
                panels.append(colorize_mask(load_mask(truth, NUM_CLASSES), PALETTE))
            panels.append(read_bgr(os.path.join(results_dir, f"{index}.png")))
            panel = np.ascontiguousarray(np.concatenate(panels, axis=1)[..., ::-1])     # BGR -> RGB
            self.writer.add_image(f"test_images/{index}", panel, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
