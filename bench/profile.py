"""Sampling profiles of the processes under load, with py-spy (`pip install py-spy`).

`record` samples one process for a while (non-blocking, so the process is not paused)
into py-spy's collapsed-stack format, only while it holds the GIL: Python's own CPU time,
without the waits and the system calls (a socket write that the kernel holds up, say).
`python -m bench.profile FILE` prints the functions that take the most samples,
inclusive and exclusive, which is what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from collections import Counter
from pathlib import Path


async def record(pid: int, seconds: float, out: Path, *, rate: int = 200) -> Path | None:
    """py-spy's collapsed stacks of `pid` for `seconds`; None when py-spy is missing."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    process = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--nonblocking", "--gil", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.wait_for(process.wait(), seconds + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
    return out


def summarize(path: Path, *, top: int = 25, match: str = "") -> str:
    """The heaviest frames: share of samples that include them, and that end in them."""
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        exclusive[frames[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("exclusive", exclusive)):
        lines.append(f"-- {title}")
        shown = 0
        for frame, count in counter.most_common():
            if match and match not in frame:
                continue
            lines.append(f"{count / total:6.1%}  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only frames containing this text")
    options = parser.parse_args()
    print(summarize(options.file, top=options.top, match=options.match))


if __name__ == "__main__":
    main()
