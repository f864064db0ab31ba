"""Clean lifecycles: a gateway that fails half way through starting exits non-zero at once (it
used to hang: the open store's worker thread kept the process alive, so systemd never restarted
it)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_failure_after_the_store_is_open_exits_non_zero(tmp_path: Path) -> None:
    # The web server starts last, after the store, the buses and the authorizer: a port that is
    # already taken makes the very end of Gateway.__aenter__ fail.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "site.yaml"
        config.write_text(
            "site: {id: t1, timezone: Europe/Berlin}\n"
            f"storage: {{path: {tmp_path / 'b.db'}}}\n"
            f'web: {{listen: "127.0.0.1:{port}"}}\n'
        )
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("evgw run: web: cannot listen on 127.0.0.1:")
    # The store was closed properly: its WAL was checkpointed and removed.
    assert (tmp_path / "b.db").exists()
    assert not (tmp_path / "b.db-wal").exists()
