"""Process set-up shared by the scripts: threads and allocator, device, seeding, torch.distributed
(torchrun), and writing files all at once."""
import contextlib
import ctypes
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import torch
import torch.distributed as dist

from tqdm import tqdm

from common.errors import MeloError, out_of_memory


TEMPORARY_PREFIX = ".tmp-"


def write_atomic(path, write, binary=True):
    """Write `path` all at once or not at all: `write(file)` fills a temporary file in the same folder,
    which is flushed to disk, given mode 0644 (mkstemp's files are private to the owner) and renamed over
    `path`. On any error the temporary file is removed and `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # named after the target, so that a run can tell its own leftovers (a SIGKILL) from other runs' files
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f"{TEMPORARY_PREFIX}{os.path.basename(path)}-",
                                         suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(handle, "wb" if binary else "w") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM (job schedulers' preemption, `timeout`, Kubernetes), raised where Ctrl-C raises
    KeyboardInterrupt, so that the code that saves the latest state on Ctrl-C handles both."""


def interruption(error):
    """(what happened, exit status) of a KeyboardInterrupt or Terminated: the shell's 128 + signal."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated; a second one, while the first is being handled
    (saving), is ignored. Python can only install handlers in the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_stop_signal = [None]  # the stop signal that arrived and is not yet acted on (stop_signals_as_flag)


def check_stop():
    """Raise what a stop signal that arrived asks for (Terminated for SIGTERM, KeyboardInterrupt for
    SIGINT): training calls it between iterations and between validation batches, where raising leaves
    nothing half done. A no-op when none arrived, or outside stop_signals_as_flag."""
    signum, _stop_signal[0] = _stop_signal[0], None
    if signum == signal.SIGTERM:
        raise Terminated()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt()


@contextlib.contextmanager
def stop_signals_as_flag():
    """Within the block, SIGTERM and Ctrl-C (SIGINT) only record that they arrived; check_stop acts on it.
    Raising from the handler could land inside torch.func's vmap / grad (the inner loop), which leaves
    its tensors escaped and ends in a traceback with the step unsaved (issue 22). A second SIGTERM is
    ignored; a second Ctrl-C before the first was acted on raises at once (to stop a stuck run). Python
    can only install handlers in the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and _stop_signal[0] == signal.SIGINT:
            raise KeyboardInterrupt()
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_signal[0] = _stop_signal[0] or signum

    _stop_signal[0] = None
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
        _stop_signal[0] = None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """A child's preexec_fn (Linux): the kernel sends it SIGTERM when its parent dies, even by SIGKILL, so
    that a stopped compare.py leaves no orphan training on (the child saves and exits as on any SIGTERM).
    Elsewhere, or without prctl, nothing changes."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_child(command, log=None, keep_fds=()):
    """Run `command` to its end, its output to the open file `log` (or this process's own). Returns (exit
    status, the stop signal this process received meanwhile or None).

    The child runs in a session of its own, so that a Ctrl-C in the terminal reaches only this process,
    which forwards it (and SIGTERM) to the child exactly once, then waits while the child saves: main.py
    takes a second Ctrl-C as "stop at once, unsaved". The child dies with this process (_die_with_parent)
    and holds the descriptors `keep_fds` (a lock) for as long as it lives. Its output is unbuffered, so
    that its log is current when it is stopped. Signal handlers are only replaced in the main thread."""
    received, child, early = [], [], []

    def forward(signum, frame):
        received.append(signum)
        if not child:
            early.append(signum)  # sent once the child exists
            return
        with contextlib.suppress(ProcessLookupError):
            child[0].send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = ({signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
                if main_thread else {})
    try:
        child.append(subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None, pass_fds=tuple(keep_fds),
            env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        while early:  # arrived while it was being started
            child[0].send_signal(early.pop(0))
        status = child[0].wait()
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
    return status, (received[0] if received else None)


def stop_by(signum):
    """The exception that stops this process for a signal received while a child ran (run_child)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class _PlainProgress:
    """A progress bar for a log file: a plain line every `every` percent instead of carriage-return
    redraws (tqdm wrote ~300 kB of them into one 20-epoch log of compare.py)."""

    def __init__(self, iterable, total, initial, desc, every, file):
        self.iterable, self.total, self.done, self.desc = iterable, total, initial, desc
        self.every, self.file, self.postfix = every, file, ""
        self.shown = self.percent() // every

    def percent(self):
        return 100 * self.done // max(self.total, 1)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.done += 1
            if self.percent() // self.every > self.shown or self.done == self.total:
                self.shown = self.percent() // self.every
                print(f"{self.desc + ': ' if self.desc else ''}{self.done}/{self.total} ({self.percent()}%)"
                      f"{self.postfix}", file=self.file, flush=True)

    def set_postfix(self, **values):
        self.postfix = "".join(f" {key}={value}" for key, value in values.items())


def progress(iterable, total, initial=0, desc=None, disable=False, every=10):
    """tqdm's bar on a terminal; on a file or pipe (compare.py's logs), a plain line every `every` percent.
    Both take set_postfix(**values); tqdm.write prints between them either way."""
    if disable:
        return tqdm(iterable, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return _PlainProgress(iterable, total, initial, desc, every, sys.stderr)


def configure_cpu(args):
    """`--num_threads=N` caps torch's CPU threads (0 keeps PyTorch's default: one per core);
    `--keep_freed_memory` (default) keeps freed memory in the process (`keep_freed_memory`). Returns
    whether freed memory is kept."""
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    return bool(args.keep_freed_memory and keep_freed_memory())


# glibc's mallopt parameters (malloc.h), and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory():
    """Make glibc's malloc keep the memory that freed tensors return, for the next iteration's tensors.

    PyTorch allocates CPU tensors with malloc. By default glibc serves a large block (above a threshold
    that adapts up to 32 MiB) from a fresh mmap, and gives the top of its heap back to the OS once more
    than twice that is free. A meta-training iteration frees its whole graph at the end, so the next one
    maps it again and page-faults on every first touch (NARM: ~100,000 faults, ~0.15 s of system time
    per iteration here). Serving blocks up to 32 MiB from the heap and never trimming it keeps those
    pages: the process holds its peak memory between iterations (which every iteration reaches anyway)
    and one iteration takes ~13% (NARM) and ~8% (the transformers) less time on this CPU.
    Returns whether the setting took effect: only glibc has these knobs (elsewhere nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (man mallopt)
    from_heap = mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
    never_trimmed = mallopt(M_TRIM_THRESHOLD, -1)
    return bool(from_heap) and bool(never_trimmed)


def seed_everything(seed):
    """Seed torch's global RNG (dropout) and numpy's legacy global RNG; task sampling uses its own
    generators derived from the seed (ratings/tasks.py)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def select_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # MELO is tested on these two only
        raise MeloError(f"--device={name} is not a device MELO runs on: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeloError(f"--device={name} asks for CUDA, but torch sees no GPU; use --device=cpu")
    return device


class LostPeer(MeloError):
    """A collective operation failed: another process of the torchrun job stopped or crashed."""


class Distributed:
    """Rank, world size and the few collectives MELO needs; a single process when not under torchrun.
    A collective that fails because another process is gone (gloo: "Connection closed by peer") raises
    LostPeer, one line instead of gloo's traceback."""

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # one GPU per process: a bare "cuda" (or "auto") means this process's local rank's GPU
        if device_name in ("auto", "cuda") and torch.cuda.is_available():
            device_name = f"cuda:{self.local_rank % torch.cuda.device_count()}"
        self.device = select_device(device_name)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, count):
        """This rank's contiguous share of `count` items, as a slice (the union over ranks is all)."""
        bounds = np.linspace(0, count, self.world_size + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def main_first(self, function, *args):
        """`function(*args)` on rank 0, then on the other ranks: rank 0 downloads and caches the data, the
        others read its cache. When it fails on rank 0, the other ranks stop with rank 0's error instead
        of waiting for it (or dying with a "connection closed" traceback when it exits)."""
        if not self.enabled:
            return function(*args)
        failure = [None]
        if self.is_main:
            try:
                result = function(*args)
            except Exception as error:
                failure = [str(error) if isinstance(error, MeloError) else f"{type(error).__name__}: {error}"]
                with self.communicating():
                    dist.broadcast_object_list(failure, src=0)
                raise
        with self.communicating():
            dist.broadcast_object_list(failure, src=0)  # also the barrier that makes the others wait
        if failure[0] is not None:
            raise MeloError(f"rank 0 failed: {failure[0]}")
        if not self.is_main:
            result = function(*args)
        return result

    def sum_(self, tensor):
        """In-place sum over ranks (a no-op for one process); returns the tensor."""
        if self.enabled:
            with self.communicating():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self):
        if self.enabled:
            with self.communicating():
                dist.barrier()

    @contextlib.contextmanager
    def communicating(self):
        """Around collectives (and DistributedDataParallel's, inside its forward and backward): their
        RuntimeError is LostPeer. A failed allocation stays itself (run_cli says so)."""
        try:
            yield
        except RuntimeError as error:
            if not self.enabled or out_of_memory(error) is not None:
                raise
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = reason.split("] ", 1)[-1].split(". ")[0]  # gloo: "[.../pair.cc:553] Connection closed ..."
            raise LostPeer(f"lost another process of this torchrun job ({reason}): it stopped or crashed (its "
                           "own output says why), so this one stops too") from None

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        """Leave the process group. After a normal run every rank first waits for the others: a rank
        that tears gloo down while another still talks to it (rank 0 writing its last checkpoint or
        report) can kill that rank ("terminate called without an active exception"). After an error
        nobody waits, since the other ranks may never arrive."""
        if self.enabled and dist.is_initialized():
            try:
                if error_type is None:
                    self.barrier()
            finally:
                dist.destroy_process_group()
        return False
