"""The one-line ends of a run: MELO's error for a problem with the user's input or files, the form of a
failed allocation, and a SIGTERM while a script starts. Imports nothing of the project (nor torch): every
layer may raise its error, and a script installs the SIGTERM line before its slow imports."""
import re
import signal
import sys


class MeloError(Exception):
    """A problem with the user's input or files: reported as one line, without a traceback."""


def out_of_memory(error):
    """The one-line error of an allocation that failed (torch's CPU allocator, CUDA, numpy), or None when
    `error` is something else."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text):
        return None
    in_bytes = re.search(r"allocate (\d+) bytes", text)    # torch's CPU allocator
    in_units = re.search(r"allocate ([\d.]+ \w+)", text)   # numpy, CUDA: "4.00 TiB", "20.00 GiB"
    size = f"{int(in_bytes.group(1)) / 2 ** 30:.1f} GiB" if in_bytes else in_units.group(1) if in_units else None
    return MeloError(f"out of memory{f' (an allocation of {size} failed)' if size else ''}: use smaller sizes "
                     "(--batch_size, --num_samples, --num_query_set, --max_seq_len, the hidden sizes) or, for "
                     "main.py, --task_chunk; what was saved before is intact")


def say_when_terminated():
    """Called first thing by the scripts (before torch loads, which takes seconds): SIGTERM prints one line
    and exits with 143 (128 + SIGTERM), where it killed the process without a word while it started, read
    the data or tested. Training takes SIGTERM over (runtime.stop_signals_as_flag: it saves the step) and
    gives it back. The exit is an exception, so `finally` blocks still remove temporary files and locks."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up on the way out is not stopped
        sys.stderr.write("terminated (SIGTERM) outside the training loop (starting, loading data, testing): "
                         "nothing was saved, and nothing saved before was changed\n")
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
