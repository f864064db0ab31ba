"""Smoke test of the benchmark runner: two scenarios at minimal size through the runner's own
functions, checking the result structure and that the figures are real measurements."""

from __future__ import annotations

import math

import pytest

from bench import ingest, rtu
from bench.__main__ import markdown, table
from bench.common import Result, Size, median_result


@pytest.mark.e2e  # the report asks `mosquitto -h` for its version
async def test_ingest_and_rtu_figures_and_report(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ingest, "rows", lambda n, devices=50, _rows=ingest.rows: _rows(2_000))
    result = median_result([await ingest.run(Size(quick=True, repeats=1)) for _ in range(2)])
    assert result.scenario == "ingest" and result.runs == 2
    gw = result.figure("Store.add_readings")
    assert gw.value is not None and gw.value > 0 and gw.target == ">= 100000"
    assert gw.ok is (gw.value >= 100_000)
    assert result.figure("ratio gateway/raw").value is not None

    paper = rtu.paper_table()
    # FC03 of 10 registers at 9600 baud with 20 ms turnaround: about 66 ms a request (PITFALLS).
    row = next(r for r in paper if r["baudrate"] == 9600 and r["registers"] == 10)
    assert math.isclose(row["cycle_ms"], 66, abs_tol=2)

    lines = table(result)
    assert lines[0].startswith("3. Ingest") and any("Store.add_readings" in x for x in lines)
    text = markdown([result], True, {"poll": "Traceback: boom"}, 1.0, (101.4, 98.6))
    assert "## Machine" in text and "pymodbus" in text and "poll: FAILED" in text
    assert "101 ms at the start, 99 ms at the end" in text


def test_median_rechecks_targets() -> None:
    runs = []
    for value in (10.0, 30.0, 20.0):
        r = Result("x", "x")
        r.add("rate", value, "1/s", at_least=15)
        runs.append(r)
    med = median_result(runs)
    assert med.figure("rate").value == 20.0 and med.figure("rate").ok is True
