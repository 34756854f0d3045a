"""Table files by extension: read one whole, scan one in chunks, append chunks to one.

The formats (CSV, TSV, Parquet, JSON lines; `.json` may also hold one JSON array of objects)
and their polars options are written here once:
`data` reads training tables through `read_table`, `inference` streams its input through
`scan_chunks` and writes scored rows with `TableWriter`. Every failure is a one-line
`SentimentError` naming the file. Nothing here knows what the columns mean.
"""

import codecs
import csv
import functools
import json
import os
import re
import shlex
import shutil

import polars as pl
from tqdm.auto import tqdm

from .errors import SentimentError, json_type, repeated_key, warn
from .files import did_you_mean, remove_stale_temporaries, replace_durably, temporary


def scan_json(path):
    """A `.json` file: one JSON array of objects (read whole), or JSON lines (streamed)."""
    if starts_with_bracket(path):
        return pl.read_json(path, infer_schema_length=None).lazy()
    return scan_json_lines(path)


def scan_json_lines(path):
    # The schema from every line, not the first hundred: a field first seen further down is a column too.
    return pl.scan_ndjson(check_line_ends(path), infer_schema_length=None)


def starts_with_bracket(path):
    with open(path, "rb") as f:
        return f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"[")


def scan_csv(path):
    """A `.csv` file, every column as text (a review of "1984" stays a string, labels stay names), after the
    `sep=,` line Excel may write first to name its separator, which would otherwise be read as the header."""
    separator = excel_separator(check_line_ends(path))
    if separator not in (None, ","):
        raise SentimentError(f"{path}: its first line, {f'sep={separator}'!r}, is a spreadsheet's note that its fields "
                             f"are separated by {separator!r}, not commas; save it as CSV with commas (CSV UTF-8), "
                             f"or with tabs as a .tsv file")
    return pl.scan_csv(path, infer_schema=False, skip_rows=1 if separator else 0)


def excel_separator(path):
    """The separator named by a first line of `sep=X` (as Excel writes it, and reads it), or None."""
    with open(path, "rb") as f:
        line = f.readline(64).removeprefix(codecs.BOM_UTF8).rstrip(b"\r\n")
    return chr(line[4]) if len(line) == 5 and line.startswith(b"sep=") and line[4] < 128 else None


SCANNERS = {
    ".csv": scan_csv,
    ".tsv": lambda path: pl.scan_csv(check_line_ends(path), separator="\t", infer_schema=False, quote_char=None),
    ".parquet": pl.scan_parquet,
    ".jsonl": scan_json_lines,
    ".ndjson": scan_json_lines,
    ".json": scan_json,
}
JSON_FORMATS = (".jsonl", ".ndjson", ".json")
TEXT_FORMATS = (".csv", ".tsv", *JSON_FORMATS)  # read as UTF-8


def extension(path):
    return os.path.splitext(str(path))[1].lower()


# Archives and compressed files, as downloads come (Kaggle's IMDb CSV is a .zip): what to run first.
UNPACK = {".zip": "unzip", ".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zst": "unzstd"}


def unknown_type(path, types):
    """The one-line error for a file of a type not read here, saying how to unpack a compressed one."""
    ext = extension(path)
    if ext in UNPACK:
        inside = "the table in it" if ext == ".zip" else os.path.splitext(str(path))[0]
        return SentimentError(f"{path}: a compressed file; unpack it first ({UNPACK[ext]} {path}) and name "
                              f"{inside}")
    typo = "" if os.path.exists(path) else did_you_mean(path)
    return SentimentError(f"{path}: unknown file type {ext or '(none)'}{typo}; use {types}")


def first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def scanner(path):
    """The lazy scan of a table file, after checking its type and that it is there (and, for a format of
    lines, its line ends)."""
    ext = extension(path)
    if ext not in SCANNERS:
        raise unknown_type(path, f"one of {', '.join(SCANNERS)}")
    existing_file(path)
    if ext in JSON_FORMATS:
        check_json_objects(path)
    scan = SCANNERS[ext](path)
    if ext in (".csv", ".tsv"):
        refuse_repeated_columns(path, scan)
    return scan


def check_line_ends(path):
    """`path`, once its lines are known not to end in a carriage return alone, as classic Mac OS programs and
    some spreadsheets' exports write them: polars reads such a CSV as one header of every line and no rows
    (`infer.py` scored nothing, and said nothing), and such a text file as one line."""
    with open(path, "rb") as f:
        start = f.read(1 << 16)
    # Counted, not looked for: a text may hold a stray carriage return, or a quoted line break.
    if start.count(b"\r") - start.count(b"\r\n") > start.count(b"\n"):
        stem, ext = os.path.splitext(str(path))
        raise SentimentError(f"{path}: its lines end in a carriage return alone (as classic Mac OS and some "
                             f"spreadsheet exports write them); convert them first: tr '\\r' '\\n' < "
                             f"{shlex.quote(str(path))} > {shlex.quote(stem + '-lf' + ext)}")
    return path


def refuse_repeated_columns(path, scan):
    """A header that names a column twice: polars renames the second to NAME_duplicated_0, and which of
    the two holds the texts or labels would be a guess."""
    names = scan.collect_schema().names()
    repeated = sorted({m[1] for m in (re.fullmatch(r"(.+)_duplicated_\d+", n) for n in names) if m and m[1] in names})
    if repeated:
        raise SentimentError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once; give "
                             f"each column its own name")


class RepeatedKey(ValueError):
    pass


def one_of_each(pairs):
    """json's object_pairs_hook: refuse an object that names a key twice."""
    key = repeated_key(pairs)
    if key is not None:
        raise RepeatedKey(key)
    return dict(pairs)


def check_json_objects(path):
    """Refuse, before polars reads them, JSON objects no two readers agree on or that polars cannot be trusted with.
    An object that names a key twice, as JSON allows and JSON writers do not: polars keeps the first value,
    Python's json the last, and which one holds the text or label would be a guess, as with a header that names a
    column twice. Arrays and objects nested more than MAX_DEPTH deep. Every line is parsed once more in Python
    (0.5 s for the 34 MB of 25,000 IMDb reviews, where tokenising them takes seconds); a scan that runs twice
    (counting rows, then reading them) checks once."""
    stat = os.stat(path)
    problem = json_objects_problem(path, stat.st_size, stat.st_mtime_ns)
    if problem:
        raise SentimentError(f"{path}: {problem}")


# Levels of arrays and objects a row may nest, itself included. Polars' time to read nested lists grows about as
# the cube of their depth (2.1, 4,000 lines: 0.8 s at 16 levels, 5 s at 32, 34 s at 64; 40 lines: 158 s at 512),
# and polars 1.37 crashes the process (a stack overflow in its Rust code) at about 990.
MAX_DEPTH = 32


def deeper_than(value, limit):
    """Whether `value` nests lists and dicts more than `limit` levels deep, itself the first; without recursion."""
    pending = [(value, 1)]
    while pending:
        value, level = pending.pop()
        if isinstance(value, (dict, list)):
            if level > limit:
                return True
            pending.extend((inner, level + 1) for inner in (value.values() if isinstance(value, dict) else value))
    return False


def twice(where, key):
    shown = repr(key) if len(key) <= 40 else repr(key[:40])[:-1] + "…'"  # a key can be a megabyte
    return f"{where} names {shown} twice (polars reads the first value, other tools the last); keep one of them"


def too_deep(path, line=None):
    """The refusal of JSON nested too deep: on line `line` of JSON lines, or anywhere in one array (None)."""
    where, flatten = (f"line {line} nests", "it") if line else ("it nests", "them")
    return (f"could not read it as {extension(path)[1:].upper()}: {where} arrays or objects more than {MAX_DEPTH} "
            f"levels deep, which takes polars minutes to read or crashes it; flatten {flatten}")


# JSON lines from this size on are checked under a progress bar: at about 80 MB/s, seconds of waiting otherwise.
CHECK_BAR_BYTES = 256 << 20


@functools.lru_cache(maxsize=8)
def json_objects_problem(path, size, mtime_ns):
    """What `check_json_objects` refuses in the JSON file `path`, said in words, or None. Lines that are not valid
    JSON are passed over: reading them says what is wrong with them (`where_broken`)."""
    # One bar for the processes of an `accelerate launch`, which each read the file.
    quiet = size < CHECK_BAR_BYTES or os.environ.get("RANK", "0") != "0"
    with open(path, "rb") as f, tqdm(total=size, desc=f"checking the objects in {os.path.basename(path)}",
                                     unit="B", unit_scale=True, leave=False, disable=quiet) as bar:
        if starts_with_bracket(path):  # one array: read whole by polars too
            try:
                rows = json.loads(f.read().removeprefix(codecs.BOM_UTF8), object_pairs_hook=one_of_each)
            except RepeatedKey as err:
                return twice("an object in its array", err.args[0])
            except RecursionError:  # nested deeper than Python's json goes (about 1,000 levels)
                return too_deep(path)
            except ValueError:
                return None
            return too_deep(path) if deeper_than(rows, MAX_DEPTH + 1) else None
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line, object_pairs_hook=one_of_each)
                # Walked only where the line has enough brackets to nest that deep: most lines have two.
                if line.count(b"[") + line.count(b"{") > MAX_DEPTH and deeper_than(row, MAX_DEPTH):
                    return too_deep(path, number)
            except RepeatedKey as err:
                return twice(f"an object on line {number}", err.args[0])
            except RecursionError:
                return too_deep(path, number)
            except ValueError:
                pass
            if number % 1024 == 0:
                bar.update(f.tell() - bar.n)
    return None


def existing_file(path):
    """`path`, once it is known to be a file, and not a compressed one: a folder, a missing path or packed
    bytes are a one-line error."""
    if os.path.isdir(path):
        raise SentimentError(f"{path}: a folder, not a file; name the file in it")
    if os.path.exists(path) and not os.path.isfile(path):  # read twice (columns, then rows): a pipe empties
        raise SentimentError(f"{path}: a named pipe or device, not a file; save what it gives to a file first")
    if not os.path.isfile(path):
        raise SentimentError(f"{path}: no such file{did_you_mean(path)}")
    packed = compression(path)
    if packed:
        kind, unpack = packed
        stem, ext = os.path.splitext(str(path))
        raise SentimentError(f"{path}: its bytes are {kind}-compressed, though it is named {ext or 'without a type'}; "
                             f"unpack it first: {unpack} {shlex.quote(str(path))} > "
                             f"{shlex.quote(stem + '-unpacked' + ext)}")
    return path


# How compressed files start, whatever their names (a download saved as .csv, a .gz renamed): what it is, and
# what unpacks it to standard output. Read as text, their bytes were taken for lines ending in carriage
# returns alone, or for text in another encoding.
COMPRESSED = ((re.compile(rb"\x1f\x8b"), "gzip", "gunzip -c"), (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2", "bunzip2 -c"),
              (re.compile(rb"\xfd7zXZ\x00"), "xz", "unxz -c"), (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd", "unzstd -c"))


def compression(path):
    """(kind, command to unpack) for a file whose bytes are compressed, else None."""
    with open(path, "rb") as f:
        start = f.read(10)
    return next(((kind, unpack) for magic, kind, unpack in COMPRESSED if magic.match(start)), None)


def where_broken(path, err):
    """What went wrong reading `path`: an empty file, text that is not UTF-8, or the line where JSON lines
    break (polars names none of them)."""
    if is_empty(path):
        return "the file is empty"
    if extension(path) in TEXT_FORMATS:
        problem = not_utf8(path)
        if problem:
            return problem
    if extension(path) in (".csv", ".tsv"):
        problem = ragged_row(path)
        if problem:
            return problem
    if extension(path) in JSON_FORMATS and starts_with_bracket(path):
        if extension(path) == ".json":  # polars says "Syntax at character 0" wherever the array breaks
            try:
                with open(path, encoding="utf-8-sig") as f:
                    rows = json.load(f, parse_constant=not_json)
            except ValueError as bad:
                where = f"line {bad.lineno}, column {bad.colno}" if hasattr(bad, "lineno") else "it"
                return f"{where} is not valid JSON ({getattr(bad, 'msg', bad)})"
            except RecursionError:
                return "it nests arrays or objects too deeply to be read; flatten them"
            other = next(((i, row) for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
            if other:
                return (f"item {other[0]} of its array is a JSON {json_type(other[1])}, not an object: a .json file "
                        f"holds one array of objects, such as [{{\"review\": \"…\"}}]")
            return first_line(err)
        return "it is one JSON array, not JSON lines (one object a line); name it .json, or convert it (jq -c '.[]')"
    if extension(path) in JSON_FORMATS:
        with open(path, "rb") as f:
            if f.read(3) == codecs.BOM_UTF8:  # as Windows editors save UTF-8; polars reads JSON lines without
                return (f"it starts with a byte-order mark, which JSON lines may not; save it as UTF-8 without one "
                        f"(e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {path})")
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        value = json.loads(line, parse_constant=not_json)
                    except ValueError as bad:
                        return f"line {number} is not valid JSON ({getattr(bad, 'msg', bad)})"
                    except RecursionError:  # where polars stops too (DepthLimitExceeded), without a line
                        return f"line {number} nests arrays or objects too deeply to be read; flatten it"
                    if not isinstance(value, dict):
                        return (f"line {number} holds a JSON {json_type(value)}, not an object: JSON lines hold one "
                                f"object a line, such as {{\"review\": \"…\"}}")
    return first_line(err)


def not_json(constant):
    """Python's json reads NaN and Infinity; polars, rightly, does not."""
    raise ValueError(f"{constant} is not JSON; write null or a number")


def is_empty(path):
    """Whether the file holds nothing but white space (and a byte-order mark)."""
    with open(path, "rb") as f:
        return not f.read(1 << 16).lstrip(codecs.BOM_UTF8).strip() and not f.read(1)


def ragged_row(path):
    """The first row of a CSV or TSV file with more fields than its header, or whose quotes do not close
    where they should (polars names neither); None when there is none."""
    tsv = extension(path) == ".tsv"
    advice = ("a text may not hold a tab in TSV (it has no quoting); replace its tabs with spaces" if tsv
              else "put a text that holds a comma in double quotes")
    skipped = 1 if not tsv and excel_separator(path) else 0  # a `sep=,` line, as `scan_csv` leaves out
    with open(path, encoding="utf-8-sig", newline="") as f:
        for _ in range(skipped):
            f.readline()
        reader = csv.reader(f, delimiter="\t" if tsv else ",", strict=True,
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        width, row, line = None, 0, 1 + skipped
        try:
            for row, fields in enumerate(reader):  # row 0 is the header
                if width is None:
                    width = len(fields)
                elif len(fields) > width:
                    return (f"data row {row} (line {line}) has {len(fields)} fields where the header has {width}; "
                            f"{advice}")
                line = reader.line_num + 1 + skipped
        except csv.Error as bad:
            where = f"the header (line {line})" if width is None else f"data row {row + 1} (from line {line})"
            return (f"{where} has a quote that does not close where it should ({bad}); a quote inside a quoted "
                    f"text is written twice (\"\")")
    return None


def garbled_header(path, columns):
    """Why the columns polars read from `path` hold what no header would (replaced bytes, control
    characters): it is binary, or text that is not UTF-8. None when they do not, or `path` is no file."""
    garbled = any(c == "\ufffd" or (c < " " and c != "\t") for name in columns for c in name)
    return not_utf8(path) if garbled and os.path.isfile(str(path)) else None


def not_utf8(path):
    """Why `path` is not UTF-8 text, naming the first bad line; None when it is."""
    with open(path, "rb") as f:
        start = f.read(4)
        if start[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            return "it is UTF-16 text; save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"
        if start == b"PK\x03\x04":
            return "it is a zip archive, not text (an .xlsx spreadsheet is one); save the sheet as CSV"
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number} is not valid UTF-8; convert the file (e.g. iconv -f latin1 -t utf-8)"
            if b"\0" in line:
                return f"line {number} holds NUL bytes, as UTF-16 text does; save the file as UTF-8"
    return None


def read_table(path):
    """The whole table in `path`."""
    try:
        return scanner(path).collect()
    except (pl.exceptions.PolarsError, OSError, ValueError) as err:
        raise SentimentError(f"{path}: could not read it as {extension(path)[1:].upper()}: {where_broken(path, err)}"
                             ) from None


def scan_chunks(path, chunk_rows):
    """Frames of at most about `chunk_rows` rows, in file order."""
    rows = 0
    try:
        for frame in scanner(path).collect_batches(chunk_size=chunk_rows):
            rows += len(frame)
            yield frame
    except (pl.exceptions.PolarsError, OSError) as err:
        where = f"could not read past row {rows}" if rows else "could not read it"
        raise SentimentError(f"{path}: {where}: {where_broken(path, err)}") from None


def row_count(path):
    """The rows of a table file, for a progress bar's total; None where counting would mean reading a
    JSON array whole once more, or the file does not count (its error comes when it is read)."""
    if extension(path) == ".json":
        return None
    try:
        return scanner(path).select(pl.len()).collect().item()  # 0.07 s for the 25k IMDb reviews' CSV
    except (pl.exceptions.PolarsError, OSError, SentimentError):
        return None


def writable(path, flag, source=None, model=None):
    """Refuse, in one line, an output path that cannot be written, that is the input itself, or that
    would overwrite a file of the model folder being read."""
    folder = os.path.dirname(os.path.realpath(path))  # a link's file is written, in the folder it names
    if os.path.isdir(path):
        raise SentimentError(f"{flag} {path} is a folder; name a file in it")
    if os.path.exists(path) and not os.path.isfile(path):  # the rename would replace the pipe, not feed it
        rows = " (without --output, the rows go to standard output as JSON lines)" if flag == "--output" else ""
        raise SentimentError(f"{flag} {path}: a named pipe or device, not a file; name a file{rows}")
    if not os.path.isdir(folder):
        raise SentimentError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise SentimentError(f"{flag} {path}: the folder {folder} is not writable")
    if os.path.isfile(path) and not os.access(path, os.W_OK):  # the rename would replace it all the same
        raise SentimentError(f"{flag} {path} is read-only, as if kept from being overwritten; make it writable "
                             f"(chmod u+w) to replace it, or write to another file")
    if source and source != "-" and (os.path.abspath(source) == os.path.abspath(path) or (
            os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path))):
        raise SentimentError(f"{flag} {path} is the input file; write to another file, then rename it")
    if model and os.path.isdir(model) and os.path.exists(path) and \
            os.path.commonpath([os.path.realpath(model), os.path.realpath(path)]) == os.path.realpath(model):
        raise SentimentError(f"{flag} {path} would overwrite a file of the model folder {model}; write elsewhere")


def holds(dtype, kind):
    """Whether `dtype` is `kind` (pl.Binary, say) or a list, array or struct with one inside."""
    if dtype.base_type() == kind:
        return True
    if isinstance(dtype, (pl.List, pl.Array)):
        return holds(dtype.inner, kind)
    return isinstance(dtype, pl.Struct) and any(holds(field.dtype, kind) for field in dtype.fields)


def check_writable_columns(frame, path):
    """Refuse an output of a format that cannot hold one of `frame`'s columns (bytes in text, durations in
    CSV): polars failed on the first chunk written, with a traceback or a panic."""
    ext = extension(path)
    for name, dtype in frame.schema.items():
        if ext != ".parquet" and holds(dtype, pl.Binary):
            cannot, instead = "bytes", ".parquet"
        elif ext in (".csv", ".tsv") and dtype.base_type() == pl.Duration:
            cannot, instead = "durations", ".parquet or .jsonl"
        else:
            continue
        raise SentimentError(f"--output {path}: the input's column {name!r} holds {cannot} ({dtype}), which "
                             f"{ext[1:].upper()} cannot hold; write {instead}, or leave the column out of the input")


def nested_as_json(frame):
    """`frame` with each nested column (objects and lists of a JSON-lines input) as JSON text, which CSV can hold."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.when(pl.col(name).is_not_null())
        .then(pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.head(-1))  # {"v":…}
        .alias(name) for name in nested)


def tsv_names(columns):
    """{name: the name TSV can hold}: tabs and line breaks as spaces, as in its values. Two columns whose
    names would then be one are refused (`score_and_report` asks before the model loads)."""
    names, named = {}, {}  # named: each safe name's column
    for name in columns:
        safe = re.sub(r"[\t\r\n]", " ", name)
        if safe in named:
            raise SentimentError(f"columns {named[safe]!r} and {name!r} would have one name in TSV, which cannot "
                                 f"hold tabs or line breaks; rename one, or write .csv, .parquet or .jsonl")
        names[name], named[safe] = safe, name
    return names


def tsv_safe(frame):
    """`frame` with tabs and line breaks in its text and its column names turned into spaces, as TSV has no
    quoting to hold them, and how many values that changed."""
    frame = frame.rename(tsv_names(frame.columns))
    text = [name for name, dtype in frame.schema.items() if isinstance(dtype, (pl.String, pl.Categorical, pl.Enum))]
    if not text:
        return frame, 0
    frame = frame.with_columns(pl.col(text).cast(pl.String))
    changed = frame.select(pl.col(text).str.contains(r"[\t\r\n]").fill_null(False).sum()).sum_horizontal().item()
    return frame.with_columns(pl.col(text).str.replace_all(r"[\t\r\n]", " ")), changed


class TableWriter:
    """Appends frames to a temporary file beside `path` that `close()` renames into place, so a run
    that fails leaves an existing file as it was; Parquet goes through parts joined at the end, and
    `.json` is one array, its objects written a chunk at a time between brackets. A link is written
    through: the file it points to is replaced, and the link stays."""

    def __init__(self, path):
        self.path, self.target = path, os.path.realpath(path)
        self.ext = extension(path)  # one of SCANNERS: checked before the model loads (inference.score_and_report)
        remove_stale_temporaries(self.target)  # what a run killed outright (SIGKILL, out of memory) left
        self.tmp = temporary(self.target, hidden=True)
        self.parts = self.tmp + ".parts"
        self.count, self.flattened, self.renamed, self.objects = 0, 0, 0, 0

    def start(self):
        """Create the temporary file at the first write, in the caller's `try` whose `finally` calls
        `abort`: a signal between creating the writer and entering that block left the file behind."""
        if self.ext == ".parquet":
            os.makedirs(self.parts)
        else:
            with open(self.tmp, "w") as f:
                f.write("[" if self.ext == ".json" else "")

    def write(self, frame):
        if self.count == 0:
            self.start()
        if self.ext == ".parquet":
            frame.write_parquet(os.path.join(self.parts, f"part-{self.count:06d}.parquet"))
        else:
            with open(self.tmp, "a", encoding="utf-8") as f:
                if self.ext == ".csv":
                    frame.pipe(nested_as_json).write_csv(f, include_header=self.count == 0)
                elif self.ext == ".tsv":  # no quoting, as TSV is read (tables.SCANNERS)
                    if self.count == 0:  # the header's names, changed like the values
                        self.renamed = sum(name != safe for name, safe in tsv_names(frame.columns).items())
                    frame, changed = tsv_safe(frame.pipe(nested_as_json))
                    self.flattened += changed
                    frame.write_csv(f, include_header=self.count == 0, separator="\t", quote_style="never")
                elif self.ext == ".json":  # one object a line, as JSON lines, with commas between
                    objects = frame.write_ndjson().split("\n")[:-1]  # not splitlines: U+2028 is a line to it
                    if objects:
                        f.write(("," if self.objects else "") + "\n" + ",\n".join(objects))
                        self.objects += len(objects)
                else:
                    frame.write_ndjson(f)
        self.count += 1

    def close(self):
        """Every row is written: put the file in place."""
        if self.ext == ".parquet":
            pl.scan_parquet(os.path.join(self.parts, "*.parquet")).sink_parquet(self.tmp)
            shutil.rmtree(self.parts)
        elif self.ext == ".json":
            with open(self.tmp, "a") as f:
                f.write("\n]\n")
        replace_durably(self.tmp, self.target)
        what = [f"{n} {kind}" for n, kind in ((self.flattened, "values"), (self.renamed, "column names")) if n]
        if what:
            warn(f"{' and '.join(what)} held tabs or line breaks, which TSV cannot hold; they are spaces in "
                 f"{self.path} (.csv, .parquet or .jsonl keep them)")

    def abort(self):
        """Remove what an unfinished run wrote (nothing is left after `close`)."""
        shutil.rmtree(self.parts, ignore_errors=True)
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
