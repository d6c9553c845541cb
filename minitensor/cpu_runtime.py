"""Process settings that decide minitensor's CPU speed: the two thread pools, and big arrays' memory.

They are applied by ``apply_before_numpy()``, the first thing ``import minitensor`` does, and must
come before NumPy is imported to take full effect (``train.py``, ``predict.py`` and ``unet`` import
minitensor first; a program that imported NumPy first gets one CPUSettingsWarning saying so), and
are skipped altogether with ``MINITENSOR_CPU_DEFAULTS=0``. ``status()`` says what is in effect; the
benchmark prints it. What each setting bought, measured, is in docs/benchmarks.md ("Process settings").

Thread pools. A training step alternates between numba's pool (the ``prange`` kernels:
Winograd and direct convolutions, pooling, upsampling) and OpenBLAS's (the layers that keep
im2col + GEMM, the 1x1 output layer, the bias gradients). Out of the box each pool's threads
keep spinning after their work is done, OpenBLAS's for about 2^28 cycles (a tenth of a second)
after every product, and on a machine with as many cores as threads the spinning threads of one
pool steal the cores from the other pool's busy ones. The two settings below let idle threads
sleep at once.

- ``OPENBLAS_THREAD_TIMEOUT=4``: OpenBLAS's threads wait 2^4 cycles before they sleep.
  OpenBLAS reads it when it is loaded, i.e. when NumPy is first imported, so it only helps
  when minitensor comes first, or when it is set in the environment beforehand.
- ``OMP_WAIT_POLICY=PASSIVE``: numba's OpenMP threads sleep when idle (libgomp reads it when
  numba starts its threads, at the first parallel kernel).

Both are defaults (``os.environ.setdefault``): a value set by the user wins.

Under ``mpiexec`` (data-parallel, minitensor/distributed.py), the ranks on one machine share its
cores: each rank's pools get ``cores // ranks on this machine`` threads (OMP_NUM_THREADS,
NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS), read from the launcher's environment
(MPICH's MPI_LOCALNRANKS, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE), since N ranks with a thread per
core each would run N times as many threads as cores. Also defaults.

Memory. glibc hands every allocation above 32 MiB (a 16 x 128 x 128 x 32 float32 map is
32 MiB) straight from the operating system and gives it back on ``free``, so each step's
activations and gradients arrive as fresh pages, which the operating system zeroes on first
touch, every step. ``mallopt`` (glibc, Linux) is told to serve them from the heap and keep freed
memory for the next step (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB): the pages are zeroed once,
and the peak memory stays that of one step.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import warnings

THREAD_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
THREAD_COUNTS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOCAL_RANKS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")   # MPICH's and Open MPI's
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4          # from glibc's malloc.h
_TRIM_THRESHOLD_BYTES = 2**31 - 1                # mallopt takes a C int

#: False when MINITENSOR_CPU_DEFAULTS=0 asked for none of this.
ENABLED = os.environ.get("MINITENSOR_CPU_DEFAULTS", "1").strip() != "0"
#: Whether NumPy (and so OpenBLAS) was already loaded when minitensor was imported.
NUMPY_WAS_LOADED_FIRST = "numpy" in sys.modules
#: The variables the environment already had then (a shell's export, set before NumPy loaded).
_SET_BY_USER = {name for name in THREAD_DEFAULTS if name in os.environ}


def usable_cores():
    """The cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_ranks(environ=os.environ):
    """How many MPI ranks the launcher started on this machine (1 without one)."""
    return next((int(environ[name]) for name in LOCAL_RANKS if environ.get(name, "").strip().isdigit()), 1)


def vector_isa(flags, machine=""):
    """The widest x86 vector extension in a set of /proc/cpuinfo flags (what a CPU's speed here depends on)."""
    if "avx512f" in flags:
        return "AVX-512" + (" (with BF16)" if "avx512_bf16" in flags else "")
    for name, label in (("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if name in flags:
            return label
    return machine or "unknown"


def cpu_identity():
    """{"cpu_model", "cpu_family_model", "vector_isa"} of this machine, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as file:
            cpuinfo = file.read()
    except OSError:
        cpuinfo = ""
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.M)
    flags = set((re.findall(r"^flags\s*:\s*(.+)$", cpuinfo, flags=re.M) or [""])[0].split())
    return {"cpu_model": models[0].strip() if models else (platform.processor() or platform.machine()),
            "cpu_family_model": "/".join(re.findall(r"^(?:cpu family|model)\s*:\s*(\d+)$", cpuinfo, flags=re.M)[:2]),
            "vector_isa": vector_isa(flags, platform.machine())}


def threads_per_rank(environ=os.environ):
    """Threads for each pool of one rank when an MPI launcher started several on this machine, else None."""
    ranks = local_ranks(environ)
    if ranks <= 1:
        return None
    return max(1, usable_cores() // ranks)


def _keep_freed_memory() -> bool:
    """Ask glibc to serve big blocks from the heap and keep freed memory; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt      # the C library this process already runs on
    except (OSError, AttributeError):            # not glibc (musl has no mallopt)
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1


_NO_LOCAL_BLAS_THREADS = object()
_local_blas_threads = None


def _openblas_function(names):
    """The first of ``names`` found in an OpenBLAS this process has loaded (NumPy's wheels bundle one), or None
    (another BLAS, another OS)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            if hasattr(library, name):
                return getattr(library, name)
    return None


def _find_local_blas_threads():
    """OpenBLAS's ``openblas_set_num_threads_local`` (0.3.27 on: the BLAS threads of the calling thread only)."""
    function = _openblas_function(["openblas_set_num_threads_local"])
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


def blas_core():
    """The kernels NumPy's OpenBLAS runs on this CPU ('SkylakeX', 'Haswell', ...; None for another BLAS).

    OpenBLAS picks them at load time from the CPU, unless OPENBLAS_CORETYPE names others: some machines set
    it to 'Haswell' for older OpenBLAS builds, which halves the float32 GEMM speed of an AVX-512 CPU (2048^3:
    239 against 452 GFLOP/s on a 2-core Zen 5). The measured plan keeps its timings apart per core, and the
    bench prints it."""
    import numpy  # noqa: F401  (loads OpenBLAS, after apply_before_numpy has set its variables)
    function = _openblas_function(["openblas_get_corename", "scipy_openblas_get_corename64_",
                                   "scipy_openblas_get_corename"])
    if function is None:
        return None
    function.argtypes, function.restype = [], ctypes.c_char_p
    return function().decode(errors="replace").strip()


def _local_blas_threads_function():
    global _local_blas_threads
    if _local_blas_threads is None:
        _local_blas_threads = _find_local_blas_threads() or _NO_LOCAL_BLAS_THREADS
    return None if _local_blas_threads is _NO_LOCAL_BLAS_THREADS else _local_blas_threads


def can_set_local_blas_threads() -> bool:
    """Whether ``set_local_blas_threads`` works here (OpenBLAS 0.3.27 or later, on Linux)."""
    return _local_blas_threads_function() is not None


def set_local_blas_threads(count):
    """Ask BLAS to run the products of the calling thread on ``count`` threads; returns the previous count, or
    None where the BLAS cannot do this (then nothing changed).

    OpenBLAS calls it thread-local, but in the 0.3.31 that NumPy's wheels bundle a call from one thread
    changed the count of every thread (measured: a 2048^3 product in the main thread fell from 138 to 79
    GFLOP/s after another thread set 1). So a caller treats it as process-wide: set it from one thread
    around a section whose products must each run on one thread (kernels/cpu_winograd4.py's chunks run
    side by side, one per worker), and put the previous count back from that thread afterwards."""
    function = _local_blas_threads_function()
    return None if function is None else function(int(count))


class CPUSettingsWarning(RuntimeWarning):
    """NumPy was loaded before minitensor, so a CPU setting could not apply (training runs slower)."""


KEEPS_FREED_MEMORY = False


def apply_before_numpy():
    """Apply the settings above (minitensor/__init__.py calls this first, before it imports NumPy).

    Where NumPy was loaded already (``import numpy`` before ``import minitensor``), OpenBLAS has
    read its environment: say so once, with the fix, rather than run slower without a word.
    """
    global KEEPS_FREED_MEMORY
    if not ENABLED:
        return
    for name, value in THREAD_DEFAULTS.items():
        if name == "OPENBLAS_THREAD_TIMEOUT" and NUMPY_WAS_LOADED_FIRST:
            continue                   # too late to matter; do not pretend it was applied
        os.environ.setdefault(name, value)
    threads = threads_per_rank()
    if threads is not None and not NUMPY_WAS_LOADED_FIRST:
        for name in THREAD_COUNTS:
            os.environ.setdefault(name, str(threads))
    KEEPS_FREED_MEMORY = _keep_freed_memory()
    if NUMPY_WAS_LOADED_FIRST and "OPENBLAS_THREAD_TIMEOUT" not in _SET_BY_USER:
        warnings.warn("NumPy was imported before minitensor, so OpenBLAS's idle threads will spin instead of "
                      "sleeping (a slower CPU training step; docs/benchmarks.md, 'Process settings'): import "
                      "minitensor first, or export OPENBLAS_THREAD_TIMEOUT=4 (MINITENSOR_CPU_DEFAULTS=0 "
                      "silences this)", CPUSettingsWarning, stacklevel=3)


def _numba_uses_openmp():
    """True or False once numba has started its threads (its first parallel kernel), else None."""
    try:
        import numba
        return numba.threading_layer() == "omp"
    except (ImportError, ValueError):          # ValueError: no parallel kernel has run yet
        return None


def status() -> dict:
    """This process's settings: each variable's value and whether it took effect, and the allocator's.

    OMP_WAIT_POLICY counts only where numba's threads are OpenMP's (libgomp); before the first
    parallel kernel that is not known yet, and it is reported as in effect if set."""
    report = {}
    for name in THREAD_DEFAULTS:
        value = os.environ.get(name)
        late = name == "OPENBLAS_THREAD_TIMEOUT" and NUMPY_WAS_LOADED_FIRST and name not in _SET_BY_USER
        if name == "OMP_WAIT_POLICY" and _numba_uses_openmp() is False:
            late = True                        # numba runs on TBB or its workqueue: nobody reads it
        report[name] = {"value": value, "in_effect": value is not None and not late}
    report["keep freed memory (mallopt)"] = {"value": "on" if KEEPS_FREED_MEMORY else "off",
                                            "in_effect": KEEPS_FREED_MEMORY}
    return report
