"""JASON on PostgreSQL and Redis against the raw driver doing the same work. Run by `make bench-servers`.

    python benchmarks/servers.py [--rounds 5] [--seconds 3]

Starts throwaway servers of its own (as the tests do: Unix sockets, PostgreSQL
with fsync on, Redis with appendfsync always), then for each backend measures,
alternating JASON and the raw driver in every round so that drift falls on both:
one client's load and save (median µs per operation), and one user's
read-modify-write (JASON's edit_user_data against the driver's own atomic one:
a row lock in a transaction, or WATCH/MULTI). Last, the chat mix from two
processes at once: 50 clients each, 80% loads and 20% edits of random users,
counting the increments that were lost. Writes servers.md and servers.json here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import orjson  # noqa: E402

import jason  # noqa: E402
from test_jason import SERVERS  # noqa: E402  (the tests' throwaway servers)

USERS = 1000
RECORD = {"name": "user ✓", "balance": 0, "settings": {"lang": "en", "tz": 3}, "history": ["x" * 40] * 15}


async def per_op_us(operation: Callable[[int], Any], count: int) -> float:
    started = time.perf_counter()
    for n in range(count):
        await operation(n % USERS)
    return (time.perf_counter() - started) / count * 1e6


class RawPostgres:
    def __init__(self, url: str, table: str) -> None:
        self.url, self.table = url, table

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=16)
        await self.pool.execute(f'CREATE TABLE IF NOT EXISTS "{self.table}" (user_id text PRIMARY KEY, data json)')

    async def load(self, user: int) -> Any:
        text = await self.pool.fetchval(f'SELECT data FROM "{self.table}" WHERE user_id = $1', str(user))
        return orjson.loads(text) if text is not None else {}

    async def save(self, user: int, data: Any) -> None:
        await self.pool.execute(f'INSERT INTO "{self.table}" (user_id, data) VALUES ($1, $2) '
                                "ON CONFLICT (user_id) DO UPDATE SET data = EXCLUDED.data",
                                str(user), orjson.dumps(data).decode())

    async def increment(self, user: int) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            text = await connection.fetchval(
                f'SELECT data FROM "{self.table}" WHERE user_id = $1 FOR UPDATE', str(user))
            data = orjson.loads(text)
            data["balance"] += 1
            await connection.execute(f'UPDATE "{self.table}" SET data = $2 WHERE user_id = $1',
                                     str(user), orjson.dumps(data).decode())

    async def close(self) -> None:
        await self.pool.close()


class RawRedis:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix

    async def open(self) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(self.url)

    def key(self, user: int) -> str:
        return f"{self.prefix}:{user}"

    async def load(self, user: int) -> Any:
        raw = await self.client.get(self.key(user))
        return orjson.loads(raw) if raw is not None else {}

    async def save(self, user: int, data: Any) -> None:
        await self.client.set(self.key(user), orjson.dumps(data))

    async def increment(self, user: int) -> None:
        import redis

        async with self.client.pipeline() as pipe:
            while True:
                try:
                    await pipe.watch(self.key(user))
                    data = orjson.loads(await pipe.get(self.key(user)))
                    data["balance"] += 1
                    pipe.multi()
                    pipe.set(self.key(user), orjson.dumps(data))
                    await pipe.execute()
                    return
                except redis.WatchError:
                    continue

    async def close(self) -> None:
        await self.client.aclose()


class Jason:
    def __init__(self, url: str, namespace: str) -> None:
        self.db = jason.JASON(url, namespace=namespace)

    async def open(self) -> None:
        pass

    async def load(self, user: int) -> Any:
        return await self.db.load_user_data(user)

    async def save(self, user: int, data: Any) -> None:
        await self.db.save_user_data(user, data)

    async def increment(self, user: int) -> None:
        async with self.db.edit_user_data(user) as data:
            data["balance"] += 1

    async def close(self) -> None:
        await self.db.close()


async def one_round(system: Any, count: int) -> dict[str, float]:
    await system.open()
    try:
        for user in range(USERS):
            await system.save(user, RECORD)
        return {
            "load_us": await per_op_us(system.load, count),
            "save_us": await per_op_us(lambda user: system.save(user, RECORD), count),
            "edit_us": await per_op_us(system.increment, count),
        }
    finally:
        await system.close()


CHAT_CHILD = """
import asyncio, json, random, sys, time
sys.path.insert(0, sys.argv[4])
import jason
url, namespace, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
async def main():
    async with jason.JASON(url, namespace=namespace) as db:
        done, increments, latencies = 0, 0, []
        stop = time.monotonic() + seconds
        async def client(seed):
            nonlocal done, increments
            rng = random.Random(seed)
            while time.monotonic() < stop:
                user, started = rng.randrange(1000), time.perf_counter()
                if rng.random() < 0.8:
                    await db.load_user_data(user)
                else:
                    async with db.edit_user_data(user) as data:
                        data["balance"] = data.get("balance", 0) + 1
                    increments += 1
                latencies.append(time.perf_counter() - started)
                done += 1
        await asyncio.gather(*(client(seed) for seed in range(50)))
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)] * 1e3
        print(json.dumps({"ops": done, "increments": increments, "p99_ms": p99}))
asyncio.run(main())
"""


async def chat_mix(url: str, namespace: str, seconds: float) -> dict[str, float]:
    async with jason.JASON(url, namespace=namespace) as db:
        for user in range(USERS):
            await db.save_user_data(user, {"balance": 0})
    command = [sys.executable, "-c", CHAT_CHILD, url, namespace, str(seconds), os.path.dirname(HERE)]

    def run_child() -> dict[str, Any]:
        child = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 10 + 60, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"a chat-mix process failed: {child.stderr}")
        return json.loads(child.stdout)  # type: ignore[no-any-return]

    results = await asyncio.gather(*(asyncio.to_thread(run_child) for _ in range(2)))
    async with jason.JASON(url, namespace=namespace, readonly=True) as db:
        stored = sum([(await db.load_user_data(user)).get("balance", 0) for user in range(USERS)])
    increments = sum(result["increments"] for result in results)
    return {"ops_per_s": sum(result["ops"] for result in results) / seconds, "increments": increments,
            "lost": increments - stored, "p99_ms": max(result["p99_ms"] for result in results)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"python": sys.version.split()[0], "rounds": args.rounds, "count": args.count}
    try:
        backends = {"postgres": (SERVERS.url("postgres"), RawPostgres), "redis": (SERVERS.url("redis"), RawRedis)}
        for backend, (url, raw_class) in backends.items():
            rounds: dict[str, list[dict[str, float]]] = {"jason": [], "raw": []}
            for number in range(args.rounds):
                for name in random.Random(number).sample(["jason", "raw"], 2):  # alternate who goes first
                    system = Jason(url, f"b{number}") if name == "jason" else raw_class(url, f"raw{number}")
                    rounds[name].append(await one_round(system, args.count))
            medians = {name: {metric: statistics.median(r[metric] for r in runs) for metric in runs[0]}
                       for name, runs in rounds.items()}
            report[backend] = {"rounds": rounds, "medians": medians,
                               "chat_mix": await chat_mix(url, "chat", args.seconds)}
            print(backend, json.dumps(report[backend]["medians"]), json.dumps(report[backend]["chat_mix"]))
    finally:
        SERVERS.stop()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="chat-mix duration")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    with open(os.path.join(HERE, "servers.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    lines = ["| backend | operation | JASON µs | raw driver µs | ratio |", "| --- | --- | --- | --- | --- |"]
    for backend in ("postgres", "redis"):
        medians = report[backend]["medians"]
        for metric, label in [("load_us", "load"), ("save_us", "save"), ("edit_us", "read-modify-write")]:
            jason_us, raw_us = medians["jason"][metric], medians["raw"][metric]
            lines.append(f"| {backend} | {label} | {jason_us:.0f} | {raw_us:.0f} | {jason_us / raw_us:.2f}x |")
    lines += ["", "| backend | chat mix, 2 processes x 50 clients: ops/s | p99 ms | increments | lost |",
              "| --- | --- | --- | --- | --- |"]
    for backend in ("postgres", "redis"):
        mix = report[backend]["chat_mix"]
        lines.append(f"| {backend} | {mix['ops_per_s']:.0f} | {mix['p99_ms']:.1f} | {mix['increments']} "
                     f"| {mix['lost']} |")
    with open(os.path.join(HERE, "servers.md"), "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
