"""Reading, filtering and caching a ratings file for MELO (one reader per file format: ratings/readers.py).

``load_data(args)`` reads the ratings file of ``--mode`` (downloading MovieLens when the default file is
missing), drops items with fewer than ``--min_item`` ratings and then users with fewer than
``max(--min_sequence, --min_sub_window_size + 1)`` ratings (one pass, in that order), re-indexes items to
1..N (0 is padding) and users to 0..U-1, both in sorted order of their original ids, sorts every user's
ratings by time (stably: file order breaks ties) and returns a :class:`RatingData` in CSR layout. The
result is cached as an ``.npz`` under ``<data_dir>/cache/``, keyed on a hash of the file's bytes and the options.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import MeloError
from common.runtime import write_atomic
from ratings.readers import MAX_RATING, read_ratings

log = logging.getLogger("melo.data")

DOWNLOAD_URLS = {
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-10m": "https://files.grouplens.org/datasets/movielens/ml-10m.zip",
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
}
# The ratings file inside each GroupLens zip (matched by file name; the folders are ml-1m/,
# ml-10M100K/ and ml-100k/).
ZIP_MEMBERS = {"ml-1m": "ratings.dat", "ml-10m": "ratings.dat", "ml-100k": "u.data"}

CACHE_VERSION = 3           # bump when the preprocessing or the cache layout changes


# ============================================================================ data containers
@dataclass
class RatingData:
    """Filtered, re-indexed, time-sorted ratings in CSR layout.

    User u's ratings are ``[offsets[u], offsets[u+1])`` of ``items`` / ``ratings`` / ``timestamps``.
    Items are 1..num_items (0 is padding and never occurs); ``item_ids[i-1]`` is the original id of item i
    and ``user_ids[u]`` the original id of user u (int64 for MovieLens, str for Amazon / Yelp).
    """
    offsets: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    num_items: int
    max_rating: float = MAX_RATING
    duplicates_dropped: int = 0     # repeated (user, item) ratings removed before filtering

    def num_users(self):
        return len(self.offsets) - 1

    def sequence_lengths(self):
        """Number of ratings of every user, int64 [U]."""
        return np.diff(self.offsets)

    def sequence(self, u):
        """(items, ratings) of user u in time order (views, not copies)."""
        start, end = self.offsets[u], self.offsets[u + 1]
        return self.items[start:end], self.ratings[start:end]

    def fingerprint(self):
        """A short hash of the preprocessed arrays: checkpoints and exports record it, so that weights
        trained on one ratings file are not tested or resumed on another that merely has as many items."""
        digest = hashlib.sha256()
        for array in (self.offsets, self.items, self.ratings, self.timestamps, self.user_ids, self.item_ids):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]


# ============================================================================ downloading
def download_movielens(mode, data_path, data_dir):
    """Download the GroupLens zip of `mode` and put its ratings file at `data_path`, atomically.

    Everything happens in a temporary folder under ``<data_dir>/<mode>/``; the ratings file is moved into
    place with ``os.replace`` only after the zip checked out, so an interrupted or corrupt download never
    leaves a file that a later run would read as data.
    """
    import wget   # imported here: machines that never download need not have it

    url, member_name = DOWNLOAD_URLS[mode], ZIP_MEMBERS[mode]
    folder = os.path.join(data_dir, mode)
    by_hand = (f"download {url} by hand and put {member_name} from it at {data_path} "
               f"(or pass --data_path)")
    created = missing_folders(folder) + missing_folders(os.path.dirname(os.path.abspath(data_path)))
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(data_path)), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".download-", dir=folder)
    try:
        print(f"downloading {url} ...", file=sys.stderr, flush=True)
        try:
            archive = wget.download(url, out=os.path.join(os.path.abspath(work), f"{mode}.zip"), bar=None)
        except Exception as error:    # URLError, HTTPError, ContentTooShortError, OSError, ...
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MeloError(f"could not download {url} ({reason}); {by_hand}") from None
        if not zipfile.is_zipfile(archive):
            raise MeloError(f"the download from {url} is not a valid zip file (interrupted?); {by_hand}")
        try:
            with zipfile.ZipFile(archive) as bundle:
                members = [m for m in bundle.infolist()
                           if not m.is_dir() and m.filename.replace("\\", "/").rsplit("/", 1)[-1] == member_name]
                if not members:
                    raise MeloError(f"the zip from {url} has no {member_name}; {by_hand}")
                if bundle.testzip() is not None:
                    raise MeloError(f"the zip from {url} is corrupt; {by_hand}")
                extracted = bundle.extract(members[0], os.path.join(work, "unpacked"))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
            raise MeloError(f"the zip from {url} could not be unpacked ({error}); {by_hand}") from None
        os.replace(extracted, data_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not os.path.exists(data_path):  # failed: leave no empty folders behind either
            for directory in sorted(set(created), key=len, reverse=True):  # the deepest first
                with contextlib.suppress(OSError):  # not empty (any more): keep it
                    os.rmdir(directory)


def missing_folders(path):
    """`path` and those of its parents that do not exist yet (what os.makedirs would create)."""
    missing, path = [], os.path.abspath(path)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


# ============================================================================ preprocessing
def effective_min_sequence(options):
    """Users need at least this many ratings: a task needs a support window plus a query target
    (`options`: the flags, or a TaskConfig)."""
    return max(options.min_sequence, options.min_sub_window_size + 1)


def drop_duplicates(users, items, ratings, timestamps):
    """Keep one rating per (user, item): the latest by time, and of equal times the last in the file (as
    RecBole's rm_dup_inter keeps the last). A repeated rating would otherwise let a test target's (item,
    rating) stand in the support set too. Returns the kept rows, in file order, and how many went."""
    user_codes, _ = pd.factorize(users)
    item_codes, item_uniques = pd.factorize(items)
    pair = user_codes.astype(np.int64) * max(len(item_uniques), 1) + item_codes
    order = np.lexsort((np.arange(len(pair)), timestamps, pair))  # by pair, then time, then file position
    last_of_pair = np.ones(len(order), bool)
    last_of_pair[:-1] = pair[order[1:]] != pair[order[:-1]]
    keep = np.zeros(len(pair), bool)
    keep[order[last_of_pair]] = True
    return (users[keep], items[keep], ratings[keep], timestamps[keep]), int(len(keep) - keep.sum())


def preprocess(users, items, ratings, timestamps, min_item, min_sequence):
    """Filter (items, then users; one pass), re-index and sort raw ratings into a RatingData."""
    item_codes, _ = pd.factorize(items)
    keep = np.bincount(item_codes)[item_codes] >= min_item
    users, items, ratings, timestamps = users[keep], items[keep], ratings[keep], timestamps[keep]
    if len(users):
        user_codes, _ = pd.factorize(users)
        keep = np.bincount(user_codes)[user_codes] >= min_sequence
        users, items, ratings, timestamps = users[keep], items[keep], ratings[keep], timestamps[keep]
    if len(users) == 0:
        return None
    user_codes, user_ids = pd.factorize(users, sort=True)
    item_codes, item_ids = pd.factorize(items, sort=True)
    # Stable sort by (user, time): file order breaks timestamp ties.
    order = np.argsort(timestamps, kind="stable")
    order = order[np.argsort(user_codes[order], kind="stable")]
    counts = np.bincount(user_codes, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return RatingData(
        offsets=offsets,
        items=item_codes[order].astype(np.int64) + 1,
        ratings=np.ascontiguousarray(ratings[order], dtype=np.float32),
        timestamps=np.ascontiguousarray(timestamps[order], dtype=np.int64),
        user_ids=_id_array(user_ids),
        item_ids=_id_array(item_ids),
        num_items=int(len(item_ids)),
        max_rating=MAX_RATING,
    )


def _id_array(uniques):
    values = np.asarray(uniques)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.asarray([str(v) for v in values], dtype=str)   # fixed-width unicode: no pickle in .npz


def content_digest(path, chunk_bytes=1 << 20):
    """sha256 of the file's bytes, read in chunks (memory stays flat for ML-10M's 265 MB; ~0.2 s there,
    docs/performance.md). Path, size and mtime are not enough: an edit of equal size with its mtime
    restored (`touch -r`) keeps all three."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_path(args, min_sequence):
    # Keyed on the content, not the path: the cache is only as fresh as the bytes it was made from.
    key = json.dumps({"content_sha256": content_digest(args.data_path),
                      "mode": args.mode, "min_item": args.min_item, "min_sequence": min_sequence,
                      "keep_duplicates": args.keep_duplicates, "csv_columns": args.csv_columns,
                      "version": CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(args.data_dir, "cache", f"{args.mode}-{digest}.npz")


def _load_cache(path):
    try:
        with np.load(path, allow_pickle=False) as stored:
            if int(stored["version"]) != CACHE_VERSION:
                return None
            return RatingData(offsets=stored["offsets"], items=stored["items"], ratings=stored["ratings"],
                              timestamps=stored["timestamps"], user_ids=stored["user_ids"],
                              item_ids=stored["item_ids"], num_items=int(stored["num_items"]),
                              max_rating=float(stored["max_rating"]),
                              duplicates_dropped=int(stored["duplicates_dropped"]))
    except FileNotFoundError:
        return None
    except Exception as error:     # a corrupt or foreign cache file is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s)", path, error)
        return None


def _save_cache(path, data):
    try:
        write_atomic(path, lambda out: np.savez(
            out, version=np.int64(CACHE_VERSION), offsets=data.offsets, items=data.items, ratings=data.ratings,
            timestamps=data.timestamps, user_ids=data.user_ids, item_ids=data.item_ids,
            num_items=np.int64(data.num_items), max_rating=np.float64(data.max_rating),
            duplicates_dropped=np.int64(data.duplicates_dropped)))
    except OSError as error:      # a read-only data folder only costs the next start its speed
        print(f"warning: could not write the data cache {path}: {error}", file=sys.stderr)


def load_data(args):
    """Read (downloading MovieLens if needed), filter, re-index, sort and cache the ratings of --mode."""
    path, mode = args.data_path, args.mode
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise MeloError(f"--data_path {path} is not a file")
        if getattr(args, "data_path_given", True):
            raise MeloError(f"--data_path {path} does not exist: check the path "
                            f"(leave --data_path out to use {mode}'s default location)")
        if mode in DOWNLOAD_URLS:
            download_movielens(mode, path, args.data_dir)
        else:
            expected = {"amazon": "a CSV reviewerID,product_id,rating,date (or headerless "
                                  "user,item,rating,timestamp)",
                        "yelp": "the Yelp review JSON-lines file or a CSV user_id,business_id,stars,timestamp"}
            raise MeloError(f"no {mode} ratings at {path}: put {expected.get(mode, 'the ratings file')} "
                            f"there, or pass --data_path")
    min_sequence = effective_min_sequence(args)
    cache = _cache_path(args, min_sequence)
    data = _load_cache(cache)
    if data is not None:
        log.info("loaded %s from cache %s", path, cache)
        return data
    rows = read_ratings(path, mode, args.csv_columns)
    dropped = 0
    if not args.keep_duplicates:
        rows, dropped = drop_duplicates(*rows)
    data = preprocess(*rows, args.min_item, min_sequence)
    if data is None:
        raise MeloError(f"no users left in {path} after filtering (min_item={args.min_item}, "
                        f"min_sequence={min_sequence}): lower --min_item or --min_sequence")
    data.duplicates_dropped = dropped
    _save_cache(cache, data)
    return data


def duplicates_note(dropped, args):
    """What happened to repeated (user, item) ratings, for the summary and the start of training."""
    if args.keep_duplicates:
        return "kept (--keep_duplicates=True)"
    return f"{dropped} repeated (user, item) ratings dropped, the latest kept (--keep_duplicates=True keeps them)"
