"""The measured plan behind the 'auto' convolution setting: which algorithm each product of each shape runs.

On the CPU a stride-1 convolution product (the forward, dx or dW of one layer shape, batch size and
dtype: its ``key``) can run by two to four algorithms (``candidates``). Under 'auto' the plan learns
which is fastest on this machine from the training itself, as cuDNN's benchmark mode does on a GPU:

- **Trials.** A new key's first call runs the rules' choice (kernels/conv_policy.py), untimed;
  its next calls run its candidates in a fixed order, the rules' choice first, one per call, and
  kernels/conv.py times each of those real calls (a process's first call of an algorithm runs
  twice, timed the second time: the first loads the compiled code). When every candidate has one
  time, the rules' choice and its fastest rival get REPEATS times each; then the key is decided
  (``decide``): the fastest, if its best time beat the rules' choice's by MARGIN, else the rules'
  choice. The trials are real work, so they cost only what the slower candidates take beyond the
  fastest, in the first steps of a new shape. Past TRIAL_BUDGET_S of that in one process, the keys
  not yet decided are decided on what they have for the rest of the process, and their trials so
  far go to the cache for the next run to go on with.
- **Cache.** Decided keys (and a spent budget's trials) go to ``conv-plan-<machine>.json`` in
  ``cache_folder()`` (``MINITENSOR_CACHE_DIR``, or ``$XDG_CACHE_HOME/minitensor``, or
  ``~/.cache/minitensor``), one file per machine kind: the CPU model, its vector ISA, numba's thread
  count, the kernels OpenBLAS runs (``cpu_runtime.blas_core``: OPENBLAS_CORETYPE can halve GEMM's
  speed), the NumPy and numba versions and the convolution kernels' own code (``machine()``; this
  file is one of them). A later run on the same kind of machine tries nothing; a changed kernel,
  BLAS core or thread count starts a new file. Written atomically; an unreadable file is warned about and
  rewritten, an unwritable folder costs only the re-measuring.
- **Checkpoint.** ``state()`` is every key this process served, decided or still in its trials, and
  ``restore()`` puts it back: a resumed run makes the same choices, and a key still in its trials
  goes on with the same next candidate, so a resumed run rounds exactly as the run it continues did
  (unet/training_state.py keeps it as ``conv_plan``).

Which candidate a key's first trials run depends only on the key and on how many trials it has had
(only which rival gets the repeated trials depends on their times); what is decided afterwards
depends on the timings, as cuDNN's choice does. Nothing is tried on more than one MPI rank per machine
(the ranks would time each other's work) or under ``MINITENSOR_CONV=rules`` (kernels/switches.py):
there the rules decide.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings

import numba
import numpy as np

from minitensor import cpu_runtime
from minitensor.kernels import cpu_winograd4

#: Bumped when the file's layout or the meaning of its keys changes.
PLAN_FORMAT = 1
#: The files whose code the timings measure: a change to any of them starts a new cache file.
KERNEL_FILES = ("conv_gemm.py", "cpu_conv.py", "cpu_winograd.py", "cpu_winograd4.py", "cpu_winograd4_tiles.py",
                "conv_plan.py")
#: Seconds a process's trials may cost beyond the fastest candidates; past it, keys are decided on what
#: they have (a later run on the machine tries the rest).
TRIAL_BUDGET_S = 10.0
#: Another algorithm replaces the rules' choice only when its best time is this much faster (1.08: 8%).
MARGIN = 1.08
#: Trials of the rules' choice and of its fastest rival before a key is decided.
REPEATS = 3


class PlanWarning(UserWarning):
    """The cache file could not be read or written; training goes on, re-measuring what it lacks."""


def key(product, geometry, x_shape, out_channels, dtype):
    """The plan's name for one product: 'forward float32 16x128x128x3 oc16 k3x3 s1x1 pad1,1 out128x128'."""
    n_images, height, width, in_channels = x_shape
    return (f"{product} {np.dtype(dtype).name} {n_images}x{height}x{width}x{in_channels} oc{out_channels} "
            f"k{geometry.kernel_h}x{geometry.kernel_w} s{geometry.stride_h}x{geometry.stride_w} "
            f"pad{geometry.pad_top},{geometry.pad_left} out{geometry.out_h}x{geometry.out_w}")


def candidates(entry_key, preferred):
    """The CPU algorithms that can run the product ``entry_key`` names, ``preferred`` first, then the
    others in a fixed order (gemm, direct, winograd, winograd4)."""
    product, _dtype, x_shape, out_channels, kernel, stride = entry_key.split()[:6]
    names = ["gemm"]
    if stride == "s1x1" and kernel != "k1x1":
        names.append("direct")
        if kernel == "k3x3":
            names.append("winograd")
            channel_product = int(x_shape.split("x")[3]) * int(out_channels[2:])
            if ((cpu_winograd4.runs_in_parallel() or numba.get_num_threads() == 1)
                    and (product != "kernel_grad" or channel_product <= cpu_winograd4.KERNEL_GRAD_MAX_CHANNEL_PRODUCT)):
                names.append("winograd4")
    if preferred not in names:
        raise ValueError(f"{preferred!r} cannot run {entry_key!r}; its candidates are {', '.join(names)}")
    return [preferred] + [name for name in names if name != preferred]


def valid(entry_key, algorithm):
    """Whether ``algorithm`` can run the product ``entry_key`` names on this CPU (a file's entry must)."""
    try:
        return algorithm in candidates(entry_key, "gemm")
    except (AttributeError, ValueError):
        return False


def decide(times, preferred):
    """The trial's verdict from {algorithm: [seconds, ...]}: the fastest (by its best time), if MARGIN faster
    than ``preferred``, else ``preferred``."""
    best = {name: min(seconds) for name, seconds in times.items()}
    fastest = min(best, key=best.get)
    return fastest if best[fastest] * MARGIN < best[preferred] else preferred


def _next_trial(times, names):
    """The candidate the next call of a key in its trials runs, or None once it can be decided: every
    candidate once, then the rules' choice and the fastest other one up to REPEATS times each (one call
    on a busy machine can be 10% off; the trials are real work, and these two are the quick ones)."""
    for name in names:
        if not times.get(name):
            return name
    preferred, others = names[0], names[1:]
    contender = min(others, key=lambda name: min(times[name]))
    for name in (preferred, contender):
        if len(times[name]) < REPEATS:
            return name
    return None


def _kernels_digest():
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in KERNEL_FILES:
        with open(os.path.join(folder, name), "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()[:16]


def machine():
    """What a plan is valid for: the CPU, the threads, the libraries and the kernels' code."""
    return {"format": PLAN_FORMAT, **cpu_runtime.cpu_identity(), "numba_threads": numba.get_num_threads(),
            "local_blas_threads": cpu_runtime.can_set_local_blas_threads(), "blas_core": cpu_runtime.blas_core(),
            "numpy": np.__version__,
            "numba": numba.__version__, "kernels": _kernels_digest()}


def cache_folder():
    """Where the plan files live: MINITENSOR_CACHE_DIR, else $XDG_CACHE_HOME/minitensor, else ~/.cache/minitensor."""
    chosen = os.environ.get("MINITENSOR_CACHE_DIR", "").strip()
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minitensor")


def cache_path(identity=None):
    """This machine kind's plan file (``identity``: ``machine()``, if the caller has it already)."""
    identity = machine() if identity is None else identity
    name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_folder(), f"conv-plan-{name}.json")


def _usable(entry, value):
    """A cache entry: an algorithm that can run the key, or {"trials": {algorithm: [seconds, ...]}} so far."""
    if isinstance(value, dict):
        trials = value.get("trials")
        return isinstance(trials, dict) and all(valid(entry, a) and isinstance(t, list) and t and
                                                all(isinstance(x, (int, float)) for x in t)
                                                for a, t in trials.items())
    return valid(entry, value)


def _read_entries(path):
    with open(path) as file:
        entries = json.load(file)["entries"]
    return {k: v for k, v in entries.items() if _usable(k, v)}


class Plan:
    """One process's plan: each key it served, decided or in its trials."""

    def __init__(self):
        self.decided = {}           # key -> algorithm: from the cache, a checkpoint or this process's trials
        self.trials = {}            # key -> {algorithm: [seconds, ...]} while undecided
        self.served = set()         # the keys this process chose for (what a checkpoint keeps)
        self.restored = set()       # the decided keys a checkpoint gave (kept by the next one too)
        self.tried_here = 0         # keys decided by this process's own trials
        self.extra_seconds = 0.0    # what trials took beyond each key's fastest so far (TRIAL_BUDGET_S bounds it)
        self._warmed = set()        # (product, algorithm, dtype) that has run once in this process
        self._machine = None        # machine(), read once (it hashes the kernels' files)
        self._path = None           # the cache file, once read
        self._spent_out = False     # the trials budget is spent (and the trials so far saved)
        self._cached_trials = {}    # trials an earlier run left in the cache, taken up at a key's first call
        self._writable = True

    def _load(self):
        if self._path is not None:
            return
        self._machine = machine()
        self._path = cache_path(self._machine)
        try:
            for entry, value in _read_entries(self._path).items():
                if isinstance(value, dict):            # a run that spent its budget left these trials
                    self._cached_trials[entry] = {a: list(t) for a, t in value["trials"].items()}
                else:
                    self.decided.setdefault(entry, value)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            warnings.warn(f"the convolution plan cache {self._path} is unreadable ({error}); it is measured "
                          f"again and rewritten", PlanWarning, stacklevel=4)

    def _save(self, updates):
        """Merge ``updates`` ({key: algorithm or {"trials": ...}}) into the cache file."""
        if not self._writable:
            return
        folder = os.path.dirname(self._path)
        try:
            os.makedirs(folder, exist_ok=True)
            try:      # another process may have decided other keys meanwhile: keep them too
                entries = _read_entries(self._path)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                entries = {}
            for entry, value in updates.items():
                if isinstance(value, str) or not isinstance(entries.get(entry), str):
                    entries[entry] = value     # never a decision overwritten by trials
            # A name no other process uses; open() gives it the umask's permissions (mkstemp's 0600 is for secrets).
            temporary = os.path.join(folder, f".conv-plan-{os.getpid()}-{uuid.uuid4().hex}.tmp")
            try:
                with open(temporary, "x") as file:
                    json.dump({"machine": self._machine, "entries": dict(sorted(entries.items()))}, file, indent=1)
                os.replace(temporary, self._path)      # readers see the old file or the new one, never half
            except BaseException:
                if os.path.exists(temporary):
                    os.unlink(temporary)
                raise
        except OSError as error:
            self._writable = False
            warnings.warn(f"cannot write the convolution plan cache in {folder} ({error}); each run measures "
                          f"its convolutions again (set MINITENSOR_CACHE_DIR to a writable folder)",
                          PlanWarning, stacklevel=4)

    def choose(self, entry, preferred):
        """(algorithm, trial) for the next call of ``entry``: ``trial`` is None, or the Trial whose ``record``
        the caller gives that call's time. Choosing again before ``record`` gives the same answer."""
        self.served.add(entry)
        if entry not in self.decided and entry not in self.trials:
            self._load()
        product, dtype = entry.split()[:2]
        if entry in self.decided:
            algorithm, trial = self.decided[entry], None
        elif cpu_runtime.local_ranks() > 1:
            algorithm, trial = preferred, None
        elif self.extra_seconds >= TRIAL_BUDGET_S:
            # This process has spent its budget: the key is decided on what it has, for this process only
            # (its trials so far go to the cache, and a later run goes on with them).
            self._spend_out()
            times = self.trials.pop(entry, {})
            algorithm = decide(times, preferred) if times.get(preferred) else preferred
            self.decided[entry], trial = algorithm, None
        elif entry not in self.trials:
            # A key's first call is untimed: in a run's first step every array it writes is fresh memory
            # that the system zeroes on first touch, which would count against the first candidate only.
            self.trials[entry] = self._cached_trials.pop(entry, {})
            algorithm, trial = preferred, None
        else:
            algorithm = _next_trial(self.trials[entry], candidates(entry, preferred))
            trial = Trial(self, entry, preferred, algorithm, cold=(product, algorithm, dtype) not in self._warmed)
        self._warmed.add((product, algorithm, dtype))
        return algorithm, trial

    def record(self, entry, preferred, algorithm, seconds):
        """One trial's time; decides ``entry`` once its trials are complete."""
        times = self.trials[entry]
        best = min((min(v) for v in times.values()), default=seconds)
        self.extra_seconds += max(0.0, seconds - best)        # beyond the fastest this key has shown so far
        times.setdefault(algorithm, []).append(float(seconds))
        if _next_trial(times, candidates(entry, preferred)) is None:
            self.decided[entry] = decide(times, preferred)
            self.tried_here += 1
            del self.trials[entry]
            self._save({entry: self.decided[entry]})

    def _spend_out(self):
        """Once, when the budget is spent: the trials so far go to the cache, for a later run to go on with."""
        if not self._spent_out:
            self._spent_out = True
            self._save({entry: {"trials": times} for entry, times in self.trials.items() if times})


class Trial:
    """One timed call of a key in its trials. ``cold``: this process has not run that code yet, so the caller
    runs the call once untimed first (loading compiled code is not the algorithm's speed; the kernels are
    deterministic, so the second call's result is the first's)."""

    def __init__(self, plan, entry, preferred, algorithm, cold):
        self.plan, self.entry, self.preferred, self.algorithm, self.cold = plan, entry, preferred, algorithm, cold

    def record(self, seconds):
        self.plan.record(self.entry, self.preferred, self.algorithm, seconds)


_plan = Plan()


def current():
    """This process's Plan."""
    return _plan


def reset():
    """Forget everything this process decided, tried and read (the cache file stays)."""
    global _plan
    _plan = Plan()


def settled():
    """True when no key this process served is still in its trials."""
    return not _plan.trials


def state():
    """{"decided": {key: algorithm}, "trials": {key: {algorithm: [seconds]}}, "extra_seconds": the budget spent}
    of every key this process served or was given: what a checkpoint keeps."""
    keep = _plan.served | _plan.restored
    return {"decided": {k: v for k, v in sorted(_plan.decided.items()) if k in keep},
            "trials": {k: {a: list(s) for a, s in v.items()} for k, v in sorted(_plan.trials.items())},
            "extra_seconds": _plan.extra_seconds}


def restore(saved):
    """Put back a ``state()`` (a resumed run's, from its checkpoint): its decisions win over the cache, and its
    keys in trial go on where they stood. Returns the keys left out because an algorithm named there cannot
    run that product (a file from another version or machine); those are planned afresh."""
    saved = saved or {}
    decided, trials = dict(saved.get("decided") or {}), dict(saved.get("trials") or {})
    refused = sorted([k for k, v in decided.items() if not valid(k, v)] +
                     [k for k, v in trials.items() if not all(valid(k, a) for a in v)])
    reset()
    _plan.decided.update({k: v for k, v in decided.items() if k not in refused})
    _plan.trials.update({k: {a: [float(s) for s in v[a]] for a in v} for k, v in trials.items() if k not in refused})
    _plan.restored = set(_plan.decided)
    _plan.extra_seconds = float(saved.get("extra_seconds") or 0.0)
    return refused


def summary():
    """{"tried": keys decided by trials here, "extra_seconds": what trials cost beyond the fastest candidates
    (this run's, and those of the run it resumes), "in_trial": keys still in trial, "cache": the file}."""
    return {"tried": _plan.tried_here, "extra_seconds": round(_plan.extra_seconds, 3), "in_trial": len(_plan.trials),
            "cache": _plan._path or cache_path()}
