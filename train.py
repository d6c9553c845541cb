"""Train the seed's U-Net on the Shape dataset, from an empty folder to colored test masks.

    python train.py                      # everything with the seed's settings; CPU unless a GPU is usable
    python train.py --device gpu         # on the GPU (needs CuPy)
    python train.py --epochs 5           # a shorter run (see the README for times)
    python train.py --resume             # continue an interrupted run exactly where it stopped

The steps are the seed's: generate the data set if it is missing (shape/train_imgs,
shape/train_mask, shape/test_imgs and, for the metrics, shape/test_mask); build small_unet; train
with Adam(1e-3) on BinaryCrossentropy with batches of 16 read by a generator; every 3 epochs save
the model if val_loss improved (UNet_weight/ep...-loss...-val_loss....npz); halve the learning
rate after 3 epochs without improvement; stop after 10; then write the test set's predictions
as colored masks into UNet_test_result/ and report IoU and Dice.

Ctrl-C stops after the current batch and saves a resumable checkpoint (UNet_weight/last.npz:
weights, Adam's moments, epoch and batch, callback state, the shuffling generator) atomically;
a second Ctrl-C stops at once and keeps the previous checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np

import minitensor
from minitensor import backend, losses
from minitensor.optimizers import Adam
from unet import small_unet, unet
from unet.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from unet.data import (CLASS_NAMES, NUM_CLASSES, PALETTE, BatchLoader, DatasetError, check_dataset,
                       colorize_mask, dataset_dirs, ensure_dataset, load_mask, read_bgr, split_ids,
                       write_image_atomic)
from unet.augment import Augmenter
from unet.metrics import format_scores, score_mask_files
from unet.models import valid_unet_sizes
from unet.report import plot_history, plot_predictions, write_history_csv, write_text_atomic
from unet.tta import predict_views
from unet.weights import batch_weights, dataset_class_weights

RESUME_FILE = "last.npz"

LOSSES = {
    # What Keras 3 really trains for the seed's compile(loss=BinaryCrossentropy()) on a softmax
    # output: sigmoid BCE on the pre-softmax logits (see minitensor/losses.py).
    "bce-logits": lambda: losses.BinaryCrossentropy(from_logits=True),
    # The formula the seed's code reads as: BCE on the clipped softmax probabilities.
    "bce": lambda: losses.BinaryCrossentropy(),
    # The usual choice for one label per pixel: softmax cross-entropy on the logits, fused.
    "softmax-ce": lambda: losses.SoftmaxCrossEntropy(),
    # The paper's loss: softmax cross-entropy weighted per pixel by unet/weights.py's border map.
    "weighted": lambda: losses.SoftmaxCrossEntropy(),
    # The seed's loss (as Keras trains it) with the same border weights.
    "weighted-bce": lambda: losses.BinaryCrossentropy(from_logits=True),
}
BORDER_WEIGHTED = ("weighted", "weighted-bce")
# --augment: a factory of each choice's augmenter, given its seed.
AUGMENTERS = {
    "none": lambda seed: None,
    "elastic": lambda seed: Augmenter(seed),
    "flip": lambda seed: Augmenter(seed, elastic=False, affine=False, flips=True),
}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or a checkpoint that does not fit); the message says why."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the seed's U-Net on the Shape dataset with minitensor.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="auto = the GPU when CuPy sees one, else the CPU")
    parser.add_argument("--model", default="small", choices=["small", "original"],
                        help="small_unet ('same' convs, the seed's Shape model) or the original valid-conv unet")
    parser.add_argument("--data", default="shape", help="data set folder; generated there if missing")
    parser.add_argument("--num-images", type=int, default=1000, help="images in the data set (the seed: 1000)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (the seed: 100)")
    parser.add_argument("--num-test", type=int, default=100, help="test images (the seed: 100)")
    parser.add_argument("--image-size", type=int, default=128, help="image size of a generated data set")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--loss", default="bce-logits", choices=sorted(LOSSES),
                        help="bce-logits: what Keras trains for the seed's BCE on softmax; bce: BCE on probabilities; "
                             "weighted / weighted-bce: softmax-ce / bce-logits with the paper's border weights")
    parser.add_argument("--class-weights", default="none", choices=("none", "mask", "dataset"),
                        help="w_c of the border-weighted losses: 1 for every class (the border term alone), or "
                             "the paper's class balancing by the frequencies in each mask or in the whole training "
                             "set; on the Shape data both balancings held training at the uniform prediction "
                             "(loss ln 4) for epochs (README)")
    parser.add_argument("--augment", default="none", choices=sorted(AUGMENTERS),
                        help="elastic: the paper's random elastic deformation, shift/rotation and gray-value "
                             "variation on every training batch; flip: random flips and quarter turns with the "
                             "gray-value variation, which leave every shape's class intact")
    parser.add_argument("--seed", type=int, default=22, help="seed of weights, shuffling and data generation")
    parser.add_argument("--weights-dir", default="UNet_weight")
    parser.add_argument("--results-dir", default="UNet_test_result")
    parser.add_argument("--resume", action="store_true", help=f"continue from WEIGHTS_DIR/{RESUME_FILE}")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after the epoch during which this much training time has passed")
    parser.add_argument("--tta", action="store_true",
                        help="predict the test set 8 times, flipped and turned, and average (8x the prediction time; "
                             "the training is the same)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "num_images", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    return args


# ----- model and data --------------------------------------------------------------------------------

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


def _mirror_to(array, size):
    """Mirror-pad the two spatial axes (1 and 2) of a batch to size x size."""
    before = (size - array.shape[1]) // 2
    spatial = (before, size - array.shape[1] - before)
    return np.pad(array, ((0, 0), spatial, spatial) + ((0, 0),) * (array.ndim - 3), mode="symmetric")


def fit_to_model(model, images, *targets):
    """Mirror-pad images (and per-pixel targets: masks, weights) so the output covers the image.

    small_unet keeps the size, so nothing changes. The original unet's 'valid' convolutions lose
    a margin, so, as in the paper, the missing context is supplied by mirroring the border; the
    targets are mirrored too, to the output's size. None targets stay None.
    """
    in_size, out_size = model.input_shape[1], model.output_shape[1]
    if in_size == images.shape[1]:
        return (images, *targets)
    return (_mirror_to(images, in_size), *(None if t is None else _mirror_to(t, out_size) for t in targets))


def crop_output(model, probabilities, size):
    """The centre ``size`` x ``size`` of the output (the image's own pixels)."""
    start = (probabilities.shape[1] - size) // 2
    return probabilities[:, start:start + size, start:start + size]


# ----- Ctrl-C ---------------------------------------------------------------------------------------------

class StopRequest:
    """First Ctrl-C: finish the current batch, then save and stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this batch and saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)


def class_weights_for(args, train_loader):
    """w_c for the border-weighted losses, as --class-weights asks: None means per mask."""
    if args.class_weights == "mask":
        return None
    if args.class_weights == "none":
        return np.ones(NUM_CLASSES)
    return dataset_class_weights([os.path.join(train_loader.masks_dir, f"{i}.png") for i in train_loader.ids],
                                 NUM_CLASSES)


# ----- the training loop -----------------------------------------------------------------------------------

def run_fingerprint(args):
    """The settings a resumed run must share with the run it continues."""
    keys = ["model", "num_images", "num_val", "num_test", "image_size", "batch_size", "loss", "augment", "seed"]
    if args.loss in BORDER_WEIGHTED:
        keys.append("class_weights")
    return {key: getattr(args, key) for key in keys}


class Trainer:
    """The seed's model.fit_generator, written out: epochs of batches, validation, callbacks."""

    def __init__(self, args, model, train_loader, val_loader, log=print):
        self.args = args
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.log = log
        self.stop = StopRequest()
        self.history = []
        self.epoch, self.batch = 0, 0                  # where the next step starts
        self.epoch_loss_sum, self.epoch_images, self.epoch_seconds = 0.0, 0, 0.0
        self.epoch_start_state = None                  # the shuffler's state before this epoch's order
        self.train_seconds = 0.0
        self.on_batch_end = None                       # a hook for tests and tools: f(trainer)
        # Its own seed, so that switching augmentation on does not change the shuffling.
        self.augmenter = AUGMENTERS[args.augment](args.seed + 1)
        self.border_weighted = args.loss in BORDER_WEIGHTED
        self.class_weights = class_weights_for(args, train_loader) if self.border_weighted else None
        if self.class_weights is not None:
            log(f"border-weighted loss, class weights ({args.class_weights}): "
                + ", ".join(f"{name} {w:.3g}" for name, w in zip(CLASS_NAMES, self.class_weights)))
        checkpoint_log = self._log_above_progress
        self.callbacks = [
            ModelCheckpoint(args.weights_dir, period=3, verbose=1, log=checkpoint_log),
            ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, verbose=1, log=checkpoint_log),
            EarlyStopping(monitor="val_loss", min_delta=0, patience=10, verbose=1, log=checkpoint_log),
        ]
        for callback in self.callbacks:
            callback.set_model(model)
            callback.on_train_begin()

    def _log_above_progress(self, message):
        from tqdm import tqdm

        tqdm.write(message)

    # -- saving and resuming --
    @property
    def resume_path(self):
        return os.path.join(self.args.weights_dir, RESUME_FILE)

    def save_resumable(self):
        extra = {
            "fingerprint": run_fingerprint(self.args), "epoch": self.epoch, "batch": self.batch,
            "epoch_loss_sum": self.epoch_loss_sum, "epoch_images": self.epoch_images,
            "epoch_seconds": self.epoch_seconds, "epoch_start_state": self.epoch_start_state,
            "train_seconds": self.train_seconds, "history": self.history,
            "callbacks": [c.get_state() for c in self.callbacks], "stop_training": self.model.stop_training,
            "augmenter": self.augmenter.get_state() if self.augmenter else None,
        }
        self.model.save(self.resume_path, extra=extra)

    def restore(self):
        if not os.path.exists(self.resume_path):
            raise TrainingError(f"--resume: no checkpoint at {self.resume_path}; run without --resume to start, "
                                f"or point --weights-dir at the folder of the run to continue")
        saved = minitensor.load_model(self.resume_path)
        extra = saved.saved_extra
        if extra.get("fingerprint") != run_fingerprint(self.args):
            raise TrainingError(f"--resume: {self.resume_path} was written by a run with settings "
                                f"{extra.get('fingerprint')}, not {run_fingerprint(self.args)}; use the same "
                                f"settings, or another --weights-dir to start afresh")
        if extra["epoch"] > self.args.epochs:
            raise TrainingError(f"--resume: {self.resume_path} has trained {extra['epoch']} epochs, more than "
                                f"--epochs {self.args.epochs}; pass --epochs {extra['epoch']} or more")
        self.model.set_weights(saved.get_weights())
        self.model.optimizer.set_state(saved.optimizer.get_state())
        for key in ("epoch", "batch", "epoch_loss_sum", "epoch_images", "epoch_seconds", "epoch_start_state",
                    "train_seconds", "history"):
            setattr(self, key, extra[key])
        for callback, state in zip(self.callbacks, extra["callbacks"]):
            callback.set_state(state)
        self.model.stop_training = extra["stop_training"]
        if self.augmenter:
            self.augmenter.set_state(extra["augmenter"])
        if self.epoch == self.args.epochs or self.model.stop_training:
            self.log(f"resumed from {self.resume_path}: training finished after epoch {self.epoch}; predicting")
        else:
            self.log(f"resumed from {self.resume_path}: epoch {self.epoch + 1}, batch {self.batch}")

    # -- one epoch --
    def _train_epoch(self):
        from tqdm import tqdm

        loader = self.train_loader
        if self.batch == 0:
            self.epoch_start_state = loader.get_state()
        else:
            loader.set_state(self.epoch_start_state)   # draw the same order as before the interruption
        order = loader.epoch_order()
        batches = [order[i:i + loader.batch_size] for i in range(0, len(order), loader.batch_size)]
        progress = tqdm(total=len(batches), initial=self.batch, desc=f"Epoch {self.epoch + 1}/{self.args.epochs}",
                        unit="batch", disable=self.args.quiet, leave=False, dynamic_ncols=True)
        with progress:
            while self.batch < len(batches):
                start = time.perf_counter()
                images, masks, weights = self._read_batch(loader, batches[self.batch], augment=True)
                loss = self.model.train_on_batch(images, masks, sample_weight=weights)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at epoch {self.epoch + 1}, batch {self.batch + 1}: training "
                        f"diverged and was stopped. The last good checkpoint is kept ({self.resume_path}); "
                        f"try a smaller --lr")
                self.epoch_seconds += time.perf_counter() - start
                self.epoch_loss_sum += loss * len(images)
                self.epoch_images += len(images)
                self.batch += 1
                progress.update(1)
                progress.set_postfix(loss=f"{self.epoch_loss_sum / self.epoch_images:.4f}")
                if self.on_batch_end is not None:
                    self.on_batch_end(self)
                if self.stop.requested and self.batch < len(batches):
                    return False
        return True

    def _read_batch(self, loader, ids, augment):
        """(images, masks, weights or None) for these ids, augmented if asked, fitted to the model.

        Border weights come from the cache beside the masks and, when the batch is deformed,
        are deformed with it, so they stay on the gaps between the objects.
        """
        images, masks = loader.read_batch(ids)
        weights = (batch_weights(ids, loader.masks_dir, NUM_CLASSES, class_weights=self.class_weights)
                   if self.border_weighted else None)
        if augment and self.augmenter is not None:
            images, masks, *rest = self.augmenter(images, masks, weights)
            weights = rest[0] if rest else None
        return fit_to_model(self.model, images, masks, weights)

    def _validate(self):
        """Mean loss over every validation image (weighted like the training loss, never augmented)."""
        loader = self.val_loader
        total, count = 0.0, 0
        for start in range(0, len(loader.ids), loader.batch_size):
            ids = loader.ids[start:start + loader.batch_size]
            images, masks, weights = self._read_batch(loader, ids, augment=False)
            total += self.model.test_on_batch(images, masks, sample_weight=weights) * len(images)
            count += len(images)
        return total / count

    def _end_epoch(self):
        val_loss = self._validate()
        seconds = self.epoch_seconds
        logs = {"loss": self.epoch_loss_sum / self.epoch_images, "val_loss": val_loss,
                "lr": self.model.optimizer.learning_rate}
        self.history.append({"epoch": self.epoch + 1, **logs, "seconds": round(seconds, 3),
                             "images_per_second": round(self.epoch_images / seconds, 3)})
        self.log(f"Epoch {self.epoch + 1}/{self.args.epochs} - loss {logs['loss']:.4f} - val_loss {val_loss:.4f} "
                 f"- lr {logs['lr']:.2e} - {seconds:.1f} s - {self.epoch_images / seconds:.1f} images/s")
        self.train_seconds += seconds
        for callback in self.callbacks:
            callback.on_epoch_end(self.epoch, logs)
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_images, self.epoch_seconds = 0.0, 0, 0.0

    def fit(self):
        """Train until the epochs are done, EarlyStopping stops, time is up, or Ctrl-C. True if finished."""
        with self.stop:
            while self.epoch < self.args.epochs and not self.model.stop_training:
                if not self._train_epoch():
                    self.save_resumable()
                    self.log(f"interrupted: saved {self.resume_path}; continue with the same command and --resume")
                    return False
                self._end_epoch()
                self.save_resumable()
                if self.stop.requested:
                    self.log(f"interrupted: saved {self.resume_path}; continue with the same command and --resume")
                    return False
                if self.args.max_minutes is not None and self.train_seconds > 60 * self.args.max_minutes:
                    self.log(f"--max-minutes {self.args.max_minutes:g}: stopping after epoch {self.epoch}")
                    break
        for callback in self.callbacks:
            callback.on_train_end()
        return True


# ----- after training --------------------------------------------------------------------------------------

def predict_test_set(args, model, test_ids, dirs):
    """Colored masks of every test image into the results folder; returns (ids, images, predictions)."""
    os.makedirs(args.results_dir, exist_ok=True)

    def predict(images):
        (inputs,) = fit_to_model(model, images)
        return crop_output(model, model.predict(inputs, batch_size=args.batch_size), images.shape[1])

    images_bgr, predictions = [], []
    for start in range(0, len(test_ids), args.batch_size):
        ids = test_ids[start:start + args.batch_size]
        batch = np.stack([read_bgr(os.path.join(dirs.test_images, f"{i}.jpg")) for i in ids])
        probabilities = predict_views(predict, batch.astype(np.float32) / 127.5 - 1, 8 if args.tta else 1)
        labels = probabilities.argmax(axis=-1)
        for index, label_map in zip(ids, labels):
            write_image_atomic(os.path.join(args.results_dir, f"{index}.png"), colorize_mask(label_map, PALETTE))
        images_bgr.extend(batch)
        predictions.extend(labels)
    return images_bgr, predictions


def report(args, trainer, test_ids, dirs, images, predictions):
    scores = score_mask_files(dirs.test_masks, args.results_dir, test_ids, NUM_CLASSES, palette=PALETTE)
    print("Test set (from the files in", args.results_dir, "against", dirs.test_masks + "):")
    print(format_scores(scores, CLASS_NAMES))
    write_text_atomic(os.path.join(args.results_dir, "metrics.json"), json.dumps(scores, indent=2))
    write_history_csv(os.path.join(args.results_dir, "history.csv"), trainer.history)
    if trainer.history:
        plot_history(os.path.join(args.results_dir, "training.png"), trainer.history)
    shown = min(4, len(test_ids))
    truths = [load_mask(os.path.join(dirs.test_masks, f"{i}.png"), NUM_CLASSES) for i in test_ids[:shown]]
    plot_predictions(os.path.join(args.results_dir, "predictions.png"), images[:shown], truths, predictions[:shown],
                     [f"test image {i}" for i in test_ids[:shown]])
    print(f"wrote {len(test_ids)} colored masks, metrics.json, history.csv, training.png and predictions.png "
          f"to {args.results_dir}")
    return scores


def main(argv=None, on_batch_end=None):
    args = parse_args(argv)
    try:
        device = backend.resolve_device(args.device)
    except RuntimeError as error:
        print(f"error: --device {args.device}: {error}", file=sys.stderr)
        return 2
    print(f"device: {device}" + (" (no usable GPU found)" if args.device == "auto" and device == "cpu" else ""))
    try:
        ensure_dataset(args.data, args.num_images, args.image_size, args.num_test, seed=args.seed)
        check_dataset(args.data, args.num_images, args.num_test, NUM_CLASSES, args.image_size)
    except (DatasetError, ValueError) as error:
        print(f"error: the data set in {args.data} cannot be used:\n{error}", file=sys.stderr)
        return 2
    dirs = dataset_dirs(args.data)
    train_ids, val_ids, test_ids = split_ids(args.num_images, args.num_test, args.num_val)
    train_loader = BatchLoader(train_ids, dirs.train_images, dirs.train_masks, args.batch_size, seed=args.seed)
    val_loader = BatchLoader(val_ids, dirs.train_images, dirs.train_masks, args.batch_size, shuffle=False)

    model = build_model(args, args.image_size)
    model.summary()
    model.compile(Adam(learning_rate=args.lr), LOSSES[args.loss]())
    model.to(device)
    os.makedirs(args.weights_dir, exist_ok=True)
    trainer = Trainer(args, model, train_loader, val_loader)
    trainer.on_batch_end = on_batch_end
    try:
        if args.resume:
            trainer.restore()
        finished = trainer.fit()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped; the last checkpoint is {trainer.resume_path}", file=sys.stderr)
        return 130
    if not finished:
        return 130
    images, predictions = predict_test_set(args, model, list(test_ids), dirs)
    report(args, trainer, list(test_ids), dirs, images, predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
