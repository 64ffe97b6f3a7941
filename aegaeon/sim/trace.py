"""Trace files: one request per row with its arrival time, model, and input and output tokens.

CSV (a header row naming the columns) or JSON Lines (one object per line); the format is taken from
the file's suffix (`.csv`, `.jsonl` / `.ndjson`). Columns, in any order (others are ignored):

    arrival_s      seconds from the start of the trace (>= 0)
    model          the model's name
    input_tokens   prompt length (>= 1)
    output_tokens  tokens to generate (>= 1)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from aegaeon.sim.workload import Arrival

COLUMNS = ("arrival_s", "model", "input_tokens", "output_tokens")
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    known = ", ".join(CSV_SUFFIXES + JSONL_SUFFIXES)
    raise TraceError(f"{path}: unknown trace format {suffix!r} (name the file with one of: {known})")


def _row_to_arrival(row: Mapping, where: str) -> Arrival:
    missing = [c for c in COLUMNS if c not in row or row[c] in (None, "")]
    if missing:
        raise TraceError(f"{where}: missing {', '.join(missing)} (each row needs {', '.join(COLUMNS)})")
    try:
        arrival_s = float(row["arrival_s"])
    except (TypeError, ValueError):
        raise TraceError(
            f"{where}: arrival_s must be a number of seconds, got {row['arrival_s']!r}"
        ) from None
    if not arrival_s >= 0:  # also refuses NaN
        raise TraceError(f"{where}: arrival_s must be >= 0, got {row['arrival_s']!r}")
    counts = {}
    for column in ("input_tokens", "output_tokens"):
        value = row[column]
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TraceError(f"{where}: {column} must be a whole number, got {value!r}") from None
        if number != int(number) or number < 1:
            raise TraceError(f"{where}: {column} must be a whole number >= 1, got {value!r}")
        counts[column] = int(number)
    model = str(row["model"]).strip()
    if not model:
        raise TraceError(f"{where}: model is empty")
    return Arrival(arrival_s, model, counts["input_tokens"], counts["output_tokens"])


def _csv_rows(path: Path) -> Iterator[tuple[str, Mapping]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise TraceError(f"{path}: empty file (expected a header row: {','.join(COLUMNS)})")
        absent = [c for c in COLUMNS if c not in reader.fieldnames]
        if absent:
            raise TraceError(
                f"{path}: header lacks {', '.join(absent)} (found {', '.join(reader.fieldnames)}; "
                f"expected {','.join(COLUMNS)})"
            )
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Mapping]]:
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TraceError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{where}: expected a JSON object with {', '.join(COLUMNS)}")
            yield where, row


def read_trace(path: str | Path) -> list[Arrival]:
    """The arrivals of a trace file, sorted by time; TraceError on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    rows = _csv_rows(path) if _format(path) == "csv" else _jsonl_rows(path)
    arrivals = [_row_to_arrival(row, where) for where, row in rows]
    if not arrivals:
        raise TraceError(f"{path}: the trace has no requests")
    arrivals.sort(key=lambda a: (a.arrival_s, a.model))
    return arrivals


def write_trace(path: str | Path, arrivals: Iterable[Arrival]) -> None:
    """Write arrivals as CSV or JSON Lines (by the suffix)."""
    path = Path(path)
    fmt = _format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if fmt == "csv":
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for a in arrivals:
                writer.writerow((f"{a.arrival_s:.6f}", a.model, a.input_tokens, a.output_tokens))
        else:
            for a in arrivals:
                values = (round(a.arrival_s, 6), a.model, a.input_tokens, a.output_tokens)
                row = dict(zip(COLUMNS, values, strict=True))
                f.write(json.dumps(row) + "\n")


def trace_duration_s(arrivals: Sequence[Arrival]) -> float:
    """From time 0 to the last arrival."""
    return max((a.arrival_s for a in arrivals), default=0.0)
