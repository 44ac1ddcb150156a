"""What the rest of the machine spent: the services' processes and the whole machine.

The pipeline's aigen processes are only part of what a job costs on one 2-core machine:
PostgreSQL, RabbitMQ and Redis run beside them, and so do the load generator and the
webhook receiver (the bench's own process). Their CPU is read the same way as the
aigen processes' (`/proc/<pid>/stat`), summed over every process of a service, found
by its command name; the machine's total comes from `/proc/stat`. A server process that
ends during the run takes its CPU with it, which is why the bench keeps its own
connections to PostgreSQL open across a reading.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from .infra import Proc, cpu_seconds

# Command names (`/proc/<pid>/comm`) of each service's processes, as Debian runs them.
SERVICES = {
    "postgresql": ("postgres",),
    "rabbitmq": ("beam.smp", "erl_child_setup", "epmd", "inet_gethost"),
    "redis": ("redis-server",),
}
_TICK = os.sysconf("SC_CLK_TCK")
# The columns `CpuMeter` adds to the aigen processes', in the order the table shows them.
COLUMNS = (*SERVICES, "bench", "other", "machine")


def services() -> dict[str, float]:
    """CPU seconds so far of every service's processes, by service."""
    totals = dict.fromkeys(SERVICES, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for service, commands in SERVICES.items():
            if command in commands:
                totals[service] += cpu_seconds(entry.name)
    return totals


def busy() -> float:
    """CPU seconds the whole machine spent so far, all cores, idle and I/O wait excluded."""
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / _TICK


def reading() -> dict[str, float]:
    """The services' CPU seconds and the machine's, now."""
    return {**services(), "machine": busy()}


class CpuMeter:
    """CPU seconds of the aigen processes, the services, the bench and the machine, from
    `start` to `per_job`, in milliseconds per job."""

    def __init__(self, procs: Mapping[str, Proc]) -> None:
        self._procs = dict(procs)
        self._before = self._read()

    def _read(self) -> dict[str, float]:
        aigen = {name: proc.cpu_seconds() for name, proc in self._procs.items()}
        return {**aigen, **reading(), "bench": time.process_time()}

    def per_job(self, jobs: int) -> dict[str, float]:
        """Each one's CPU ms per job so far, and `other`: what none of them accounts for
        (the kernel's own threads, processes started and ended meanwhile, other tenants)."""
        after = self._read()
        spent = {name: 1000 * (after[name] - self._before[name]) / max(1, jobs) for name in after}
        spent["other"] = spent["machine"] - sum(v for n, v in spent.items() if n != "machine")
        return spent
