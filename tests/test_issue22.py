"""Stale results never pass as fresh (issue 22): the data cache and every reused report are keyed on the
ratings file's content; signals, full disks, truncated reports and bad rates end in one line."""
import os

import numpy as np

import dataloader as dl

import synthetic as sy


def same_size_edit(path):
    """Change ratings without changing the file's size, then restore its mtime (`touch -r`)."""
    before = os.stat(path)
    lines = open(path).read().splitlines(keepends=True)
    for number in range(0, len(lines), 3):   # every third rating: 5 <-> 1, other values kept
        user, item, rating, timestamp = lines[number].split("\t")
        lines[number] = "\t".join((user, item, {"5": "1", "1": "5"}.get(rating, rating), timestamp))
    with open(path, "w") as handle:
        handle.write("".join(lines))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_data_cache_sees_a_same_size_edit_with_its_mtime_restored(tmp_path):
    path = str(tmp_path / "u.data")
    sy.write_movielens(path, fmt="ml-100k", num_users=60, num_items=40, seed=4)
    args = sy.make_args("ml-100k", path, tmp_path, num_test_data=10)
    before = dl.load_data(args)
    same_size_edit(path)
    after = dl.load_data(args)
    assert not np.array_equal(before.ratings, after.ratings)
    assert after.fingerprint() != before.fingerprint()   # what checkpoints and reports carry
    np.testing.assert_array_equal(after.ratings, dl.load_data(sy.make_args("ml-100k", path, tmp_path / "fresh",
                                                                            num_test_data=10)).ratings)
