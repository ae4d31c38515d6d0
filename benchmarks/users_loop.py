"""Visiting every user: db.users() against a plain loop over user_ids() and load_user_data().

    python benchmarks/users_loop.py [--users 10000 100000] [--rounds 3]

For each size, fills a folder (fast saves, ~1 KB records), then times a full
visit of every user both ways, each in a fresh JASON (nothing cached), the two
alternating in every round so that drift falls on both. Reports the median
seconds and users per second, and the ratio. Writes users_loop.md here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jason  # noqa: E402

RECORD = {"name": "user ✓", "balance": 0, "settings": {"lang": "en", "tz": 3}, "history": ["x" * 40] * 20}


async def fill(folder: str, users: int) -> None:
    async with jason.JASON(folder, durable=False) as db:
        for start in range(0, users, 200):
            await asyncio.gather(*(db.save_user_data(user, RECORD) for user in range(start, min(start + 200, users))))


async def with_users(folder: str) -> int:
    async with jason.JASON(folder) as db:
        return sum([1 async for _ in db.users()])


async def with_plain_loop(folder: str) -> int:
    async with jason.JASON(folder) as db:
        visited = 0
        for user_id in await db.user_ids():
            await db.load_user_data(user_id)
            visited += 1
        return visited


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lines = ["| users | db.users() | plain loop | ratio |", "| --- | --- | --- | --- |"]
    for users in args.users:
        with tempfile.TemporaryDirectory(prefix="jason-users-") as folder:
            asyncio.run(fill(folder, users))
            times: dict[str, list[float]] = {"users": [], "plain": []}
            for _ in range(args.rounds):
                for name, visit in (("users", with_users), ("plain", with_plain_loop)):
                    started = time.perf_counter()
                    assert asyncio.run(visit(folder)) == users
                    times[name].append(time.perf_counter() - started)
            new, plain = statistics.median(times["users"]), statistics.median(times["plain"])
            lines.append(f"| {users:,} | {new:.2f} s ({users / new:,.0f}/s) | {plain:.2f} s ({users / plain:,.0f}/s) "
                         f"| {plain / new:.1f}x faster |")
            print(lines[-1], flush=True)
    header = (f"Visiting every user, median of {args.rounds} rounds (orjson {'on' if jason.HAVE_ORJSON else 'off'}, "
              f"~1 KB records, a fresh JASON each time). `python benchmarks/users_loop.py`\n\n")
    with open(os.path.join(HERE, "users_loop.md"), "w", encoding="utf-8") as out:
        out.write(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
