"""Reading ratings files: one function per file format (READERS), each checking what it reads and
refusing a bad file with one line that names the file, the line and what to do.

`read_ratings(path, mode, columns)` picks the format from --mode (and, for Yelp, the file's first
character) and returns the raw (users, items, ratings float32, timestamps int64) in file order;
ratings/preprocess.py filters and re-indexes them, ratings/tasks.py splits them and makes tasks.
"""
import csv
import io
import json

import numpy as np
import pandas as pd

from common.errors import MeloError

MAX_RATING = 5.0  # the rating scale's maximum for every supported data set
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1  # timestamps are int64 unix seconds


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
                if not INT64_MIN <= int(value) <= INT64_MAX:
                    return (f"{name} {value} does not fit the 64-bit integers MELO stores ids in: number the "
                            f"{name.split()[0]}s anew")
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
        for name in ("user", "item"):  # an unsigned column beyond int64 would wrap to negative ids
            column = frame[name]
            if column.dtype.kind == "u" and column.max() > INT64_MAX:
                raise _diagnose(path, fmt, skip_rows, row=int(np.argmax(column.to_numpy() > INT64_MAX)))
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


def read_movielens(path, mode, columns=""):
    """GroupLens' ratings.dat ('::'-separated, ML-1M / ML-10M) or u.data (tab-separated, ML-100K)."""
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


def read_csv_ratings(path, mode, columns=""):
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


def read_yelp_json(path, mode="yelp", columns="", chunk_rows=200_000):
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
    return READERS[file_format(path, mode)](path, mode, columns)


def file_format(path, mode):
    """The key of READERS that reads `path` for --mode `mode`: Yelp's reviews come as JSON lines or CSV."""
    if mode in ("ml-1m", "ml-10m", "ml-100k"):
        return "movielens"
    if mode not in ("amazon", "yelp"):
        raise MeloError(f"unknown --mode {mode!r}")
    _, first = _first_line(path)
    if first is None:
        raise _fail(path, None, "the file is empty")
    return "yelp-json" if mode == "yelp" and first.lstrip().startswith("{") else "csv"


# One function per file format, each (path, mode, columns) → (users, items, ratings float32, timestamps
# int64) in file order.
READERS = {"movielens": read_movielens, "csv": read_csv_ratings, "yelp-json": read_yelp_json}
