"""Simulated serial lines: two connected pseudo-terminals made by socat."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

__all__ = ["pty_pair"]

log = structlog.get_logger(__name__)


@contextlib.asynccontextmanager
async def pty_pair(
    gateway_link: str | os.PathLike[str] | None = None,
    sim_link: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float = 5.0,
) -> AsyncIterator[tuple[str, str]]:
    """Two connected pseudo-terminals made by socat; yields ``(gateway_path, sim_path)``.

    ``gateway_link`` is where the gateway-side symlink is created (``evgw simulate`` puts it at
    the bus ``port:`` path from the site config); default: a temporary directory. An existing
    symlink there (a leftover of a killed run) is replaced; any other existing file is an error.
    The links exist when the block is entered; socat is terminated when it ends.
    """
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("socat is not installed (needed for simulated serial lines)")
    with tempfile.TemporaryDirectory(prefix="evgw-pty-") as tmp:
        gw = Path(gateway_link) if gateway_link is not None else Path(tmp) / "gateway"
        sim = Path(sim_link) if sim_link is not None else Path(tmp) / "sim"
        for link in (gw, sim):
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
            if not link.parent.is_dir():
                raise FileNotFoundError(f"directory {link.parent} does not exist")
        proc = await asyncio.create_subprocess_exec(
            socat,
            "-d",
            "-d",
            f"pty,raw,echo=0,link={gw}",
            f"pty,raw,echo=0,link={sim}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            # socat announces each pty, creates the links, then says it starts its loop.
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        raise RuntimeError("socat exited before creating the pty pair")
                    if b"starting data transfer loop" in line:
                        break
            if not (gw.is_symlink() and sim.is_symlink()):
                raise RuntimeError(f"socat did not create {gw} and {sim}")
            # Keep draining socat's stderr so it can never block on a full pipe.
            drain = asyncio.create_task(_drain(proc.stderr), name="socat_stderr")
            log.info("sim_pty_pair", gateway=str(gw), sim=str(sim))
            try:
                yield str(gw), str(sim)
            finally:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(2):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            for link in (gw, sim):
                if link.is_symlink():
                    with contextlib.suppress(OSError):
                        link.unlink()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(4096):
        pass
