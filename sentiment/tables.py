"""Table files by extension: read one whole, scan one in chunks, append chunks to one.

The formats (CSV, TSV, Parquet, JSON lines) and their polars options are written here once:
`data` reads training tables through `read_table`, `inference` streams its input through
`scan_chunks` and writes scored rows with `TableWriter`. Every failure is a one-line
`SentimentError` naming the file. Nothing here knows what the columns mean.
"""

import os
import shutil

import polars as pl

from .errors import SentimentError

# Every column is read as text: a review of "1984" stays a string, labels stay names.
SCANNERS = {
    ".csv": lambda path: pl.scan_csv(path, infer_schema=False),
    ".tsv": lambda path: pl.scan_csv(path, separator="\t", infer_schema=False, quote_char=None),
    ".parquet": pl.scan_parquet,
    ".jsonl": pl.scan_ndjson,
    ".ndjson": pl.scan_ndjson,
    ".json": pl.scan_ndjson,
}


def extension(path):
    return os.path.splitext(str(path))[1].lower()


def first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def scanner(path):
    """The lazy scan of a table file, after checking its type and that it is there."""
    ext = extension(path)
    if ext not in SCANNERS:
        raise SentimentError(f"{path}: unknown file type {ext or '(none)'}; use one of {', '.join(SCANNERS)}")
    if not os.path.isfile(path):
        raise SentimentError(f"{path}: no such file")
    return SCANNERS[ext](path)


def read_table(path):
    """The whole table in `path`."""
    try:
        return scanner(path).collect()
    except (pl.exceptions.PolarsError, OSError, ValueError) as err:
        raise SentimentError(f"{path}: could not read it as {extension(path)[1:].upper()}: {first_line(err)}") from None


def scan_chunks(path, chunk_rows):
    """Frames of at most about `chunk_rows` rows, in file order."""
    rows = 0
    try:
        for frame in scanner(path).collect_batches(chunk_size=chunk_rows):
            rows += len(frame)
            yield frame
    except (pl.exceptions.PolarsError, OSError) as err:
        raise SentimentError(f"{path}: could not read past row {rows}: {first_line(err)}") from None


class TableWriter:
    """Appends frames to one output file; Parquet goes through parts joined at the end."""

    def __init__(self, path):
        self.path = path
        self.ext = extension(path)
        if self.ext not in SCANNERS:
            raise SentimentError(f"--output {path}: unknown file type; use one of {', '.join(SCANNERS)}")
        self.parts = path + ".parts"
        self.count = 0
        if self.ext == ".parquet":
            shutil.rmtree(self.parts, ignore_errors=True)
            os.makedirs(self.parts)
        else:
            open(path, "w").close()

    def write(self, frame):
        if self.ext == ".parquet":
            frame.write_parquet(os.path.join(self.parts, f"part-{self.count:06d}.parquet"))
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                if self.ext in (".csv", ".tsv"):
                    frame.write_csv(f, include_header=self.count == 0, separator="\t" if self.ext == ".tsv" else ",")
                else:
                    frame.write_ndjson(f)
        self.count += 1

    def close(self):
        if self.ext == ".parquet":
            pl.scan_parquet(os.path.join(self.parts, "*.parquet")).sink_parquet(self.path)
            shutil.rmtree(self.parts)
