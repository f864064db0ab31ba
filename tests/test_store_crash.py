"""A process writing sessions is killed with SIGKILL at random moments, many times over.

Afterwards every session it reported as committed (it prints only after ``finish_session``
returned) is in the buffer exactly once, with the seq and hash it reported; seqs have no gaps;
the hash chain holds; each record has exactly one outbox row carrying its exact bytes; and no
point or open row is left behind for a finished session.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.records import GENESIS, canonical_json, record_hash

CYCLES = 30

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.model import MeterPoint
    from gateway.store import Store
    from tests.support.records import unsealed

    def report(rec):
        print(f"C {rec.session_id} {rec.seq} {rec.hash}", flush=True)

    async def charger(store, run, charger_id):
        n = 0
        while True:
            sid = f"{run}-{charger_id}-{n}"
            await store.save_open_session(sid, charger_id, {"n": n})
            for k in range(3):
                await store.add_session_point(
                    sid, MeterPoint(ts=1e9 + k, energy_wh=100 * k, charging=True, power_w=7000.0)
                )
            await store.add_readings([(charger_id, 1e9 + i, {"power_w": i}) for i in range(200)])
            points = await store.session_points(sid)
            rec = await store.finish_session(
                unsealed(sid, site_id="crash", charger_id=charger_id,
                         energy_wh=points[-1].energy_wh, flags=[])
            )
            report(rec)
            n += 1

    async def main(path, run):
        async with Store.open(path, site_id="crash", reserve_bytes=0) as store:
            # What the session manager does at start: finish what a killed run left open.
            for state in await store.load_open_sessions():
                rec = await store.finish_session(
                    unsealed(state["session_id"], site_id="crash", charger_id=state["charger_id"],
                             energy_wh=0, flags=["end_estimated"])
                )
                report(rec)
            print("ready", flush=True)
            async with asyncio.TaskGroup() as tg:
                for charger_id in ("cp1", "cp2"):
                    tg.create_task(charger(store, run, charger_id))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_never_loses_or_duplicates_a_committed_session(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(0xE5)
    reported: dict[str, tuple[int, str]] = {}
    for cycle in range(CYCLES):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db), f"r{cycle}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        lines: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, (
                f"writer died before ready: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
            lines.append(line)
            if line == b"ready\n":
                break
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        lines += out.splitlines(keepends=True)
        for line in lines:
            if not line.startswith(b"C ") or not line.endswith(b"\n"):
                continue  # "ready", or a line cut by the kill
            _, sid, seq, digest = line.decode().split()
            assert sid not in reported or reported[sid] == (int(seq), digest), sid
            reported[sid] = (int(seq), digest)

    print(f"{len(reported)} sessions reported committed over {CYCLES} kills")
    assert len(reported) > CYCLES  # the kills did land among many commits
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT seq, session_id, record, hash, outbox_id FROM finished_sessions ORDER BY seq"
        ).fetchall()
        outbox = {
            oid: payload
            for oid, payload in raw.execute(
                "SELECT id, payload FROM outbox WHERE stream = 'session'"
            )
        }
        open_ids = {r[0] for r in raw.execute("SELECT session_id FROM open_sessions")}
        point_ids = {r[0] for r in raw.execute("SELECT DISTINCT session_id FROM session_points")}
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    stored = {sid: (seq, digest) for seq, sid, _, digest, _ in rows}
    assert len(stored) == len(rows)  # each session exactly once
    for sid, seq_hash in reported.items():
        assert stored.get(sid) == seq_hash, sid
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))  # no gaps
    prev = GENESIS
    for _, _, text, digest, outbox_id in rows:
        rec = json.loads(text)
        assert rec["prev_hash"] == prev and record_hash(rec) == digest == rec["hash"]
        assert outbox[outbox_id] == canonical_json(rec) == text.encode()
        prev = digest
    assert len(outbox) == len(rows)  # one outbox row per record, none without a record
    assert not (open_ids & stored.keys())
    assert point_ids <= open_ids  # points go with their session
    assert len(open_ids) <= 2  # at most the two left open by the last kill
