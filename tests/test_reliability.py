"""The fault matrix, CI-sized: every fault kind once against the real gateway process, a real
mosquitto behind the fault proxy, the simulator on Modbus TCP and RTU (pty), a persistent cloud
subscriber. The long runs (``python -m tests.reliability --cycles N``, ``--soak``) are recorded in
docs/RELIABILITY.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability import matrix


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not os.access("/usr/sbin/mosquitto", os.X_OK), reason="needs mosquitto")
async def test_fault_matrix_loses_nothing(tmp_path: Path) -> None:
    faults = list(matrix.FAULTS)
    skipped = []
    if not matrix.faketime_available():
        skipped.append("clock-jump")
    if not matrix.can_mount_tmpfs():
        skipped.append("disk-full")
    faults = [f for f in faults if f not in skipped]
    result = await matrix.run_matrix(faults, 1, seed=13, workdir=tmp_path / "run", quick=True)
    print(result.table())
    if skipped:
        print(f"skipped (needs root / libfaketime): {', '.join(skipped)}")
    assert result.ok, "\n".join(result.problems)
    by_fault = {p.fault: p for p in result.phases}
    assert all(by_fault[f].cycles == 1 for f in faults)
    # the matrix proves something only when sessions crossed the faults
    assert result.sessions >= 6
    assert sum(p.lost for p in result.phases) == 0


def test_the_table_counts_and_flags_a_loss() -> None:
    """A run that lost a session or got an energy wrong is not ok, and the table shows it."""
    result = matrix.RunResult(
        phases=[matrix.PhaseResult("kill", cycles=3, expected=4, received=3, lost=1)]
    )
    assert not result.ok
    table = result.table()
    assert "kill" in table and table.splitlines()[-1].split()[:6] == [
        "total",
        "3",
        "4",
        "3",
        "0",
        "1",
    ]
    assert not matrix.RunResult(phases=[matrix.PhaseResult("x", energy_bad=1)]).ok
    assert not matrix.RunResult(problems=["gateway crash"]).ok
    assert matrix.RunResult(phases=[matrix.PhaseResult("x", expected=2, received=3)]).ok
