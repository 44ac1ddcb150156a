"""Running wrk (Debian's `/usr/bin/wrk`) with `post.lua` and reading its result."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).with_name("post.lua")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # non-2xx answers and socket errors

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    return path


async def run_wrk(
    url: str,
    *,
    body: str,
    key: str | None,
    seconds: float,
    connections: int,
    delay_ms: float = 0.0,
) -> WrkResult:
    """`wrk -t1 -c<connections> -d<seconds>s --latency` against `url` (one thread: the
    server under test is a single Python process; one wrk thread keeps up with it)."""
    env = {
        **os.environ,
        "BENCH_BODY": body,
        "BENCH_KEY": key or "",
        "BENCH_DELAY_MS": str(int(delay_ms)),
    }
    process = await asyncio.create_subprocess_exec(
        wrk_path(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(SCRIPT),
        url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    for line in out.decode().splitlines():
        if line.startswith("BENCH_RESULT "):
            data = json.loads(line.removeprefix("BENCH_RESULT "))
            errors = sum(data[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p90_ms=data["p90_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                errors=errors,
            )
    raise RuntimeError(f"wrk gave no result: {out.decode()[-1000:]} {err.decode()[-1000:]}")
