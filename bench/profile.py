"""Sampling profiles of the processes under load, with py-spy (`pip install py-spy`).

`record` samples one process for a while (non-blocking, so the process is not paused)
into py-spy's collapsed-stack format, only while it holds the GIL: Python's own CPU time,
without the waits and the system calls (a socket write that the kernel holds up, say).
`python -m bench.profile FILE` prints where the samples go by library, then the
functions that take the most samples, inclusive and exclusive, which is what
BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
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


# The frames of a process's entry (the CLI that starts its event loop) own nothing:
# every sample of the loop sits under them.
_ENTRY = ("aigen/__main__.py", "aigen/cli/", "typer/", "click/")


def owner(frames: list[str]) -> str:
    """Who a sample's time is spent for: the deepest frame outside the standard library
    (an asyncio call made by aiormq counts for aiormq), by package, and for aigen by
    subpackage ("aigen.bus"); "python" when the rest is the standard library's (the
    event loop itself, mostly).

    Flat lists of functions spread an asyncio process thin: py-spy starts a coroutine's
    stack at the task step that resumed it, and SQLAlchemy's at the greenlet it runs in,
    so no one function is large; the libraries are.
    """
    for frame in reversed(frames):
        path = frame.rpartition(" (")[2].rpartition(":")[0]
        parts = path.split("/")
        package = parts[0].removesuffix(".py")
        if package.startswith("<") or package in sys.stdlib_module_names:
            continue
        if path.startswith(_ENTRY):
            continue
        if package == "aigen" and len(parts) > 2:
            return f"aigen.{parts[1]}"
        return package
    return "python"


def _samples(path: Path) -> Iterator[tuple[list[str], int]]:
    """Each stack of a collapsed-stack file (outermost frame first) and its count."""
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def libraries(path: Path) -> dict[str, float]:
    """Each `owner`'s share of the samples, largest first ({} without samples)."""
    owners: Counter[str] = Counter()
    for frames, count in _samples(path):
        owners[owner(frames)] += count
    return _shares(owners)


def _shares(counter: Counter[str]) -> dict[str, float]:
    total = sum(counter.values())
    return {name: count / total for name, count in counter.most_common()} if total else {}


def summarize(path: Path, *, top: int = 25, match: str = "") -> str:
    """Where the samples go by library (`owner`), then the heaviest frames: share of
    samples that include them, and that end in them."""
    owners: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for frames, count in _samples(path):
        total += count
        owners[owner(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
        exclusive[frames[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "-- by library"]
    lines += [f"{share:6.1%}  {name}" for name, share in list(_shares(owners).items())[:top]]
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
