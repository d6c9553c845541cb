"""Train the post's U-Net on the Shape dataset, from an empty folder to colored test masks.

    python train.py                      # everything with the post's settings; CPU unless a GPU is usable
    python train.py --device gpu         # on the GPU (needs CuPy)
    python train.py --epochs 5           # a shorter run (see the README for times)
    python train.py --resume             # continue an interrupted run exactly where it stopped

The steps are the post's: generate the data set if it is missing (shape/train_imgs,
shape/train_mask, shape/test_imgs and, for the metrics, shape/test_mask); build small_unet; train
with Adam(1e-3) on BinaryCrossentropy with batches of 16 read by a generator; every 3 epochs save
the model if val_loss improved (UNet_weight/ep...-loss...-val_loss....npz); halve the learning
rate after 3 epochs without improvement; stop after 10; then write the test set's predictions
as colored masks into UNet_test_result/ and report IoU and Dice.

Ctrl-C, SIGTERM (kill, timeout, a scheduler), SIGHUP (a closed terminal) and a closed output
pipe stop after the current batch and save a resumable checkpoint (UNet_weight/last.npz: weights,
Adam's moments, epoch and batch, callback state, the shuffling generator) atomically; a second
signal stops at once and keeps the previous checkpoint. A checkpoint is also written after every
epoch and every few minutes within one (--checkpoint-minutes), so ``kill -9`` loses little;
``--resume`` ends where an uninterrupted run would (unet/trainer.py says how). The test set is
predicted with the weights of the epoch with the lowest val_loss (UNet_weight/best.npz), unless
``--predict-with last``.

One run per folder: a second train.py on the same --weights-dir or --results-dir is refused while
the first runs, and a folder that holds an earlier run is never written over: continue it with
--resume, or pass --start-over to delete it and begin again.

Data-parallel: ``mpiexec -n N python train.py <the same flags>`` trains on N processes (CPU cores,
or one GPU each), each on its slice of every batch of --batch-size, with the gradients summed
across them: the same run as one process, up to float rounding (docs/data_parallel.md).

Exit status: 0 done (or stopped by --max-minutes, with predictions), 1 training diverged, 2 a
setting, file or folder that cannot be used (the message names it and the fix), 130 Ctrl-C, 143
SIGTERM, 129 SIGHUP, 141 a closed output pipe (128 + the signal's number, as a shell reports it).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import traceback

try:
    import minitensor  # before NumPy: minitensor/cpu_runtime.py sets what OpenBLAS reads at load
except ValueError as error:     # a misspelt MINITENSOR_KERNELS or MINITENSOR_CONV: the message says the fix
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
import numpy as np
from minitensor import backend, losses
from minitensor.data_parallel import WeightsDifferError
from minitensor.distributed import DistributedError, SingleProcess, launched_rank
from minitensor.files import ModelFileError
from minitensor.optimizers import Adam
from unet import small_unet, unet
from unet.augment import Augmenter
from unet.batches import BatchLoader
from unet.data import NUM_CLASSES, DatasetError, check_dataset, dataset_dirs, split_ids
from unet.folders import OutputFolderError
from unet.launch import OtherRankFailed, claim_output_folders, on_rank_zero, start_world
from unet.models import valid_unet_sizes
from unet.report import write_results
from unet.shapes import ensure_dataset
from unet.stopping import Interrupted, signals_interrupt
from unet.tensorboard_log import TensorBoardLog, TensorBoardUnavailable
from unet.trainer import RESUME_FILE, CheckpointError, Trainer, TrainingError, rank_slice
from unet.weights import dataset_class_weights

DEFAULT_LR = 1e-3
MIN_IMAGE_SIZE = 16    # the smallest image the generator draws shapes into and small_unet pools 4 times

LOSSES = {
    # What Keras 3 really trains for the post's compile(loss=BinaryCrossentropy()) on a softmax
    # output: sigmoid BCE on the pre-softmax logits (see minitensor/losses.py).
    "bce-logits": lambda: losses.BinaryCrossentropy(from_logits=True),
    # The formula the post's code reads as: BCE on the clipped softmax probabilities.
    "bce": lambda: losses.BinaryCrossentropy(),
    # The usual choice for one label per pixel: softmax cross-entropy on the logits, fused.
    "softmax-ce": lambda: losses.SoftmaxCrossEntropy(),
    # The paper's loss: softmax cross-entropy weighted per pixel by unet/weights.py's border map.
    "weighted": lambda: losses.SoftmaxCrossEntropy(),
    # The post's loss (as Keras trains it) with the same border weights.
    "weighted-bce": lambda: losses.BinaryCrossentropy(from_logits=True),
}
BORDER_WEIGHTED = ("weighted", "weighted-bce")
# --augment: a factory of each choice's augmenter, given its seed.
AUGMENTERS = {
    "none": lambda seed: None,
    "elastic": lambda seed: Augmenter(seed),
    "flip": lambda seed: Augmenter(seed, elastic=False, affine=False, flips=True),
}


class UsageError(RuntimeError):
    """A setting, file or folder of the user's that cannot be used; the message says what to change."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the post's U-Net on the Shape dataset with minitensor.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="auto = the GPU when CuPy sees one, else the CPU")
    parser.add_argument("--model", default="small", choices=["small", "original"],
                        help="small_unet ('same' convs, the post's Shape model) or the original valid-conv unet")
    parser.add_argument("--data", default="shape",
                        help="data set folder: generated there if new or empty, completed if unet.shapes wrote it, "
                             "otherwise read as your own data set and never written to")
    parser.add_argument("--num-images", type=int, default=1000, help="images in the data set (the post: 1000)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (the post: 100)")
    parser.add_argument("--num-test", type=int, default=100, help="test images (the post: 100)")
    parser.add_argument("--image-size", type=int, default=128, help="image size of a generated data set")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"Adam's learning rate (default {DEFAULT_LR:g}); with --resume, replaces the "
                             "checkpoint's rate (which ReduceLROnPlateau may have lowered)")
    parser.add_argument("--loss", default="bce-logits", choices=sorted(LOSSES),
                        help="bce-logits: what Keras trains for the post's BCE on softmax; bce: BCE on probabilities; "
                             "weighted / weighted-bce: softmax-ce / bce-logits with the paper's border weights")
    parser.add_argument("--class-weights", default="none", choices=("none", "mask", "dataset"),
                        help="w_c of the border-weighted losses: 1 for every class (the border term alone), or "
                             "the paper's class balancing by the frequencies in each mask or in the whole training "
                             "set; on the Shape data both balancings held training at the uniform prediction "
                             "(loss ln 4) for epochs (docs/results.md)")
    parser.add_argument("--augment", default="none", choices=sorted(AUGMENTERS),
                        help="elastic: the paper's random elastic deformation, shift/rotation and gray-value "
                             "variation on every training batch; flip: random flips and quarter turns with the "
                             "gray-value variation, which leave every shape's class intact")
    parser.add_argument("--seed", type=int, default=22,
                        help="seed of weights, shuffling and of a newly generated data set (a generated folder "
                             "keeps the seed it was drawn with)")
    parser.add_argument("--weights-dir", default="UNet_weight")
    parser.add_argument("--results-dir", default="UNet_test_result")
    parser.add_argument("--resume", action="store_true", help=f"continue from WEIGHTS_DIR/{RESUME_FILE}")
    parser.add_argument("--start-over", action="store_true",
                        help="delete the checkpoints and results an earlier run left in WEIGHTS_DIR and RESULTS_DIR "
                             "and train afresh (without it, such folders are refused)")
    parser.add_argument("--predict-with", default="best", choices=("best", "last"),
                        help="the test set's weights: those of the epoch with the lowest val_loss "
                             "(WEIGHTS_DIR/best.npz, as Keras's restore_best_weights), or the last epoch's")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0,
                        help=f"also save WEIGHTS_DIR/{RESUME_FILE} within an epoch this often (0: after every "
                             "batch), so a killed run loses at most this much")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after the epoch during which this run's training time passed this much "
                             "(a resumed run counts afresh), then predict")
    parser.add_argument("--tta", action="store_true",
                        help="predict the test set 8 times, flipped and turned, and average (8x the prediction time; "
                             "the training is the same)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true", default=None,
                        help="data-parallel over the ranks of mpiexec -n N (detected by itself when N > 1; this "
                             "flag makes a run outside mpiexec an error): --batch-size stays the global batch "
                             "(docs/data_parallel.md)")
    parser.add_argument("--tensorboard", metavar="DIR", default=None,
                        help="also write loss, val_loss, learning rate and images/s every epoch, and a few test "
                             "images with their masks at the end, for tensorboard --logdir DIR (needs "
                             "pip install 'minitensor[tensorboard]')")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "num_images", "num_val"):
        if getattr(args, name) < 1:
            hint = " (the callbacks watch val_loss)" if name == "num_val" else ""
            parser.error(f"--{name.replace('_', '-')} must be at least 1{hint}")
    if args.num_test < 0:
        parser.error("--num-test must be 0 or more")
    if args.num_images - args.num_val - args.num_test < 1:
        parser.error(f"--num-images {args.num_images} leaves no training image after --num-val {args.num_val} "
                     f"and --num-test {args.num_test}; lower those or raise --num-images")
    if args.image_size < MIN_IMAGE_SIZE or (args.model == "small" and args.image_size % 16):
        nearest = max(MIN_IMAGE_SIZE, 16 * round(args.image_size / 16))
        parser.error(f"--image-size {args.image_size}: " + (
            f"small_unet's four 2x max-pools need a multiple of 16, e.g. {nearest}" if args.model == "small"
            else f"must be at least {MIN_IMAGE_SIZE} px"))
    for name in ("lr", "checkpoint_minutes", "max_minutes"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if name == "lr" else value >= 0)):
            parser.error(f"--{name.replace('_', '-')} {value:g}: must be "
                         f"{'a positive number' if name == 'lr' else '0 or more'}")
    if args.resume and args.start_over:
        parser.error("--resume continues the run in --weights-dir, --start-over deletes it: pass one of them")
    return args


def build_model(args, image_size):
    """small_unet at the images' size, or the original unet at the smallest input that covers them."""
    minitensor.set_seed(args.seed)
    if args.model == "small":
        return small_unet((image_size, image_size, 3), num_classes=NUM_CLASSES)

    def output_size(size):          # the last decoder map: what the valid convolutions leave of the input
        stages = valid_unet_sizes(size)
        return stages[2][-1] if stages else 0

    size = next(s for s in range(image_size, image_size + 4096) if output_size(s) >= image_size)
    return unet((size, size, 3), num_classes=NUM_CLASSES)


def class_weights_for(args, train_loader):
    """w_c for the border-weighted losses, as --class-weights asks: None means per mask."""
    if args.class_weights == "mask":
        return None
    if args.class_weights == "none":
        return np.ones(NUM_CLASSES)
    return dataset_class_weights([os.path.join(train_loader.masks_dir, f"{i}.png") for i in train_loader.ids],
                                 NUM_CLASSES)


def run_fingerprint(args):
    """The settings a resumed run must share with the run it continues."""
    keys = ["model", "num_images", "num_val", "num_test", "image_size", "batch_size", "loss", "augment", "seed"]
    if args.loss in BORDER_WEIGHTED:
        keys.append("class_weights")
    return {key: getattr(args, key) for key in keys}


def prepare(args, stack, world=SingleProcess(), log=print):
    """Output folders, data set, loaders, model and trainer (restored with --resume), or a
    UsageError / OutputFolderError that says why not. The folders' locks are released by ``stack``.
    Data-parallel, rank 0 alone claims the folders and generates the data set."""
    train_ids, val_ids, test_ids = split_ids(args.num_images, args.num_test, args.num_val)

    def claim_and_generate():
        claim_output_folders(args, stack, test_ids, log)
        try:
            ensure_dataset(args.data, args.num_images, args.image_size, args.num_test, seed=args.seed, log=log)
        except (DatasetError, ValueError, OSError) as error:
            raise UsageError(f"the data set in {args.data} cannot be used:\n{error}") from None

    on_rank_zero(world, claim_and_generate, exit_status_of)
    try:
        check_dataset(args.data, args.num_images, args.num_test, NUM_CLASSES, args.image_size)
    except (DatasetError, ValueError, OSError) as error:
        raise UsageError(f"the data set in {args.data} cannot be used:\n{error}") from None
    dirs = dataset_dirs(args.data)
    train_loader = BatchLoader(train_ids, dirs.train_images, dirs.train_masks, args.batch_size, seed=args.seed)
    val_loader = BatchLoader(val_ids, dirs.train_images, dirs.train_masks, args.batch_size, shuffle=False)
    model = build_model(args, args.image_size)
    model.summary(print_fn=log)
    model.compile(Adam(learning_rate=args.lr or DEFAULT_LR), LOSSES[args.loss]())
    border_weighted = args.loss in BORDER_WEIGHTED
    trainer = Trainer(model, train_loader, val_loader, epochs=args.epochs, weights_dir=args.weights_dir,
                      fingerprint=run_fingerprint(args),
                      augmenter=AUGMENTERS[args.augment](args.seed + 1),   # own seed: shuffling stays the same
                      border_weighted=border_weighted,
                      class_weights=class_weights_for(args, train_loader) if border_weighted else None,
                      checkpoint_minutes=args.checkpoint_minutes, max_minutes=args.max_minutes,
                      quiet=args.quiet, log=log, world=world)
    if args.resume:
        trainer.restore()
        if args.lr is not None and args.lr != model.optimizer.learning_rate:
            log(f"--lr {args.lr:g}: the learning rate is now {args.lr:g} (the checkpoint had "
                f"{model.optimizer.learning_rate:g})")
            model.optimizer.learning_rate = args.lr
    return trainer, list(test_ids), dirs


def prediction_weights(trainer, predict_with, log=print):
    """Put the weights the test set is predicted with into the model; returns what metrics.json records."""
    last = {"file": trainer.resume_path, "epoch": trainer.state.epoch}
    if predict_with == "last":
        log(f"predicting the test set with the last epoch's weights (epoch {trainer.state.epoch}, --predict-with "
            f"last)")
        return last
    best = trainer.load_best_weights()
    if best is None:
        log(f"predicting the test set with the last epoch's weights: {trainer.best_path} does not hold the best "
            f"epoch's ({trainer.state.best_epoch}; the run was begun by a version that kept no best.npz)")
        return last
    log(f"predicting the test set with {trainer.best_path}: the weights of epoch {best['epoch']}, whose val_loss "
        f"{best['val_loss']:.4f} is the lowest; the last epoch's ({trainer.state.epoch}) are in {trainer.resume_path} "
        f"(--predict-with last uses them)")
    return {"file": trainer.best_path, **best}


USER_ERRORS = (UsageError, OutputFolderError, CheckpointError, ModelFileError, DatasetError, TensorBoardUnavailable,
               DistributedError)


def exit_status_of(error):
    """The status train.py ends with after ``error`` (the module doc's table)."""
    if isinstance(error, OtherRankFailed):
        return error.status
    if isinstance(error, USER_ERRORS):
        return 2
    if isinstance(error, BrokenPipeError):      # train.py | head: the reader has all it wanted
        return 128 + signal.SIGPIPE
    if isinstance(error, OSError):
        return 2
    if isinstance(error, KeyboardInterrupt):    # a second stop signal, or one outside training
        return error.exit_status if isinstance(error, Interrupted) else 130
    return 1                                    # TrainingError, WeightsDifferError, a bug


def tell(error, args, prefix=""):
    """Print what ``error`` means for the user (to stderr), as ``exit_status_of`` ends on it."""
    if isinstance(error, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    elif isinstance(error, OSError) and not isinstance(error, USER_ERRORS):
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prefix}error: {where}{error.strerror or error}; check that the disk has room and the folder is "
              f"writable, then continue with --resume", file=sys.stderr)
    elif isinstance(error, KeyboardInterrupt):
        resume_path = os.path.join(args.weights_dir, RESUME_FILE)
        kept = f"the last checkpoint is {resume_path}" if os.path.exists(resume_path) else "no checkpoint was written"
        with contextlib.suppress(OSError):
            print(f"{prefix}stopped ({error.args[0] if isinstance(error, Interrupted) else 'Ctrl-C'}); {kept}",
                  file=sys.stderr)
    elif isinstance(error, USER_ERRORS + (TrainingError, WeightsDifferError)):
        print(f"{prefix}error: {error}", file=sys.stderr)
    else:                                       # a bug: the whole traceback
        print(f"{prefix}" + "".join(traceback.format_exception(error)), file=sys.stderr, end="")


def set_up(args, stack, world, log):
    """``prepare`` on every rank, then agreement: if it failed on any rank, every rank raises (the
    failing rank's error there, OtherRankFailed elsewhere), and only one rank has printed why."""
    try:
        result, failure = prepare(args, stack, world, log), None
    except Exception as error:          # noqa: BLE001 (every rank must hear of it before any exits)
        result, failure = None, error
    statuses = world.allgather(None if failure is None else exit_status_of(failure))
    if failure is not None:
        if not isinstance(failure, OtherRankFailed) and (world.rank == 0 or statuses[0] is None):
            tell(failure, args, prefix=f"rank {world.rank}: " if world.rank else "")
        raise OtherRankFailed(exit_status_of(failure))
    first = next((status for status in statuses if status is not None), None)
    if first is not None:
        raise OtherRankFailed(first)
    return result


def main(argv=None, on_batch_end=None):
    args = parse_args(argv)
    try:
        device = backend.resolve_device(args.device)
    except RuntimeError as error:
        print(f"error: --device {args.device}: {error}", file=sys.stderr)
        return 2
    try:
        world = start_world(args.distributed, device)
    except DistributedError as error:
        if launched_rank() == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    say = print if world.is_writer else (lambda *args, **kwargs: None)
    fallback, training = args.device == "auto" and device == "cpu", False
    try:
        with contextlib.ExitStack() as stack, signals_interrupt():
            say(f"device: {device}" + (f" (no usable GPU: {backend.gpu_status()[1]})" if fallback else ""))
            if world.is_distributed:
                shares = " + ".join(str(len(rank_slice(range(args.batch_size), rank, world.size)))
                                    for rank in range(world.size))
                say(f"data-parallel: {world.size} rank{'s' if world.size > 1 else ''}, every batch of {args.batch_size} "
                    f"shared out as {shares} images, gradients summed (docs/data_parallel.md)")
            trainer, test_ids, dirs = set_up(args, stack, world, say)
            training = True          # from here on an error on one rank must end all of them (MPI abort)
            trainer.model.to(device)
            trainer.on_batch_end = on_batch_end
            board = TensorBoardLog(args.tensorboard, trainer.state.history) if args.tensorboard and world.is_writer \
                else None
            if board:
                stack.callback(board.close)
                trainer.on_epoch_end = board.epoch_end
            if not trainer.fit():
                return trainer.stop.exit_status
            weights = prediction_weights(trainer, args.predict_with, log=say)
            write_results(trainer.model, trainer.state.history, test_ids, dirs, args.results_dir, args.batch_size,
                          args.tta, log=say, weights=weights, world=world)
            if board:
                board.test_images(trainer.state.epoch, test_ids, dirs, args.results_dir)
    except (Exception, KeyboardInterrupt) as error:
        status = exit_status_of(error)
        if isinstance(error, OtherRankFailed):   # the rank that failed has said why
            return status
        if world.size == 1 and not isinstance(error, USER_ERRORS + (OSError, KeyboardInterrupt, TrainingError,
                                                                    WeightsDifferError)):
            raise                                # a bug in one process: Python's own traceback and exit
        # The ranks agree on a diverged loss and on differing weights (they see the same numbers);
        # anything else may have struck this rank alone, while the others wait for it in a collective.
        agreed = world.size == 1 or not training or isinstance(error, (TrainingError, WeightsDifferError))
        if world.is_writer or not agreed:
            tell(error, args, prefix=f"rank {world.rank}: " if world.size > 1 else "")
        if not agreed:
            world.abort(status)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
