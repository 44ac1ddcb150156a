"""Per-key limits (DESIGN §6): requests per minute (GCRA) and jobs or credits per day and
per month, checked together, all or nothing.

`Limiter` is the port. `InProcessLimiter` keeps the counters in this process (the embedded
default); `RedisLimiter` keeps them in Redis, where one Lua call checks and counts every
policy of a request, so any number of API processes share them exactly. Both derive their
answer from the same pure function (`policy.evaluate`), so both give the same `Decision`.

Concurrent jobs are not counted here: the job service counts them in the database, under a
row lock, which is exact across processes without Redis.
"""

from .base import Decision, Limiter, PolicyState, Quota
from .memory import InProcessLimiter

__all__ = ["Decision", "InProcessLimiter", "Limiter", "PolicyState", "Quota"]
