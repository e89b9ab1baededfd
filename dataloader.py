"""Reading, downloading, filtering, splitting and task generation for MELO.

Data flow
---------
``load_data(args)`` reads the ratings file of ``--mode`` (downloading MovieLens when the default file is
missing), drops items with fewer than ``--min_item`` ratings and then users with fewer than
``max(--min_sequence, --min_sub_window_size + 1)`` ratings (one pass, in that order), re-indexes items to
1..N (0 is padding) and users to 0..U-1, both in sorted order of their original ids, sorts every user's
ratings by time (stably: file order breaks ties) and returns a :class:`RatingData` in CSR layout. The
result is cached as an ``.npz`` under ``<data_dir>/cache/``, keyed on a hash of the file's bytes and the options.

``MetaDataset(data, args)`` makes the cold-start user split and every task:

* split: a permutation of all users from ``rng(seed, 3)``; the first ``--num_test_data`` are test users,
  ``round(val_fraction * rest)`` of the rest (at least 1, and at most rest - 1) are validation users, the
  others train (in permutation order).
* a task for user u with n ratings uses a window of ``w = min(n, max_seq_len)`` consecutive ratings
  (training with ``--use_random_sequence_length``: w uniform in [min_sub_window_size + 1, min(n, L)]),
  starting uniformly in [0, n - w] for training and at n - w (the latest ratings) for validation / test.
  The query set is ``num_query_set`` windows that end on the window's last item, each of a random length
  in [min_sub_window_size, w]; the target of each is that last item. The support set is up to
  ``num_samples`` distinct contiguous sub-windows (length >= min_sub_window_size) drawn without
  replacement from the window without its last item, so the query target is never in the support set.
* every window is left-padded to ``max_seq_len`` with item 0 and rating ``--default_rating``.

Randomness comes only from numpy Generators ``rng(seed, stream, *keys)`` with fixed streams
(train 0, validation 1, test 2, split 3, baseline windows 4); see :func:`task_rng`. A training meta-batch
is a pure function of (seed, iteration); validation and test tasks are fixed by the seed.

``python dataloader.py --mode=M [--data_path=P] [data flags]`` prints the data summary (see
:meth:`MetaDataset.summary`; the balance score is defined there).
"""
import contextlib
import csv
import dataclasses
import hashlib
import io
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
import torch

from options import MeloError, run_cli
from runtime import write_atomic

log = logging.getLogger("melo.data")

DOWNLOAD_URLS = {
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-10m": "https://files.grouplens.org/datasets/movielens/ml-10m.zip",
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
}
# The ratings file inside each GroupLens zip (matched by file name; the folders are ml-1m/,
# ml-10M100K/ and ml-100k/).
ZIP_MEMBERS = {"ml-1m": "ratings.dat", "ml-10m": "ratings.dat", "ml-100k": "u.data"}

MAX_RATING = 5.0            # the rating scale's maximum for every supported data set
CACHE_VERSION = 3           # bump when the preprocessing or the cache layout changes
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1  # timestamps are int64 unix seconds

STREAM_TRAIN, STREAM_VAL, STREAM_TEST, STREAM_SPLIT, STREAM_WINDOWS = 0, 1, 2, 3, 4
# The options that decide who the training, validation and test users are: weights trained under other
# values may have been trained on this split's test users.
SPLIT_OPTIONS = ("random_seed", "num_test_data", "val_fraction", "min_item", "min_sequence",
                 "min_sub_window_size")


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


# ============================================================================ reading
def _fail(path, line, problem):
    where = f"{path} line {line}" if line is not None else str(path)
    return MeloError(f"{where}: {problem}")


def _text_lines(path):
    """(line number, line without newline) of every non-blank line; used on error paths only."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _csv_rows(path):
    """(line number where the row starts, fields) of every non-empty CSV row, as pandas counts rows; error
    paths only. A quote that is never closed swallows the lines after it into one field: the row is
    reported at the quote's line (by check_row), or here when the field outgrows csv's limit."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise _fail(path, start, f"a quoted field that starts here is never closed ({error}): "
                                         "check the quotes on this line") from None
            if fields and any(f.strip() for f in fields):
                yield start, fields


def _is_number(text):
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _format_hint(line, mode):
    if mode in ("amazon", "yelp"):
        if "::" in line:
            return " (this looks like a MovieLens 1M/10M '::' file: check --mode)"
        if "\t" in line:
            return " (this looks like a tab-separated MovieLens 100K file: check --mode)"
        return ""
    if "::" in line and mode == "ml-100k":
        return " (this looks like a MovieLens 1M/10M '::' file: use --mode=ml-1m or --mode=ml-10m)"
    if "\t" in line and mode != "ml-100k":
        return " (this looks like a tab-separated MovieLens 100K u.data: use --mode=ml-100k)"
    if line.lstrip().startswith("{"):
        return " (this looks like a JSON-lines file: use --mode=yelp)"
    if "," in line:
        return " (this looks like a CSV file: use --mode=amazon or --mode=yelp, or check the file)"
    return ""


class _Format:
    """How one mode's delimited text file looks, and how to explain a bad row of it."""

    def __init__(self, mode, sep, layout, description, integer_ids, header=None):
        self.mode, self.sep, self.layout, self.description = mode, sep, layout, description
        self.integer_ids, self.header = integer_ids, header
        self.order = (0, 1, 2, 3)      # file column of user, item, rating, timestamp

    def rows(self, path):
        """(line number, fields in user, item, rating, timestamp order) of every non-blank row."""
        if self.sep == ",":
            rows = _csv_rows(path)
        else:
            rows = ((number, line.split(self.sep)) for number, line in _text_lines(path))
        for number, fields in rows:
            yield number, [fields[i] for i in self.order] if len(fields) == 4 else fields

    def field_count_problem(self, fields, line_text):
        return (f"expected 4 {self.description} fields {self.layout}, got {len(fields)}"
                + _format_hint(line_text, self.mode))

    def check_row(self, fields, line_text):
        """The problem of one data row, or None if it is fine."""
        if "\ufffd" in line_text:  # what the error paths read in place of a byte that is not UTF-8
            return ("holds a byte that is not UTF-8 (a latin-1 file?): convert the file, e.g. iconv -f "
                    "latin1 -t utf-8 FILE > FILE.utf8, and pass that as --data_path")
        if any("\n" in field for field in fields):
            return "a quoted field that starts on this line is never closed: check the quotes on this line"
        if len(fields) != 4:
            return self.field_count_problem(fields, line_text)
        user, item, rating, stamp = (f.strip() for f in fields)
        if not self.header and not any(_is_number(f) for f in (user, item, rating, stamp)):
            return (f"{line_text.strip()!r} looks like a header line, but this format has none "
                    "(remove it, or check --mode)")
        for name, value in (("user id", user), ("item id", item), ("rating", rating), ("timestamp", stamp)):
            if not value:
                return f"empty {name}"
        if self.integer_ids:
            for name, value in (("user id", user), ("item id", item)):
                if not _is_int(value):
                    return f"{name} {value!r} is not an integer"
        if not _is_number(rating):
            return f"rating {rating!r} is not a number"
        if not np.isfinite(float(rating)) or not 0 < float(rating) <= MAX_RATING:
            return f"rating {rating} is outside (0, {MAX_RATING:g}]"
        if self.integer_ids and not _is_int(stamp):
            return f"timestamp {stamp!r} is not an integer (unix seconds)"
        seconds = int(stamp) if self.integer_ids else _to_seconds_scalar(stamp)
        if seconds is None:
            return f"timestamp {stamp!r} is neither unix seconds nor a date"
        if not INT64_MIN <= seconds <= INT64_MAX:
            return f"timestamp {stamp} is beyond the range of unix seconds that MELO stores (int64)"
        return None


def _is_int(text):
    try:
        int(text)
        return True
    except (TypeError, ValueError):
        return False


def _to_seconds_scalar(text):
    if _is_number(text):
        value = float(text)
        return int(value) if np.isfinite(value) else None
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError):
        return None
    if pd.isna(stamp):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.timestamp())


def _diagnose(path, fmt, skip_rows=0, row=None, fallback=None):
    """Find the first bad row (or data row number `row`, 0-based after `skip_rows` rows) and describe it."""
    for index, (number, fields) in enumerate(fmt.rows(path)):
        if index < skip_rows:
            continue
        line_text = fmt.sep.join(fields)
        if row is not None and index - skip_rows != row:
            continue
        problem = fmt.check_row(fields, line_text)
        if problem is not None:
            return _fail(path, number, problem)
        if row is not None:
            return _fail(path, number, fallback or "could not be parsed")
    return _fail(path, None, fallback or "could not be parsed")


def _first_line(path):
    for number, line in _text_lines(path):
        return number, line
    return None, None


def _to_seconds(column, path, fmt, skip_rows):
    """int64 unix seconds from a column of unix seconds (ints or floats) and / or date strings
    (vectorised; date strings without a time zone are taken as UTC)."""
    if pd.api.types.is_integer_dtype(column.dtype):
        if column.dtype.kind == "u" and len(column) and column.max() > INT64_MAX:  # would wrap to negative
            raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(column.to_numpy() > INT64_MAX)))
        return column.to_numpy(np.int64)
    numeric = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    seconds = np.zeros(len(column), np.int64)
    is_number = np.isfinite(numeric)
    beyond = is_number & ~((numeric >= INT64_MIN) & (numeric < 2.0 ** 63))
    if beyond.any():
        raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(beyond)))
    seconds[is_number] = np.floor(numeric[is_number]).astype(np.int64)
    if is_number.all():
        return seconds
    text = column[~is_number].astype(str)
    parsed = pd.to_datetime(text, errors="coerce", utc=True)        # one inferred format, fast
    missing = parsed.isna().to_numpy()
    if missing.any():      # several date formats in one file: parse the rest one by one
        parsed = parsed.copy()
        parsed[missing] = pd.to_datetime(text[missing], errors="coerce", utc=True, format="mixed")
        missing = parsed.isna().to_numpy()
        if missing.any():
            raise _diagnose(path, fmt, skip_rows, row=int(np.flatnonzero(~is_number)[np.argmax(missing)]))
    seconds[~is_number] = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    return seconds


def _validated(frame, path, fmt, skip_rows):
    """Check a 4-column frame parsed by pandas; return (users, items, ratings, timestamps) arrays."""
    if frame.shape[1] != 4:
        raise _diagnose(path, fmt, skip_rows, fallback=f"expected 4 fields per row, got {frame.shape[1]}")
    if len(frame) == 0:
        raise _fail(path, None, "no ratings in the file")
    frame.columns = ["user", "item", "rating", "timestamp"]
    empty = frame.isna().any(axis=1).to_numpy()
    if empty.any():
        raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(empty)))
    if fmt.integer_ids:
        for name in ("user", "item", "timestamp"):
            if not pd.api.types.is_integer_dtype(frame[name].dtype):
                bad = pd.to_numeric(frame[name], errors="coerce")
                bad = (bad.isna() | (bad != np.floor(bad))).to_numpy()
                raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(bad)) if bad.any() else None)
        users, items = frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64)
    else:
        users = frame["user"].astype(str).str.strip().to_numpy(dtype=object)
        items = frame["item"].astype(str).str.strip().to_numpy(dtype=object)
    ratings = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(ratings) & (ratings > 0) & (ratings <= MAX_RATING))
    if bad.any():
        raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(bad)))
    timestamps = _to_seconds(frame["timestamp"], path, fmt, skip_rows)
    return users, items, ratings.astype(np.float32), timestamps


def _read_pandas(source, path, fmt, skip_lines, header_rows, **kwargs):
    """pandas' C parser on `source`, skipping `skip_lines` raw lines; on failure, explain the first bad
    row (`header_rows` non-blank rows are not data)."""
    try:
        return pd.read_csv(source, header=None, skiprows=skip_lines, skip_blank_lines=True,
                           keep_default_na=False, na_values=[""], engine="c", **kwargs)
    except pd.errors.EmptyDataError:  # pandas says "No columns to parse from file"
        raise _fail(path, None, "holds a header line but no ratings" if header_rows else "holds no ratings") from None
    except (ValueError, UnicodeDecodeError) as error:     # ParserError is a ValueError
        message = str(error).strip().splitlines()
        raise _diagnose(path, fmt, header_rows, fallback=message[-1] if message else None) from None


# What a compressed file starts with (the ratings are read as plain text).
COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k FILE"), b"BZh": ("bzip2", "bunzip2 -k FILE"),
              b"\xfd7zXZ\x00": ("xz", "unxz -k FILE"), b"PK\x03\x04": ("zip", "unzip FILE"),
              b"\x28\xb5\x2f\xfd": ("zstd", "unzstd FILE")}
UTF8_BOM = b"\xef\xbb\xbf"


def _check_encoding(path):
    """A compressed file, or one that starts with a byte-order mark, is refused with what to do."""
    with open(path, "rb") as handle:
        start = handle.read(8)
    for magic, (kind, unpack) in COMPRESSED.items():
        if start.startswith(magic):
            raise _fail(path, None, f"is {kind}-compressed: unpack it first ({unpack}) and pass the "
                                    "unpacked ratings file as --data_path")
    if start.startswith(UTF8_BOM):
        raise _fail(path, 1, "starts with a UTF-8 byte-order mark (BOM), which is not part of the data: "
                             "remove it, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE")


def _read_movielens(path, mode):
    if mode == "ml-100k":
        fmt = _Format(mode, "\t", "user<TAB>item<TAB>rating<TAB>timestamp", "tab-separated", True)
    else:
        fmt = _Format(mode, "::", "user::item::rating::timestamp", "'::'-separated", True)
    _, first = _first_line(path)
    if first is None:
        raise _fail(path, None, "the file is empty")
    problem = fmt.check_row(first.split(fmt.sep), first)
    if problem is not None:          # a file of the wrong format fails here, before the full parse
        raise _diagnose(path, fmt)
    with open(path, "rb") as handle:
        raw = handle.read()
    if fmt.sep == "::":
        # pandas' C parser takes single-character separators only: map '::' to the unit separator.
        if b"\x1f" in raw:
            raise _fail(path, None, "contains the control character 0x1f: not a MovieLens ratings file")
        raw, sep = raw.replace(b"::", b"\x1f"), "\x1f"
    else:
        sep = "\t"
    frame = _read_pandas(io.BytesIO(raw), path, fmt, 0, 0, sep=sep, quoting=csv.QUOTE_NONE)
    del raw
    return _validated(frame, path, fmt, 0)


# Header names understood in Amazon / Yelp CSV files (lower case); the four may come in any order. Any
# other header is refused unless --csv_columns says what the columns hold.
HEADER_NAMES = {
    "user": ("reviewerid", "user_id", "userid", "user"),
    "item": ("product_id", "asin", "business_id", "item_id", "itemid", "item", "movieid"),
    "rating": ("rating", "stars", "overall", "score"),
    "timestamp": ("date", "timestamp", "unixreviewtime", "time"),
}


def _header_order(fields):
    """File column of user, item, rating, timestamp from the header names; None unless each of the four
    is named exactly once."""
    names = [f.strip().lower() for f in fields]
    positions = []
    for role, aliases in HEADER_NAMES.items():
        found = [i for i, name in enumerate(names) if name in aliases]
        if len(found) != 1:
            return None
        positions.append(found[0])
    return tuple(positions) if len(set(positions)) == 4 else None


def _column_order(columns):
    """File column of user, item, rating, timestamp from --csv_columns (roles in file order)."""
    roles = columns.split(",")
    return tuple(roles.index(role) for role in HEADER_NAMES)


def _read_csv_ratings(path, mode, columns=""):
    """Amazon / Yelp CSV: the original project's file with a header, or a headerless ratings-only dump."""
    layouts = {"amazon": "reviewerID,product_id,rating,date (with that header) or user,item,rating,timestamp "
                         "(no header)",
               "yelp": "user_id,business_id,stars,timestamp (with or without that header)"}
    fmt = _Format(mode, ",", layouts[mode], "comma-separated", False)
    number, first = _first_line(path)
    fields = next(csv.reader([first]))
    if len(fields) != 4:
        raise _fail(path, number, fmt.field_count_problem(fields, first))
    if columns:
        fmt.order = _column_order(columns)
    has_header = not _is_number(fields[fmt.order[2]])  # a header names the rating column, data rate there
    fmt.header = has_header or None
    if has_header and not columns:
        fmt.order = _header_order(fields)
        if fmt.order is None:  # guessing would swap users and items without a word
            understood = "; ".join(f"{role}: {', '.join(names)}" for role, names in HEADER_NAMES.items())
            raise _fail(path, number, f"header {first.strip()!r} does not name the user, item, rating and "
                                      f"timestamp columns once each; names understood (any case): {understood}; "
                                      "or say what the columns hold with --csv_columns, e.g. "
                                      "--csv_columns=item,user,rating,timestamp")
    skip = number if has_header else 0     # raw lines to skip (blank lines before the header included)
    header_rows = 1 if has_header else 0
    user, item = fmt.order[:2]
    frame = _read_pandas(path, path, fmt, skip, header_rows, sep=",", dtype={user: str, item: str})
    if frame.shape[1] == 4:
        frame = frame[list(fmt.order)]
    return _validated(frame, path, fmt, header_rows)


YELP_JSON_FIELDS = ("user_id", "business_id", "stars", "date")


def _read_yelp_json(path, chunk_rows=200_000):
    """The Yelp data set's review JSON-lines file, read in chunks (only the four fields are kept)."""
    fmt = _Format("yelp", ",", "", "", False, header=True)
    fmt.rows = lambda p: ((number, [str(v) for v in values]) for number, values in _json_rows(p))
    parts, rows_before = [], 0
    try:
        with pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False) as reader:
            for chunk in reader:
                _check_json_chunk(path, chunk, rows_before)
                parts.append(chunk[list(YELP_JSON_FIELDS)])
                rows_before += len(chunk)
    except (ValueError, TypeError) as error:  # TypeError: a line that is an array, a number or null
        raise _json_problem(path, str(error)) from None
    if not parts:
        raise _fail(path, None, "no reviews in the file")
    return _validated(pd.concat(parts, ignore_index=True), path, fmt, 0)


def _check_json_chunk(path, chunk, rows_before):
    present = [f for f in YELP_JSON_FIELDS if f in chunk.columns]
    bad = chunk[present].isna().any(axis=1).to_numpy() | (len(present) < len(YELP_JSON_FIELDS))
    if bad.any():
        first = int(np.argmax(bad))
        record = chunk.iloc[first]
        absent = [f for f in YELP_JSON_FIELDS if f not in present or pd.isna(record[f])]
        raise _fail(path, _json_line_of_row(path, rows_before + first),
                    f"review record has no {', '.join(absent)} (needs {', '.join(YELP_JSON_FIELDS)})")


def _json_rows(path):
    for number, line in _text_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            record = {}
        yield number, [record.get(f, "") for f in YELP_JSON_FIELDS]


def _json_line_of_row(path, row):
    for index, (number, _) in enumerate(_text_lines(path)):
        if index == row:
            return number
    return None


def _json_problem(path, message):
    for number, line in _text_lines(path):
        try:
            record = json.loads(line)
        except ValueError as error:
            return _fail(path, number, f"not valid JSON ({error})")
        if not isinstance(record, dict):
            return _fail(path, number, "expected one JSON object per line")
    return _fail(path, None, f"could not be read as JSON lines ({message})")


def read_ratings(path, mode, columns=""):
    """Raw (users, items, ratings float32, timestamps int64) of a ratings file, in file order. `columns`:
    --csv_columns, for Amazon / Yelp CSV files."""
    _check_encoding(path)
    if mode in ("ml-1m", "ml-10m", "ml-100k"):
        return _read_movielens(path, mode)
    _, first = _first_line(path)
    if first is None:
        raise _fail(path, None, "the file is empty")
    if mode == "yelp" and first.lstrip().startswith("{"):
        return _read_yelp_json(path)
    if mode in ("amazon", "yelp"):
        return _read_csv_ratings(path, mode, columns)
    raise MeloError(f"unknown --mode {mode!r}")


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
def effective_min_sequence(args):
    """Users need at least this many ratings: a task needs a support window plus a query target."""
    return max(args.min_sequence, args.min_sub_window_size + 1)


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


# ============================================================================ tasks
def task_rng(seed, stream, *keys):
    """The Generator of (seed, stream, *keys).

    It is ``np.random.default_rng([seed, stream, len(keys), *keys])``: the key count keeps keys of
    different lengths apart (numpy's SeedSequence zero-pads short entropy, so without it
    ``[seed, 0, it]`` and ``[seed, 0, it, 0]`` would give the same stream).
    """
    return np.random.default_rng([int(seed) % 2 ** 64, stream, len(keys), *map(int, keys)])


def candidate_windows(m, min_size):
    """All (a, b) with 0 <= a < b <= m and b - a >= min_size, as two int64 arrays (a-major order)."""
    a, b = np.triu_indices(m + 1, k=min_size)
    return a.astype(np.int64), b.astype(np.int64)


class MetaDataset:
    """The cold-start user split and all task generation (see the module docstring for the rules)."""

    def __init__(self, data, args):
        self.data, self.args = data, args
        self.seed = args.random_seed
        self.L, self.S, self.Q = args.max_seq_len, args.num_samples, args.num_query_set
        self.min_window = args.min_sub_window_size
        self.lengths = data.sequence_lengths()
        num_users = data.num_users()
        if num_users and self.lengths.min() < self.min_window + 1:
            raise MeloError(f"some users have fewer than min_sub_window_size + 1 = {self.min_window + 1} "
                            "ratings: load the data with the same flags as the task generation")
        self._pairs = {m: candidate_windows(m, self.min_window) for m in range(self.min_window, self.L)}
        self._val, self._test = None, None

        permutation = task_rng(self.seed, STREAM_SPLIT).permutation(num_users).astype(np.int64)
        rest = num_users - args.num_test_data
        num_val = min(max(1, int(round(args.val_fraction * rest))), rest - 1) if rest > 1 else max(rest, 0)
        if rest - num_val < 1:
            works = (f"--num_test_data={num_users - 2} at most works here, e.g. "
                     f"--num_test_data={max(1, num_users // 10)}" if num_users >= 3 else "no --num_test_data works")
            raise MeloError(
                f"data set has {num_users} users after filtering (min_item={args.min_item}, "
                f"min_sequence={effective_min_sequence(args)}); --num_test_data={args.num_test_data} leaves "
                f"{'no' if rest <= 0 else 'too few'} training/validation users (needs at least 2 more): "
                f"lower --num_test_data ({works}) or the filters")
        self.test_users = permutation[:args.num_test_data]
        self.val_users = permutation[args.num_test_data:args.num_test_data + num_val]
        self.train_users = permutation[args.num_test_data + num_val:]

    # ------------------------------------------------------------------ one task's random choices
    def _draw(self, rng, n, training):
        """(start, w, query lengths [Q], support a [k], support b [k]) of one task; the order of the
        draws is part of the reproducibility contract."""
        longest = min(n, self.L)
        if training and self.args.use_random_sequence_length:
            w = int(rng.integers(self.min_window + 1, longest + 1))
        else:
            w = longest
        start = int(rng.integers(0, n - w + 1)) if training else n - w
        query_lengths = rng.integers(self.min_window, w + 1, size=self.Q)
        a, b = self._pairs[w - 1]
        chosen = rng.choice(len(a), size=min(self.S, len(a)), replace=False)
        return start, w, query_lengths, a[chosen], b[chosen]

    def _build(self, users, rngs, training):
        """numpy arrays of the tasks of `users`, task k drawn from rngs[k]."""
        T, S, Q = len(users), self.S, self.Q
        support_end = np.zeros((T, S), np.int64)      # exclusive end, as an index into data.items
        support_len = np.zeros((T, S), np.int64)      # 0 = no window
        query_end = np.zeros((T, Q), np.int64)
        query_len = np.zeros((T, Q), np.int64)
        offsets, lengths = self.data.offsets, self.lengths
        for k, (u, rng) in enumerate(zip(users, rngs)):
            start, w, query_lengths, a, b = self._draw(rng, int(lengths[u]), training)
            base = int(offsets[u]) + start
            count = len(a)
            support_end[k, :count] = base + b
            support_len[k, :count] = b - a
            query_end[k] = base + w
            query_len[k] = query_lengths
        support = self._windows(support_end, support_len)
        query = self._windows(query_end, query_len)
        return support + (support_len > 0,) + query + (query_len > 0,) + (np.asarray(users, np.int64),)

    def _windows(self, end, length):
        """Left-padded [.., L] item and rating windows ending (exclusively) at `end`."""
        position = np.arange(self.L)
        index = end[..., None] - self.L + position
        real = position >= self.L - length[..., None]
        index = np.where(real, index, 0)
        items = np.where(real, self.data.items[index], 0)
        ratings = np.where(real, self.data.ratings[index],
                           np.float32(self.args.default_rating)).astype(np.float32)
        return items, ratings

    @staticmethod
    def _batch(arrays):
        return TaskBatch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))

    # ------------------------------------------------------------------ public
    def train_users_of(self, iteration):
        """Positions into train_users of the `batch_size` tasks of `iteration`."""
        count, size = len(self.train_users), self.args.batch_size
        return task_rng(self.seed, STREAM_TRAIN, iteration).choice(count, size, replace=size > count)

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
            users = self.val_users[:self.args.val_size]
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
            s_items, s_ratings, s_mask, q_items, q_ratings, q_mask, _ = self._build(users, rngs, True)
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


# ============================================================================ command line
def format_summary(summary, args):
    lines = [
        f"data            {args.mode}: {args.data_path}",
        f"filters         min_item={args.min_item}, min_sequence={effective_min_sequence(args)}",
        f"users           {summary['users']}",
        f"items           {summary['items']}",
        f"ratings         {summary['ratings']}",
        f"duplicates      {duplicates_note(summary['duplicates_dropped'], args)}",
        f"avg seq length  {summary['avg_seq_len']:.1f} (truncated to max_seq_len={summary['max_seq_len']}: "
        f"{summary['avg_seq_len_truncated']:.1f})",
        "rating distribution (value, count, share):",
    ]
    for value, count in summary["rating_counts"].items():
        lines.append(f"  {value:>4g}  {count:>10}  {100 * summary['rating_shares'][value]:5.1f}%")
    lines += [
        f"balance score   {summary['balance']:.3f} (mean normalised entropy of each user's rating values: "
        "1 = even, 0 = always one value)",
    ]
    if "test_users" in summary:
        lines.append(f"split (seed {args.random_seed})  train {summary['train_users']}, validation "
                     f"{summary['val_users']}, test {summary['test_users']} users")
    return "\n".join(lines)


def duplicates_note(dropped, args):
    """What happened to repeated (user, item) ratings, for the summary and the start of training."""
    if args.keep_duplicates:
        return "kept (--keep_duplicates=True)"
    return f"{dropped} repeated (user, item) ratings dropped, the latest kept (--keep_duplicates=True keeps them)"


def main(args):
    data = load_data(args)
    try:
        dataset = MetaDataset(data, args)
    except MeloError:  # no split with these flags: every figure of the data itself, then the reason
        print(format_summary(data_summary(data, args.max_seq_len), args), flush=True)
        raise
    print(format_summary(dataset.summary(), args))


if __name__ == "__main__":
    run_cli(main)
