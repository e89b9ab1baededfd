"""The argparse types of MELO's flags and their bounds: what every parser (options.py, the study scripts)
and every backbone's own flags (models/backbones.py) check values with. Imports nothing of the project."""
import argparse
import math

# Float flags become float32 tensors (learning rates in Adam, ratings): larger values overflow there.
FLOAT32_MAX = 3.4028234663852886e38
# The largest learning rate a flag accepts. Adam divides the rate by 1 - beta1 (0.1) at its first step, so
# rates near FLOAT32_MAX overflowed there; any rate near this bound already moves weights by ~1e4 per step
# (normalised ratings are at most 1), far past anything that trains.
LR_MAX = 1e4
# The largest value of the size flags (in --help). Far above anything that trains here (the defaults are 1
# to 32), so that a slip of the keyboard is one line at once: --gru4rec_n_layers=100000 built its layers for
# minutes without a word, and a hidden size or window length of 10**6 ended in the allocator's traceback.
# A meta-batch and its support windows are bounded by the data instead (ratings.tasks.MetaDataset).
WIDTH_MAX = 4096  # hidden and embedding sizes, window length, query windows per task
DEPTH_MAX = 64    # layers, blocks, attention heads, inner steps
# Seeds go to torch.manual_seed, which takes 64-bit integers (a larger one raised "Overflow").
SEED_MAX = 2 ** 63 - 1
# The largest weight decay (Adam adds decay x weight to the gradient: one near FLOAT32_MAX overflowed there,
# and a decay near this bound already pulls every weight to zero).
DECAY_MAX = 1e4


def str2bool(text):
    """Parse 'True'/'False' (as the original wrote them; also true/false/1/0/yes/no)."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def checked(kind, minimum, what, maximum=None):
    """An argparse type that converts with `kind` and rejects values below `minimum` (`None`: no bound)
    or above `maximum` (then `bounds` says both, for --help); floats must be finite within float32's range
    (nan, inf or 1e300 would fail deep inside training)."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise argparse.ArgumentTypeError(f"must be a finite number of at most {FLOAT32_MAX:.3g}, got {text}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    convert.bounds = (minimum, maximum) if maximum is not None else None
    return convert


def size(maximum, minimum=1):
    """An argparse type for a size flag: an integer from `minimum` to `maximum`."""
    return checked(int, minimum, f"from {minimum} to {maximum}", maximum)


non_negative_int = checked(int, 0, ">= 0")
positive_int = checked(int, 1, ">= 1")
non_negative_float = checked(float, 0.0, ">= 0")
learning_rate = checked(float, 0.0, f"a learning rate from 0 to {LR_MAX:g}", LR_MAX)
weight_decay = checked(float, 0.0, f"from 0 to {DECAY_MAX:g}", DECAY_MAX)
width, depth = size(WIDTH_MAX), size(DEPTH_MAX)
seed = checked(int, 0, f"a seed from 0 to {SEED_MAX} (2**63 - 1)", SEED_MAX)


def comma_list(convert):
    """An argparse type for a comma-separated list of values, each converted (and checked) by `convert`;
    the empty string is the empty list."""

    def parse(text):
        return [convert(part.strip()) for part in str(text).split(",") if part.strip()]

    return parse
