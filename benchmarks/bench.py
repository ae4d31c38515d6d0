"""JASON against its floors and its peers, on a chatbot's workload. Run by `make bench`.

    python benchmarks/bench.py [--rounds 3] [--quick]

Every (system, round) runs in a fresh child process (`--worker`), so each has
its own memory figure and no warm state leaks between systems. Rounds visit
every system in turn, so slow drift of this shared machine falls on all of
them alike. Each figure is the median over rounds, and is also shown as a
ratio to a floor measured in the same invocation. Writes results.json (every
round's raw figures), results.md (the tables) and chart.svg next to this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

USERS = 1000
CLIENTS = 100
LOAD_SHARE = 0.8


def make_record(user: int) -> dict[str, Any]:
    """A ~1 KB chatbot record: profile, settings, counters and a short history."""
    return {
        "profile": {"id": user, "name": f"User {user}", "lang": "en", "tz": "Europe/Berlin", "premium": user % 7 == 0},
        "settings": {"notify": True, "theme": "dark", "daily_goal": 3, "quiet_hours": [22, 7]},
        "counters": {"messages": 0, "points": user % 100, "streak": 4},
        "state": {"active_challenge": "run 5k", "step": 2},
        "history": [{"t": 1_764_460_800 + i * 60, "text": f"message number {i} from the user"} for i in range(10)],
    }


# ---------------------------------------------------------------- systems
#
# Each system is an async load/save/increment over user ids, opened on a folder.
# `guarantees` says what a returned save means, in the same words for all.


class System:
    name = ""
    guarantees = ""
    durable = False
    burst = 1000  # operations in the storm and in the 100-client save burst
    reads = 5000  # hot loads timed

    async def count_messages(self, users: int) -> list[int]:
        return [(await self.load(user))["counters"]["messages"] for user in range(users)]

    async def open(self, folder: str) -> None: ...
    async def close(self) -> None: ...
    async def load(self, user: int) -> dict[str, Any]: raise NotImplementedError
    async def save(self, user: int, data: dict[str, Any]) -> None: raise NotImplementedError

    async def increment(self, user: int) -> None:
        """A read-modify-write as this system's users would write it."""
        data = await self.load(user)
        data["counters"]["messages"] += 1
        await self.save(user, data)

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        for user, data in records.items():
            await self.save(user, data)


_MEMORY: dict[int, bytes] = {}  # outlives a reopen, as a disk would


class MemFloor(System):
    name = "mem floor (orjson)"
    guarantees = "memory only: serialised bytes in a dict"

    def __init__(self, stdlib: bool = False) -> None:
        self.dumps, self.loads = json_functions()
        if stdlib:
            self.name = "mem floor (json)"
        self.store = _MEMORY

    async def load(self, user: int) -> dict[str, Any]:
        return self.loads(self.store[user])  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        self.store[user] = self.dumps(data)


def json_functions() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """orjson's dumps and loads, or the json module's where orjson is blocked (stdlib-only runs)."""
    try:
        import orjson
        return orjson.dumps, orjson.loads
    except ImportError:
        return (lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()), json.loads


class DiskFloor(System):
    """The bare per-file recipe, one thread hop per operation, no cache, no lock."""

    def __init__(self, durable: bool) -> None:
        self.durable = durable
        self.name = f"disk floor ({'durable' if durable else 'fast'})"
        self.guarantees = ("temp file, fsync, rename, folder fsync" if durable else "temp file, rename; no fsync")
        self.dumps, self.loads = json_functions()

    async def open(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _read(self, user: int) -> dict[str, Any]:
        with open(os.path.join(self.folder, f"{user}.json"), "rb") as file:
            return self.loads(file.read())  # type: ignore[no-any-return]

    def _write(self, user: int, data: dict[str, Any]) -> None:
        path = os.path.join(self.folder, f"{user}.json")
        temp = f"{path}.{os.getpid()}.{random.getrandbits(64):x}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, self.dumps(data))
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        if self.durable:
            folder_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)

    async def load(self, user: int) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self._read, user)

    async def save(self, user: int, data: dict[str, Any]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._write, user, data)


class Jason(System):
    def __init__(self, durable: bool, journal: bool | None = None) -> None:
        import jason
        self.jason = jason
        self.durable = durable
        self.journal = journal  # None: JASON's default, the journal for a durable folder
        backend = "orjson" if jason.HAVE_ORJSON else "stdlib"
        journals = durable and journal is not False
        self.name = f"JASON {backend} ({'default: journal' if journals else 'per-file' if durable else 'fast'})"
        self.guarantees = ("journal append, fdatasync shared by the saves waiting; files at checkpoints; per-user "
                           "lock; cache" if journals else
                           "temp file, fsync, rename, folder fsync; per-user lock; cache" if durable
                           else "temp file, rename; no fsync; per-user lock; cache")

    async def open(self, folder: str) -> None:
        self.db = self.jason.JASON(folder, durable=self.durable, journal=self.journal)

    async def close(self) -> None:
        await self.db.close()

    async def load(self, user: int) -> dict[str, Any]:
        return await self.db.load_user_data(user)

    async def save(self, user: int, data: dict[str, Any]) -> None:
        await self.db.save_user_data(user, data)

    async def increment(self, user: int) -> None:
        async with self.db.edit_user_data(user) as data:
            data["counters"]["messages"] += 1

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        if self.durable and self.journal is not False:  # through the journal, checkpointed at close
            await run_limited(lambda user: self.db.save_user_data(user, records[user]), records, 64)
            return
        async with self.jason.JASON(self.db.folder, durable=False, cache_size=0) as filler:
            await run_limited(lambda user: filler.save_user_data(user, records[user]), records, 64)


class OldJason(System):
    name = "jason-db 0.2.0"
    guarantees = "fixed .tmp name, rename; no fsync; shallow copies; failures return False"

    async def open(self, folder: str) -> None:
        import jason_db
        self.db = jason_db.JASON(folder, {})

    async def load(self, user: int) -> dict[str, Any]:
        return await self.db.load_user_data(user)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        if not await self.db.save_user_data(user, data):
            raise OSError("jason-db 0.2.0 reported a failed save")

    async def increment(self, user: int) -> None:
        data = await self.load(user)
        data = {**data, "counters": {**data["counters"], "messages": data["counters"]["messages"] + 1}}
        await self.save(user, data)  # 0.2.0's copies are shallow: build a new record, as its users must


class Tiny(System):
    def __init__(self, caching: bool) -> None:
        self.burst = self.reads = 1000 if caching else 100  # each plain get reads, each write rewrites, the file
        self.caching = caching
        self.name = "TinyDB + CachingMiddleware" if caching else "TinyDB"
        self.guarantees = ("writes buffered in memory, flushed every 1000 writes" if caching
                           else "whole file rewritten in place per write; no fsync")

    async def open(self, folder: str) -> None:
        from tinydb import TinyDB
        from tinydb.middlewares import CachingMiddleware
        from tinydb.storages import JSONStorage
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "db.json")
        self.db = TinyDB(path, storage=CachingMiddleware(JSONStorage)) if self.caching else TinyDB(path)

    async def close(self) -> None:
        self.db.close()

    async def count_messages(self, users: int) -> list[int]:
        counts = {document.doc_id: document["counters"]["messages"] for document in self.db.all()}
        return [counts[user] for user in range(users)]

    async def load(self, user: int) -> dict[str, Any]:
        return dict(self.db.get(doc_id=user))

    async def save(self, user: int, data: dict[str, Any]) -> None:
        from tinydb.table import Document
        self.db.upsert(Document(data, doc_id=user))

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        from tinydb.table import Document
        self.db.insert_multiple(Document(data, doc_id=user) for user, data in records.items())


class Pickle(System):
    name = "pickleDB 1.6"
    guarantees = "whole file rewritten per save (temp + rename); no fsync"
    burst = 200  # each save rewrites the whole file

    async def open(self, folder: str) -> None:
        from pickledb import PickleDB
        os.makedirs(folder, exist_ok=True)
        self.db = PickleDB(os.path.join(folder, "db.json"))
        await self.db.load()

    async def load(self, user: int) -> dict[str, Any]:
        return await self.db.get(user)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        await self.db.set(user, data)
        await self.db.save()

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        for user, data in records.items():
            await self.db.set(user, data)
        await self.db.save()


class MappingStore(System):
    """A peer used as a dict with str keys, called inline."""

    db: Any

    async def close(self) -> None:
        self.db.close()

    async def load(self, user: int) -> dict[str, Any]:
        return self.db[str(user)]  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        self.db[str(user)] = data


class SqliteDict(MappingStore):
    name = "sqlitedict"
    guarantees = "SQLite rollback journal, commit per write (fsync); pickled values"
    durable = True

    async def open(self, folder: str) -> None:
        from sqlitedict import SqliteDict as Dict
        os.makedirs(folder, exist_ok=True)
        self.db = Dict(os.path.join(folder, "db.sqlite"), autocommit=True)

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        from sqlitedict import SqliteDict as Dict
        with Dict(self.db.filename, autocommit=False) as bulk:
            for user, data in records.items():
                bulk[str(user)] = data
            bulk.commit()


class DiskCache(System):
    name = "diskcache"
    guarantees = "SQLite WAL, synchronous=NORMAL (no fsync per write); pickled values"

    async def open(self, folder: str) -> None:
        import diskcache
        self.db = diskcache.Cache(folder)

    async def close(self) -> None:
        self.db.close()

    async def load(self, user: int) -> dict[str, Any]:
        return self.db.get(user)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        self.db.set(user, data)


class Shelve(MappingStore):
    name = "shelve"
    guarantees = "dbm file, no fsync; pickled values"

    async def open(self, folder: str) -> None:
        import shelve
        os.makedirs(folder, exist_ok=True)
        self.db = shelve.open(os.path.join(folder, "db"))  # noqa: SIM115  (closed in close())


class Sqlite(System):
    """A bare SQLite file in WAL mode, called inline (it blocks the loop while it works)."""

    def __init__(self, durable: bool) -> None:
        import orjson
        self.durable = durable
        self.sync = "FULL" if durable else "NORMAL"
        self.name = f"SQLite WAL {self.sync}"
        self.guarantees = ("WAL, fsync per commit" if durable else "WAL, synchronous=NORMAL: no fsync per commit")
        self.dumps, self.loads = orjson.dumps, orjson.loads

    async def open(self, folder: str) -> None:
        import sqlite3
        os.makedirs(folder, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(folder, "db.sqlite"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={self.sync}")
        self.db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, data BLOB)")

    async def close(self) -> None:
        self.db.close()

    async def load(self, user: int) -> dict[str, Any]:
        (raw,) = self.db.execute("SELECT data FROM users WHERE id = ?", (user,)).fetchone()
        return self.loads(raw)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO users (id, data) VALUES (?, ?)", (user, self.dumps(data)))

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO users (id, data) VALUES (?, ?)",
                            ((user, self.dumps(data)) for user, data in records.items()))
        self.db.execute("COMMIT")


class SqliteThread(Sqlite):
    """The same SQLite file, each call in a thread of its own pool: how an async bot keeps it off its loop."""

    def __init__(self) -> None:
        super().__init__(durable=True)
        self.name = "SQLite WAL FULL, in a thread"
        self.guarantees = "WAL, fsync per commit; one connection, its calls in one worker thread"

    async def open(self, folder: str) -> None:
        import concurrent.futures
        # One connection is used from one thread only (sqlite3's rule), so the pool has one thread.
        self.thread = concurrent.futures.ThreadPoolExecutor(1)
        await self._in_thread(super().open, folder)

    async def _in_thread(self, call: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            return asyncio.run(call(*args)) if asyncio.iscoroutinefunction(call) else call(*args)

        return await asyncio.get_running_loop().run_in_executor(self.thread, run)

    async def close(self) -> None:
        await self._in_thread(self.db.close)
        self.thread.shutdown()

    async def load(self, user: int) -> dict[str, Any]:
        (raw,) = await self._in_thread(lambda: self.db.execute("SELECT data FROM users WHERE id = ?",
                                                               (user,)).fetchone())
        return self.loads(raw)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        raw = self.dumps(data)
        await self._in_thread(self.db.execute, "INSERT OR REPLACE INTO users (id, data) VALUES (?, ?)", (user, raw))

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        await self._in_thread(super().fill, records)

    async def increment(self, user: int) -> None:
        """One transaction in the thread: the read-modify-write a bot would write, none lost."""
        def add_one() -> None:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                (raw,) = self.db.execute("SELECT data FROM users WHERE id = ?", (user,)).fetchone()
                data = self.loads(raw)
                data["counters"]["messages"] += 1
                self.db.execute("UPDATE users SET data = ? WHERE id = ?", (self.dumps(data), user))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

        await self._in_thread(add_one)


class AioSqlite(Sqlite):
    name = "aiosqlite WAL FULL"
    guarantees = "WAL, fsync per commit; a thread hop per query"

    def __init__(self) -> None:
        super().__init__(durable=True)
        self.name = AioSqlite.name
        self.guarantees = AioSqlite.guarantees

    async def open(self, folder: str) -> None:
        import aiosqlite
        os.makedirs(folder, exist_ok=True)
        self.db = await aiosqlite.connect(os.path.join(folder, "db.sqlite"), isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=FULL")
        await self.db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, data BLOB)")

    async def close(self) -> None:
        await self.db.close()

    async def load(self, user: int) -> dict[str, Any]:
        async with self.db.execute("SELECT data FROM users WHERE id = ?", (user,)) as cursor:
            (raw,) = await cursor.fetchone()
        return self.loads(raw)  # type: ignore[no-any-return]

    async def save(self, user: int, data: dict[str, Any]) -> None:
        await self.db.execute("INSERT OR REPLACE INTO users (id, data) VALUES (?, ?)", (user, self.dumps(data)))

    async def fill(self, records: dict[int, dict[str, Any]]) -> None:
        await self.db.executemany("INSERT OR REPLACE INTO users (id, data) VALUES (?, ?)",
                                  [(user, self.dumps(data)) for user, data in records.items()])


SYSTEMS: dict[str, Callable[[], System]] = {
    "mem-floor": lambda: MemFloor(),
    "mem-floor-json": lambda: MemFloor(stdlib=True),
    "disk-floor-durable": lambda: DiskFloor(durable=True),
    "disk-floor-fast": lambda: DiskFloor(durable=False),
    "jason-durable": lambda: Jason(durable=True),
    "jason-fast": lambda: Jason(durable=False),
    "jason-per-file": lambda: Jason(durable=True, journal=False),
    "jason-stdlib-durable": lambda: Jason(durable=True),
    "jason-stdlib-fast": lambda: Jason(durable=False),
    "jason-db-0.2.0": OldJason,
    "tinydb": lambda: Tiny(caching=False),
    "tinydb-caching": lambda: Tiny(caching=True),
    "pickledb": Pickle,
    "sqlitedict": SqliteDict,
    "diskcache": DiskCache,
    "shelve": Shelve,
    "sqlite-wal-full": lambda: Sqlite(durable=True),
    "sqlite-thread": SqliteThread,
    "sqlite-wal-normal": lambda: Sqlite(durable=False),
    "aiosqlite-wal-full": AioSqlite,
}
STDLIB_ONLY = {"mem-floor-json", "jason-stdlib-durable", "jason-stdlib-fast"}
SCALE_SYSTEMS = ["disk-floor-durable", "jason-durable", "jason-per-file", "sqlite-wal-full"]


# ---------------------------------------------------------------- workloads (in the worker)


async def run_limited(operation: Callable[[int], Any], users: Any, limit: int) -> None:
    """await operation(user) for every user, `limit` at a time, keeping no results: memory stays flat."""
    pending = iter(users)

    async def worker() -> None:
        for user in pending:
            await operation(user)

    await asyncio.gather(*(worker() for _ in range(limit)))


async def per_op_us(operation: Callable[[int], Any], users: list[int]) -> float:
    start = time.perf_counter()
    for user in users:
        await operation(user)
    return (time.perf_counter() - start) / len(users) * 1e6


async def chat_mix(system: System, users: int, seconds: float) -> dict[str, float]:
    """CLIENTS clients for `seconds`: 80% loads, 20% read-modify-writes of random users."""
    increments = dict.fromkeys(range(users), 0)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            user = rng.randrange(users)
            start = time.perf_counter()
            if rng.random() < LOAD_SHARE:
                await system.load(user)
            else:
                await system.increment(user)
                increments[user] += 1
            latencies.append(time.perf_counter() - start)

    before = await system.count_messages(users)
    start = time.perf_counter()
    await asyncio.gather(*(client(seed) for seed in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    after = await system.count_messages(users)
    lost = sum(before[user] + increments[user] - after[user] for user in range(users))
    latencies.sort()
    return {"ops_per_s": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3, "lost_updates": lost}


async def messages(system: System, user: int) -> int:
    return (await system.load(user))["counters"]["messages"]  # type: ignore[no-any-return]


async def storm(system: System, user: int, count: int) -> dict[str, float]:
    before = await messages(system, user)
    start = time.perf_counter()
    await asyncio.gather(*(system.increment(user) for _ in range(count)))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "lost_updates": before + count - await messages(system, user)}


def peak_rss_mb() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def folder_bytes(folder: str) -> int:
    """The bytes of the folder's files now: a file a checkpoint deletes meanwhile (a journal) counts 0."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(root, name))
    return total


async def run_fill(key: str, users: int, folder: str) -> dict[str, Any]:
    system = SYSTEMS[key]()
    if isinstance(system, MemFloor):
        return {}
    await system.open(folder)
    await system.fill({user: make_record(user) for user in range(users)})
    await system.close()
    return {}


async def paired_with_floor(system: Jason, folder: str, users: list[int]) -> dict[str, float]:
    """JASON and the bare recipe alternating in one process on one folder: ratios that drift cannot skew."""
    floor = DiskFloor(system.durable)
    await floor.open(folder)
    loads: dict[str, list[float]] = {"floor": [], "jason": []}
    saves: dict[str, list[float]] = {"floor": [], "jason": []}
    batches = [users[i:i + 25] for i in range(0, len(users), 25)]
    for index, batch in enumerate(batches):
        for name, runner in (("floor", floor), ("jason", system)) if index % 2 == 0 else (("jason", system),
                                                                                          ("floor", floor)):
            half = batch[:12] if name == "floor" else batch[12:]
            loads[name].append(await per_op_us(runner.load, half))  # each user read for the first time: cold
            saves[name].append(await per_op_us(lambda user, r=runner: r.save(user, make_record(user)), half))
    return {"paired_cold_load_ratio": statistics.median(loads["jason"]) / statistics.median(loads["floor"]),
            "paired_save_ratio": statistics.median(saves["jason"]) / statistics.median(saves["floor"])}


async def run_worker(key: str, users: int, seconds: float, folder: str, scale: bool) -> dict[str, Any]:
    rng = random.Random(1)
    system = SYSTEMS[key]()
    result: dict[str, Any] = {"name": system.name, "guarantees": system.guarantees, "burst": system.burst}
    if isinstance(system, MemFloor):  # its store lives in this process only
        await system.fill({user: make_record(user) for user in range(users)})
    start = time.perf_counter()
    await system.open(folder)
    await system.load(0)
    result["open_ms"] = (time.perf_counter() - start) * 1e3
    sample = rng.sample(range(1, users), min(users - 1, 600))
    result["cold_load_us"] = await per_op_us(system.load, sample[:300])
    if not scale:
        result["hot_load_us"] = await per_op_us(system.load, [rng.choice(sample[:300]) for _ in range(system.reads)])
    result["save_us"] = await per_op_us(lambda user: system.save(user, make_record(user)), sample[300:400])
    if isinstance(system, Jason):
        result.update(await paired_with_floor(system, folder, sample[400:600]))
    if scale:
        start = time.perf_counter()
        await run_limited(system.load, range(users), CLIENTS)
        result["load_all_s"] = time.perf_counter() - start
        result["disk_mb"] = folder_bytes(folder) / 1e6
        result["peak_rss_mb"] = peak_rss_mb()
        await system.close()
        return result
    burst = list(range(system.burst))
    start = time.perf_counter()
    await run_limited(lambda user: system.save(user, make_record(user)), burst, CLIENTS)
    result["save_100_clients_per_s"] = len(burst) / (time.perf_counter() - start)
    result["chat_mix"] = await chat_mix(system, users, seconds)
    result["storm"] = await storm(system, 1, system.burst)
    result["peak_rss_mb"] = peak_rss_mb()
    await system.close()
    return result


# ---------------------------------------------------------------- the runner


def run_child(key: str, users: int, seconds: float, folder: str, mode: str, timeout: float) -> dict[str, Any]:
    """Run a worker in a fresh interpreter; STDLIB_ONLY systems run with orjson and aiofiles blocked."""
    block = "import sys; sys.modules['orjson'] = None; sys.modules['aiofiles'] = None; " if key in STDLIB_ONLY else ""
    code = block + f"import sys; sys.path.insert(0, {HERE!r}); import bench; bench.worker_main(sys.argv[1:])"
    command = [sys.executable, "-c", code, key, str(users), str(seconds), folder, mode]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        last_line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"skipped": f"failed: {last_line}"}
    result: dict[str, Any] = json.loads(done.stdout)
    result["worker_seconds"] = round(time.perf_counter() - started, 2)
    return result


def run_one(key: str, users: int, seconds: float, timeout: float) -> dict[str, Any]:
    """Fill a fresh folder for one system in one process, then measure it in another."""
    folder = tempfile.mkdtemp(prefix=f"jason-bench-{key}-", dir=os.environ.get("JASON_BENCH_DIR"))
    try:
        filled = run_child(key, users, seconds, folder, "fill", timeout)
        if "skipped" in filled:
            return filled
        return run_child(key, users, seconds, folder, "main", timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def worker_main(argv: list[str]) -> None:
    key, users, seconds, folder, mode = argv
    if mode == "fill":
        result = asyncio.run(run_fill(key, int(users), folder))
    else:
        result = asyncio.run(run_worker(key, int(users), float(seconds), folder, mode == "scale"))
    print(json.dumps(result))


def run_scale(keys: list[str], users: int, seconds: float) -> dict[str, list[dict[str, Any]]]:
    """One run each at this many users. JASON and the disk floor share one folder: their files are alike."""
    results: dict[str, list[dict[str, Any]]] = {}
    shared = tempfile.mkdtemp(prefix="jason-bench-scale-", dir=os.environ.get("JASON_BENCH_DIR"))
    try:
        for key in keys:
            print(f"scale {users}: {key}", file=sys.stderr, flush=True)
            if key in ("disk-floor-durable", "jason-durable"):
                if not os.listdir(shared):
                    run_child("jason-durable", users, seconds, shared, "fill", 600)
                results[key] = [run_child(key, users, seconds, shared, "scale", 300)]
            else:
                folder = tempfile.mkdtemp(prefix=f"jason-bench-{key}-", dir=os.environ.get("JASON_BENCH_DIR"))
                try:
                    run_child(key, users, seconds, folder, "fill", 600)
                    results[key] = [run_child(key, users, seconds, folder, "scale", 300)]
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return results


def median_of(runs: list[dict[str, Any]], path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="chat-mix duration per run")
    parser.add_argument("--quick", action="store_true", help="one round, short mixes, no 100,000-user scale")
    parser.add_argument("--only", nargs="*", help="run only these systems")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    seconds = 1.0 if args.quick else args.seconds
    keys = args.only or list(SYSTEMS)
    started = time.time()

    raw: dict[str, Any] = {"main": {key: [] for key in keys}, "scale": {}}
    for round_number in range(rounds):
        for key in keys:
            print(f"round {round_number + 1}/{rounds}: {key}", file=sys.stderr, flush=True)
            raw["main"][key].append(run_one(key, USERS, seconds, timeout=120))
    for users in [10_000] if args.quick else [10_000, 100_000]:
        raw["scale"][str(users)] = run_scale([key for key in SCALE_SYSTEMS if key in keys], users, seconds)
    raw["machine"] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds, "chat_mix_seconds": seconds,
        "wall_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(HERE, "results.json"), "w", encoding="utf-8") as file:
        json.dump(raw, file, indent=1)
    report = render_report(raw)
    with open(os.path.join(HERE, "results.md"), "w", encoding="utf-8") as file:
        file.write(report)
    with open(os.path.join(HERE, "chart.svg"), "w", encoding="utf-8") as file:
        file.write(render_chart(raw))
    print(report)
    return 0


# ---------------------------------------------------------------- the report


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if value < 1000 else f"{value:,.0f}"


def ratio(value: float | None, floor: float | None) -> str:
    return "" if value is None or not floor else f" ({value / floor:.2f}x)"


AGAINST_SQLITE = [("jason-durable", "JASON default (the journal)"), ("jason-per-file", "JASON journal=False"),
                  ("sqlite-thread", "SQLite in a thread"), ("sqlite-wal-full", "SQLite inline"),
                  ("aiosqlite-wal-full", "aiosqlite")]


def against_sqlite(main: dict[str, Any]) -> list[str]:
    """JASON's durable modes and the ways a bot calls SQLite (WAL, FULL), as ratios to SQLite in a thread."""
    def figures(key: str) -> dict[str, float | None]:
        ok = [run for run in main.get(key, []) if "skipped" not in run]
        save, storm = median_of(ok, "save_us"), median_of(ok, "storm.seconds")
        return {"saves": 1e6 / save if save else None, "mix": median_of(ok, "chat_mix.ops_per_s"),
                "p99": median_of(ok, "chat_mix.p99_ms"), "storm": 1 / storm if storm else None,
                "lost": median_of(ok, "chat_mix.lost_updates"), "storm_lost": median_of(ok, "storm.lost_updates")}

    base = figures("sqlite-thread")

    def times(value: float | None, of: float | None) -> str:
        return f"{value / of:.2f}x" if value and of else ""

    lines = ["", "## Against SQLite", "",
             "Each durable mode of JASON and each way a bot calls SQLite (WAL, `synchronous=FULL`: every commit "
             "fsynced), as ratios to SQLite called in a worker thread, measured in this run (higher is faster; "
             "p99 in ms, lower is better). One client: durable saves, one after another. Chat mix: 100 clients, "
             "80% loads and 20% read-modify-writes. Storm: 1,000 concurrent increments of one user.", "",
             "| | one client, durable saves | chat mix | chat mix p99 ms | storm | lost (mix, storm) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in AGAINST_SQLITE:
        row = figures(key)
        lines.append(" | ".join([f"| {label}", times(row["saves"], base["saves"]), times(row["mix"], base["mix"]),
                                 fmt(row["p99"], 1), times(row["storm"], base["storm"]),
                                 f"{fmt(row['lost'], 0)}, {fmt(row['storm_lost'], 0)}"]) + " |")
    return lines


def render_report(raw: dict[str, Any]) -> str:
    main = raw["main"]
    floors = {path: {mode: median_of(main.get(key, []), path) for mode, key in pairs.items()} for path, pairs in {
        "hot_load_us": {"orjson": "mem-floor", "stdlib": "mem-floor-json"},
        "cold_load_us": {"orjson": "disk-floor-fast", "stdlib": "disk-floor-fast"},
    }.items()}
    save_floor = {True: median_of(main.get("disk-floor-durable", []), "save_us"),
                  False: median_of(main.get("disk-floor-fast", []), "save_us")}
    machine = raw["machine"]
    lines = [
        "# Benchmark results", "",
        f"{machine['date']}; Python {machine['python']}; {machine['platform']}; {machine['cpus']} CPUs; "
        f"median of {machine['rounds']} rounds, each system in a fresh process; {USERS} users of ~1 KB; "
        f"chat mix {CLIENTS} clients for {machine['chat_mix_seconds']:g} s; whole run {machine['wall_seconds']:g} s.",
        "",
        "Ratios in brackets are to the floor measured in the same run: hot load to the mem floor (orjson, or json "
        "for stdlib systems), cold load to the disk floor's read, save to the disk floor of the same durability.",
        "",
        "For JASON, `paired` also gives its cold load and save as a ratio to the bare recipe run alternately in the "
        "same process on the same folder (median of batches), which drift between processes cannot skew. "
        "Slow peers run a shorter burst and storm; the count is then shown in brackets.",
        "",
        "| system | guarantees | hot load µs | cold load µs | save µs | paired: cold, save | saves/s, 100 clients | "
        "chat mix ops/s | p50 ms | p99 ms | lost | storm s | storm lost | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, runs in main.items():
        ok = [run for run in runs if "skipped" not in run]
        if not ok:
            lines.append(f"| {key} | skipped: {runs[0]['skipped'] if runs else 'not run'} |" + " |" * 12)
            continue
        mode = "stdlib" if key in STDLIB_ONLY else "orjson"
        durable = any(key.startswith(p) for p in ("disk-floor-durable", "jason-durable", "jason-per-file",
                                                  "jason-stdlib-durable", "sqlite-thread",
                                                  "sqlitedict", "sqlite-wal-full", "aiosqlite"))
        hot, cold, save = (median_of(ok, p) for p in ("hot_load_us", "cold_load_us", "save_us"))
        paired = (f"{median_of(ok, 'paired_cold_load_ratio'):.2f}x, {median_of(ok, 'paired_save_ratio'):.2f}x"
                  if median_of(ok, "paired_save_ratio") else "")
        burst = "" if ok[0].get("burst", 1000) == 1000 else f" ({ok[0]['burst']})"
        lines.append(" | ".join([
            f"| {ok[0]['name']}", ok[0]["guarantees"],
            fmt(hot, 2) + ratio(hot, floors["hot_load_us"][mode]),
            fmt(cold) + ratio(cold, floors["cold_load_us"][mode]),
            fmt(save) + ratio(save, save_floor[durable]), paired,
            fmt(median_of(ok, "save_100_clients_per_s"), 0) + burst,
            fmt(median_of(ok, "chat_mix.ops_per_s"), 0),
            fmt(median_of(ok, "chat_mix.p50_ms"), 2), fmt(median_of(ok, "chat_mix.p99_ms"), 2),
            fmt(median_of(ok, "chat_mix.lost_updates"), 0),
            fmt(median_of(ok, "storm.seconds"), 2) + burst, fmt(median_of(ok, "storm.lost_updates"), 0),
            fmt(median_of(ok, "peak_rss_mb"), 0),
        ]) + " |")
    lines += against_sqlite(main)
    lines += ["", "## Scale", "",
              "One run each. Cold load and save are also shown as a ratio to the same system's median at 1,000 users "
              "above. `load all` reads every user once, 100 at a time; peak RSS is the process's peak after it.", "",
              "| system | users | open ms | cold load µs | save µs | load all s | disk MB | peak RSS MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for users, systems in raw["scale"].items():
        for key, runs in systems.items():
            ok = [run for run in runs if "skipped" not in run]
            if not ok:
                lines.append(f"| {key} | {users} | skipped: {runs[0]['skipped']} | | | | | |")
                continue
            base = [run for run in main.get(key, []) if "skipped" not in run]
            cold, save = median_of(ok, "cold_load_us"), median_of(ok, "save_us")
            lines.append(" | ".join([
                f"| {ok[0]['name']}", f"{int(users):,}", fmt(median_of(ok, "open_ms")),
                fmt(cold) + ratio(cold, median_of(base, "cold_load_us")),
                fmt(save) + ratio(save, median_of(base, "save_us")),
                fmt(median_of(ok, "load_all_s")), fmt(median_of(ok, "disk_mb")), fmt(median_of(ok, "peak_rss_mb")),
            ]) + " |")
    return "\n".join(lines) + "\n"


def render_chart(raw: dict[str, Any]) -> str:
    """A horizontal bar chart of chat-mix throughput, durable systems in one colour, the rest in another."""
    bars = []
    for key, runs in raw["main"].items():
        ok = [run for run in runs if "skipped" not in run]
        value = median_of(ok, "chat_mix.ops_per_s")
        if value is not None and not key.startswith("mem-floor"):
            durable = "fsync" in ok[0]["guarantees"] and "no fsync" not in ok[0]["guarantees"]
            bars.append((ok[0]["name"], value, durable))
    bars.sort(key=lambda bar: -bar[1])
    width, left, row = 760, 230, 22
    top = max((value for _, value, _ in bars), default=1)
    height = 50 + row * len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="10" y="20" font-size="14" font-weight="bold">Chat mix: operations per second, {CLIENTS} '
             'clients, 80% load / 20% read-modify-write (higher is better)</text>',
             '<text x="10" y="38" fill="#555">dark: a returned save has been fsynced; light: it has not</text>']
    for index, (name, value, durable) in enumerate(bars):
        y = 48 + index * row
        length = (width - left - 90) * value / top
        colour = "#1f5fa8" if durable else "#9cc3ea"
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" fill="{colour}"/>')
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 14}">{value:,.0f}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
