from __future__ import annotations

from pathlib import Path

import pytest

from aegaeon.sim.trace import TraceError, read_trace, write_trace
from aegaeon.sim.workload import Arrival

ROWS = [Arrival(0.5, "a", 100, 20), Arrival(0.25, "b", 7, 3)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_sorted_by_time(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"trace{suffix}"
    write_trace(path, ROWS)
    assert read_trace(path) == sorted(ROWS, key=lambda a: a.arrival_s)


def test_csv_columns_in_any_order_and_extra_columns_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("model,output_tokens,note,input_tokens,arrival_s\nx,5,hi,9,1.5\n")
    assert read_trace(path) == [Arrival(1.5, "x", 9, 5)]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("t.csv", "", "empty file"),
        ("t.csv", "arrival_s,model,input_tokens\n1,a,3\n", "header lacks output_tokens"),
        (
            "t.csv",
            "arrival_s,model,input_tokens,output_tokens\n1,a,3,5\nsoon,a,3,5\n",
            r"t\.csv:3: arrival_s",
        ),
        (
            "t.csv",
            "arrival_s,model,input_tokens,output_tokens\n1,a,3.5,5\n",
            "input_tokens must be a whole number",
        ),
        (
            "t.csv",
            "arrival_s,model,input_tokens,output_tokens\n1,a,3,0\n",
            r"output_tokens must be a whole number >= 1",
        ),
        ("t.csv", "arrival_s,model,input_tokens,output_tokens\n-1,a,3,5\n", "arrival_s must be >= 0"),
        ("t.csv", "arrival_s,model,input_tokens,output_tokens\n1,,3,5\n", "missing model"),
        (
            "t.jsonl",
            '{"arrival_s": 1, "model": "a", "input_tokens": 3, "output_tokens": 5}\n{oops\n',
            r"t\.jsonl:2: not valid JSON",
        ),
        ("t.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("t.jsonl", '{"arrival_s": 1, "model": "a"}\n', "missing input_tokens, output_tokens"),
        ("t.jsonl", "\n\n", "no requests"),
        ("t.txt", "x", "unknown trace format"),
    ],
)
def test_malformed_traces_say_where_and_what(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "absent.csv")
