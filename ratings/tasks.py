"""The cold-start split and task generation for MELO (the data: ratings/preprocess.py).

``MetaDataset.from_args(data, args)`` makes the cold-start user split and every task:

* split: a permutation of all users from ``rng(seed, 3)``; the first ``--num_test_data`` are test users,
  ``round(val_fraction * rest)`` of the rest (at least 1, and at most rest - 1) are validation users, the
  others train (in permutation order).
* a task for user u with n ratings uses a window of ``w = min(n, max_seq_len)`` consecutive ratings
  (training with ``--use_random_sequence_length``: w uniform in [min_sub_window_size + 1, min(n, L)]),
  starting uniformly in [0, n - w] for training and at n - w (the latest ratings) for validation / test
  (training too with ``--train_windows=latest`` or ``held-out``, so training targets are latest items).
  The query set is ``num_query_set`` windows that end on the window's last item, each of a random length
  in [min_sub_window_size, w]; the target of each is that last item. The support set is up to
  ``num_samples`` distinct contiguous sub-windows (length >= min_sub_window_size) drawn without
  replacement from the window without its last item, so the query target is never in the support set.
  A training task with ``--train_query_targets=m`` > 1 holds out the window's last m items instead
  (fewer where the window is short) and has max(num_query_set, m) query windows: window j ends on the
  (j mod m)-th of them from the end, the support windows come from the items before them. Validation and
  test tasks always have one target and num_query_set windows.
* a training meta-batch is ``--batch_size`` distinct training users, at most all of them; the task arrays
  hold at most as many support windows as the longest task window has (``--num_samples`` capped there).
* every window is left-padded to ``max_seq_len`` with item 0 and rating ``--default_rating``.

Randomness comes only from numpy Generators ``rng(seed, stream, *keys)`` with fixed streams
(train 0, validation 1, test 2, split 3, baseline windows 4); see :func:`task_rng`. A training meta-batch
is a pure function of (seed, iteration); validation and test tasks are fixed by the seed.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import MeloError
from ratings.preprocess import effective_min_sequence

STREAM_TRAIN, STREAM_VAL, STREAM_TEST, STREAM_SPLIT, STREAM_WINDOWS = 0, 1, 2, 3, 4
# The options that decide who the training, validation and test users are: weights trained under other
# values may have been trained on this split's test users.
SPLIT_OPTIONS = ("random_seed", "num_test_data", "val_fraction", "min_item", "min_sequence",
                 "min_sub_window_size")


@dataclass
class TaskBatch:
    """A batch of T tasks; S = num_samples, Q = num_query_set, L = max_seq_len.

    Windows are left-padded with item 0 and rating ``--default_rating``; the target of a window is its
    last position. Rows of a task beyond its real support windows are all padding with mask False.
    """
    support_items: torch.Tensor     # long  [T, S, L]
    support_ratings: torch.Tensor   # float [T, S, L] (stars)
    support_mask: torch.Tensor      # bool  [T, S]
    query_items: torch.Tensor       # long  [T, Q, L]
    query_ratings: torch.Tensor     # float [T, Q, L]
    query_mask: torch.Tensor        # bool  [T, Q]
    users: torch.Tensor             # long  [T], user index u into RatingData
    support_age: torch.Tensor       # long  [T, S, L], items from each support position to the task's
    #                                 latest support item (0: that item; 0 at padding): its recency

    def _map(self, function):
        return TaskBatch(*(function(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def to(self, device):
        return self._map(lambda t: t.to(device))

    def __len__(self):
        return int(self.users.shape[0])

    def select(self, index):
        """The tasks at `index` over the task dimension: a slice, an int (kept as a batch of one), or a
        sequence / tensor of positions or a boolean mask."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
            if index.dtype != torch.bool:
                index = index.long()
        return self._map(lambda t: t[index])


# ============================================================================ tasks
def task_rng(seed, stream, *keys):
    """The Generator of (seed, stream, *keys).

    It is ``np.random.default_rng([seed, stream, len(keys), *keys])``: the key count keeps keys of
    different lengths apart (numpy's SeedSequence zero-pads short entropy, so without it
    ``[seed, 0, it]`` and ``[seed, 0, it, 0]`` would give the same stream).
    """
    return np.random.default_rng([int(seed) % 2 ** 64, stream, len(keys), *map(int, keys)])


def window_count(m, min_size):
    """How many (a, b) there are with 0 <= a < b <= m and b - a >= min_size: m - d + 1 of each length d."""
    lengths = m - min_size + 1
    return lengths * (lengths + 1) // 2 if lengths > 0 else 0


def candidate_windows(index, m, min_size):
    """The (a, b) at positions `index` of all those window_count counts, in a-major order (numpy's
    triu_indices(m + 1, k=min_size)), as two int64 arrays. Without making all ~m²/2 of them: kept for every
    m below --max_seq_len, they grew as its cube (a numpy MemoryError at --max_seq_len=10**5)."""
    index = np.asarray(index, np.int64)
    rows = m - min_size + 1                       # a = 0 .. rows - 1; row a holds rows - a windows
    a = np.arange(rows, dtype=np.int64)
    first = a * rows - a * (a - 1) // 2           # position of row a's first window
    a = np.searchsorted(first, index, side="right") - 1
    return a, a + min_size + (index - first[a])


@dataclass(frozen=True)
class TaskConfig:
    """What the split and the tasks depend on, the flags of the same names (`from_args`); `min_item` and
    `min_sequence` only name the filters in an error."""
    random_seed: int = 222
    num_test_data: int = 1000
    val_fraction: float = 0.15
    val_size: int = 600
    batch_size: int = 16
    max_seq_len: int = 30
    num_samples: int = 25
    num_query_set: int = 3
    train_query_targets: int = 1
    train_windows: str = "random"
    min_sub_window_size: int = 2
    use_random_sequence_length: bool = False
    default_rating: float = 0.0
    min_item: int = 50
    min_sequence: int = 5

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


class MetaDataset:
    """The cold-start user split and all task generation (see the module docstring for the rules), from
    the data and a TaskConfig (`MetaDataset.from_args(data, args)`: from the flags)."""

    def __init__(self, data, config):
        self.data, self.config = data, config
        self.seed = config.random_seed
        self.L, self.S, self.Q = config.max_seq_len, config.num_samples, config.num_query_set
        self.min_window = config.min_sub_window_size
        self.lengths = data.sequence_lengths()
        num_users = data.num_users()
        if num_users and self.lengths.min() < self.min_window + 1:
            raise MeloError(f"some users have fewer than min_sub_window_size + 1 = {self.min_window + 1} "
                            "ratings: load the data with the same flags as the task generation")
        self._val, self._test = None, None
        # No task has more distinct support windows than its longest window holds: larger arrays would be
        # padding only (--num_samples=100000 asked for terabytes)
        longest = min(int(self.lengths.max()), self.L) if num_users else self.L
        self.S = min(self.S, window_count(longest - 1, self.min_window))

        permutation = task_rng(self.seed, STREAM_SPLIT).permutation(num_users).astype(np.int64)
        rest = num_users - config.num_test_data
        num_val = min(max(1, int(round(config.val_fraction * rest))), rest - 1) if rest > 1 else max(rest, 0)
        if rest - num_val < 1:
            works = (f"--num_test_data={num_users - 2} at most works here, e.g. "
                     f"--num_test_data={max(1, num_users // 10)}" if num_users >= 3 else "no --num_test_data works")
            raise MeloError(
                f"data set has {num_users} users after filtering (min_item={config.min_item}, "
                f"min_sequence={effective_min_sequence(config)}); --num_test_data={config.num_test_data} leaves "
                f"{'no' if rest <= 0 else 'too few'} training/validation users (needs at least 2 more): "
                f"lower --num_test_data ({works}) or the filters")
        self.test_users = permutation[:config.num_test_data]
        self.val_users = permutation[config.num_test_data:config.num_test_data + num_val]
        self.train_users = permutation[config.num_test_data + num_val:]
        # a meta-batch holds each training user at most once (--batch_size=100000 of 80 users ran out of memory)
        self.batch_size = min(config.batch_size, len(self.train_users))

    @classmethod
    def from_args(cls, data, args):
        return cls(data, TaskConfig.from_args(args))

    # ------------------------------------------------------------------ one task's random choices
    def _draw(self, rng, n, training):
        """(start, w, query lengths [Q], query offsets [Q], support a [k], support b [k]) of one task: query
        window j ends `offsets[j]` items before the window's last item. The order of the draws is part of
        the reproducibility contract."""
        longest = min(n, self.L)
        if training and self.config.use_random_sequence_length:
            w = int(rng.integers(self.min_window + 1, longest + 1))
        else:
            w = longest
        random_start = training and self.config.train_windows == "random"
        start = int(rng.integers(0, n - w + 1)) if random_start else n - w
        # a training task may hold out its last m items as query targets (--train_query_targets), keeping
        # at least one support window of the shortest length before them
        targets = min(self.config.train_query_targets, w - self.min_window) if training else 1
        if targets == 1:
            query_offsets = np.zeros(self.num_query(training), np.int64)
            query_lengths = rng.integers(self.min_window, w + 1, size=self.num_query(training))
        else:
            query_offsets = np.arange(self.num_query(training), dtype=np.int64) % targets
            query_lengths = rng.integers(self.min_window, w - query_offsets + 1)
        count = window_count(w - targets, self.min_window)
        chosen = rng.choice(count, size=min(self.S, count), replace=False)
        return (start, w, query_lengths, query_offsets) + candidate_windows(chosen, w - targets, self.min_window)

    def num_query(self, training):
        """Query windows per task: --num_query_set, and for training tasks at least one per held-out target
        (--train_query_targets)."""
        return max(self.Q, self.config.train_query_targets) if training else self.Q

    def _build(self, users, rngs, training):
        """numpy arrays of the tasks of `users`, task k drawn from rngs[k]."""
        T, S, Q = len(users), self.S, self.num_query(training)
        support_end = np.zeros((T, S), np.int64)      # exclusive end, as an index into data.items
        support_len = np.zeros((T, S), np.int64)      # 0 = no window
        latest = np.zeros((T, 1, 1), np.int64)        # index of the task's latest support item
        query_end = np.zeros((T, Q), np.int64)
        query_len = np.zeros((T, Q), np.int64)
        offsets, lengths = self.data.offsets, self.lengths
        for k, (u, rng) in enumerate(zip(users, rngs)):
            start, w, query_lengths, query_offsets, a, b = self._draw(rng, int(lengths[u]), training)
            base = int(offsets[u]) + start
            count = len(a)
            support_end[k, :count] = base + b
            support_len[k, :count] = b - a
            query_end[k] = base + w - query_offsets
            query_len[k] = query_lengths
            latest[k] = base + w - query_offsets.max() - 2  # the item before the earliest target
        support_index, real = self._positions(support_end, support_len)
        support = self._windows(support_end, support_len)
        query = self._windows(query_end, query_len)
        age = np.where(real, latest - support_index, 0)
        return (support + (support_len > 0,) + query + (query_len > 0,) + (np.asarray(users, np.int64),)
                + (age,))

    def _positions(self, end, length):
        """The index into data.items of every position of left-padded [.., L] windows ending (exclusively)
        at `end`, 0 at padding, and whether each position is real."""
        position = np.arange(self.L)
        index = end[..., None] - self.L + position
        real = position >= self.L - length[..., None]
        return np.where(real, index, 0), real

    def _windows(self, end, length):
        """Left-padded [.., L] item and rating windows ending (exclusively) at `end`."""
        index, real = self._positions(end, length)
        items = np.where(real, self.data.items[index], 0)
        ratings = np.where(real, self.data.ratings[index],
                           np.float32(self.config.default_rating)).astype(np.float32)
        return items, ratings

    @staticmethod
    def _batch(arrays):
        return TaskBatch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))

    # ------------------------------------------------------------------ public
    def train_users_of(self, iteration):
        """Positions into train_users of the `batch_size` tasks of `iteration` (distinct users)."""
        return task_rng(self.seed, STREAM_TRAIN, iteration).choice(len(self.train_users), self.batch_size,
                                                                   replace=False)

    def train_batch(self, iteration, task_slice=slice(None)):
        """The meta-batch of `iteration` (a pure function of seed and iteration), or the tasks of it at
        the positions `task_slice` (a slice or a sequence of positions): identical to slicing the full
        batch."""
        picks = self.train_users_of(iteration)
        if torch.is_tensor(task_slice):
            task_slice = task_slice.cpu().numpy()
        positions = np.arange(len(picks))[task_slice]
        users = self.train_users[picks[positions]]
        rngs = [task_rng(self.seed, STREAM_TRAIN, iteration, k) for k in positions]
        return self._batch(self._build(users, rngs, training=True))

    def val_tasks(self):
        """Fixed validation tasks: the first min(val_size, len(val_users)) validation users."""
        if self._val is None:
            users = self.val_users[:self.config.val_size]
            rngs = [task_rng(self.seed, STREAM_VAL, j) for j in range(len(users))]
            self._val = self._batch(self._build(users, rngs, training=False))
        return self._val

    def test_tasks(self):
        """Fixed test tasks: one per test user."""
        if self._test is None:
            rngs = [task_rng(self.seed, STREAM_TEST, j) for j in range(len(self.test_users))]
            self._test = self._batch(self._build(self.test_users, rngs, training=False))
        return self._test

    def window_dataset(self, epoch, chunk=4096):
        """Training windows of the non-meta baseline for `epoch`: for every training user (in
        train_users order), the real support windows then the query windows of one training-style task
        drawn from rng(seed, 4, epoch, u). Returns (items long [N, L], ratings float [N, L])."""
        items, ratings = [], []
        for begin in range(0, len(self.train_users), chunk):
            users = self.train_users[begin:begin + chunk]
            rngs = [task_rng(self.seed, STREAM_WINDOWS, epoch, u) for u in users]
            s_items, s_ratings, s_mask, q_items, q_ratings, q_mask, _, _ = self._build(users, rngs, True)
            mask = np.concatenate([s_mask, q_mask], axis=1)
            items.append(np.concatenate([s_items, q_items], axis=1)[mask])
            ratings.append(np.concatenate([s_ratings, q_ratings], axis=1)[mask])
        if not items:
            return torch.zeros(0, self.L, dtype=torch.long), torch.zeros(0, self.L)
        return torch.from_numpy(np.concatenate(items)), torch.from_numpy(np.concatenate(ratings))

    def summary(self):
        """Numbers about the filtered data (data_summary) and the split."""
        return {**data_summary(self.data, self.L), "train_users": len(self.train_users),
                "val_users": len(self.val_users), "test_users": len(self.test_users)}


def data_summary(data, max_seq_len):
    """Numbers about the filtered data, before any split.

    ``balance`` is the mean over users of the normalised entropy of the user's rating-value
    distribution: for user u with shares p_v of each rating value v, H_u = -sum_v p_v log p_v, divided
    by log K where K is the number of distinct rating values in the whole data set. 1 means every
    user rates evenly across all values, 0 that every user always gives one value (0 when K = 1).
    """
    lengths = data.sequence_lengths()
    values, codes = np.unique(data.ratings, return_inverse=True)
    counts = np.bincount(codes, minlength=len(values))
    user_of = np.repeat(np.arange(data.num_users()), lengths)
    per_user = np.bincount(user_of * len(values) + codes,
                           minlength=data.num_users() * len(values)).reshape(-1, len(values))
    shares = per_user / lengths[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1)
    balance = float(np.mean(entropy) / np.log(len(values))) if len(values) > 1 else 0.0
    total = len(data.ratings)
    return {
        "duplicates_dropped": data.duplicates_dropped,
        "users": data.num_users(),
        "items": data.num_items,
        "ratings": total,
        "avg_seq_len": float(lengths.mean()),
        "avg_seq_len_truncated": float(np.minimum(lengths, max_seq_len).mean()),
        "max_seq_len": max_seq_len,
        "max_rating": data.max_rating,
        "rating_counts": {float(v): int(c) for v, c in zip(values, counts)},
        "rating_shares": {float(v): float(c) / total for v, c in zip(values, counts)},
        "balance": balance,
    }
