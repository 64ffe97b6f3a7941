from __future__ import annotations

import json
from pathlib import Path

import pytest

from aegaeon.cli import main
from aegaeon.sim.trace import write_trace
from aegaeon.sim.workload import Arrival

SMALL = ["--models", "6", "--rate", "0.5", "--duration", "30", "--gpus", "4"]


def test_simulate_json_has_one_result_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    main(["simulate", *SMALL, "--json"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["policy"] for r in results] == ["aegaeon", "dedicated", "serverless", "mux"]
    for r in results:
        assert 0.0 <= r["attainment"] <= 1.0 and 0.0 <= r["strict_attainment"] <= 1.0
        assert set(r["ttft_s"]) == {"p50", "p90", "p99"} and set(r["tbt_s"]) == {"p50", "p90", "p99"}
        assert r["gpus"] == 4 and r["models"] == 6
        assert 0.0 <= r["gpu_utilisation"] <= 1.0
        assert r["requests"] == r["finished"] + r["failed"] + r["unfinished"]


def test_simulate_table_and_trace_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "w.csv"
    main(["simulate", *SMALL, "--policy", "aegaeon", "--save-trace", str(trace)])
    table = capsys.readouterr().out
    assert "aegaeon" in table and "attain" in table
    main(["simulate", "--trace", str(trace), "--gpus", "4", "--policy", "aegaeon", "--json"])
    again = json.loads(capsys.readouterr().out)["results"][0]
    assert again["models"] == 6


def test_sweep_prints_a_table_and_draws_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sweep.png"
    main(
        [
            "simulate",
            "--sweep",
            "models",
            "--values",
            "2",
            "4",
            "--duration",
            "20",
            "--gpus",
            "2",
            "--policy",
            "aegaeon",
            "dedicated",
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert "sustained" in out and png.stat().st_size > 1000


def test_plan_on_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [Arrival(0.5 * i, f"m{i % 3}", 200, 50) for i in range(30)])
    main(["plan", "--trace", str(trace), "--policy", "dedicated", "aegaeon", "--json", "--max-gpus", "8"])
    plans = {p["policy"]: p for p in json.loads(capsys.readouterr().out)["plans"]}
    assert plans["dedicated"]["gpus"] == 3
    assert 1 <= plans["aegaeon"]["gpus"] <= 3


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,model\n1,a\n")
    with pytest.raises(SystemExit, match="header lacks input_tokens"):
        main(["simulate", "--trace", str(bad)])
    with pytest.raises(SystemExit, match="needs --values"):
        main(["simulate", "--sweep", "models"])
    with pytest.raises(SystemExit, match="unknown GPU"):
        main(["simulate", "--gpu", "TPU", "--models", "2", "--duration", "5"])


def test_simulate_takes_a_tensor_parallel_size_and_node_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    common = [
        "simulate",
        "--kinds",
        "Qwen2.5-72B",
        "--models",
        "2",
        "--duration",
        "30",
        "--policy",
        "aegaeon",
    ]
    main([*common, "--node-devices", "8", "4", "--json"])
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["gpus"] == 12 and result["layout"] == "1P+1D TP4 + 1C TP4"
    main([*common, "--gpus", "16", "--tensor-parallel-size", "8", "--json"])
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["gpus"] == 16 and result["layout"] == "1C TP8 + 1C TP8"
    with pytest.raises(SystemExit, match="does not split into instances of 4"):
        main([*common, "--node-devices", "6"])
