"""dataloader.py on generated files in every supported format (no network: downloads come from a local
HTTP server)."""
import dataclasses
import functools
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_args, same_size_edit
from options import MeloError
from ratings import preprocess, tasks, synthetic as sy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITERS = {
    "ml-1m": ("ml-1m", lambda p, **k: sy.write_movielens(p, "ml-1m", **k)),
    "ml-10m": ("ml-10m", lambda p, **k: sy.write_movielens(p, "ml-10m", **k)),
    "ml-100k": ("ml-100k", lambda p, **k: sy.write_movielens(p, "ml-100k", **k)),
    "amazon-header": ("amazon", lambda p, **k: sy.write_amazon_csv(p, header=True, **k)),
    "amazon-header-unix": ("amazon", lambda p, **k: sy.write_amazon_csv(p, header=True, date_format="unix", **k)),
    "amazon-dump": ("amazon", lambda p, **k: sy.write_amazon_csv(p, header=False, **k)),
    "yelp-csv": ("yelp", lambda p, **k: sy.write_yelp(p, "csv", **k)),
    "yelp-json": ("yelp", lambda p, **k: sy.write_yelp(p, "json", **k)),
}


def write(tmp_path, kind, name=None, **kwargs):
    mode, writer = WRITERS[kind]
    path = str(tmp_path / (name or f"{kind}.txt"))
    return mode, path, writer(path, **kwargs)


def expected_after_filters(frame, min_item, min_sequence):
    """An independent pandas version of the filters: items first, then users, one pass."""
    item_counts = frame.groupby("item")["item"].transform("size")
    kept = frame[item_counts >= min_item]
    user_counts = kept.groupby("user")["user"].transform("size")
    return kept[user_counts >= min_sequence]


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    """A loaded ML-1M-format data set and its MetaDataset (shared by the read-only task tests)."""
    tmp = tmp_path_factory.mktemp("ml1m")
    mode, path, frame = write(tmp, "ml-1m")
    args = make_args(mode, path, tmp, default_rating=0.25)
    data = preprocess.load_data(args)
    return frame, args, data, tasks.MetaDataset.from_args(data, args)


# ============================================================================ reading and preprocessing
@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_filters_reindexes_and_sorts_like_pandas(tmp_path, kind):
    mode, path, frame = write(tmp_path, kind)
    args = make_args(mode, path, tmp_path, min_item=10, min_sequence=5)
    data = preprocess.load_data(args)
    expected = expected_after_filters(frame, 10, preprocess.effective_min_sequence(args))
    # the filters must really remove items and users, or this test proves little
    assert expected["item"].nunique() < frame["item"].nunique()
    assert expected["user"].nunique() < frame["user"].nunique()

    assert data.num_users() == expected["user"].nunique()
    assert data.num_items == expected["item"].nunique()
    assert len(data.items) == len(expected) == data.offsets[-1]
    assert data.offsets[0] == 0 and np.all(np.diff(data.offsets) >= preprocess.effective_min_sequence(args))
    assert data.max_rating == 5.0
    assert data.items.dtype == np.int64 and data.ratings.dtype == np.float32
    assert data.timestamps.dtype == np.int64 and data.offsets.dtype == np.int64

    # re-indexing: items 1..N, every one used, 0 never; ids in sorted order of the original ids
    assert data.items.min() == 1 and data.items.max() == data.num_items
    assert len(np.unique(data.items)) == data.num_items
    assert list(data.item_ids) == sorted(expected["item"].unique())
    assert list(data.user_ids) == sorted(expected["user"].unique())

    # each user's ratings, in stable time order (file order breaks ties)
    for u in range(data.num_users()):
        rows = expected[expected["user"] == data.user_ids[u]].sort_values("timestamp", kind="stable")
        items, ratings = data.sequence(u)
        start, end = data.offsets[u], data.offsets[u + 1]
        assert list(data.item_ids[items - 1]) == list(rows["item"])
        np.testing.assert_array_equal(ratings, rows["rating"].to_numpy(np.float32))
        np.testing.assert_array_equal(data.timestamps[start:end], rows["timestamp"].to_numpy())


def test_ties_are_kept_in_file_order(tmp_path):
    """The generated files have timestamp ties in a shuffled file order; ties must keep file order."""
    mode, path, frame = write(tmp_path, "ml-100k", tie_fraction=0.4)
    data = preprocess.load_data(make_args(mode, path, tmp_path))
    checked = 0
    for u in range(data.num_users()):
        start, end = data.offsets[u], data.offsets[u + 1]
        stamps = data.timestamps[start:end]
        assert np.all(np.diff(stamps) >= 0)
        rows = frame[frame["user"] == data.user_ids[u]]
        for stamp in np.unique(stamps[np.r_[np.diff(stamps) == 0, False]]):
            in_file = rows[rows["timestamp"] == stamp]["item"].tolist()
            loaded = data.item_ids[data.items[start:end][stamps == stamp] - 1].tolist()
            expected = [i for i in in_file if i in set(loaded)]
            assert loaded == expected
            checked += len(in_file) > 1 and in_file != sorted(in_file)
    assert checked > 10


def test_reindexing_is_deterministic(tmp_path):
    mode, path, _ = write(tmp_path, "amazon-header")
    first = preprocess.load_data(make_args(mode, path, tmp_path / "a"))
    second = preprocess.load_data(make_args(mode, path, tmp_path / "b"))     # separate caches
    for name in ("offsets", "items", "ratings", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.user_ids.dtype.kind == "U" and first.item_ids[0].startswith(("0", "B0"))
    assert all(len(i) == 10 for i in first.item_ids)       # leading zeros of ASINs survive


def test_half_star_ratings_survive(tmp_path):
    mode, path, frame = write(tmp_path, "ml-10m")
    data = preprocess.load_data(make_args(mode, path, tmp_path, min_item=0, min_sequence=1))
    frame = expected_after_filters(frame, 0, 3)          # min_sub_window_size + 1
    assert len(data.ratings) == len(frame)
    halves = np.sum(data.ratings % 1 == 0.5)
    assert halves == np.sum(frame["rating"] % 1 == 0.5) > 1000
    assert sorted(np.unique(data.ratings)) == sorted(frame["rating"].unique())


def test_dates_become_unix_seconds(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("reviewerID,product_id,rating,date\n"
                    "u1,0001,5.0,2014-01-02\nu1,0002,4.0,1388707200\nu1,0003,3.0,\"01 04, 2014\"\n")
    args = make_args("amazon", str(path), tmp_path, min_item=0, min_sequence=1, min_sub_window_size=2)
    data = preprocess.load_data(args)
    assert list(data.timestamps) == [1388620800, 1388707200, 1388793600]


def test_csv_header_columns_may_come_in_any_order(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("date,overall,asin,reviewerID\n"
                    "2014-01-02,5.0,0001,u1\n2014-01-03,4.0,0002,u1\n2014-01-04,3.0,0003,u1\n")
    args = make_args("amazon", str(path), tmp_path, min_item=0, min_sequence=1)
    data = preprocess.load_data(args)
    assert list(data.user_ids) == ["u1"] and list(data.item_ids) == ["0001", "0002", "0003"]
    assert list(data.ratings) == [5.0, 4.0, 3.0]
    path.write_text("date,overall,asin,reviewerID\n2014-01-02,5.0,0001,u1\n2014-01-03,x,0002,u1\n")
    with pytest.raises(MeloError, match="line 3: rating 'x' is not a number"):
        preprocess.load_data(make_args("amazon", str(path), tmp_path / "b", min_item=0, min_sequence=1))


# ============================================================================ cache
def test_cache_is_used_then_invalidated(tmp_path, monkeypatch):
    mode, path, _ = write(tmp_path, "ml-1m")
    args = make_args(mode, path, tmp_path)
    first = preprocess.load_data(args)
    cache_files = os.listdir(tmp_path / "Data" / "cache")
    assert len(cache_files) == 1 and cache_files[0].endswith(".npz")

    def no_reading(*_):
        raise AssertionError("read the raw file although the cache was valid")

    with monkeypatch.context() as patch:
        patch.setattr(preprocess, "read_ratings", no_reading)
        second = preprocess.load_data(args)
        np.testing.assert_array_equal(first.items, second.items)
        np.testing.assert_array_equal(first.user_ids, second.user_ids)
        assert second.num_items == first.num_items and second.max_rating == 5.0
        with pytest.raises(AssertionError, match="cache was valid"):
            preprocess.load_data(make_args(mode, path, tmp_path, min_item=12))
        with pytest.raises(AssertionError, match="cache was valid"):
            preprocess.load_data(make_args(mode, path, tmp_path, min_sequence=8))

    changed = preprocess.load_data(make_args(mode, path, tmp_path, min_item=12))
    assert changed.num_items < first.num_items
    assert len(os.listdir(tmp_path / "Data" / "cache")) == 2

    # a changed data file or a corrupt cache file is never trusted
    sy.write_movielens(path, "ml-1m", seed=5)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not np.array_equal(preprocess.load_data(args).items, first.items)
    for name in os.listdir(tmp_path / "Data" / "cache"):
        (tmp_path / "Data" / "cache" / name).write_bytes(b"PK\x03\x04 not really")
    fresh = preprocess.load_data(make_args(mode, path, tmp_path / "x"))
    np.testing.assert_array_equal(preprocess.load_data(args).items, fresh.items)
    assert not [n for n in os.listdir(tmp_path / "Data" / "cache") if n.startswith(".tmp")]


# ============================================================================ split
def test_split_is_disjoint_deterministic_and_seeded(ml1m):
    _, args, data, meta = ml1m
    train, val, test = meta.train_users, meta.val_users, meta.test_users
    assert train.dtype == val.dtype == test.dtype == np.int64
    everyone = np.concatenate([train, val, test])
    assert len(everyone) == len(np.unique(everyone)) == data.num_users()
    assert len(test) == args.num_test_data
    assert len(val) == round(args.val_fraction * (data.num_users() - args.num_test_data))
    again = tasks.MetaDataset.from_args(data, args)
    for a, b in ((train, again.train_users), (val, again.val_users), (test, again.test_users)):
        np.testing.assert_array_equal(a, b)
    args.random_seed += 1
    try:
        other = tasks.MetaDataset.from_args(data, args)
    finally:
        args.random_seed -= 1
    assert set(other.test_users) != set(test)


def test_too_few_users_is_a_clear_error(ml1m):
    _, args, data, _ = ml1m
    args_small = make_args("ml-1m", "unused", "/tmp", num_test_data=data.num_users() - 1)
    with pytest.raises(MeloError, match=r"data set has \d+ users after filtering \(min_item=10, "
                                        r"min_sequence=5\); --num_test_data=\d+ leaves .*lower --num_test_data"):
        tasks.MetaDataset.from_args(data, args_small)
    enough = make_args("ml-1m", "unused", "/tmp", num_test_data=data.num_users() - 2)
    meta = tasks.MetaDataset.from_args(data, enough)
    assert len(meta.train_users) == 1 and len(meta.val_users) == 1
    mostly_val = make_args("ml-1m", "unused", "/tmp", num_test_data=data.num_users() - 3, val_fraction=0.9)
    meta = tasks.MetaDataset.from_args(data, mostly_val)
    assert len(meta.train_users) == 1 and len(meta.val_users) == 2


# ============================================================================ tasks
def check_layout(batch, args, L=None):
    """Shapes, dtypes, left padding with item 0 / default_rating, and masks."""
    L = L or args.max_seq_len
    T = len(batch)
    assert batch.support_items.shape == batch.support_ratings.shape == (T, args.num_samples, L)
    assert batch.query_items.shape == batch.query_ratings.shape == (T, args.num_query_set, L)
    assert batch.support_mask.shape == (T, args.num_samples) and batch.query_mask.shape == (T, args.num_query_set)
    assert batch.support_items.dtype == batch.query_items.dtype == batch.users.dtype == torch.long
    assert batch.support_ratings.dtype == batch.query_ratings.dtype == torch.float32
    assert batch.support_mask.dtype == batch.query_mask.dtype == torch.bool
    assert bool(batch.query_mask.all())
    for items, ratings, mask in ((batch.support_items, batch.support_ratings, batch.support_mask),
                                 (batch.query_items, batch.query_ratings, batch.query_mask)):
        real = items > 0
        # left padding: once a row has started, it stays real to the end
        assert bool((real[..., 1:] >= real[..., :-1]).all())
        assert bool((ratings[~real] == args.default_rating).all())
        assert bool((ratings[real] > 0).all())
        assert bool((real.sum(-1)[mask] >= args.min_sub_window_size).all())
        assert bool((real.sum(-1)[~mask] == 0).all())


def check_positions(batch, data, args, evaluation):
    """Every query window ends on the window's last item (the target) and every support window is a
    distinct contiguous sub-range of the window without that item. The generated users rate distinct
    items, so an item identifies its position in the user's history."""
    L, msw = args.max_seq_len, args.min_sub_window_size
    counts = {}
    for k in range(len(batch)):
        u = int(batch.users[k])
        items, ratings = data.sequence(u)
        assert len(np.unique(items)) == len(items)
        where = {item: p for p, item in enumerate(items)}
        n, longest = len(items), min(len(items), L)
        query = batch.query_items[k].numpy()
        ends = {where[row[-1]] for row in query}
        assert len(ends) == 1
        end = ends.pop()                                    # position of the target
        if evaluation:
            assert end == n - 1                             # validation/test: the latest items
        for row, stars in zip(query, batch.query_ratings[k].numpy()):
            length = int((row > 0).sum())
            assert msw <= length <= longest
            np.testing.assert_array_equal(row[L - length:], items[end - length + 1:end + 1])
            np.testing.assert_array_equal(stars[L - length:], ratings[end - length + 1:end + 1])
        seen = set()
        for row, stars, real in zip(batch.support_items[k].numpy(), batch.support_ratings[k].numpy(),
                                    batch.support_mask[k].numpy()):
            if not real:
                continue
            length = int((row > 0).sum())
            first = where[row[L - length]]
            assert end - longest + 1 <= first and first + length <= end       # never the target
            np.testing.assert_array_equal(row[L - length:], items[first:first + length])
            np.testing.assert_array_equal(stars[L - length:], ratings[first:first + length])
            seen.add((first, length))
        assert len(seen) == int(batch.support_mask[k].sum())                  # distinct windows
        m = longest - 1
        available = (m - msw + 1) * (m - msw + 2) // 2
        if evaluation or not args.use_random_sequence_length:
            assert len(seen) == min(args.num_samples, available)
        counts[len(seen)] = counts.get(len(seen), 0) + 1
    return counts


def test_eval_tasks_layout_and_positions(ml1m):
    _, args, data, meta = ml1m
    val, test = meta.val_tasks(), meta.test_tasks()
    assert len(val) == min(args.val_size, len(meta.val_users)) and len(test) == len(meta.test_users)
    np.testing.assert_array_equal(val.users.numpy(), meta.val_users[:args.val_size])
    np.testing.assert_array_equal(test.users.numpy(), meta.test_users)
    check_layout(val, args)
    check_layout(test, args)
    check_positions(val, data, args, evaluation=True)
    check_positions(test, data, args, evaluation=True)
    assert meta.val_tasks() is val                        # built once


def test_short_users_get_fewer_windows_with_padding_masks(tmp_path):
    """With min_sequence=3 and min_sub_window_size=2 a 3-rating user has exactly one support window."""
    mode, path, _ = write(tmp_path, "ml-1m", short_user_fraction=0.3)
    args = make_args(mode, path, tmp_path, min_sequence=3, min_item=0, default_rating=-1, num_test_data=100)
    data = preprocess.load_data(args)
    assert data.sequence_lengths().min() == 3
    test = tasks.MetaDataset.from_args(data, args).test_tasks()
    check_layout(test, args)
    counts = check_positions(test, data, args, evaluation=True)
    assert counts.get(1, 0) > 0 and counts.get(args.num_samples, 0) > 0
    assert not bool(test.support_mask.all())


def test_train_batch_is_reproducible_and_sliceable(ml1m):
    _, args, data, meta = ml1m
    full = meta.train_batch(7)
    assert len(full) == args.batch_size
    check_layout(full, args)
    check_positions(full, data, args, evaluation=False)
    assert set(full.users.tolist()) <= set(meta.train_users.tolist())
    assert_same(full, meta.train_batch(7))
    assert_same(meta.train_batch(7, slice(1, 3)), full.select(slice(1, 3)))
    assert_same(meta.train_batch(7, [3, 0]), full.select(torch.tensor([3, 0])))
    assert_same(meta.train_batch(7, np.array([2])), full.select(2))
    assert not same(full, meta.train_batch(8))
    # training windows start anywhere: over many iterations some targets are not the latest item
    ends = []
    for iteration in range(20):
        batch = meta.train_batch(iteration)
        for k in range(len(batch)):
            items, _ = data.sequence(int(batch.users[k]))
            ends.append(int(np.flatnonzero(items == int(batch.query_items[k, 0, -1]))[0]) == len(items) - 1)
    assert 0 < sum(ends) < len(ends)


def test_random_sequence_length_and_large_batches(tmp_path):
    mode, path, _ = write(tmp_path, "ml-100k", num_users=60)
    args = make_args(mode, path, tmp_path, use_random_sequence_length=True, num_test_data=20,
                        batch_size=64)
    data = preprocess.load_data(args)
    meta = tasks.MetaDataset.from_args(data, args)
    assert len(meta.train_users) < args.batch_size           # capped: each training user once (issue 35)
    batch = meta.train_batch(0)
    assert len(batch) == meta.batch_size == len(meta.train_users)
    assert sorted(batch.users.tolist()) == sorted(meta.train_users.tolist())
    check_layout(batch, args)
    check_positions(batch, data, args, evaluation=False)
    longest = [int((batch.query_items[k] > 0).sum(-1).max()) for k in range(len(batch))]
    assert min(longest) < args.max_seq_len and max(longest) <= args.max_seq_len


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ("support_items", "support_ratings", "support_mask", "query_items", "query_ratings",
                "query_mask", "users"))


def assert_same(a, b):
    assert len(a) == len(b) and same(a, b)


def test_eval_tasks_are_identical_across_instances_and_processes(ml1m, tmp_path):
    frame, args, data, meta = ml1m
    other_cache = make_args("ml-1m", args.data_path, tmp_path, default_rating=0.25)
    fresh = tasks.MetaDataset.from_args(preprocess.load_data(other_cache), args)
    assert_same(meta.val_tasks(), fresh.val_tasks())
    assert_same(meta.test_tasks(), fresh.test_tasks())
    script = ("import sys, hashlib\nfrom ratings import preprocess, tasks\nfrom helpers import make_args\n"
              f"args = make_args('ml-1m', {args.data_path!r}, {str(tmp_path / 'p')!r}, default_rating=0.25)\n"
              "m = tasks.MetaDataset.from_args(preprocess.load_data(args), args)\n"
              "h = hashlib.sha256()\n"
              "for b in (m.val_tasks(), m.test_tasks(), m.train_batch(3)):\n"
              "    for t in vars(b).values(): h.update(t.numpy().tobytes())\n"
              "print(h.hexdigest())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256()
    for batch in (meta.val_tasks(), meta.test_tasks(), meta.train_batch(3)):
        for tensor in vars(batch).values():
            digest.update(tensor.numpy().tobytes())
    assert out.stdout.strip() == digest.hexdigest()


def test_task_batch_helpers(ml1m):
    _, _, _, meta = ml1m
    batch = meta.train_batch(0)
    moved = batch.to("cpu")
    assert_same(moved, batch)
    assert len(batch.select(slice(0, 0))) == 0
    assert len(batch.select(torch.tensor([True, False, True, False]))) == 2
    assert_same(batch.select(-1), batch.select(slice(3, 4)))


def test_window_dataset(ml1m):
    _, args, _, meta = ml1m
    items, ratings = meta.window_dataset(0)
    assert items.dtype == torch.long and ratings.dtype == torch.float32
    assert items.shape == ratings.shape and items.shape[1] == args.max_seq_len
    expected = 0
    for u in meta.train_users:
        task = meta._build([u], [tasks.task_rng(args.random_seed, tasks.STREAM_WINDOWS, 0, u)], True)
        expected += int(task[2].sum()) + int(task[5].sum())
    assert items.shape[0] == expected
    assert bool((items[:, -1] > 0).all())                        # real windows only
    assert bool(((items > 0).sum(1) >= args.min_sub_window_size).all())
    again, _ = meta.window_dataset(0)
    assert torch.equal(items, again)
    other, _ = meta.window_dataset(1)
    assert not (other.shape == items.shape and torch.equal(other, items))


def test_task_rngs_are_distinct():
    draws = {tuple(tasks.task_rng(222, *key).integers(0, 2**31, 4))
             for key in [(0, 5), (0, 5, 0), (1, 5), (0, 5, 1), (3,), (3, 0)]}
    assert len(draws) == 6


# ============================================================================ summary
def test_summary_numbers(ml1m):
    frame, args, data, meta = ml1m
    summary = meta.summary()
    kept = expected_after_filters(frame, args.min_item, 5)
    assert summary["users"] == kept["user"].nunique() and summary["ratings"] == len(kept)
    assert summary["rating_counts"] == {float(k): int(v) for k, v in kept["rating"].value_counts().items()}
    assert abs(sum(summary["rating_shares"].values()) - 1) < 1e-9
    lengths = kept.groupby("user").size()
    assert summary["avg_seq_len"] == pytest.approx(lengths.mean())
    assert summary["avg_seq_len_truncated"] == pytest.approx(lengths.clip(upper=args.max_seq_len).mean())
    values = kept["rating"].nunique()
    entropy = kept.groupby("user")["rating"].apply(
        lambda r: -(r.value_counts(normalize=True) * np.log(r.value_counts(normalize=True))).sum())
    assert summary["balance"] == pytest.approx(entropy.mean() / np.log(values))
    assert 0.2 < summary["balance"] < 0.9
    assert (summary["train_users"], summary["val_users"], summary["test_users"]) == \
        (len(meta.train_users), len(meta.val_users), len(meta.test_users))


def test_balance_extremes(tmp_path):
    rows = []
    for u in range(1, 41):
        for k in range(10):
            rating = 4 if u <= 20 else 1 + k % 5
            rows.append(f"{u}::{k + 1}::{rating}::{1000 + k}")
    path = tmp_path / "r.dat"
    path.write_text("\n".join(rows) + "\n")
    args = make_args("ml-1m", str(path), tmp_path, num_test_data=5, min_item=0)
    summary = tasks.MetaDataset.from_args(preprocess.load_data(args), args).summary()
    # half the users give one value (0), half spread evenly over all 5 values (1)
    assert summary["balance"] == pytest.approx(0.5)


# ============================================================================ download
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server for tmp_path/www; downloads start in an empty working directory."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    assert os.listdir(cwd) == []            # nothing left in the working directory


@pytest.mark.parametrize("mode", ["ml-1m", "ml-10m", "ml-100k"])
def test_download(server, tmp_path, monkeypatch, mode):
    root, url = server
    frame = sy.make_movielens_zip(str(root / f"{mode}.zip"), mode, num_users=80, seed=3)
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, mode, f"{url}/{mode}.zip")
    args = make_args(mode, None, tmp_path, num_test_data=10)
    assert not args.data_path_given and not os.path.exists(args.data_path)
    data = preprocess.load_data(args)
    assert os.path.isfile(args.data_path)
    assert sorted(os.listdir(os.path.dirname(args.data_path))) == [os.path.basename(args.data_path)]
    assert sorted(data.user_ids) == sorted(expected_after_filters(frame, 10, 5)["user"].unique())
    # a second run neither downloads nor reads the file again
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, mode, f"{url}/gone.zip")
    np.testing.assert_array_equal(preprocess.load_data(args).items, data.items)


def test_truncated_download_leaves_nothing(server, tmp_path, monkeypatch):
    root, url = server
    sy.make_movielens_zip(str(tmp_path / "full.zip"), "ml-1m", num_users=80)
    content = (tmp_path / "full.zip").read_bytes()
    (root / "ml-1m.zip").write_bytes(content[:len(content) // 2])
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, "ml-1m", f"{url}/ml-1m.zip")
    args = make_args("ml-1m", None, tmp_path)
    with pytest.raises(MeloError, match=r"ml-1m\.zip is not a valid zip.*put ratings\.dat from it at") as error:
        preprocess.load_data(args)
    assert "\n" not in str(error.value) and url in str(error.value)
    assert not os.path.exists(os.path.dirname(args.data_path))  # nor the folders made for it


def test_download_failures_name_the_url(server, tmp_path, monkeypatch):
    root, url = server
    args = make_args("ml-100k", None, tmp_path)
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, "ml-100k", f"{url}/missing.zip")
    with pytest.raises(MeloError, match=rf"could not download {url}/missing\.zip \(.*404.*\); download .* by "
                                        rf"hand and put u\.data from it at .*u\.data"):
        preprocess.load_data(args)
    # a zip without the ratings file
    sy.make_movielens_zip(str(root / "ml-1m.zip"), "ml-1m", num_users=50)
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, "ml-100k", f"{url}/ml-1m.zip")
    with pytest.raises(MeloError, match=r"has no u\.data"):
        preprocess.load_data(args)
    assert not os.path.exists(os.path.dirname(args.data_path))


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(preprocess.DOWNLOAD_URLS, "ml-1m", "http://127.0.0.1:9/ml-1m.zip")   # discard port: refused
    args = make_args("ml-1m", None, tmp_path)
    with pytest.raises(MeloError, match=r"could not download http://127\.0\.0\.1:9/ml-1m\.zip"):
        preprocess.load_data(args)
    assert not os.path.exists(os.path.dirname(args.data_path))


# ============================================================================ bad input
def load(tmp_path, mode, text, **flags):
    path = tmp_path / "data.txt"
    path.write_text(text)
    return preprocess.load_data(make_args(mode, str(path), tmp_path, **flags))


def ml_lines(count=8, sep="::"):
    return [sep.join(["1", str(i + 1), "4", str(1000 + i)]) for i in range(count)]


@pytest.mark.parametrize("mode, text, message", [
    ("ml-1m", "\n".join(ml_lines()[:2] + ["1::3::4"] + ml_lines()[3:]) + "\n",
     "line 3: expected 4 '::'-separated fields user::item::rating::timestamp, got 3"),
    ("ml-1m", "\n".join(ml_lines()[:4] + ["1::3::4::5::6"] + ml_lines()[5:]) + "\n",
     "line 5: expected 4 '::'-separated fields user::item::rating::timestamp, got 5"),
    ("ml-1m", "\n".join(ml_lines()[:3] + ["", "1::3::four::1003"] + ml_lines()[5:]) + "\n",
     "line 5: rating 'four' is not a number"),
    ("ml-100k", "\n".join(ml_lines(sep="\t")[:3] + ["1\t3\tfour\t1003"] + ml_lines(sep="\t")[4:]) + "\n",
     "line 4: rating 'four' is not a number"),
    ("ml-100k", "\n".join(ml_lines(sep="\t")[:6] + ["1\tx7\t4\t1003"]) + "\n",
     "line 7: item id 'x7' is not an integer"),
    ("ml-1m", "\n".join(ml_lines()[:6] + ["1::9::7::1003"]) + "\n", "line 7: rating 7 is outside (0, 5]"),
    ("ml-1m", "\n".join(ml_lines()[:6] + ["1::9::4::soon"]) + "\n",
     "line 7: timestamp 'soon' is not an integer"),
    ("ml-1m", "userId::movieId::rating::timestamp\n" + "\n".join(ml_lines()) + "\n",
     "line 1: 'userId::movieId::rating::timestamp' looks like a header line, but this format has none"),
    ("ml-1m", "reviewerID,product_id,rating,date\nu,i,5.0,2014-01-01\n",
     "line 1: expected 4 '::'-separated fields user::item::rating::timestamp, got 1 (this looks like a CSV"),
    ("ml-1m", "\n".join(ml_lines(sep="\t")) + "\n", "got 1 (this looks like a tab-separated MovieLens 100K"),
    ("ml-100k", "\n".join(ml_lines()) + "\n", "got 1 (this looks like a MovieLens 1M/10M '::' file"),
    ("yelp", "\n".join(ml_lines()) + "\n", "got 1 (this looks like a MovieLens 1M/10M '::' file"),
    ("amazon", "reviewerID,product_id,rating,date\nu,i,5.0,2014-01-01\nu,j,great,2014-01-02\n",
     "line 3: rating 'great' is not a number"),
    ("amazon", "u,i,5.0,1400000000\nu,j,4.0,1400000001\nu,k,4.0\n",
     "line 3: expected 4 comma-separated fields"),
    ("amazon", "reviewerID,product_id,rating,date\nu,i,5.0,2014-01-01\nu,j,4.0,someday\n",
     "line 3: timestamp 'someday' is neither unix seconds nor a date"),
    ("yelp", '{"user_id": "a", "business_id": "b", "stars": 4, "date": "2016-01-01"}\n'
             '{"user_id": "a", "business_id": "c", "stars": 4, "date": "2016-01-02"\n',
     "line 2: not valid JSON"),
    ("yelp", '{"user_id": "a", "business_id": "b", "stars": 4, "date": "2016-01-01"}\n\n'
             '{"user_id": "a", "business_id": "c", "date": "2016-01-02"}\n',
     "line 3: review record has no stars"),
    ("ml-1m", "", "the file is empty"),
])
def test_bad_files_give_one_line_errors(tmp_path, mode, text, message):
    with pytest.raises(MeloError) as error:
        load(tmp_path, mode, text)
    text_of_error = str(error.value)
    assert "\n" not in text_of_error
    assert text_of_error.startswith(str(tmp_path / "data.txt"))
    assert message in text_of_error, text_of_error


def test_missing_files(tmp_path):
    args = make_args("ml-1m", str(tmp_path / "nope.dat"), tmp_path)
    with pytest.raises(MeloError, match=r"--data_path .*nope\.dat does not exist"):
        preprocess.load_data(args)
    for mode in ("amazon", "yelp"):
        args = make_args(mode, None, tmp_path)
        with pytest.raises(MeloError, match=rf"no {mode} ratings at .*: put .* there, or pass --data_path"):
            preprocess.load_data(args)


def test_everything_filtered_away(tmp_path):
    with pytest.raises(MeloError, match=r"no users left .* after filtering \(min_item=1000"):
        load(tmp_path, "ml-1m", "\n".join(ml_lines()) + "\n", min_item=1000)


# ============================================================================ command line
def run_cli(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), *argv], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_cli_missing_file_is_one_line(tmp_path):
    out = run_cli("--mode=ml-1m", f"--data_path={tmp_path / 'missing.dat'}", cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data_path") and "does not exist" in lines[0]


def test_cli_prints_the_summary(tmp_path):
    mode, path, _ = write(tmp_path, "ml-10m")
    out = run_cli(f"--mode={mode}", f"--data_path={path}", "--num_test_data=30", "--min_item=10",
                  f"--data_dir={tmp_path / 'Data'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("users", "items", "ratings", "avg seq length", "rating distribution", "4.5",
                 "balance score", "train", "validation", "test 30 users"):
        assert word in out.stdout


def test_cli_with_too_many_test_users_prints_the_summary_then_what_works(tmp_path):
    mode, path, _ = write(tmp_path, "ml-10m")
    out = run_cli(f"--mode={mode}", f"--data_path={path}", "--num_test_data=100000", "--min_item=10",
                  f"--data_dir={tmp_path / 'Data'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for word in ("users", "items", "ratings", "avg seq length", "rating distribution", "balance score"):
        assert word in out.stdout
    assert "split" not in out.stdout
    users = int(re.search(r"^users\s+(\d+)", out.stdout, re.M).group(1))
    error, = out.stderr.strip().splitlines()
    assert f"--num_test_data={users - 2} at most works here" in error
    works = run_cli(f"--mode={mode}", f"--data_path={path}", f"--num_test_data={users - 2}", "--min_item=10",
                    f"--data_dir={tmp_path / 'Data'}", cwd=tmp_path)
    assert works.returncode == 0 and "validation 1, test" in works.stdout, works.stderr


def test_the_generator_cli_overrides_reach_the_profile(tmp_path, capsys):
    """`ratings/synthetic.py u.data --selection_strength=0.75` is the profile with that one setting changed."""
    default, changed, direct = (tmp_path / name for name in ("default.data", "changed.data", "direct.data"))
    sy.main([str(default)])
    sy.main([str(changed), "--selection_strength=0.75"])
    assert "ml-100k profile, selection_strength 0.75, seed 100" in capsys.readouterr().out
    sizes = sy.PROFILES["ml-100k"]
    sy.write_movielens(str(direct), fmt="ml-100k", num_users=sizes["num_users"], num_items=sizes["num_items"],
                       seed=100, profile="ml-100k", selection_strength=0.75)
    assert changed.read_bytes() == direct.read_bytes() != default.read_bytes()


def test_the_taste_for_the_single_item_changes_ratings_alone():
    """idiosyncrasy draws from its own stream: the same users pick the same items at the same times, only
    the ratings move (so that profiles differing in it differ in nothing else), and at 0 nothing moves."""
    kwargs = dict(num_users=60, num_items=300, seed=5, mean_length=40)
    plain = sy.realistic_ratings(**kwargs, idiosyncrasy=0.0)
    again = sy.realistic_ratings(**kwargs, idiosyncrasy=0.0)
    noisy = sy.realistic_ratings(**kwargs, idiosyncrasy=0.7)
    pd.testing.assert_frame_equal(plain, again)
    pd.testing.assert_frame_equal(plain.drop(columns="rating"), noisy.drop(columns="rating"))
    moved = (plain["rating"] != noisy["rating"]).mean()
    assert 0.2 < moved < 0.9, moved


def test_training_tasks_can_hold_out_several_query_targets(ml1m):
    """--train_query_targets=m: a training task's query windows end on its window's last m items (window j
    on the (j mod m)-th from the end), the support windows come only from the items before them, and the
    validation and test tasks are those of m = 1 (one target, the latest item)."""
    _, args, data, _ = ml1m
    held = dataclasses.replace(tasks.TaskConfig.from_args(args), train_query_targets=3, num_query_set=6)
    meta = tasks.MetaDataset(data, held)
    batch = meta.train_batch(4)
    more = tasks.MetaDataset(data, dataclasses.replace(held, train_query_targets=8, num_query_set=2))
    assert more.train_batch(4).query_items.shape[1] == 8 and more.val_tasks().query_items.shape[1] == 2
    seen_offsets = set()
    for k in range(len(batch)):
        items, _ = data.sequence(int(batch.users[k]))
        where = {item: p for p, item in enumerate(items)}
        ends = [where[int(row[-1])] for row in batch.query_items[k].numpy()]
        last = max(ends)
        targets = min(3, min(len(items), args.max_seq_len) - args.min_sub_window_size)
        assert ends == [last - (j % targets) for j in range(6)]
        seen_offsets.update(last - end for end in ends)
        support = batch.support_items[k][batch.support_mask[k]]
        support_positions = [where[int(item)] for item in support[support > 0]]
        assert max(support_positions) < last - targets + 1           # no target in the support windows
    assert seen_offsets == {0, 1, 2}
    plain = tasks.MetaDataset(data, dataclasses.replace(held, train_query_targets=1))
    assert_same(meta.val_tasks(), plain.val_tasks())
    assert_same(meta.test_tasks(), plain.test_tasks())


def test_support_age_is_each_positions_distance_from_the_latest_support_item(ml1m):
    """TaskBatch.support_age: 0 at the user's latest item before the earliest target (in a support window or
    not: the windows are a sample), one more per item back, 0 at padding; for validation, test and
    multi-target training tasks alike."""
    _, args, data, meta = ml1m
    held = tasks.MetaDataset(data, dataclasses.replace(tasks.TaskConfig.from_args(args), train_query_targets=3))
    for batch in (meta.val_tasks(), meta.test_tasks().select(slice(0, 20)), held.train_batch(2)):
        assert batch.support_age.shape == batch.support_items.shape and batch.support_age.dtype == torch.long
        assert bool((batch.support_age[batch.support_items == 0] == 0).all())
        for k in range(len(batch)):
            items, _ = data.sequence(int(batch.users[k]))
            where = {item: p for p, item in enumerate(items)}
            earliest_target = min(where[int(row[-1])] for row in batch.query_items[k].numpy())
            real = batch.support_items[k] > 0
            positions = torch.tensor([where[int(i)] for i in batch.support_items[k][real]])
            assert torch.equal(batch.support_age[k][real], earliest_target - 1 - positions)


def test_the_data_cache_sees_a_same_size_edit_with_its_mtime_restored(tmp_path):
    path = str(tmp_path / "u.data")
    sy.write_movielens(path, fmt="ml-100k", num_users=60, num_items=40, seed=4)
    args = make_args("ml-100k", path, tmp_path, num_test_data=10)
    before = preprocess.load_data(args)
    same_size_edit(path)
    after = preprocess.load_data(args)
    assert not np.array_equal(before.ratings, after.ratings)
    assert after.fingerprint() != before.fingerprint()   # what checkpoints and reports carry
    np.testing.assert_array_equal(after.ratings, preprocess.load_data(make_args("ml-100k", path, tmp_path / "fresh",
                                                                            num_test_data=10)).ratings)


@pytest.mark.parametrize("windows", ["latest", "held-out"])
def test_training_tasks_can_end_on_the_latest_rating(ml1m, windows):
    """--train_windows=latest / held-out: a training task's window ends on the user's latest rating, as a
    validation or test task's does (its targets: the last --train_query_targets items); the validation and
    test tasks are unchanged."""
    _, args, data, meta = ml1m
    config = tasks.TaskConfig.from_args(args)
    for targets in (1, 3):
        latest = tasks.MetaDataset(data, dataclasses.replace(config, train_windows=windows,
                                                             train_query_targets=targets))
        batch = latest.train_batch(4)
        for k in range(len(batch)):
            items, _ = data.sequence(int(batch.users[k]))
            ends = {int(row[-1]) for row in batch.query_items[k].numpy()}
            held = min(targets, min(len(items), args.max_seq_len) - args.min_sub_window_size)
            assert ends == {int(item) for item in items[len(items) - held:]}
        assert_same(latest.val_tasks(), meta.val_tasks())
        assert_same(latest.test_tasks(), meta.test_tasks())
    # the default draws the window's start: some training targets are not the latest item
    batch = meta.train_batch(4)
    assert any(int(batch.query_items[k, 0, -1]) != int(data.sequence(int(batch.users[k]))[0][-1])
               for k in range(len(batch)))
