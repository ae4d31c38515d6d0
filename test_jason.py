"""Tests for jason.py: python -m unittest -v test_jason

Every test runs with whatever optional packages (orjson, the drivers, the frameworks) are installed; `make test`
runs it twice, the second time with orjson blocked, on the tests that go through the JSON codec.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import datetime
import errno
import functools
import gc
import glob
import inspect
import itertools
import json
import logging
import os
import pickle
import queue
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import unicodedata
import unittest
import zipfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TYPE_CHECKING, Any, Callable, ClassVar
from unittest import mock

import jason
from jason import (
    JASON,
    CorruptDataError,
    DatabaseLockedError,
    InvalidUserIdError,
    JasonError,
    ReadOnlyError,
)

# IsolatedAsyncioTestCase runs the loop in debug mode, which logs every step
# slower than 0.1 s; on a shared machine that is noise, not a finding.
logging.getLogger("asyncio").setLevel(logging.ERROR)

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_TIMEOUT = 60
# `make quick` sets JASON_QUICK=1: the slow tests skip and the CLI works on a smaller folder.
# CI sets JASON_FULL=1: the full sizes (10,000-user folders and copies); 2,000 already crosses every
# batch boundary (32, 64, 256 and 1,000 records) and the progress counter's threshold.
QUICK = os.environ.get("JASON_QUICK") == "1"
FULL = os.environ.get("JASON_FULL") == "1"

# `make test` starts one of its two processes in the background, where a shell ignores SIGINT: take it
# back, so that Ctrl-C stops that process too (and with it the servers it started).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
CLI_USERS = 300 if QUICK else 10_000 if FULL else 2_000  # 300: still more than one batch (RECORDS_PER_BATCH)
OPTIONAL_PACKAGES_BLOCKED = sys.modules.get("orjson", "not imported") is None  # make test-stdlib
_missing_here: list[str] = []


def needs(available: object, what: str) -> Callable[[Any], Any]:
    """skipUnless(available, what), remembered so that the run ends by saying what to install."""
    if not available:
        _missing_here.append(what)
    return unittest.skipUnless(available, what)


def slow(test: Any) -> Any:
    return unittest.skipIf(QUICK, "slow: left out by make quick")(test)


def tearDownModule() -> None:
    SERVERS.stop()
    if _missing_here:
        print("\nnot run here, for want of: " + "; ".join(_missing_here), file=sys.stderr)


DEFAULT: dict[str, Any] = {"challenges": {}, "active_challenge": None, "challenge_balance": 0, "profile": {"tags": []}}
RECORD: dict[str, Any] = {
    "challenges": {"run": 3}, "active_challenge": "run", "challenge_balance": 5, "profile": {"tags": ["x"]},
}


# Hides the optional packages from an interpreter; `make test-stdlib` runs the suite with the
# same lines as a sitecustomize on PYTHONPATH, which child_env() passes on to every child.
def without(*modules: str) -> str:
    """Python that makes modules unimportable, as on a machine without them: the suite's one such probe."""
    return "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules)


OPTIONAL_BLOCK = without("orjson", "aiofiles")


def child_env() -> dict[str, str]:
    """The environment of every child interpreter: this checkout's jason first, then the run's PYTHONPATH."""
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": HERE + (os.pathsep + inherited if inherited else "")}


def run_child(code: str, *args: str, timeout: float = CHILD_TIMEOUT,
              missing: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter that imports this checkout's jason, where the modules missing are not."""
    return subprocess.run(
        [sys.executable, "-c", without(*missing) + textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, env=child_env(), check=False,
    )


async def until(condition: Callable[[], bool], timeout: float = CHILD_TIMEOUT) -> None:
    """Wait, polling, until condition() holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        await asyncio.sleep(0.005)


def nested_dicts(depth: int) -> dict[str, object]:
    """{"d": {"d": ... {}}}, depth dicts deep."""
    top: dict[str, object] = {}
    node = top
    for _ in range(depth - 1):
        child: dict[str, object] = {}
        node["d"] = child
        node = child
    return top


async def add_one(db: JASON, user: int | str, field: str = "challenge_balance") -> None:
    """One read-modify-write that lets every other task run between its read and its write."""
    async with db.edit_user_data(user) as data:
        value = data.get(field, 0)
        await asyncio.sleep(0)
        data[field] = value + 1


async def cached_users(db: JASON, candidates: Iterator[int | str]) -> set[str]:
    """The candidates db serves from its cache: those that still load with the disk gone."""
    served = set()
    with mock.patch("os.open", side_effect=OSError(errno.EIO, "the disk is gone")):
        for user in candidates:
            with contextlib.suppress(OSError):
                await db.load_user_data(user)
                served.add(str(user))
    return served


@contextlib.contextmanager
def gated(function: str, selects: Callable[[tuple[object, ...]], bool],
          then_raise: int | None = None) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Make os.<function> wait, on the calls that selects() picks, until the test opens the gate.

    Yields (entered, gate): entered is set once such a call is waiting; then the
    call goes on, or raises OSError(then_raise) when that is given.
    """
    real = getattr(os, function)
    entered, gate = threading.Event(), threading.Event()

    def fake(*args: object, **kwargs: object) -> object:
        if selects(args):
            entered.set()
            if not gate.wait(CHILD_TIMEOUT):
                raise AssertionError("the gate was never opened")
            if then_raise is not None:
                raise OSError(then_raise, os.strerror(then_raise))
        return real(*args, **kwargs)

    with mock.patch(f"os.{function}", fake):
        try:
            yield entered, gate
        finally:
            gate.set()


async def wait_for_event(event: threading.Event) -> None:
    """Wait for a threading.Event without blocking the loop (bounded by CHILD_TIMEOUT)."""
    if not await asyncio.to_thread(event.wait, CHILD_TIMEOUT):
        raise AssertionError("the event never came")


def rendezvous(parties: int) -> Callable[[], Awaitable[None]]:
    """An awaitable that returns once `parties` tasks are all waiting on it (asyncio.Barrier before 3.11)."""
    arrived = [0]
    everyone = asyncio.Event()

    async def wait() -> None:
        arrived[0] += 1
        if arrived[0] == parties:
            everyone.set()
        await everyone.wait()

    return wait


def renames_into_folder(args: tuple[object, ...]) -> bool:
    return os.path.basename(str(args[0])).startswith(jason.TEMP_PREFIX)


def lock_registry_size(db: JASON) -> int:
    """The one look at JASON's private state: how many per-user locks it keeps.

    No public behaviour shows a lock that is kept but never used again; memory
    (LifecycleTest) shows it only in bulk.
    """
    return len(db._locks)


def fill_folder(folder: str, records: dict[str, dict[str, object]]) -> None:
    """Save every record (fast mode, 64 at a time) through the public API."""

    async def fill() -> None:
        async with JASON(folder, durable=False) as db:
            pending = iter(records.items())

            async def worker() -> None:
                for key, data in pending:
                    await db.save_user_data(key, data)

            await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(fill())


def read_folder(folder: str) -> dict[str, dict[str, object]]:
    """Every user's record, through a readonly JASON."""

    async def everyone() -> dict[str, dict[str, object]]:
        async with JASON(folder, readonly=True) as db:
            return {key: await db.load_user_data(key) for key in await db.user_ids()}

    return asyncio.run(everyone())


def jason_records(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".json")]


def temp_files(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(jason.TEMP_PREFIX)]


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


STORM_WRITER = """
import asyncio, random, sys, jason
folder, log_path, mode, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def main():
    db = jason.JASON(folder, durable=mode != "fast", journal=mode == "journal")
    log = open(log_path, "a", buffering=1)
    async def writer(worker):
        rng = random.Random(worker)
        for n in range(first, 10**12):
            user = rng.choice([0, 0, 0, 1, 1]) if rng.random() < 0.5 else rng.randrange(20)
            log.write(f"{user} {worker} {n}\\n")  # the intent, before the save
            await db.save_user_data(user, {"worker": worker, "n": n, "pad": "x" * (n % 3001)})
            log.write(f"R {user} {worker} {n}\\n")  # returned
    await asyncio.gather(*(writer(w) for w in range(4)))
asyncio.run(main())
"""


def storm_pad(n: int) -> str:
    return "x" * (n % 3001)


def start_storm_writer(folder: str, log_path: str, mode: str = "durable", first: int = 0) -> subprocess.Popen[bytes]:
    """A child that saves 20 users (two of them hot) from 4 coroutines, as fast as it can.

    mode is "durable", "fast" or "journal". The log gets "user worker n" before each save and
    "R user worker n" once it has returned; each worker counts n up from first.
    """
    return subprocess.Popen([sys.executable, "-c", STORM_WRITER, folder, log_path, mode, str(first)],
                            env=child_env())


def postgres_bin_dir() -> str | None:
    """The folder holding initdb, pg_ctl and psql, or None."""
    for folder in [os.path.dirname(shutil.which("initdb") or ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]:
        if folder and all(os.path.exists(os.path.join(folder, tool)) for tool in ("initdb", "pg_ctl")):
            return folder
    return None


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# Stops the servers when the test process ends, however it ends (a SIGKILL, a timeout, Ctrl-C): it reads
# one stop command per line from a pipe that only the test process holds, and runs them once the pipe
# closes, unless the tests stopped the servers themselves ("done"). In a session of its own, so that
# the Ctrl-C that stops the tests does not stop it first.
SERVER_WATCHDOG = """
import json, shutil, subprocess, sys
commands = []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    commands.append(json.loads(line))
for command in reversed(commands):
    if command[0] == "rmtree":
        shutil.rmtree(command[1], ignore_errors=True)
    else:
        subprocess.run(command, capture_output=True, timeout=120, check=False)
"""


class ThrowawayServers:
    """This run's own PostgreSQL and Redis servers: started on first use in a temporary folder,
    listening on Unix sockets only, stopped when the module's tests end, or by a watchdog when the
    test process ends without getting there."""

    def __init__(self) -> None:
        self._work: tempfile.TemporaryDirectory[str] | None = None
        self._urls: dict[str, str] = {}
        self._stops: list[Callable[[], object]] = []
        self._watchdog: subprocess.Popen[str] | None = None
        self.namespaces = (f"t{n}" for n in itertools.count())

    def _on_exit(self, *command: str) -> None:
        """Have the watchdog run command if this process ends with the servers still running."""
        if self._watchdog is None:
            self._watchdog = subprocess.Popen([sys.executable, "-c", SERVER_WATCHDOG], stdin=subprocess.PIPE,
                                              text=True, start_new_session=True)
        assert self._watchdog.stdin is not None
        self._watchdog.stdin.write(json.dumps(command) + "\n")
        self._watchdog.stdin.flush()

    def _folder(self, name: str) -> str:
        if self._work is None:
            self._work = tempfile.TemporaryDirectory(prefix="jason-servers-")
            os.chmod(self._work.name, 0o755)
            self._on_exit("rmtree", self._work.name)
        folder = os.path.join(self._work.name, name)
        os.mkdir(folder)
        return folder

    @staticmethod
    def run(*command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{command[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def url(self, backend: str) -> str:
        if backend not in self._urls:
            try:
                self._urls[backend] = self._start_postgres() if backend == "postgres" else self._start_redis()
            except AssertionError as exc:
                self._urls[backend] = f"failed: {exc}"
        if self._urls[backend].startswith("failed: "):
            raise AssertionError(f"the {backend} server did not start: {self._urls[backend]}")
        return self._urls[backend]

    def _start_postgres(self) -> str:
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None
        work = self._folder("postgres")
        data, sockets = os.path.join(work, "data"), os.path.join(work, "sockets")
        os.mkdir(data, 0o700)
        os.mkdir(sockets)
        as_server: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            nobody = pwd.getpwnam("nobody")
            for folder in (data, sockets):
                os.chown(folder, nobody.pw_uid, nobody.pw_gid)
            as_server = ["runuser", "-u", "nobody", "--"]
        self.run(*as_server, os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--locale=C")
        self.postgres_ctl = [*as_server, os.path.join(bin_dir, "pg_ctl"), "-D", data, "-w"]
        self.postgres_start = [*self.postgres_ctl, "-o", f"-c listen_addresses='' -k {sockets} -c fsync=on",
                               "-l", os.path.join(sockets, "log"), "start"]
        self._on_exit(*self.postgres_ctl, "-m", "immediate", "stop")
        self.run(*self.postgres_start)
        self._stops.append(lambda: self.run(*self.postgres_ctl, "-m", "immediate", "stop"))
        self.postgres_sockets = sockets
        return f"postgresql://postgres@/postgres?host={sockets}"

    @staticmethod
    def _accepts(path: str) -> bool:
        """True once a server listens on the Unix socket at path."""
        import socket

        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                return False
        return True

    def _start_redis(self) -> str:
        work = self._folder("redis")
        self.redis_socket = os.path.join(work, "redis.sock")
        self.redis_start = ["redis-server", "--port", "0", "--unixsocket", self.redis_socket, "--dir", work,
                            "--daemonize", "yes", "--pidfile", os.path.join(work, "redis.pid"),
                            "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self._on_exit("redis-cli", "-s", self.redis_socket, "shutdown", "nosave")
        self.run(*self.redis_start)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not self._accepts(self.redis_socket):  # the socket file exists a moment before it listens
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.01)
        self._stops.append(lambda: self.run("redis-cli", "-s", self.redis_socket, "shutdown", "nosave"))
        return f"unix://{self.redis_socket}"

    def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(AssertionError, OSError, subprocess.TimeoutExpired):
                stop()
        self._stops.clear()
        self._urls.clear()
        if self._work is not None:
            self._work.cleanup()
            self._work = None
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            with contextlib.suppress(OSError):
                self._watchdog.stdin.write("done\n")
                self._watchdog.stdin.close()
            self._watchdog.wait(CHILD_TIMEOUT)
            self._watchdog = None


SERVERS = ThrowawayServers()
HAVE_POSTGRES = bool(postgres_bin_dir()) and importable("asyncpg")
HAVE_REDIS = bool(shutil.which("redis-server")) and importable("redis")
for _available, _what in [
    (postgres_bin_dir(), "PostgreSQL, for the PostgreSQL backend (apt-get install postgresql)"),
    (importable("asyncpg"), "asyncpg, for the PostgreSQL backend (pip install asyncpg)"),
    (shutil.which("redis-server"), "Redis, for the Redis backend (apt-get install redis-server)"),
    (importable("redis"), "redis-py, for the Redis backend (pip install redis)"),
]:
    if not _available:
        _missing_here.append(_what)


def async_only(test: Any) -> Any:
    """Mark a test of the API suite not run again on SyncJASON: a size test, whose code path the others cover."""
    test.async_only = True
    return test


def folder_only(test: Any) -> Any:
    """Mark a test of a backend-parametrised class that looks at a folder's files."""
    test.folder_only = True
    return test


def per_file(test: Any) -> Any:
    """Mark a folder test of how a save writes its own file: it runs with journal=False."""
    test.folder_only = test.per_file = True
    return test


class FolderMixin(unittest.IsolatedAsyncioTestCase):
    """A fresh database per test, on the class's backend; every database opened through open_db is closed.

    backend is "folder" here; the classes made by on_every_backend() run the same
    tests on PostgreSQL and Redis, each test in a namespace of its own.
    """

    backend: ClassVar[str] = "folder"
    journal: ClassVar[bool | None] = None  # a folder's: the default, or False for the classes about files

    async def asyncSetUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-test-")
        self.addCleanup(self._tmp.cleanup)  # the first cleanup runs last: after every instance a test closes
        self.folder = os.path.join(self._tmp.name, "users")
        self._opened: list[JASON] = []
        if self.backend == "folder":
            self.location = self.folder
            journal = False if getattr(getattr(self, self._testMethodName), "per_file", False) else self.journal
            self.options: dict[str, Any] = {} if journal is None else {"journal": journal}
        else:
            self.location = SERVERS.url(self.backend)
            self.options = {"namespace": next(SERVERS.namespaces)}
        self.db = self.open_db()

    async def asyncTearDown(self) -> None:
        for db in self._opened:
            await db.close()

    def open_db(self, **options: object) -> JASON:
        options.setdefault("default_structure", DEFAULT)
        db = JASON(self.location, **{**self.options, **options})  # type: ignore[arg-type]
        self._opened.append(db)
        return db

    def path(self, user_id: int | str) -> str:
        return os.path.join(self.folder, jason._file_name(jason._user_key(user_id)))

    async def stored_bytes(self, user_id: int | str) -> bytes | None:
        """The user's record as the backend holds it, read past JASON: a file, a row, a hash field."""
        key = jason._user_key(user_id)
        if self.backend == "folder":  # the journal first, as every reader of a folder does
            newer = jason._JournalReader(self.folder).newer(key)
            if newer is not None:
                return newer[0]
            return read_bytes(self.path(user_id)) if os.path.exists(self.path(user_id)) else None
        if self.backend == "postgres":
            import asyncpg

            connection = await asyncpg.connect(self.location)
            try:
                text = await connection.fetchval(
                    f'SELECT data FROM "{self.options["namespace"]}" WHERE user_id = $1 AND data IS NOT NULL', key)
            except asyncpg.UndefinedTableError:
                text = None
            finally:
                await connection.close()
            # The table holds each NUL as two private-use characters (PostgreSQL refuses \u0000): undo that.
            return None if text is None else jason._with_nul(text.encode())
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.location)
        try:
            value = await client.hget(f'{self.options["namespace"]}:users', key)
        finally:
            await client.aclose()
        return value if value is None or isinstance(value, bytes) else value.encode()

    async def stored(self, user_id: int | str) -> object:
        raw = await self.stored_bytes(user_id)
        return None if raw is None else json.loads(raw)


def on_every_backend(*test_classes: type[FolderMixin]) -> None:
    """Run these test classes on PostgreSQL and Redis too, as PostgresLoadTest, RedisLoadTest, ..."""
    for name, available, reason in [
        ("postgres", HAVE_POSTGRES, "PostgreSQL and asyncpg"), ("redis", HAVE_REDIS, "Redis and redis-py"),
    ]:
        for test_class in test_classes:
            # A folder-only test is left out of the variant (not callable, so never collected), not skipped.
            left_out = {attr: None for attr in dir(test_class)
                        if attr.startswith("test_") and getattr(getattr(test_class, attr), "folder_only", False)}
            variant = type(f"{name.capitalize()}{test_class.__name__}", (test_class,), {"backend": name, **left_out})
            variant = slow(unittest.skipUnless(available, f"needs {reason}")(variant))
            globals()[variant.__name__] = variant


# ---------------------------------------------------------------- construction


class ConstructionTest(FolderMixin):
    @folder_only
    async def test_creates_folder_with_parents_and_expands_home(self) -> None:
        with mock.patch.dict(os.environ, {"HOME": self._tmp.name, "USERPROFILE": self._tmp.name}):
            db = JASON("~/deep/er/users")
        try:
            self.assertEqual(db.folder, os.path.join(self._tmp.name, "deep", "er", "users"))
            self.assertTrue(os.path.isdir(db.folder))
        finally:
            await db.close()

    async def test_unstorable_default_structure_fails_at_construction(self) -> None:
        await self.db.close()
        defaults: list[tuple[Any, type[Exception]]] = [
            ({"s": {1, 2}}, TypeError), ({"x": float("nan")}, ValueError), ({1: "a"}, TypeError),
            (["not", "a", "dict"], TypeError)]
        for default, error in defaults:
            with self.subTest(default=default), self.assertRaises(error):
                JASON(self.folder, default)

    async def test_a_bad_default_structure_is_named_in_the_error(self) -> None:
        with self.assertRaisesRegex(TypeError, r"cannot store default_structure\['when'\]"):
            JASON(self.folder, {"when": object()})

    async def test_bad_cache_size_is_refused(self) -> None:
        for size, error in [(-1, ValueError), ("10", TypeError), (True, TypeError), (1.5, TypeError)]:
            with self.subTest(size=size), self.assertRaises(error):
                JASON(self.folder, cache_size=size)  # type: ignore[arg-type]

    async def test_default_structure_is_copied_at_construction(self) -> None:
        default: dict[str, list[str]] = {"items": []}
        db = self.open_db(default_structure=default)
        default["items"].append("changed later")
        self.assertEqual(await db.load_user_data(1), {"items": []})

    async def test_pretty_indents_by_two_spaces_and_compact_otherwise(self) -> None:
        await self.db.save_user_data(1, {"a": [1], "b": "é"})
        self.assertEqual(await self.stored_bytes(1), '{"a":[1],"b":"é"}'.encode())
        pretty = self.open_db(pretty=True)
        await pretty.save_user_data(2, {"a": [1], "b": "é"})
        self.assertEqual(await self.stored_bytes(2), '{\n  "a": [\n    1\n  ],\n  "b": "é"\n}\n'.encode())
        self.assertEqual(await self.db.load_user_data(2), {**DEFAULT, "a": [1], "b": "é"})

    @folder_only
    async def test_readonly_on_missing_folder_raises_and_creates_nothing(self) -> None:
        missing = os.path.join(self._tmp.name, "missing")
        with self.assertRaises(FileNotFoundError):
            JASON(missing, readonly=True)
        self.assertFalse(os.path.exists(missing))

    @folder_only
    async def test_readonly_creates_no_file_at_all(self) -> None:
        folder = os.path.join(self._tmp.name, "ro")
        os.mkdir(folder)
        async with JASON(folder, DEFAULT, readonly=True) as db:
            self.assertEqual(await db.load_user_data(7), DEFAULT)
            self.assertFalse(await db.user_exists(7))
            self.assertEqual(await db.user_ids(), [])
        self.assertEqual(os.listdir(folder), [])

    async def test_async_with_closes_and_every_call_after_close_raises(self) -> None:
        async with self.open_db() as db:
            await db.save_user_data(1, {"a": 1})
        calls = [db.load_user_data(1), db.save_user_data(1, {}), db.delete_user_data(1),
                 db.user_exists(1), db.user_ids()]
        for call in calls:
            with self.assertRaisesRegex(JasonError, "closed"):
                await call
        with self.assertRaisesRegex(JasonError, "closed"):
            async with db.edit_user_data(1):
                pass
        await db.close()  # twice is harmless

    @folder_only
    async def test_close_releases_the_writer_lock(self) -> None:
        await self.db.close()
        result = run_child(f"import jason; jason.JASON({self.folder!r}); print('opened')")
        self.assertEqual(result.stdout.strip(), "opened", result.stderr)


class SuccessiveEventLoopsTest(unittest.TestCase):
    def test_one_instance_survives_successive_asyncio_run_calls(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            db = JASON(folder, {"n": 0}, durable=False)

            async def bump(times: int) -> None:
                await asyncio.gather(*(add_one(db, "u", "n") for _ in range(times)))

            for _ in range(3):
                asyncio.run(bump(50))
            self.assertEqual(asyncio.run(db.load_user_data("u")), {"n": 150})
            self.assertEqual(lock_registry_size(db), 0)
            asyncio.run(db.close())


# ---------------------------------------------------------------- load


class LoadTest(FolderMixin):
    async def test_unknown_user_gets_the_default_and_no_file_is_written(self) -> None:
        self.assertEqual(await self.db.load_user_data(42), DEFAULT)
        self.assertEqual(await self.db.user_ids(), [])
        self.assertIsNone(await self.stored_bytes(42))

    async def test_missing_default_keys_are_filled_recursively_without_overwriting(self) -> None:
        older_code = self.open_db(default_structure={})  # saved before the structure grew
        await older_code.save_user_data(1, {"challenge_balance": 9, "active_challenge": {"kept": True},
                                            "profile": {"name": "a"}, "extra": 1})
        self.assertEqual(await self.db.load_user_data(1), {
            "challenge_balance": 9, "active_challenge": {"kept": True},
            "profile": {"name": "a", "tags": []}, "extra": 1, "challenges": {},
        })

    async def test_a_stored_non_dict_is_never_replaced_by_a_default_dict(self) -> None:
        await self.db.save_user_data(1, {"profile": None, "challenges": [1]})
        data = await self.db.load_user_data(1)
        self.assertIsNone(data["profile"])
        self.assertEqual(data["challenges"], [1])

    async def test_every_load_is_a_fully_independent_copy(self) -> None:
        await self.db.save_user_data(1, RECORD)
        first = await self.db.load_user_data(1)
        first["profile"]["tags"].append("leak")
        first["challenges"]["new"] = 1
        self.assertEqual(await self.db.load_user_data(1), RECORD)

    async def test_nested_defaults_are_never_shared_between_users(self) -> None:
        alice = await self.db.load_user_data("alice")
        alice["profile"]["tags"].append("alice only")
        alice["challenges"]["x"] = 1
        self.assertEqual(await self.db.load_user_data("bob"), DEFAULT)
        await self.db.save_user_data(3, {})
        three = await self.db.load_user_data(3)
        three["profile"]["tags"].append("three only")
        self.assertEqual((await self.db.load_user_data(4))["profile"], {"tags": []})
        self.assertEqual((await self.db.load_user_data(3))["profile"], {"tags": []})


# ---------------------------------------------------------------- save


class SaveTest(FolderMixin):
    async def test_round_trip_keeps_non_ascii_text_readable(self) -> None:
        data = {"name": "Zoë Привет 😀", "n": [1, 2.5, None, True], "d": {"x": {}}}
        await self.db.save_user_data(1, data)
        self.assertEqual(await self.db.load_user_data(1), {**DEFAULT, **data})
        raw = await self.stored_bytes(1)
        assert raw is not None
        self.assertIn("Zoë Привет 😀".encode(), raw)
        self.assertEqual(json.loads(raw), data)

    async def test_large_records_round_trip(self) -> None:
        db, uncached = self.open_db(default_structure={}), self.open_db(default_structure={}, cache_size=0)
        for data in ({"blob": "é" * 5_000_000}, {f"k{i}": i for i in range(100_000)},
                     {"rows": [{"id": i, "tags": ["a", "b"]} for i in range(50_000)]}):
            await db.save_user_data("big", data)
            self.assertEqual(await db.load_user_data("big"), data)
            self.assertEqual(await uncached.load_user_data("big"), data)

    async def test_data_that_is_not_a_mapping_is_refused(self) -> None:
        for data in ([1, 2], "text", None, 5):
            with self.subTest(data=data), self.assertRaises(TypeError):
                await self.db.save_user_data(1, data)  # type: ignore[arg-type]
        self.assertIsNone(await self.stored_bytes(1))

    async def test_any_mapping_is_accepted(self) -> None:
        await self.db.save_user_data(1, types.MappingProxyType({"a": 1}))  # type: ignore[arg-type]  # any Mapping works at run time
        self.assertEqual((await self.db.load_user_data(1))["a"], 1)

    async def test_unstorable_data_leaves_file_and_cache_unchanged(self) -> None:
        await self.db.save_user_data(1, RECORD)
        before = await self.stored_bytes(1)
        bad_values: list[tuple[Any, type[Exception]]] = [
            ({"when": object()}, TypeError), ({"nan": float("inf")}, ValueError),
            ({"deep": {"er": {2: "x"}}}, TypeError), ({"s": "\ud800"}, ValueError)]
        for data, error in bad_values:
            with self.subTest(data=data), self.assertRaises(error):
                await self.db.save_user_data(1, data)
            self.assertEqual(await self.stored_bytes(1), before)
            self.assertEqual(await self.db.load_user_data(1), RECORD)
        if self.backend == "folder":
            self.assertEqual(temp_files(self.folder), [])

    async def test_error_names_where_the_bad_value_is(self) -> None:
        with self.assertRaisesRegex(TypeError, r"data\['a'\]\[1\]\['b'\]: set"):
            await self.db.save_user_data(1, {"a": [0, {"b": {1}}]})

    async def test_mutating_data_after_save_changes_nothing_stored(self) -> None:
        data = {"items": [1]}
        await self.db.save_user_data(1, data)
        data["items"].append(2)
        self.assertEqual((await self.db.load_user_data(1))["items"], [1])

    @per_file
    async def test_durable_save_fsyncs_the_file_and_then_the_folder(self) -> None:
        synced: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            synced.append("folder" if _is_dir_fd(fd) else "file")
            real_fsync(fd)

        with mock.patch("os.fsync", recording_fsync):
            await self.db.save_user_data(1, {"a": 1})
            self.assertEqual(synced, ["file", "folder"])
            synced.clear()
            await self.open_db(durable=False, cache_size=0).save_user_data(2, {"a": 1})
            self.assertEqual(synced, [])

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc to name the fsynced folders")
    @folder_only
    async def test_a_durable_open_fsyncs_the_folders_it_creates_and_their_parents(self) -> None:
        synced: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        top = os.path.realpath(self._tmp.name)
        with mock.patch("os.fsync", recording_fsync):
            self._opened.append(JASON(os.path.join(top, "a", "b", "c")))
            self.assertEqual(set(synced), {top, *(os.path.join(top, *parts) for parts in ("a", "ab", "abc"))})
            synced.clear()
            self._opened.append(JASON(os.path.join(top, "fast", "x"), durable=False))
            self.assertEqual(synced, [])

    @unittest.skipIf(sys.platform == "win32", "POSIX permission bits")
    @per_file
    async def test_a_save_keeps_the_record_permissions(self) -> None:
        await self.db.save_user_data(1, RECORD)
        umask = os.umask(0)
        os.umask(umask)
        self.assertEqual(os.stat(self.path(1)).st_mode & 0o777, 0o666 & ~umask)  # a new record: the umask
        os.chmod(self.path(1), 0o600)
        await self.db.save_user_data(1, {"secret": True})
        self.assertEqual(os.stat(self.path(1)).st_mode & 0o777, 0o600)

    async def test_subclasses_that_hide_their_contents_are_stored_as_they_really_are(self) -> None:
        """The check reads what the serialiser writes, so both codecs store the same data."""

        class HidingDict(dict):  # type: ignore[type-arg]
            def items(self):  # type: ignore[no-untyped-def]
                return [("shown", 1)]

            def __iter__(self):  # type: ignore[no-untyped-def]
                return iter(["shown"])

        class HidingList(list):  # type: ignore[type-arg]
            def __iter__(self):  # type: ignore[no-untyped-def]
                return iter([1])

        class LyingInt(int):
            def __le__(self, other: object) -> bool:
                return True

            def __ge__(self, other: object) -> bool:
                return True

        hiding: list[tuple[Any, type[Exception]]] = [
            ({"d": HidingDict(nan=float("nan"))}, ValueError), ({"l": HidingList([float("inf")])}, ValueError),
            ({"i": LyingInt(2**70)}, ValueError), ({"d": HidingDict({1: "x"})}, TypeError)]
        for data, error in hiding:
            with self.subTest(data=data), self.assertRaises(error):
                await self.db.save_user_data(1, data)
        self.assertIsNone(await self.stored_bytes(1))
        await self.db.save_user_data(1, {"d": HidingDict(real=2), "l": HidingList([3, 4]), "i": LyingInt(5)})
        self.assertEqual(await self.stored_bytes(1), b'{"d":{"real":2},"l":[3,4],"i":5}')
        self.assertEqual(await self.db.load_user_data(1), {**DEFAULT, "d": {"real": 2}, "l": [3, 4], "i": 5})

    @per_file
    async def test_short_writes_still_store_the_whole_record(self) -> None:
        real_write = os.write

        def short_write(fd: int, data: bytes) -> int:
            return real_write(fd, bytes(data[:7]))

        big = {"text": "x" * 5000, "list": list(range(100))}
        with mock.patch("os.write", short_write):
            await self.db.save_user_data(1, big)
        self.assertEqual(json.loads(read_bytes(self.path(1))), big)

    @per_file
    async def test_a_write_that_stores_nothing_raises_and_never_becomes_the_record(self) -> None:
        await self.db.save_user_data(1, RECORD)
        before = read_bytes(self.path(1))
        real_write = os.write
        with mock.patch("os.write", lambda fd, data: real_write(fd, bytes(data[:3])) and 0), \
                self.assertRaises(OSError) as caught:
            await self.db.save_user_data(1, {"new": "data" * 100})
        self.assertEqual(caught.exception.errno, errno.EIO)
        self.assertEqual(read_bytes(self.path(1)), before)
        self.assertEqual(temp_files(self.folder), [])

    @per_file
    async def test_windows_sharing_violations_are_retried_briefly(self) -> None:
        real_replace = os.replace
        calls = []

        def busy_twice(source: str, target: str) -> None:
            calls.append(source)
            if len(calls) <= 2:
                busy = PermissionError(errno.EACCES, "The process cannot access the file")
                busy.winerror = 32  # type: ignore[attr-defined]
                raise busy
            real_replace(source, target)

        with mock.patch("os.replace", busy_twice), mock.patch("time.sleep"):
            await self.db.save_user_data(1, {"a": 1})
        self.assertEqual(len(calls), 3)
        self.assertEqual((await self.db.load_user_data(1))["a"], 1)

    @per_file
    async def test_a_target_that_stays_busy_fails_after_bounded_retries(self) -> None:
        busy = PermissionError(errno.EACCES, "Access is denied")
        busy.winerror = 5  # type: ignore[attr-defined]
        with mock.patch("os.replace", side_effect=busy) as replace, mock.patch("time.sleep"), \
                self.assertRaises(PermissionError):
            await self.db.save_user_data(1, {"a": 1})
        self.assertEqual(replace.call_count, len(jason.REPLACE_RETRY_DELAYS) + 1)
        self.assertEqual(temp_files(self.folder), [])

    @per_file
    async def test_other_permission_errors_are_not_retried(self) -> None:
        with mock.patch("os.replace", side_effect=PermissionError(errno.EPERM, "nope")) as replace, \
                self.assertRaises(PermissionError):
            await self.db.save_user_data(1, {"a": 1})
        self.assertEqual(replace.call_count, 1)

    async def test_readonly_refuses_every_write(self) -> None:
        await self.db.save_user_data(1, RECORD)
        reader = self.open_db(readonly=True)
        with self.assertRaises(ReadOnlyError):
            await reader.save_user_data(1, {})
        with self.assertRaises(ReadOnlyError):
            await reader.delete_user_data(1)
        with self.assertRaises(ReadOnlyError):
            async with reader.edit_user_data(1):
                pass
        self.assertEqual(await reader.load_user_data(1), RECORD)


def _is_dir_fd(fd: object) -> bool:
    import stat
    return isinstance(fd, int) and stat.S_ISDIR(os.fstat(fd).st_mode)


class FaultInjectionTest(FolderMixin):
    """Each I/O step of a save, and the read of a load, fails in turn with a real OSError."""

    journal = False  # how a save writes its own file

    # step -> (os function, which calls fail, is the new record in place after the failure)
    SAVE_STEPS: ClassVar[dict[str, tuple[str, Callable[[tuple[object, ...]], bool], bool]]] = {
        "open temp file": ("open", lambda args: os.path.basename(str(args[0])).startswith(jason.TEMP_PREFIX), False),
        "write": ("write", lambda args: True, False),
        "fsync file": ("fsync", lambda args: not _is_dir_fd(args[0]), False),
        "replace": ("replace", lambda args: True, False),
        "open folder": ("open", lambda args: os.path.isdir(str(args[0])), True),
        "fsync folder": ("fsync", lambda args: _is_dir_fd(args[0]), True),
    }
    ERRNOS = (errno.ENOSPC, errno.EIO, errno.EACCES)

    async def test_every_save_step_fails_cleanly(self) -> None:
        new = {"changed": True}
        for step, (function, selects, replaced) in self.SAVE_STEPS.items():
            for code in self.ERRNOS:
                with self.subTest(step=step, errno=errno.errorcode[code]):
                    await self.db.save_user_data(1, RECORD)
                    before = read_bytes(self.path(1))
                    with failing(function, selects, code), self.assertRaises(OSError) as caught:
                        await self.db.save_user_data(1, new)
                    self.assertEqual(caught.exception.errno, code)  # the OSError itself, errno intact
                    self.assertEqual(temp_files(self.folder), [])
                    if replaced:  # renamed, durability unknown: the disk holds the new record
                        self.assertEqual(json.loads(read_bytes(self.path(1))), new)
                        self.assertEqual(await self.db.load_user_data(1), {**DEFAULT, **new})
                    else:
                        self.assertEqual(read_bytes(self.path(1)), before)
                        self.assertEqual(await self.db.load_user_data(1), RECORD)
                    await self.db.save_user_data(1, {**RECORD, "after": step})  # works again at once
                    self.assertEqual((await self.db.load_user_data(1))["after"], step)

    async def test_a_failing_read_raises_and_caches_nothing(self) -> None:
        await self.db.save_user_data(1, RECORD)
        for function in ("open", "read"):
            for code in self.ERRNOS:
                with self.subTest(function=function, errno=errno.errorcode[code]):
                    fresh = self.open_db()
                    with failing(function, lambda args: True, code), self.assertRaises(OSError) as caught:
                        await fresh.load_user_data(1)
                    self.assertEqual(caught.exception.errno, code)
                    self.assertEqual(await cached_users(fresh, iter([1])), set())
                    self.assertEqual(await fresh.load_user_data(1), RECORD)

    async def test_a_short_write_then_an_error_never_becomes_the_record(self) -> None:
        await self.db.save_user_data(1, RECORD)
        before = read_bytes(self.path(1))
        real_write = os.write
        calls = []

        def half_then_full_disk(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch("os.write", half_then_full_disk), self.assertRaises(OSError):
            await self.db.save_user_data(1, {"big": "y" * 10_000})
        self.assertEqual(len(calls), 2)
        self.assertEqual(read_bytes(self.path(1)), before)
        self.assertEqual(temp_files(self.folder), [])


@contextlib.contextmanager
def failing(function: str, selects: Callable[[tuple[object, ...]], bool], code: int) -> Iterator[None]:
    """Make os.<function> raise OSError(code) on the calls that selects() picks."""
    real = getattr(os, function)

    def fake(*args: object, **kwargs: object) -> object:
        if selects(args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    with mock.patch(f"os.{function}", fake):
        yield


# ---------------------------------------------------------------- edit


class EditTest(FolderMixin):
    async def test_clean_exit_saves(self) -> None:
        async with self.db.edit_user_data(1) as data:
            data["challenge_balance"] += 2
        self.assertEqual((await self.stored(1))["challenge_balance"], 2)  # type: ignore[index]

    async def test_an_exception_discards_the_changes(self) -> None:
        await self.db.save_user_data(1, RECORD)
        before = await self.stored_bytes(1)
        with self.assertRaises(KeyError):
            async with self.db.edit_user_data(1) as data:
                data["challenge_balance"] = 1000
                raise KeyError("handler failed")
        self.assertEqual(await self.stored_bytes(1), before)
        self.assertEqual(await self.db.load_user_data(1), RECORD)

    async def test_unstorable_edit_raises_and_saves_nothing(self) -> None:
        await self.db.save_user_data(1, RECORD)
        with self.assertRaises(TypeError):
            async with self.db.edit_user_data(1) as data:
                data["when"] = {1, 2}
        self.assertEqual(await self.db.load_user_data(1), RECORD)

    @async_only  # SyncJASONTest has the threads' version
    async def test_1000_concurrent_increments_give_exactly_1000(self) -> None:
        db = self.open_db(durable=False)
        await asyncio.gather(*(add_one(db, "hot") for _ in range(1000)))
        self.assertEqual((await db.load_user_data("hot"))["challenge_balance"], 1000)
        self.assertEqual((await self.stored("hot"))["challenge_balance"], 1000)  # type: ignore[index]


# ---------------------------------------------------------------- delete


class DeleteTest(FolderMixin):
    async def test_delete_reports_whether_a_record_existed(self) -> None:
        await self.db.save_user_data(1, RECORD)
        self.assertTrue(await self.db.user_exists(1))
        self.assertTrue(await self.db.delete_user_data(1))
        self.assertIsNone(await self.stored_bytes(1))
        self.assertFalse(await self.db.user_exists(1))
        self.assertFalse(await self.db.delete_user_data(1))
        self.assertEqual(await self.db.load_user_data(1), DEFAULT)

    async def test_a_deleted_user_stays_deleted_after_reopening(self) -> None:
        await self.db.save_user_data("gone", RECORD)
        await self.db.delete_user_data("gone")
        await self.db.close()
        async with self.open_db() as again:
            self.assertFalse(await again.user_exists("gone"))
            self.assertEqual(await again.load_user_data("gone"), DEFAULT)

    @folder_only
    async def test_user_exists_reads_the_disk_when_not_cached(self) -> None:
        db = self.open_db(cache_size=0)
        self.assertFalse(await db.user_exists(5))
        with open(self.path(5), "w", encoding="utf-8") as file:
            file.write("{}")
        self.assertTrue(await db.user_exists(5))


# ---------------------------------------------------------------- user_ids


class UserIdsTest(FolderMixin):
    async def test_ids_come_back_as_str_sorted(self) -> None:
        for user_id in (12345, -100123, "alice", "Bob", "a.b"):
            await self.db.save_user_data(user_id, {})
        self.assertEqual(await self.db.user_ids(), sorted(["12345", "-100123", "alice", "Bob", "a.b"]))

    @folder_only
    async def test_only_records_are_listed(self) -> None:
        await self.db.save_user_data("real", {})
        outside = os.path.join(self._tmp.name, "outside.json")
        with open(outside, "w", encoding="utf-8") as file:
            file.write("{}")
        for name in ("notes.txt", ".DS_Store", "Alice.json", "%61.json", "a.b.json", ".json", "%zz.json",
                     "%c3.json", "con.json", jason.TEMP_PREFIX + "0123456789abcdef"):
            with open(os.path.join(self.folder, name), "w", encoding="utf-8") as file:
                file.write("{}")
        os.mkdir(os.path.join(self.folder, "folder.json"))
        os.symlink(outside, os.path.join(self.folder, "linked.json"))
        self.assertEqual(await self.db.user_ids(), ["real"])


# ---------------------------------------------------------------- user id <-> file name


HOSTILE_IDS = [
    "/", "\\", "..", ".", "../x", "a/../../b", "C:\\x", "\x00", "a\x00b", " ", "x ", "x.", "...",
    "emoji 😀", "Привет", "CON", "con", "nul", "Nul", "com1", "COM1", "lpt9", "con.txt", "aux.json",
    "é", "e\u0301", "Alice", "alice", "ALICE", "%", "%41", "a%2eb", "a.b", ".hidden", "-", "_", "--x",
    "\ud800", "\ud83d\ude00", "😀", "tab\there", "new\nline", "'\"<>|?*:", "ß", "SS", "ss", "ǅ", "ǆ",
    "x" * 64, "." * 64, "😀" * 16, "\U0010ffff" * 16, "Ä" * 16,
]


class UserIdMappingTest(FolderMixin):
    async def test_simple_ids_stay_readable_on_disk(self) -> None:
        for user_id, name in [(12345, "12345.json"), (-100123, "-100123.json"), ("alice", "alice.json"),
                              ("a_b-c", "a_b-c.json")]:
            self.assertEqual(jason._file_name(jason._user_key(user_id)), name)

    @per_file
    async def test_int_and_str_forms_are_the_same_user_and_cache_entry(self) -> None:
        await self.db.save_user_data(5, {"n": 1})
        self.assertEqual((await self.db.load_user_data("5"))["n"], 1)
        await self.db.save_user_data("5", {"n": 2})
        self.assertEqual((await self.db.load_user_data(5))["n"], 2)
        self.assertEqual(await self.db.user_ids(), ["5"])
        if self.backend != "folder":
            return  # no cache on a server
        self.assertEqual(await cached_users(self.db, iter([5, "5"])), {"5"})
        os.unlink(self.path(5))  # one cache entry: forgetting the file behind its back shows in both forms
        self.assertEqual((await self.db.load_user_data(5))["n"], 2)
        self.assertEqual((await self.db.load_user_data("5"))["n"], 2)

    async def test_hostile_ids_round_trip_and_stay_distinct(self) -> None:
        db = self.open_db(durable=False)
        for index, user_id in enumerate(HOSTILE_IDS):
            await db.save_user_data(user_id, {"index": index})
        for index, user_id in enumerate(HOSTILE_IDS):
            with self.subTest(user_id=user_id):
                self.assertEqual((await db.load_user_data(user_id))["index"], index)
        self.assertEqual(await db.user_ids(), sorted(HOSTILE_IDS))
        for user_id in HOSTILE_IDS[::2]:
            self.assertTrue(await db.delete_user_data(user_id))
        self.assertEqual(await db.user_ids(), sorted(HOSTILE_IDS[1::2]))

    @folder_only
    async def test_hostile_ids_each_get_their_own_safe_file_inside_the_folder(self) -> None:
        db = self.open_db(durable=False)
        for index, user_id in enumerate(HOSTILE_IDS):
            await db.save_user_data(user_id, {"index": index})
        await db.close()
        await self.db.close()  # the last checkpoint writes every file
        names = os.listdir(self.folder)
        records = [name for name in names if name.endswith(".json")]
        self.assertEqual(len(records), len(HOSTILE_IDS))
        folded = {unicodedata.normalize("NFC", name).casefold() for name in records}
        self.assertEqual(len(folded), len(records), "two ids share a file on a case-insensitive disk")
        for name in records:
            self.assertTrue(name.isascii() and name == name.lower(), name)
            self.assertFalse(name.startswith("."), name)
            self.assertNotRegex(name.split(".")[0], r"^(con|prn|aux|nul|com\d|lpt\d)$")
            self.assertLessEqual(len(name.encode()), 255)
        db = self.open_db(readonly=True)
        for index, user_id in enumerate(HOSTILE_IDS):
            with self.subTest(user_id=user_id):
                self.assertEqual((await db.load_user_data(user_id))["index"], index)
                path = os.path.realpath(self.path(user_id))
                self.assertEqual(os.path.dirname(path), os.path.realpath(self.folder))
        self.assertEqual(sorted(await db.user_ids()), sorted(HOSTILE_IDS))

    def test_random_ids_round_trip_through_their_file_names(self) -> None:
        rng = random.Random(20261130)
        alphabet = [chr(c) for c in range(0, 0x250)] + list("😀€ß\u0301\ud800\udfff/\\. ")
        for _ in range(3000):
            key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
            name = jason._file_name(key)
            self.assertEqual(jason._user_key_from_file_name(name), key)
            self.assertTrue(name.isascii() and name == name.lower())

    async def test_invalid_ids_raise_and_touch_nothing(self) -> None:
        for user_id, error in [("", InvalidUserIdError), ("a" * 300, InvalidUserIdError),
                               ("é" * 60, InvalidUserIdError), (True, TypeError), (None, TypeError),
                               (1.5, TypeError), (b"x", TypeError), (("a",), TypeError)]:
            with self.subTest(user_id=user_id):
                with self.assertRaises(error):
                    await self.db.save_user_data(user_id, {})  # type: ignore[arg-type]
                with self.assertRaises(error):
                    await self.db.load_user_data(user_id)  # type: ignore[arg-type]
        self.assertEqual(await self.db.user_ids(), [])
        if self.backend == "folder":
            await self.db.close()  # and its journal, empty, with it
            self.assertEqual(os.listdir(self.folder), [jason.LOCK_FILE_NAME])
        self.assertTrue(issubclass(InvalidUserIdError, ValueError))

    async def test_long_ids_are_fine_while_their_file_name_fits(self) -> None:
        await self.db.save_user_data("a" * 250, {"ok": 1})
        self.assertEqual(await self.db.user_ids(), ["a" * 250])


# ---------------------------------------------------------------- corruption


CORRUPT_CONTENTS = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated": b'{"challenge_balance": 5, "chall',
    "a list": b"[1, 2]",
    "a string": b'"text"',
    "bad utf-8": b'{"a": "\xff\xfe"}',
    "trailing comma": b'{"a": 1,}',
    "NaN": b'{"a": NaN}',
    "byte order mark": b'\xef\xbb\xbf{"a": 1}',
    "lone surrogate": b'{"a": "\\ud800"}',
    "infinite number": b'{"a": 1e400}',
    "NUL bytes": b"\x00" * 64,
}


class CorruptionTest(FolderMixin):
    async def test_corrupt_records_raise_and_are_left_byte_for_byte(self) -> None:
        await self.db.save_user_data("neighbour", RECORD)
        for label, content in CORRUPT_CONTENTS.items():
            with self.subTest(label):
                with open(self.path("victim"), "wb") as file:
                    file.write(content)
                with self.assertRaises(CorruptDataError) as caught:
                    await self.db.load_user_data("victim")
                self.assertEqual(caught.exception.path, self.path("victim"))
                self.assertIn(self.path("victim"), str(caught.exception))
                with self.assertRaises(CorruptDataError):
                    async with self.db.edit_user_data("victim"):
                        pass
                self.assertEqual(read_bytes(self.path("victim")), content)
                self.assertEqual(await self.db.load_user_data("neighbour"), RECORD)

    async def test_errors_survive_pickling(self) -> None:
        for error in [CorruptDataError("/x/1.json", "empty"), InvalidUserIdError("", "empty"),
                      DatabaseLockedError("/x", "process 1"), ReadOnlyError("/x", "save_user_data")]:
            copy = pickle.loads(pickle.dumps(error))
            self.assertEqual((type(copy), str(copy)), (type(error), str(error)))
        self.assertEqual(pickle.loads(pickle.dumps(CorruptDataError("/p", "r"))).path, "/p")

    async def test_a_symlinked_record_is_not_followed(self) -> None:
        secret = os.path.join(self._tmp.name, "secret.json")
        with open(secret, "w", encoding="utf-8") as file:
            file.write('{"secret": 1}')
        os.symlink(secret, self.path("link"))
        with self.assertRaisesRegex(CorruptDataError, "symbolic link"):
            await self.db.load_user_data("link")

    async def test_a_folder_in_place_of_a_record_is_reported(self) -> None:
        os.mkdir(self.path("dir"))
        with self.assertRaises((CorruptDataError, IsADirectoryError)):
            await self.db.load_user_data("dir")


class QuarantineTest(FolderMixin):
    async def test_quarantine_moves_the_file_aside_logs_and_starts_afresh(self) -> None:
        db = self.open_db(on_corrupt="quarantine", cache_size=0)  # the test edits files behind its back
        await db.save_user_data("neighbour", RECORD)
        for label, content in CORRUPT_CONTENTS.items():
            with self.subTest(label):
                with open(self.path("victim"), "wb") as file:
                    file.write(content)
                before = set(os.listdir(self.folder))
                with self.assertLogs("jason", "WARNING") as logs:
                    self.assertEqual(await db.load_user_data("victim"), DEFAULT)
                moved = sorted(set(os.listdir(self.folder)) - before)
                self.assertEqual(len(moved), 1)
                self.assertTrue(moved[0].startswith("victim.json" + jason.QUARANTINE_MARK), moved)
                self.assertEqual(read_bytes(os.path.join(self.folder, moved[0])), content)
                self.assertIn(moved[0], logs.output[0])
                self.assertNotIn("left the file as it is", logs.output[0])  # it was moved, and says so
                self.assertFalse(os.path.exists(self.path("victim")))
                self.assertEqual(await db.user_ids(), ["neighbour"])
        await db.save_user_data("victim", {"fresh": 1})
        await db.delete_user_data("victim")
        quarantined = [n for n in os.listdir(self.folder) if jason.QUARANTINE_MARK in n]
        self.assertEqual(len(quarantined), len(CORRUPT_CONTENTS), "JASON deleted a quarantined file")

    async def test_raise_is_the_default_and_readonly_never_quarantines(self) -> None:
        with open(self.path("victim"), "wb") as file:
            file.write(b"{broken")
        reader = self.open_db(readonly=True, on_corrupt="quarantine")
        for db in (self.db, reader):
            with self.assertRaises(CorruptDataError):
                await db.load_user_data("victim")
        self.assertEqual(read_bytes(self.path("victim")), b"{broken")

    async def test_a_long_id_gets_a_quarantine_name_that_fits(self) -> None:
        db = self.open_db(on_corrupt="quarantine")
        user = "z" * 250
        with open(self.path(user), "wb") as file:
            file.write(b"")
        with self.assertLogs("jason", "WARNING"):
            await db.load_user_data(user)
        (moved,) = [n for n in os.listdir(self.folder) if jason.QUARANTINE_MARK in n]
        self.assertLessEqual(len(moved), 255)

    def test_an_unknown_policy_is_refused(self) -> None:
        with tempfile.TemporaryDirectory() as folder, self.assertRaises(ValueError):
            JASON(folder, on_corrupt="ignore")  # type: ignore[arg-type]


class HostileFolderTest(FolderMixin):
    async def test_stray_files_never_crash_listing_or_loading(self) -> None:
        await self.db.save_user_data("real", RECORD)
        outside = os.path.join(self._tmp.name, "outside.json")
        with open(outside, "w", encoding="utf-8") as file:
            file.write('{"secret": 1}')
        os.symlink(outside, self.path("link"))
        os.symlink(os.path.join(self._tmp.name, "nowhere"), self.path("dangling"))
        os.mkdir(self.path("dir"))
        os.mkdir(os.path.join(self.folder, "sub"))
        if hasattr(os, "mkfifo"):
            os.mkfifo(self.path("fifo"))
        for name in ("notes.txt", ".DS_Store", "%zz.json", "UPPER.json", "a.b.json"):
            with open(os.path.join(self.folder, name), "w", encoding="utf-8") as file:
                file.write("{}")
        self.assertEqual(await self.db.user_ids(), ["real"])
        for user in ("link", "dangling", "dir", "fifo"):
            with self.subTest(user=user):
                if user == "dangling":  # the link itself is what is there, and it is not followed
                    with self.assertRaises(CorruptDataError):
                        await self.db.load_user_data(user)
                elif user == "fifo" and not hasattr(os, "mkfifo"):
                    continue
                else:
                    with self.assertRaises(CorruptDataError):
                        await asyncio.wait_for(self.db.load_user_data(user), 10)
        self.assertEqual(await self.db.load_user_data("real"), RECORD)
        self.assertEqual(read_bytes(outside), b'{"secret": 1}')


class BadInputSweepTest(FolderMixin):
    """Hostile data: each value either round-trips exactly or raises a clear error that changes nothing."""

    async def test_hostile_data_round_trips_or_fails_cleanly(self) -> None:
        deep_ok = nested_dicts(jason.MAX_DEPTH)
        cases: list[tuple[str, object, type[Exception] | None]] = [
            ("10 MB string", {"s": "ü" * 5_000_000}, None),
            ("100k keys", {f"key{i}": i for i in range(100_000)}, None),
            ("deep at the limit", deep_ok, None),
            ("deep past the limit", {"x": deep_ok}, ValueError),
            ("deep as a list", {"l": [[[[[[[[[[[]]]]]]]]]]]}, None),
            ("edge ints", {"i": [2**64 - 1, -(2**63), 0]}, None),
            ("int past 64 bits", {"i": 2**64}, ValueError),
            ("int key", {1: "x"}, TypeError),
            ("bool key", {True: "x"}, TypeError),
            ("tuple key", {(1, 2): "x"}, TypeError),
            ("NaN", {"n": float("nan")}, ValueError),
            ("-inf in a list", {"n": [1.0, float("-inf")]}, ValueError),
            ("lone surrogate value", {"s": "ok\udfff"}, ValueError),
            ("lone surrogate key", {"\udfff": 1}, ValueError),
            ("surrogate pair text", {"s": "😀"}, None),
            ("control characters", {"s": "\x00\x01\x1f\x7f\u2028\u2029"}, None),
            ("a tuple", {"t": (1, 2)}, TypeError),
            ("bytes", {"b": b"\x00"}, TypeError),
            ("a set", {"s": set()}, TypeError),
            ("a function", {"f": print}, TypeError),
            ("a list, not a dict", [1, 2], TypeError),
            ("None, not a dict", None, TypeError),
        ]
        await self.db.save_user_data("u", RECORD)
        before_disk = await self.stored_bytes("u")
        for label, data, error in cases:
            with self.subTest(label):
                if error is None:
                    await self.db.save_user_data("ok", data)  # type: ignore[arg-type]
                    self.assertEqual(await self.db.load_user_data("ok"), {**DEFAULT, **data})  # type: ignore[dict-item]
                    self.assertEqual(await self.open_db(default_structure={}).load_user_data("ok"), data)
                else:
                    with self.assertRaises(error):
                        await self.db.save_user_data("u", data)  # type: ignore[arg-type]
                    self.assertEqual(await self.stored_bytes("u"), before_disk)
                    if self.backend == "folder":
                        self.assertEqual(await cached_users(self.db, iter(["u"])), {"u"})
                    self.assertEqual(await self.db.load_user_data("u"), RECORD)  # the cache too is unchanged
        if self.backend == "folder":
            self.assertEqual(temp_files(self.folder), [])

    @folder_only
    async def test_hostile_ids_never_leave_the_folder(self) -> None:
        outside = set(os.listdir(self._tmp.name))
        for index, user_id in enumerate(HOSTILE_IDS):
            await self.db.save_user_data(user_id, {"index": index})
            self.assertEqual((await self.db.load_user_data(user_id))["index"], index)
            self.assertTrue(await self.db.delete_user_data(user_id))
        await self.db.close()  # the last checkpoint writes and deletes every file the journal named
        self.assertEqual(set(os.listdir(self._tmp.name)), outside)
        self.assertEqual(os.listdir(self.folder), [jason.LOCK_FILE_NAME])


# ---------------------------------------------------------------- cache


class CacheTest(FolderMixin):
    @per_file
    async def test_cache_is_bounded_least_recently_used_first(self) -> None:
        db = self.open_db(cache_size=3, durable=False)
        for user in range(10):
            await db.save_user_data(user, {"u": user})
        self.assertEqual(await cached_users(db, iter(range(10))), {"7", "8", "9"})
        await db.load_user_data(7)
        await db.load_user_data(0)  # evicts the least recently used: 8, not 7
        self.assertEqual(await cached_users(db, iter(range(10))), {"9", "7", "0"})

    async def test_cached_loads_do_not_touch_the_disk(self) -> None:
        await self.db.save_user_data(1, RECORD)
        with mock.patch("os.open", side_effect=OSError(errno.EIO, "disk gone")):
            self.assertEqual(await self.db.load_user_data(1), RECORD)

    @per_file
    async def test_cache_size_zero_reads_the_file_every_time(self) -> None:
        db = self.open_db(cache_size=0)
        await db.save_user_data(1, {"v": 1})
        with open(self.path(1), "w", encoding="utf-8") as file:
            file.write('{"v": 2}')
        self.assertEqual((await db.load_user_data(1))["v"], 2)
        self.assertEqual(await cached_users(db, iter([1])), set())

    async def test_unbounded_cache_keeps_everyone(self) -> None:
        db = self.open_db(cache_size=None, durable=False)
        for user in range(50):
            await db.save_user_data(user, {})
        self.assertEqual(len(await cached_users(db, iter(range(50)))), 50)

    @per_file
    async def test_a_failed_save_leaves_no_stale_cache(self) -> None:
        await self.db.save_user_data(1, {"v": 1})
        with mock.patch("os.replace", side_effect=OSError(errno.EIO, "io")), self.assertRaises(OSError):
            await self.db.save_user_data(1, {"v": 2})
        with open(self.path(1), "w", encoding="utf-8") as file:  # what the disk says is what a load returns
            file.write('{"v": 3}')
        self.assertEqual((await self.db.load_user_data(1))["v"], 3)


# ---------------------------------------------------------------- concurrency


class ConcurrencyTest(FolderMixin):
    @per_file
    async def test_different_users_are_written_in_parallel_and_one_user_is_not(self) -> None:
        renamed: list[str] = []
        with gated("replace", lambda args: str(args[1]).endswith(os.sep + "1.json") and not renamed) as (entered, gate):
            real_replace = os.replace

            def recording_replace(source: str, target: str) -> None:
                real_replace(source, target)
                renamed.append(os.path.basename(target))

            with mock.patch("os.replace", recording_replace):
                first = asyncio.create_task(self.db.save_user_data(1, {"v": "first"}))
                await wait_for_event(entered)
                second = asyncio.create_task(self.db.save_user_data(1, {"v": "second"}))
                # User 1's write is stuck in its rename, so a save of user 2 can complete only if
                # different users are written in parallel; and by then user 1's second save,
                # started earlier, would have renamed too if one user's saves were not serialised.
                await self.db.save_user_data(2, {})
                self.assertEqual(renamed, ["2.json"])
                gate.set()
                await asyncio.gather(first, second)
        self.assertEqual(renamed, ["2.json", "1.json", "1.json"])
        self.assertEqual(json.loads(read_bytes(self.path(1))), {"v": "second"})

    @per_file
    async def test_a_failed_batch_raises_only_once_every_write_it_started_has_ended(self) -> None:
        # A batch is written in several threads' shares. Were its users' locks released when the first
        # share failed, a save made then could land first and be overwritten by a share still renaming.
        records = [(user, {"n": user}) for user in range(2 * jason.BATCH_WRITE_THREADS)]
        held = records[-2][0]  # the first of the last share
        real_replace, failed, calls = os.replace, threading.Event(), []

        def replace_failing_user_0(source: str, target: str) -> None:
            if target.endswith(os.sep + "0.json"):
                failed.set()
                raise OSError(errno.ENOSPC, "No space left on device")
            real_replace(source, target)

        def first_rename_of_held(args: tuple[object, ...]) -> bool:
            calls.append(args[1])
            return str(args[1]).endswith(os.sep + f"{held}.json") and calls.count(args[1]) == 1

        with mock.patch("os.replace", replace_failing_user_0), \
                gated("replace", first_rename_of_held) as (entered, gate):
            batch = asyncio.create_task(self.db.save_stored_many(records))
            await wait_for_event(failed)
            await wait_for_event(entered)
            later = asyncio.create_task(self.db.save_user_data(held, {"n": "later"}))
            await asyncio.sleep(0.05)
            self.assertFalse(batch.done())  # a share is still renaming
            self.assertFalse(later.done())  # and the batch still holds the user
            gate.set()
            with self.assertRaises(OSError):
                await batch
            await later
        self.assertEqual(await self.stored(held), {"n": "later"})

    @folder_only
    @slow
    async def test_lock_registry_holds_only_users_in_flight(self) -> None:
        db = self.open_db(durable=False, cache_size=100)
        for start in range(0, 10_000, 500):
            await asyncio.gather(*(db.load_user_data(u) for u in range(start, start + 500)))
            await asyncio.gather(*(db.save_user_data(u, {}) for u in range(start, start + 20)))
        self.assertEqual(lock_registry_size(db), 0)
        self.assertEqual(len(await cached_users(db, iter(range(9_500, 10_000)))), 100)

    @per_file
    async def test_a_cancelled_save_still_finishes_before_the_next_save_starts(self) -> None:
        renamed: list[str] = []
        with gated("replace", lambda args: str(args[1]).endswith(os.sep + "1.json") and not renamed) as (entered, gate):
            real_replace = os.replace

            def recording_replace(source: str, target: str) -> None:
                real_replace(source, target)
                renamed.append(json.loads(read_bytes(target))["v"])

            with mock.patch("os.replace", recording_replace):
                first = asyncio.create_task(self.db.save_user_data(1, {"v": "first"}))
                await wait_for_event(entered)
                first.cancel()
                second = asyncio.create_task(self.db.save_user_data(1, {"v": "second"}))
                await self.db.save_user_data(2, {"v": "other"})  # many loop turns: time for a wrong order
                self.assertEqual(renamed, ["other"], "the next save ran while the cancelled write was in flight")
                gate.set()
                with self.assertRaises(asyncio.CancelledError):
                    await first
                await second
        self.assertEqual(renamed, ["other", "first", "second"])
        self.assertEqual(json.loads(read_bytes(self.path(1))), {"v": "second"})
        self.assertEqual((await self.db.load_user_data(1))["v"], "second")

    async def test_two_instances_on_one_folder_see_each_other_at_once(self) -> None:
        other = self.open_db()
        await self.db.save_user_data(1, {"v": 1})
        self.assertEqual((await other.load_user_data(1))["v"], 1)
        await other.save_user_data(1, {"v": 2})
        self.assertEqual((await self.db.load_user_data(1))["v"], 2)
        await other.delete_user_data(1)
        self.assertFalse(await self.db.user_exists(1))
        self.assertEqual(await self.db.load_user_data(1), DEFAULT)

    async def test_edits_through_two_instances_lose_nothing(self) -> None:
        first, second = self.open_db(durable=False), self.open_db(durable=False)
        await asyncio.gather(*(add_one(db, "shared") for _ in range(250) for db in (first, second)))
        self.assertEqual((await first.load_user_data("shared"))["challenge_balance"], 500)

    @folder_only
    async def test_closing_one_instance_keeps_the_lock_for_the_other(self) -> None:
        other = self.open_db()
        await self.db.close()
        result = run_child(f"import jason; jason.JASON({self.folder!r})")
        self.assertIn("DatabaseLockedError", result.stderr)
        await other.save_user_data(1, {"still": "writing"})


class LifecycleTest(FolderMixin):
    @slow
    async def test_memory_follows_the_cache_not_the_users_ever_seen(self) -> None:
        asyncio.get_running_loop().set_debug(False)  # debug mode logs every slow step: too slow for 100,000
        db = self.open_db(cache_size=1000, durable=False)

        async def touch(first: int, count: int) -> None:
            for start in range(first, first + count, 1000):
                users = range(start, start + 1000)
                await asyncio.gather(*(db.load_user_data(u) for u in users))
                await asyncio.gather(*(db.user_exists(u) for u in users[:10]))
                await asyncio.gather(*(db.save_user_data(u, {"u": u}) for u in users[:5]))

        await touch(0, 5_000)
        gc.collect()
        blocks_after_few = sys.getallocatedblocks()
        await touch(5_000, 95_000)
        gc.collect()
        blocks_after_many = sys.getallocatedblocks()
        self.assertEqual(lock_registry_size(db), 0)
        self.assertEqual(len(await cached_users(db, iter(range(99_000, 100_000)))), 1000)
        # Anything kept per user (a lock, a key, a cache entry) would add 95,000 blocks or more.
        self.assertLess(blocks_after_many - blocks_after_few, 10_000)


# ---------------------------------------------------------------- processes


@unittest.skipUnless(hasattr(signal, "SIGKILL"), "needs POSIX signals")
class ProcessesTest(FolderMixin):
    async def test_a_second_writer_process_is_refused_with_a_clear_message(self) -> None:
        result = run_child(f"""
            import jason
            try:
                jason.JASON({self.folder!r})
            except jason.DatabaseLockedError as exc:
                print(exc)
                raise SystemExit(3)
        """)
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn(self.folder, result.stdout)
        self.assertIn(f"process {os.getpid()}", result.stdout)
        self.assertIn("readonly=True", result.stdout)

    async def test_a_readonly_process_reads_beside_the_writer(self) -> None:
        await self.db.save_user_data(1, RECORD)
        result = run_child(f"""
            import asyncio, json, jason
            async def main():
                async with jason.JASON({self.folder!r}, readonly=True) as db:
                    print(json.dumps(await db.load_user_data(1)))
            asyncio.run(main())
        """)
        self.assertEqual(json.loads(result.stdout), RECORD, result.stderr)
        await self.db.save_user_data(1, {"newer": True})
        result = run_child(result.args[2])
        self.assertEqual(json.loads(result.stdout), {"newer": True}, result.stderr)

    async def test_the_lock_dies_with_a_killed_writer(self) -> None:
        await self.db.close()
        child = subprocess.Popen(
            [sys.executable, "-c",
             f"import jason, time; jason.JASON({self.folder!r}); print('ready', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, text=True, env=child_env(),
        )
        try:
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), CHILD_TIMEOUT)  # type: ignore[union-attr]
            self.assertEqual(line.strip(), "ready")
            with self.assertRaises(DatabaseLockedError):
                JASON(self.folder)
            child.send_signal(signal.SIGKILL)
            child.wait(CHILD_TIMEOUT)
        finally:
            child.kill()
            child.stdout.close()  # type: ignore[union-attr]
        reopened = self.open_db()
        await reopened.save_user_data(1, {"after": "kill"})

    @slow
    async def test_kill_loop_every_record_is_a_version_the_child_wrote(self) -> None:
        """SIGKILL a busy writer JASON_KILLS times (20 by default; CI runs 200): durable, fast and journal in turn.

        Every record must be the user's last save that returned, or one still under way at the kill.
        """
        await self.db.close()
        log_path = os.path.join(self._tmp.name, "intent.log")
        rng = random.Random(int(os.environ.get("JASON_KILL_SEED", "2026")))
        kills = int(os.environ.get("JASON_KILLS", "20"))
        for round_number in range(kills):
            size_before = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            child = start_storm_writer(self.folder, log_path, ("durable", "fast", "journal")[round_number % 3],
                                       first=round_number * 10**6)  # so that no two rounds' saves look alike
            def saving(child: subprocess.Popen[bytes] = child, size_before: int = size_before) -> bool:
                self.assertIsNone(child.poll(), "the writer died by itself")
                return os.path.exists(log_path) and os.path.getsize(log_path) > size_before

            await until(saving)
            await asyncio.sleep(rng.random() * 0.2)
            child.kill()
            self.assertEqual(child.wait(CHILD_TIMEOUT), -signal.SIGKILL)
            intended, returned, last_returned = set(), set(), {}
            with open(log_path, encoding="utf-8") as log:
                for line in log:
                    if line.endswith("\n"):
                        words = line.split()
                        save = tuple(int(word) for word in words[-3:])
                        if words[0] == "R":
                            returned.add(save)
                            last_returned[save[0]] = save
                        else:
                            intended.add(save)
            async with JASON(self.folder) as writer:  # at once: the lock died with the process
                users = await writer.user_ids()
                self.assertFalse(set(users) & set(temp_files(self.folder)))
                self.assertLessEqual(set(last_returned), {int(user) for user in users})
                for user in users:
                    record = await writer.load_user_data(user)
                    save = (int(user), record["worker"], record["n"])
                    with self.subTest(round=round_number, user=user):
                        self.assertIn(save, intended)
                        if save != last_returned.get(int(user)):  # then it was under way: it never returned
                            self.assertNotIn(save, returned, "a save that returned was lost to an older one")
                        self.assertEqual(record["pad"], storm_pad(record["n"]))

    @slow
    async def test_a_readonly_reader_never_sees_a_torn_record_during_a_save_storm(self) -> None:
        await self.db.close()
        for mode in ("durable", "journal"):  # journal: the newest records are in the writer's journal
            with self.subTest(mode=mode):
                child = start_storm_writer(self.folder, os.path.join(self._tmp.name, "intent.log"), mode)
                loads = 0
                try:
                    async with JASON(self.folder, readonly=True) as reader:
                        await until(lambda: len(os.listdir(self.folder)) > 5)
                        while loads < 2_000:
                            for user in await reader.user_ids():
                                record = await reader.load_user_data(user)
                                self.assertEqual(record["pad"], storm_pad(record["n"]))
                                loads += 1
                finally:
                    child.kill()
                    child.wait(CHILD_TIMEOUT)

    @per_file
    async def test_exit_before_rename_keeps_the_old_record(self) -> None:
        await self.db.save_user_data(1, RECORD)
        before = read_bytes(self.path(1))
        await self.db.close()
        result = run_child(f"""
            import asyncio, os, jason
            os.replace = lambda *a: os._exit(9)
            asyncio.run(jason.JASON({self.folder!r}, journal=False).save_user_data(1, {{"new": 1}}))
        """)
        self.assertEqual(result.returncode, 9, result.stderr)
        self.assertEqual(read_bytes(self.path(1)), before)
        async with JASON(self.folder, DEFAULT) as again:
            self.assertEqual(await again.load_user_data(1), RECORD)
            self.assertEqual(await again.user_ids(), ["1"])


@unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
class ForkTest(unittest.TestCase):
    def test_a_forked_child_cannot_write_under_the_parents_lock(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            db = JASON(folder)
            asyncio.run(db.save_user_data(1, {"parent": 1}))
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report through the pipe, then leave at once
                outcome = []
                try:
                    asyncio.run(db.save_user_data(1, {"child": 1}))
                    outcome.append("saved")
                except DatabaseLockedError:
                    outcome.append("old refused")
                try:
                    JASON(folder)
                    outcome.append("opened")
                except DatabaseLockedError:
                    outcome.append("new refused")
                os.write(write_end, ",".join(outcome).encode())
                os._exit(0)
            os.close(write_end)
            os.waitpid(pid, 0)
            with os.fdopen(read_end) as pipe:
                self.assertEqual(pipe.read(), "old refused,new refused")
            asyncio.run(db.save_user_data(1, {"parent": 2}))
            result = run_child(f"import jason; jason.JASON({folder!r})")
            self.assertIn("DatabaseLockedError", result.stderr, "the child's exit released the parent's lock")
            self.assertEqual(asyncio.run(db.load_user_data(1)), {"parent": 2})
            asyncio.run(db.close())

    def test_a_forked_child_never_quarantines_its_parents_records(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            db = JASON(folder, on_corrupt="quarantine", cache_size=0)
            corrupt = os.path.join(folder, "1.json")
            with open(corrupt, "wb") as file:
                file.write(b"{not json")
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    asyncio.run(db.load_user_data(1))
                    outcome = "loaded"
                except DatabaseLockedError:
                    outcome = "refused"
                except BaseException as exc:
                    outcome = repr(exc)
                os.write(write_end, outcome.encode())
                os._exit(0)
            os.close(write_end)
            os.waitpid(pid, 0)
            with os.fdopen(read_end) as pipe:
                self.assertEqual(pipe.read(), "refused")
            self.assertEqual(read_bytes(corrupt), b"{not json")
            self.assertEqual([name for name in os.listdir(folder) if jason.QUARANTINE_MARK in name], [])
            asyncio.run(db.close())


# ---------------------------------------------------------------- closing, re-entry, loops, lock file


class CloseTest(FolderMixin):
    """close() leaves no write behind it: writes under way land first, later ones are refused."""

    @folder_only
    async def test_close_waits_for_a_write_under_way_before_releasing_the_lock(self) -> None:
        await self.db.save_user_data(1, {"v": "old"})
        with gated("replace", renames_into_folder) as (entered, gate):
            save = asyncio.create_task(self.db.save_user_data(1, {"v": "new"}))
            await wait_for_event(entered)
            asyncio.get_running_loop().call_later(0.2, gate.set)
            await self.db.close()
            # close() returned: the write has landed, so a writer opened now cannot be overwritten.
            self.assertTrue(gate.is_set(), "close() returned while a write was still under way")
            self.assertEqual(json.loads(read_bytes(self.path(1))), {"v": "new"})
        await save
        async with JASON(self.folder) as next_writer:
            await next_writer.save_user_data(1, {"v": "next"})
            self.assertEqual(await next_writer.load_user_data(1), {"v": "next"})

    async def test_an_edit_open_at_close_fails_and_writes_nothing(self) -> None:
        await self.db.save_user_data(1, RECORD)
        with self.assertRaisesRegex(JasonError, r"edit_user_data refused: .* was closed, so nothing was written"):
            async with self.db.edit_user_data(1) as data:
                data["challenge_balance"] = 99
                await self.db.close()
        self.assertEqual(await self.stored(1), RECORD)
        if self.backend != "folder":
            return
        self.assertEqual(temp_files(self.folder), [])
        result = run_child(f"import jason; jason.JASON({self.folder!r}); print('opened')")
        self.assertEqual(result.stdout.strip(), "opened", result.stderr)  # the lock was released

    async def test_a_save_waiting_for_its_user_at_close_writes_nothing(self) -> None:
        await self.db.save_user_data(1, RECORD)
        edit_open, save_waiting = asyncio.Event(), asyncio.Event()

        async def edit_then_close() -> None:
            async with self.db.edit_user_data(1):
                edit_open.set()
                await save_waiting.wait()
                await self.db.close()

        closing = asyncio.create_task(edit_then_close())
        await edit_open.wait()
        save_waiting.set()  # the save below runs up to its wait for user 1 before the edit task resumes
        with self.assertRaisesRegex(JasonError, "save_user_data refused"):
            await self.db.save_user_data(1, {"late": True})
        with self.assertRaisesRegex(JasonError, "edit_user_data refused"):
            await closing
        self.assertEqual(await self.stored(1), RECORD)

    @per_file
    async def test_a_cancelled_save_whose_write_fails_logs_nothing(self) -> None:
        """Errors surface once, to the caller: no 'Future exception was never retrieved'."""
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        with gated("replace", renames_into_folder, then_raise=errno.EIO) as (entered, gate):
            save = asyncio.create_task(self.db.save_user_data(1, RECORD))
            await wait_for_event(entered)
            save.cancel()
            gate.set()
            with self.assertRaises(asyncio.CancelledError):
                await save
        gc.collect()
        await asyncio.sleep(0)
        self.assertEqual(reported, [])
        self.assertEqual(temp_files(self.folder), [])
        self.assertFalse(await self.db.user_exists(1))


class ReentryTest(FolderMixin):
    """Calls inside edit_user_data never hang: they work, or raise JasonError at once."""

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        self.db = self.open_db(cache_size=0)  # uncached: every call goes to the lock and the disk
        await self.db.save_user_data(1, RECORD)

    async def test_calls_on_the_user_being_edited_work_or_raise_at_once(self) -> None:
        async def inside_the_edit() -> None:
            async with self.db.edit_user_data(1) as data:
                data["challenge_balance"] = 6
                self.assertEqual(await self.db.load_user_data(1), RECORD)  # as stored before the edit
                self.assertTrue(await self.db.user_exists(1))
                for call in (lambda: self.db.save_user_data(1, {}), lambda: self.db.delete_user_data(1)):
                    with self.assertRaisesRegex(JasonError, "inside edit_user_data.* in the same task"):
                        await call()
                with self.assertRaisesRegex(JasonError, "would wait for itself forever"):
                    async with self.db.edit_user_data(1):
                        pass

        await asyncio.wait_for(inside_the_edit(), CHILD_TIMEOUT)
        self.assertEqual((await self.db.load_user_data(1))["challenge_balance"], 6)

    async def test_nested_edits_of_two_users_in_opposite_orders_raise_instead_of_deadlocking(self) -> None:
        both_hold = rendezvous(2)
        outcomes: dict[str, str] = {}

        async def transfer(name: str, first: int, second: int) -> None:
            try:
                async with self.db.edit_user_data(first) as giver:
                    await both_hold()
                    async with self.db.edit_user_data(second) as taker:
                        giver["challenge_balance"] -= 1
                        taker["challenge_balance"] += 1
                outcomes[name] = "done"
            except JasonError as exc:
                outcomes[name] = str(exc)

        await self.db.save_user_data(2, RECORD)
        await asyncio.wait_for(asyncio.gather(transfer("a", 1, 2), transfer("b", 2, 1)), CHILD_TIMEOUT)
        self.assertEqual(sorted(outcome == "done" for outcome in outcomes.values()), [False, True], outcomes)
        refused = next(outcome for outcome in outcomes.values() if outcome != "done")
        self.assertIn("would deadlock", refused)
        balances = [(await self.db.load_user_data(user))["challenge_balance"] for user in (1, 2)]
        self.assertEqual(sorted(balances), [4, 6])  # one transfer, whole; the refused one changed nothing

    async def test_loads_across_two_edits_read_without_deadlocking(self) -> None:
        await self.db.save_user_data(2, {**RECORD, "challenge_balance": 7})
        both_hold = rendezvous(2)

        async def peek(mine: int, other: int) -> int:
            async with self.db.edit_user_data(mine) as data:
                await both_hold()
                data["seen"] = (await self.db.load_user_data(other))["challenge_balance"]
                return int(data["seen"])

        seen = await asyncio.wait_for(asyncio.gather(peek(1, 2), peek(2, 1)), CHILD_TIMEOUT)
        self.assertEqual(seen, [7, 5])

    async def test_edits_of_different_users_may_nest(self) -> None:
        async with self.db.edit_user_data(1) as first, self.db.edit_user_data(2) as second:
            first["challenge_balance"] = 0
            second["challenge_balance"] = 10
        self.assertEqual((await self.db.load_user_data(2))["challenge_balance"], 10)


class EventLoopsTest(unittest.TestCase):
    """Two threads, each with its own loop, on one folder: refused clearly, never a hang or a lost update."""

    def test_a_second_loop_running_at_once_is_refused_and_no_update_is_lost(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            first_running, second_tried = threading.Event(), threading.Event()
            errors: list[BaseException] = []
            counts: list[int] = []

            async def first() -> None:
                async with JASON(folder) as db:
                    async def add_one() -> None:
                        async with db.edit_user_data("n") as data:
                            data["n"] = data.get("n", 0) + 1

                    await add_one()
                    first_running.set()
                    await asyncio.to_thread(second_tried.wait, CHILD_TIMEOUT)
                    await asyncio.gather(*(add_one() for _ in range(199)))
                    counts.append((await db.load_user_data("n"))["n"])

            async def second() -> None:
                await asyncio.to_thread(first_running.wait, CHILD_TIMEOUT)
                db = JASON(folder)
                try:
                    async with db.edit_user_data("n") as data:
                        data["n"] = -1000
                except JasonError as exc:
                    errors.append(exc)
                finally:
                    second_tried.set()
                    await db.close()

            threads = [threading.Thread(target=asyncio.run, args=(job(),)) for job in (first, second)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(CHILD_TIMEOUT)
                self.assertFalse(thread.is_alive(), "a thread hung")
            self.assertEqual(counts, [200])
            self.assertEqual(len(errors), 1)
            self.assertIn("event loop running in another thread", str(errors[0]))

    def test_constructors_racing_in_threads_share_one_writer_lock(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            start = threading.Barrier(8)
            opened: list[JASON] = []
            errors: list[BaseException] = []

            def open_one() -> None:
                start.wait(CHILD_TIMEOUT)
                try:
                    opened.append(JASON(folder))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=open_one) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(CHILD_TIMEOUT)
            self.assertEqual(errors, [])
            self.assertEqual(len(opened), 8)

            async def close_all() -> None:
                for db in opened:
                    await db.close()

            asyncio.run(close_all())
            result = run_child(f"import jason; jason.JASON({folder!r}); print('opened')")
            self.assertEqual(result.stdout.strip(), "opened", result.stderr)


class LockFileTest(unittest.TestCase):
    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-lock-")
        self.folder = self._tmp.name
        self.lock_path = os.path.join(self.folder, jason.LOCK_FILE_NAME)

    def tearDown(self) -> None:
        self._tmp.cleanup()

    @unittest.skipIf(sys.platform == "win32", "symbolic links need privileges on Windows")
    def test_a_symlinked_lock_file_is_never_followed(self) -> None:
        elsewhere = tempfile.TemporaryDirectory(prefix="jason-elsewhere-")
        self.addCleanup(elsewhere.cleanup)
        outside = os.path.join(elsewhere.name, "precious.txt")
        with open(outside, "wb") as file:
            file.write(b"precious")
        with open(os.path.join(self.folder, "42.json"), "wb") as file:
            file.write(b'{"user": 42}')
        for target in ("42.json", outside):
            with self.subTest(target=target):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
                os.symlink(target, self.lock_path)
                with self.assertRaisesRegex(JasonError, "symbolic link"):
                    JASON(self.folder)
        self.assertEqual(read_bytes(os.path.join(self.folder, "42.json")), b'{"user": 42}')
        self.assertEqual(read_bytes(outside), b"precious")

    def test_a_failed_lock_file_write_does_not_keep_the_folder_locked(self) -> None:
        with failing("ftruncate", lambda args: True, errno.ENOSPC), self.assertRaises(OSError) as caught:
            JASON(self.folder)
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        db = JASON(self.folder)  # the same process, at once: the failed attempt left no lock behind
        asyncio.run(db.close())


# ---------------------------------------------------------------- the journal (journal=True)


JOURNAL_WRITER = """
import asyncio, sys, jason
folder = sys.argv[1]
async def main():
    db = jason.JASON(folder, journal=True)
    for n in range(10**6):
        await db.save_user_data(n % 50, {"n": n})
        print(n, flush=True)  # this save has returned
asyncio.run(main())
"""


# Storms of increments of three users, 60 edits at a time: each line is an edit that returned.
JOURNAL_STORM_WRITER = """
import asyncio, sys, jason
folder = sys.argv[1]
async def main():
    db = jason.JASON(folder, journal=True)
    async def increment(user):
        async with db.edit_user_data(user) as data:
            data["n"] = data.get("n", 0) + 1
            n = data["n"]
        print(user, n, flush=True)
    while True:
        await asyncio.gather(*(increment(k % 3) for k in range(60)))
asyncio.run(main())
"""


def killed_after(script: str, folder: str, lines: int) -> list[str]:
    """Run script on folder in a child, SIGKILL it once it has printed this many lines, and return them."""
    child = subprocess.Popen([sys.executable, "-c", script, folder], env=child_env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)  # a child that hangs cannot hang the test
    watchdog.start()
    printed: list[str] = []
    try:
        for line in child.stdout:
            printed.append(line)
            if len(printed) == lines:
                break
    finally:
        watchdog.cancel()
        child.kill()
        child.wait(CHILD_TIMEOUT)
        child.stdout.close()
    return printed


def is_journal_entry(args: tuple[object, ...]) -> bool:
    return bytes(args[1][:2]) == b"JE"  # type: ignore[index]


class JournalTest(FolderMixin):
    """journal=True: saves are appended to .jason-journal and reach the records' files at checkpoints."""

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        await self.db.close()
        # No checkpoint unless a test asks for one: the saves stay in the journal.
        patcher = mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 3600)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.db = self.open_db(journal=True)

    def journals(self) -> list[str]:
        return sorted(name for name in os.listdir(self.folder) if name.startswith(jason.JOURNAL_NAME))

    async def test_this_instance_a_reader_and_the_cli_see_every_save_before_any_checkpoint(self) -> None:
        await self.db.save_user_data(1, RECORD)
        await self.db.save_user_data(2, {"old": True})
        await self.db.save_user_data(2, {"new": True})
        await self.db.save_user_data(3, RECORD)
        await self.db.delete_user_data(3)
        self.assertEqual(jason_records(self.folder), [])  # all of it is in the journal
        self.assertEqual(self.journals(), [jason.JOURNAL_NAME])
        async with JASON(self.folder, DEFAULT, readonly=True) as reader:
            for db in (self.db, reader):
                self.assertEqual(await db.user_ids(), ["1", "2"])
                self.assertEqual(await db.load_user_data(2), {**DEFAULT, "new": True})
                self.assertFalse(await db.user_exists(3))
        self.assertEqual(json.loads(run_cli(self.folder, "get", "2").stdout), {"new": True})
        exported = run_cli(self.folder, "export", "-")
        self.assertEqual([json.loads(line) for line in exported.stdout.splitlines()],
                         [{"user_id": "1", "data": RECORD}, {"user_id": "2", "data": {"new": True}}])

    async def test_close_leaves_every_file_current_and_no_journal(self) -> None:
        await asyncio.gather(*(self.db.save_user_data(user, {"n": user}) for user in range(100)))
        await self.db.delete_user_data(7)
        await self.db.close()
        self.assertEqual(self.journals(), [])
        self.assertEqual(await asyncio.to_thread(read_folder, self.folder),
                         {str(user): {"n": user} for user in range(100) if user != 7})

    async def test_a_checkpoint_brings_the_files_up_to_date(self) -> None:
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 0.05):
            await self.db.save_user_data(1, {"v": 1})
            await until(lambda: self.journals() == [jason.JOURNAL_NAME] and os.path.exists(self.path(1)))
            self.assertEqual(json.loads(read_bytes(self.path(1))), {"v": 1})
            journal = read_bytes(os.path.join(self.folder, jason.JOURNAL_NAME))
            self.assertEqual(journal[jason._JOURNAL_FILE_HEADER.size:].strip(b"\0"), b"")  # a header, no entry
            await self.db.save_user_data(1, {"v": 2})
            await self.db.delete_user_data(1)
            await until(lambda: not os.path.exists(self.path(1)))

    async def test_a_big_journal_is_checkpointed_at_once(self) -> None:
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_BYTES", 10_000):
            for user in range(30):
                await self.db.save_user_data(user, {"pad": "x" * 1000})
            await until(lambda: len(jason_records(self.folder)) >= 9)

    @slow
    async def test_a_killed_writer_loses_no_save_that_returned(self) -> None:
        for round_number in range(5):
            folder = os.path.join(self._tmp.name, f"killed{round_number}")
            with self.subTest(round=round_number):
                returned = [int(line) for line in killed_after(JOURNAL_WRITER, folder, 150 + 37 * round_number)]
                self.assertIn(jason.JOURNAL_NAME, os.listdir(folder))  # killed: the journal is still there
                latest = {n % 50: n for n in returned}  # the child went on saving until the kill: n or later
                async with JASON(folder, readonly=True) as reader:  # reads the journal as it is
                    seen = {user: (await reader.load_user_data(user))["n"] for user in latest}
                async with JASON(folder, journal=False) as writer:  # replays it, then deletes it
                    self.assertNotIn(jason.JOURNAL_NAME, os.listdir(folder))
                    for user, n in latest.items():
                        stored = (await writer.load_user_data(user))["n"]
                        self.assertEqual(stored % 50, user)
                        self.assertGreaterEqual(stored, n)
                        self.assertGreaterEqual(stored, seen[user])

    @slow
    async def test_a_killed_storm_of_edits_loses_no_edit_that_returned(self) -> None:
        # Each edit read the one before it while that one was not durable yet: a kill at any moment
        # must still leave every user at least where the last edit that returned left it.
        for round_number in range(4):
            folder = os.path.join(self._tmp.name, f"storm{round_number}")
            with self.subTest(round=round_number):
                returned = {0: 0, 1: 0, 2: 0}
                for line in killed_after(JOURNAL_STORM_WRITER, folder, 400 + 97 * round_number):
                    user, n = map(int, line.split())
                    returned[user] = max(returned[user], n)
                async with JASON(folder, readonly=True) as reader:  # reads the journal as it is
                    seen = {user: (await reader.load_user_data(user))["n"] for user in returned}
                async with JASON(folder) as writer:  # replays it
                    for user, n in returned.items():
                        stored = (await writer.load_user_data(user))["n"]
                        self.assertGreaterEqual(stored, n, f"user {user} lost an edit that had returned")
                        self.assertGreaterEqual(stored, seen[user])

    async def test_a_torn_tail_is_ignored(self) -> None:
        await self.db.close()
        records = {str(user): {"v": user, "pad": "x" * 1000} for user in range(200)}  # entries across read chunks
        journal = b"".join(jason._journal_entry(user, jason._dumps(record)) for user, record in records.items())
        torn = jason._journal_entry("torn", b'{"v":3}')
        for tail in (torn[:-1], torn[:5], b"\x00" * 40, torn[:-3] + b"xyz", b""):
            with self.subTest(tail=tail):
                with open(os.path.join(self.folder, jason.JOURNAL_NAME), "wb") as file:
                    file.write(journal + tail + bytes(100_000))  # as preallocated: zeros after the last entry
                async with JASON(self.folder, readonly=True) as reader:  # reads it where it is
                    self.assertEqual(len(await reader.user_ids()), 200)
                    self.assertEqual(await reader.load_user_data("199"), records["199"])
                async with JASON(self.folder) as db:  # replays it
                    self.assertEqual({user: await db.load_user_data(user) for user in await db.user_ids()}, records)
                self.assertEqual(self.journals(), [])

    async def test_a_failed_append_breaks_the_journal_and_the_next_open_replays_what_was_durable(self) -> None:
        await self.db.save_user_data(1, {"v": 1})
        real_pwrite = os.pwrite
        calls: list[int] = []

        def short_then_full(fd: int, data: Any, offset: int) -> int:  # half an entry lands, then the disk is full
            if is_journal_entry((fd, data)) and not calls:
                calls.append(fd)
                return real_pwrite(fd, bytes(data[: len(data) // 2]), offset)
            if len(calls) == 1:
                calls.append(fd)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        with mock.patch("os.pwrite", short_then_full), self.assertRaises(OSError) as caught:
            await self.db.save_user_data(1, {"v": 2})
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        # Every read saw {"v": 2} the moment it was queued, and a later write may have built on it: so
        # nothing more is saved, and no read returns what failed.
        with self.assertRaisesRegex(JasonError, "failed earlier .*an append failed"):
            await self.db.load_user_data(1)
        with self.assertRaisesRegex(JasonError, "failed earlier .*an append failed"):
            await self.db.save_user_data(2, {"v": 3})
        self.assertEqual(await self.db.load_user_data(3), DEFAULT)  # a user it never touched
        with self.assertLogs("jason", "WARNING") as logged:
            await self.db.close()  # the journal stays for the next open
        self.assertIn("the next open replays what it made durable", logged.output[0])
        self.assertEqual(self.journals(), [jason.JOURNAL_NAME])
        async with JASON(self.folder, readonly=True) as reader:  # the torn half ends the journal
            self.assertEqual((await reader.load_user_data(1))["v"], 1)
        reopened = self.open_db(journal=True)
        self.assertEqual((await reopened.load_user_data(1))["v"], 1)
        await reopened.save_user_data(2, {"v": 4})
        self.assertEqual((await reopened.load_user_data(2))["v"], 4)

    async def test_a_checkpoint_writes_no_record_before_its_journal_entry_is_durable(self) -> None:
        """A save is pending (seen by reads) from its queueing; its file must wait for its entry's sync."""
        await self.db.save_user_data(1, {"v": 1})
        real_entry, real_pwrite = jason._journal_entry, os.pwrite
        queued, append = threading.Event(), threading.Event()

        def held_entry(key: str, data: bytes | None) -> bytes:  # the commit job, before it appends
            queued.set()
            if not append.wait(CHILD_TIMEOUT):
                raise AssertionError("the append was never let go")
            return real_entry(key, data)

        def full(fd: int, data: Any, offset: int) -> int:
            if is_journal_entry((fd, data)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        with mock.patch("jason._journal_entry", held_entry), mock.patch("os.pwrite", full):
            save = asyncio.create_task(self.db.save_user_data(1, {"v": 2}))
            await wait_for_event(queued)
            checkpoint = asyncio.create_task(self.db.check())  # check runs a checkpoint first
            await asyncio.sleep(0.2)
            on_file = read_bytes(self.path(1)) if os.path.exists(self.path(1)) else None
            self.assertIn(on_file, (None, jason._dumps({"v": 1})), "a checkpoint wrote a save not yet durable")
            append.set()
            with self.assertRaises(OSError):
                await save
            await asyncio.gather(checkpoint, return_exceptions=True)  # its outcome is not the point here
        with self.assertLogs("jason", "WARNING"):
            await self.db.close()
        reopened = self.open_db(journal=True)
        self.assertEqual(await reopened.load_user_data(1), {**DEFAULT, "v": 1})  # the save that failed is not kept

    async def test_a_failed_fdatasync_fails_the_writes_that_read_it_and_refuses_the_next(self) -> None:
        await self.db.save_user_data(1, {"v": 1})

        async def add_ten() -> None:
            async with self.db.edit_user_data(1) as data:  # reads the save below before it is durable
                data["v"] += 10

        with failing("fdatasync", lambda args: True, errno.EIO):
            outcomes = await asyncio.gather(self.db.save_user_data(1, {"v": 2}), add_ten(), return_exceptions=True)
        self.assertIsInstance(outcomes[0], OSError)
        self.assertIsInstance(outcomes[1], (OSError, JasonError))  # never reported as saved
        with self.assertRaisesRegex(JasonError, "failed earlier .*fdatasync failed"):
            await self.db.load_user_data(1)
        with self.assertRaisesRegex(JasonError, "failed earlier .*fdatasync failed.* open the folder again"):
            await self.db.save_user_data(2, {"v": 3})
        with self.assertLogs("jason", "WARNING"):
            await self.db.close()
        reopened = self.open_db(journal=True)
        # The failed ones may have reached the disk (unknown, as documented), but only in journal order.
        self.assertIn((await reopened.load_user_data(1))["v"], (1, 2, 12))
        await reopened.save_user_data(2, {"v": 4})
        self.assertEqual((await reopened.load_user_data(2))["v"], 4)

    async def test_a_storm_of_edits_of_one_user_shares_its_syncs_and_loses_none(self) -> None:
        syncs = []
        real_fdatasync = os.fdatasync

        def counted(fd: int) -> None:  # as slow as a disk's: edits queued meanwhile share the next one
            syncs.append(fd)
            time.sleep(0.005)
            real_fdatasync(fd)

        async def increment() -> None:
            async with self.db.edit_user_data(1) as data:
                data["n"] = data.get("n", 0) + 1

        with mock.patch("os.fdatasync", counted):
            await asyncio.gather(*(increment() for _ in range(300)))
        self.assertEqual((await self.db.load_user_data(1))["n"], 300)
        # Each edit waited for the sync of the one before while holding the user: 300 syncs.
        self.assertLess(len(syncs), 100, "the edits of one user did not share their syncs")
        await self.db.close()
        async with JASON(self.folder, readonly=True) as reader:
            self.assertEqual((await reader.load_user_data(1))["n"], 300)

    async def test_nothing_returns_a_write_before_it_is_durable(self) -> None:
        await self.db.save_user_data(1, {"v": 1})
        release = threading.Event()
        real_fdatasync = os.fdatasync

        def held(fd: int) -> None:
            release.wait(CHILD_TIMEOUT)
            real_fdatasync(fd)

        async def edit_that_raises() -> None:
            async with self.db.edit_user_data(1) as data:
                self.assertEqual(data["v"], 2)  # it reads the save that is not durable yet...
                raise KeyError("dropped")

        with mock.patch("os.fdatasync", held):
            saving = asyncio.ensure_future(self.db.save_user_data(1, {"v": 2}))
            await asyncio.sleep(0.01)
            callers = [saving, asyncio.ensure_future(self.db.load_user_data(1)),
                       asyncio.ensure_future(self.db.user_exists(1)), asyncio.ensure_future(self.db.user_ids()),
                       asyncio.ensure_future(edit_that_raises()),
                       asyncio.ensure_future(self.db.load_stored([1]))]
            await asyncio.sleep(0.2)
            self.assertEqual([caller.done() for caller in callers], [False] * len(callers))  # ...none returns
            release.set()
            outcomes = await asyncio.gather(*callers, return_exceptions=True)
        self.assertEqual(outcomes[:4], [None, {**DEFAULT, "v": 2}, True, ["1"]])
        self.assertIsInstance(outcomes[4], KeyError)
        self.assertEqual(outcomes[5], [{"v": 2}])

    async def test_a_writer_without_the_journal_replays_it_first(self) -> None:
        await self.db.save_user_data(1, {"v": 1})
        journal = read_bytes(os.path.join(self.folder, jason.JOURNAL_NAME))
        await self.db.close()
        with open(os.path.join(self.folder, jason.JOURNAL_NAME), "wb") as file:  # as a killed writer leaves it
            file.write(journal)
        os.unlink(self.path(1))
        result = run_cli(self.folder, "set", "2", stdin='{"v": 2}')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.journals(), [])
        self.assertEqual(await asyncio.to_thread(read_folder, self.folder), {"1": {"v": 1}, "2": {"v": 2}})

    async def test_check_reports_a_journal_only_when_its_writer_is_gone(self) -> None:
        await self.db.save_user_data(1, {"v": 1})
        running = run_cli(self.folder, "check")
        self.assertEqual(running.returncode, 0, running.stdout)  # the live writer's saves in flight
        self.assertIn("0 journal", running.stdout)
        folder = os.path.join(self._tmp.name, "killed")
        child = subprocess.Popen([sys.executable, "-c", JOURNAL_WRITER, folder], env=child_env(),
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        watchdog = threading.Timer(CHILD_TIMEOUT, child.kill)  # a child that hangs cannot hang the test
        watchdog.start()
        child.stdout.readline()  # one save has returned
        watchdog.cancel()
        child.kill()
        child.wait(CHILD_TIMEOUT)
        child.stdout.close()
        left = run_cli(folder, "check")
        self.assertEqual(left.returncode, 1)
        self.assertIn(f"journal: {os.path.join(folder, jason.JOURNAL_NAME)}: saves of a writer", left.stdout)

    async def test_a_long_lived_reader_never_goes_back(self) -> None:
        # A checkpoint at every save: journals are deleted and made anew between two reads, and the
        # file system gives a new journal the inode of a deleted one.
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_BYTES", 1):
            async with JASON(self.folder, readonly=True) as reader:
                seen = -1
                for v in range(150):
                    await self.db.save_user_data(1, {"v": v})
                    if v % 2 == 0:  # when the new journal may have the inode of the one read last
                        now = (await reader.load_user_data(1))["v"]
                        self.assertGreaterEqual(now, v, "older than a save that had returned")
                        self.assertGreaterEqual(now, seen, "older than what this reader saw before")
                        seen = now
                    await asyncio.sleep(0.002)  # the checkpoint of that save runs

    async def test_user_ids_and_users_list_every_user_whose_save_had_returned(self) -> None:
        returned: list[str] = []

        async def create_users() -> None:
            for user in range(150):
                await self.db.save_user_data(user, {"n": user})
                returned.append(str(user))

        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 0.001):  # checkpoints all the time
            creating = asyncio.ensure_future(create_users())
            while not creating.done():
                before = set(returned)
                self.assertLessEqual(before, set(await self.db.user_ids()))
                before = set(returned)
                self.assertLessEqual(before, {user async for user, _ in self.db.users()})
            await creating

    async def test_the_journal_is_for_durable_saves_to_a_folder(self) -> None:
        with self.assertRaisesRegex(ValueError, "durable=False"):
            JASON(os.path.join(self._tmp.name, "other"), journal=True, durable=False)
        with self.assertRaisesRegex(ValueError, "for a folder"):
            JASON("redis://localhost:1", journal=True)
        with self.assertRaisesRegex(ValueError, "journal=True; every JASON of one folder must use the same"):
            JASON(self.folder, journal=False)
        joined = self.open_db()  # journal=None joins the mode the folder is open with
        await joined.save_user_data(1, {"v": 1})
        self.assertEqual(jason_records(self.folder), [])  # in the journal
        self.assertEqual((await self.db.load_user_data(1))["v"], 1)


def crash_image(folder: str) -> dict[str, bytes]:
    """The records and journals as a SIGKILL would leave them: what is in the folder now."""
    image = {}
    for name in os.listdir(folder):
        if name.endswith(".json") or name.startswith(jason.JOURNAL_NAME):
            with contextlib.suppress(FileNotFoundError):
                image[name] = read_bytes(os.path.join(folder, name))
    return image


async def recovered_records(image: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """What a bot finds when it opens a folder holding image: the journals replayed."""
    with tempfile.TemporaryDirectory() as folder:
        for name, content in image.items():
            with open(os.path.join(folder, name), "wb") as file:
                file.write(content)
        async with JASON(folder) as db:
            return {user: await db.load_user_data(user) for user in await db.user_ids()}


class JournalLifecycleTest(unittest.TestCase):
    """The journal across event loops, instances that come and go, and hostile folder content."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-journal-")
        self.addCleanup(self._tmp.cleanup)
        self.folder = os.path.join(self._tmp.name, "users")

    def test_a_checkpoint_cut_short_by_the_end_of_its_event_loop_loses_no_save(self) -> None:
        images: list[tuple[dict[str, bytes], dict[str, int]]] = []
        returned: dict[str, int] = {}
        real_replace = os.replace

        def replace_then_image(source: Any, target: Any) -> None:  # a SIGKILL right after each rotation
            real_replace(source, target)
            if str(target).endswith(jason.JOURNAL_CHECKPOINTING_NAME):
                images.append((crash_image(self.folder), dict(returned)))

        async def saves(db: JASON, first: int) -> None:
            for n in range(first, first + 25):
                await db.save_user_data(n % 5, {"n": n})
                returned[str(n % 5)] = n

        # Every save makes the journal "big": a checkpoint starts at once, and the loop ends during it.
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_BYTES", 1), mock.patch("os.replace", replace_then_image):
            db = JASON(self.folder, journal=True)
            asyncio.run(saves(db, 0))
            asyncio.run(saves(db, 25))
            asyncio.run(db.close())
        self.assertGreater(len(images), 1)
        for image, expected in images:
            self.assertEqual({user: record["n"] for user, record in asyncio.run(recovered_records(image)).items()},
                             expected)
        self.assertEqual({user: record["n"] for user, record in read_folder(self.folder).items()}, returned)

    def test_checkpoints_go_on_in_a_second_event_loop(self) -> None:
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 0.05):
            db = JASON(self.folder, journal=True)
            asyncio.run(db.save_user_data(1, {"v": 1}))  # the loop ends before the checkpoint is due

            async def second() -> None:
                await db.save_user_data(2, {"v": 2})
                await until(lambda: os.path.exists(os.path.join(self.folder, "2.json")), timeout=10)
                await db.close()

            asyncio.run(second())
        self.assertEqual(read_folder(self.folder), {"1": {"v": 1}, "2": {"v": 2}})

    def test_a_save_of_a_second_event_loop_returns_when_the_first_loops_commit_takes_it(self) -> None:
        # In a child, since the save that is never answered hangs its process: the commit job that
        # served the first loop is held just before it looks for more saves, until the second loop
        # has queued one. That save must be answered on its own loop.
        result = run_child("""
            import asyncio, os, sys, threading, jason
            resume, hold, passed = threading.Event(), threading.Event(), threading.Event()
            real_lock, real_fdatasync = jason._registry_lock, os.fdatasync

            class HeldLock:
                def __enter__(self):
                    if threading.current_thread().name.startswith("jason-io") and hold.is_set():
                        if passed.is_set():  # the second time after the sync: where it looks for more
                            hold.clear()
                            resume.wait(30)
                        else:  # the first: where it records the batch as durable and wakes the saver
                            passed.set()
                    real_lock.acquire()

                def __exit__(self, *exc_info):
                    real_lock.release()

            def fdatasync_then_hold(fd):
                real_fdatasync(fd)
                hold.set()

            jason._registry_lock, os.fdatasync = HeldLock(), fdatasync_then_hold
            db = jason.JASON(sys.argv[1], journal=True)

            async def second():
                saving = asyncio.ensure_future(db.save_user_data(2, {"v": 2}))
                await asyncio.sleep(0.05)  # queued behind the held job
                resume.set()
                await saving
                await db.close()

            asyncio.run(db.save_user_data(1, {"v": 1}))
            asyncio.run(second())
            print("done")
        """, self.folder, timeout=30)
        self.assertEqual(result.stdout.strip(), "done", result.stderr)
        self.assertEqual(read_folder(self.folder), {"1": {"v": 1}, "2": {"v": 2}})

    def test_a_save_through_an_instance_opened_while_the_last_one_closes_is_never_deleted(self) -> None:
        async def trial(round_number: int) -> None:
            folder = os.path.join(self._tmp.name, f"closing{round_number}")
            first = JASON(folder, journal=True)
            await asyncio.gather(*(first.save_user_data(user, {"v": 1}) for user in range(20)))
            closing = asyncio.ensure_future(first.close())
            for _ in range(round_number):
                await asyncio.sleep(0)
            second = JASON(folder, journal=True)
            await second.save_user_data("late", {"v": round_number})  # returned: durable from here on
            await closing
            image = crash_image(folder)  # as a SIGKILL now would leave the folder
            self.assertEqual((await recovered_records(image)).get("late"), {"v": round_number})
            await second.close()
            self.assertEqual((await asyncio.to_thread(read_folder, folder))["late"], {"v": round_number})

        for round_number in range(10):
            with self.subTest(round=round_number):
                asyncio.run(trial(round_number))

    @slow  # a dozen child processes
    def test_a_fifo_named_like_the_journal_is_refused_never_waited_on(self) -> None:
        os.mkdir(self.folder)
        for name in (jason.JOURNAL_NAME, jason.JOURNAL_CHECKPOINTING_NAME):
            with self.subTest(name=name):
                path = os.path.join(self.folder, name)
                os.mkfifo(path)
                try:
                    for mode in ("writer", "journal", "reader"):
                        opened = run_child("""
                            import asyncio, sys, jason
                            async def main(folder, mode):
                                async with jason.JASON(folder, readonly=mode == "reader",
                                                       journal=mode == "journal") as db:
                                    await db.load_user_data(1)
                            try:
                                asyncio.run(main(*sys.argv[1:]))
                            except jason.JasonError as exc:
                                print(exc)
                        """, self.folder, mode, timeout=20)
                        self.assertIn("is not a regular file", opened.stdout, (mode, opened.stderr))
                    listed = run_cli(self.folder, "ls", timeout=20)
                    self.assertEqual(listed.returncode, 1, listed.stderr)
                    self.assertIn("is not a regular file", listed.stderr)
                finally:
                    os.unlink(path)


# ---------------------------------------------------------------- framework adapters


# Looked up, not imported: importing aiogram takes seconds, paid only by the process that runs its tests.
HAVE_AIOGRAM = importable("aiogram")
HAVE_PTB = importable("telegram")


class AdapterMixin(FolderMixin):
    """An adapter's JASON: opened without a default structure, closed by the test's teardown."""

    def adapter_db(self) -> JASON:
        return self.open_db(default_structure=None)

    async def readonly_record(self, record_id: str) -> dict[str, Any]:
        """A record as any reader of the database sees it: plain JSON, no framework needed."""
        async with JASON(self.location, readonly=True, **self.options) as reader:  # type: ignore[arg-type]
            return await reader.load_user_data(record_id)


@slow  # importing aiogram alone takes 4 s: make quick leaves it to make test
@needs(HAVE_AIOGRAM, "aiogram, for jason.AiogramStorage (pip install -r examples/requirements.txt)")
class AiogramStorageTest(AdapterMixin):
    def storage(self, **options: Any) -> Any:
        return jason.AiogramStorage(self.adapter_db(), **options)

    async def test_state_and_data_expire_after_their_ttl_and_leave_nothing_behind(self) -> None:
        now = [1000.0]
        storage = self.storage(state_ttl=10, data_ttl=20, clock=lambda: now[0])
        await storage.set_state(self.key(5), "Form:age")
        await storage.set_data(self.key(5), {"name": "Ann"})
        await storage.set_state(self.key(6), "Form:name")
        now[0] += 9
        self.assertEqual((await storage.get_state(self.key(5)), await storage.get_data(self.key(5))),
                         ("Form:age", {"name": "Ann"}))
        now[0] += 2  # the state's 10 s are over, the data's 20 s are not
        self.assertEqual((await storage.get_state(self.key(5)), await storage.get_data(self.key(5))),
                         (None, {"name": "Ann"}))
        await storage.update_data(self.key(5), {"age": 30})  # setting data starts its TTL again
        now[0] += 15
        self.assertEqual(await storage.get_data(self.key(5)), {"name": "Ann", "age": 30})
        now[0] += 10
        self.assertEqual(await storage.get_data(self.key(5)), {})
        self.assertIn("bot 42 chat 6", await self.readonly_record("6"))  # expired, still stored
        self.assertEqual(await storage.remove_expired(), 2)  # what users who never came back left
        self.assertEqual((await self.readonly_record("5"), await self.readonly_record("6")), ({}, {}))
        with self.assertRaisesRegex(ValueError, "state_ttl must be a positive number"):
            self.storage(state_ttl=0)

    async def test_expired_entries_are_swept_in_the_background_at_most_once_a_minute(self) -> None:
        now = [1000.0]
        storage = self.storage(state_ttl=5, clock=lambda: now[0])
        for user in range(1, 4):
            await storage.set_state(self.key(user), "Form:name")
        now[0] += 30
        await storage.get_state(self.key(9))  # no sweep yet: the last was under a minute ago
        await asyncio.sleep(0.2)
        self.assertEqual(await self.readonly_record("1"), {"bot 42 chat 1": {
            "state": "Form:name", "data": {}, "state_expires": 1005.0}})
        now[0] += 31
        await storage.get_state(self.key(9))
        deadline = time.monotonic() + CHILD_TIMEOUT
        while [await self.readonly_record(str(user)) for user in range(1, 4)] != [{}, {}, {}]:
            self.assertLess(time.monotonic(), deadline, "the sweep did not run")
            await asyncio.sleep(0.01)

    @staticmethod
    def key(user: int = 7, chat: int | None = None, **parts: Any) -> Any:
        from aiogram.fsm.storage.base import StorageKey

        return StorageKey(bot_id=parts.pop("bot_id", 42), chat_id=user if chat is None else chat, user_id=user,
                          **parts)

    async def test_state_and_data_survive_closing_and_reopening(self) -> None:
        from aiogram.fsm.state import State, StatesGroup

        class Form(StatesGroup):
            name = State()

        storage = self.storage()
        await storage.set_state(self.key(), Form.name)
        await storage.set_data(self.key(), {"name": "Ann", "tags": ["a"]})
        self.assertEqual(await storage.get_state(self.key()), "Form:name")
        data = await storage.get_data(self.key())
        data["tags"].append("changed by the caller")
        self.assertEqual(await storage.get_data(self.key()), {"name": "Ann", "tags": ["a"]})
        await storage.close()
        with self.assertRaisesRegex(JasonError, "is closed"):  # close() closed the JASON it was given
            await storage.db.user_ids()
        reopened = self.storage()
        self.assertEqual(await reopened.get_state(self.key()), "Form:name")
        self.assertEqual(await reopened.get_data(self.key()), {"name": "Ann", "tags": ["a"]})
        self.assertEqual(await self.readonly_record("7"),
                         {"bot 42 chat 7": {"state": "Form:name", "data": {"name": "Ann", "tags": ["a"]}}})

    async def test_every_part_of_the_key_keeps_its_own_state(self) -> None:
        storage = self.storage()
        keys = {
            "bot 42 chat 7": self.key(),
            "bot 43 chat 7": self.key(bot_id=43),
            "bot 42 chat -100": self.key(chat=-100),
            "bot 42 chat -100 thread 0": self.key(chat=-100, thread_id=0),
            "bot 42 chat -100 thread 5": self.key(chat=-100, thread_id=5),
            'bot 42 chat 7 business "b:1"': self.key(business_connection_id="b:1"),
            'bot 42 chat 7 destiny "quiz"': self.key(destiny="quiz"),
            'bot 42 chat 7 business "b:1" destiny "quiz"': self.key(business_connection_id="b:1", destiny="quiz"),
        }
        for name, key in keys.items():
            await storage.set_state(key, f"state of {name}")
        for name, key in keys.items():
            self.assertEqual(await storage.get_state(key), f"state of {name}")
        self.assertEqual(await self.readonly_record("7"),
                         {name: {"state": f"state of {name}", "data": {}} for name in keys})
        self.assertIsNone(await storage.get_state(self.key(user=8)))
        self.assertEqual(await storage.get_data(self.key(user=8)), {})

    async def test_data_that_is_not_a_dict_gets_aiograms_error(self) -> None:
        from aiogram.exceptions import DataNotDictLikeError

        storage = self.storage()
        await storage.set_data(self.key(), {"kept": 1})
        for bad in (["a"], "text", None):
            with self.subTest(data=bad), self.assertRaises(DataNotDictLikeError):
                await storage.set_data(self.key(), bad)
        self.assertEqual(await storage.get_data(self.key()), {"kept": 1})

    async def test_a_value_json_cannot_hold_fails_when_it_is_set(self) -> None:
        import datetime

        storage = self.storage()
        await storage.set_state(self.key(), "Form:name")
        await storage.set_data(self.key(), {"kept": 1})
        with self.assertRaisesRegex(TypeError, r"FSM data\['when'\]: datetime is not JSON"):
            await storage.set_data(self.key(), {"when": datetime.datetime.now()})
        with self.assertRaisesRegex(TypeError, r"FSM data\['tags'\]: set is not JSON"):
            await storage.update_data(self.key(), {"tags": {"a"}})
        with self.assertRaisesRegex(TypeError, "a State, a str or None, not int"):
            await storage.set_state(self.key(), 5)
        self.assertEqual(await storage.get_state(self.key()), "Form:name")
        self.assertEqual(await storage.get_data(self.key()), {"kept": 1})

    async def test_get_value_with_and_without_a_default(self) -> None:
        storage = self.storage()
        await storage.set_data(self.key(), {"name": "Ann", "nothing": None})
        self.assertEqual(await storage.get_value(self.key(), "name"), "Ann")
        self.assertIsNone(await storage.get_value(self.key(), "missing"))
        self.assertEqual(await storage.get_value(self.key(), "missing", 5), 5)
        self.assertIsNone(await storage.get_value(self.key(), "nothing", 5))

    async def test_updates_at_once_from_two_instances_all_land(self) -> None:
        first, second = self.storage(), self.storage()  # on a server: two clients, as two processes would be
        results = await asyncio.gather(*(
            (first if n % 2 else second).update_data(self.key(), {f"field{n}": n}) for n in range(100)))
        self.assertEqual(await first.get_data(self.key()), {f"field{n}": n for n in range(100)})
        self.assertEqual(max(len(result) for result in results), 100)  # each returns the data after its merge

    async def test_clearing_a_key_removes_its_entry(self) -> None:
        storage = self.storage()
        await storage.set_state(self.key(), "Form:name")
        await storage.set_state(self.key(chat=-100), "Other:step")
        await storage.update_data(self.key(), {"name": "Ann"})
        await storage.set_state(self.key(), None)  # what FSMContext.clear() does
        await storage.set_data(self.key(), {})
        self.assertEqual(await self.readonly_record("7"),
                         {"bot 42 chat -100": {"state": "Other:step", "data": {}}})

    async def test_a_database_with_defaults_or_not_a_jason_is_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, "JASON of its own, opened without default_structure"):
            jason.AiogramStorage(self.db)
        with self.assertRaisesRegex(TypeError, "needs a JASON instance, not str"):
            jason.AiogramStorage(self.location)

    async def test_an_entry_that_is_not_fsm_state_is_reported(self) -> None:
        storage = self.storage()
        await storage.db.save_user_data(7, {"bot 42 chat 7": "not an entry"})
        with self.assertRaisesRegex(CorruptDataError, "is not an FSM entry"):
            await storage.get_state(self.key())
        with self.assertRaisesRegex(CorruptDataError, "is not an FSM entry"):
            await storage.set_state(self.key(), "Form:name")
        self.assertEqual(await self.readonly_record("7"), {"bot 42 chat 7": "not an entry"})

    async def test_closing_the_storage_under_held_isolation_locks_closes_after_they_are_released(self) -> None:
        storage = self.storage()
        isolation = storage.create_isolation()
        held, release = asyncio.Event(), asyncio.Event()

        async def handler(user: int) -> None:  # a handler still running when the bot stops
            async with isolation.lock(self.key(user=user)):
                await storage.set_state(self.key(user=user), "Form:name")
                if user == 9:
                    held.set()
                await release.wait()

        handlers = [asyncio.ensure_future(handler(user)) for user in range(5, 10)]
        await held.wait()
        with self.assertLogs(level=logging.WARNING) as logs:
            closing = asyncio.ensure_future(storage.close())
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.wait_for(asyncio.gather(*handlers, closing), CHILD_TIMEOUT)  # no error in any
            logging.getLogger("jason").warning("the end")  # assertLogs needs one
        self.assertEqual([record.getMessage() for record in logs.records], ["the end"])
        self.assertEqual(await self.readonly_record("9"), {"bot 42 chat 9": {"state": "Form:name", "data": {}}})

    async def test_the_isolation_runs_one_update_per_key_at_a_time(self) -> None:
        first, second = self.storage().create_isolation(), self.storage().create_isolation()
        events: list[str] = []
        held, other_key_done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with first.lock(self.key()):
                events.append("first in")
                held.set()
                await other_key_done.wait()
                await asyncio.sleep(0.2)  # room for the second to get in, if the lock let it
                events.append("first out")

        async def same_key() -> None:
            await held.wait()
            async with second.lock(self.key()):
                events.append("second in")

        async def other_key() -> None:
            await held.wait()
            async with second.lock(self.key(user=8)):  # a different key is not held up
                other_key_done.set()

        await asyncio.wait_for(asyncio.gather(holder(), same_key(), other_key()), CHILD_TIMEOUT)
        self.assertEqual(events, ["first in", "first out", "second in"])


@needs(HAVE_PTB, "python-telegram-bot, for jason.PTBPersistence (pip install -r examples/requirements.txt)")
class PTBPersistenceTest(AdapterMixin):
    def persistence(self, **options: Any) -> Any:
        return jason.PTBPersistence(self.adapter_db(), **options)

    async def test_every_kind_of_data_comes_back_in_a_new_persistence(self) -> None:
        persistence = self.persistence()
        await persistence.update_user_data(5, {"name": "Ann", "scores": [1, 2]})
        await persistence.update_chat_data(-1001, {"topic": "runs"})
        await persistence.update_bot_data({"signed_up": 3})
        await persistence.update_callback_data(([("uuid1", 1.5, {"a": 1}), ("uuid2", 2.0, {})], {"q1": "uuid1"}))
        await persistence.update_conversation("signup", (5, 5), 1)
        await persistence.update_conversation("signup", (-1001, 5), "ASK_CITY")
        await persistence.update_conversation("signup", ("inline-id",), 2)
        await persistence.update_conversation("other", (5, 5), 0)
        await persistence.flush()

        reopened = self.persistence()
        self.assertEqual(await reopened.get_user_data(), {5: {"name": "Ann", "scores": [1, 2]}})
        self.assertEqual(await reopened.get_chat_data(), {-1001: {"topic": "runs"}})
        self.assertEqual(await reopened.get_bot_data(), {"signed_up": 3})
        self.assertEqual(await reopened.get_callback_data(),
                         ([("uuid1", 1.5, {"a": 1}), ("uuid2", 2.0, {})], {"q1": "uuid1"}))
        conversations = await reopened.get_conversations("signup")
        self.assertEqual(conversations, {(5, 5): 1, (-1001, 5): "ASK_CITY", ("inline-id",): 2})
        self.assertEqual({type(part) for key in conversations for part in key}, {int, str})
        self.assertEqual(await reopened.get_conversations("other"), {(5, 5): 0})
        self.assertEqual(await reopened.get_conversations("never used"), {})
        # Readable records, one per user, chat and handler.
        self.assertEqual(await self.readonly_record("user_5"), {"name": "Ann", "scores": [1, 2]})
        self.assertEqual(await self.readonly_record("conversations_signup"),
                         {"[5, 5]": 1, "[-1001, 5]": "ASK_CITY", '["inline-id"]': 2})

    async def test_an_empty_database_gives_empty_data(self) -> None:
        persistence = self.persistence()
        self.assertEqual(await persistence.get_user_data(), {})
        self.assertEqual(await persistence.get_chat_data(), {})
        self.assertEqual(await persistence.get_bot_data(), {})
        self.assertIsNone(await persistence.get_callback_data())

    async def test_ending_a_conversation_and_dropping_data_delete_them(self) -> None:
        persistence = self.persistence()
        await persistence.update_conversation("signup", (5, 5), 1)
        await persistence.update_conversation("signup", (6, 6), 1)
        await persistence.update_conversation("signup", (5, 5), None)
        await persistence.update_user_data(5, {"a": 1})
        await persistence.update_chat_data(5, {"a": 1})
        await persistence.drop_user_data(5)
        await persistence.drop_chat_data(5)
        self.assertFalse(await persistence.db.user_exists("user_5"))
        self.assertFalse(await persistence.db.user_exists("chat_5"))
        reopened = self.persistence()
        self.assertEqual(await reopened.get_conversations("signup"), {(6, 6): 1})
        self.assertEqual(await reopened.get_user_data(), {})

    async def test_conversation_changes_at_once_all_land(self) -> None:
        persistence = self.persistence()
        await asyncio.gather(*(persistence.update_conversation("signup", (n, n), n % 3) for n in range(300)))
        self.assertEqual(await self.persistence().get_conversations("signup"), {(n, n): n % 3 for n in range(300)})

    async def test_only_the_kinds_asked_for_are_stored(self) -> None:
        from telegram.ext import PersistenceInput

        persistence = self.persistence(store_data=PersistenceInput(user_data=False, bot_data=False))
        await persistence.update_user_data(5, {"a": 1})
        await persistence.update_bot_data({"a": 1})
        await persistence.update_chat_data(5, {"a": 1})
        self.assertEqual(await persistence.db.user_ids(), ["chat_5"])
        await persistence.db.save_user_data("user_6", {"b": 2})  # stored earlier, by a run that kept user_data
        self.assertEqual(await persistence.get_user_data(), {})
        self.assertEqual(await persistence.get_chat_data(), {5: {"a": 1}})

    async def test_a_value_json_cannot_hold_is_an_error_and_flush_names_it(self) -> None:
        import datetime

        persistence = self.persistence()
        await persistence.update_user_data(5, {"visits": 1})
        with self.assertRaisesRegex(TypeError, r"cannot store user_data\[5\]\['when'\]: datetime is not JSON"):
            await persistence.update_user_data(5, {"visits": 2, "when": datetime.datetime.now()})
        with self.assertRaisesRegex(TypeError, r"conversation 'signup'.*: set is not JSON"):
            await persistence.update_conversation("signup", (5, 5), {1, 2})
        self.assertEqual(await self.readonly_record("user_5"), {"visits": 1})  # the last saved version
        with self.assertRaisesRegex(JasonError, r"could not save 1 record.*user_5: TypeError: cannot store"):
            await persistence.flush()
        await persistence.update_user_data(5, {"visits": 3})  # the next good version clears it
        await persistence.flush()
        self.assertEqual(await self.readonly_record("user_5"), {"visits": 3})

    async def test_a_conversation_change_that_failed_is_kept_until_saved_or_named(self) -> None:
        persistence = self.persistence()
        await persistence.update_conversation("signup", (1, 1), "A")
        real_edit = persistence.db.edit_user_data
        failures = [1]

        def edit_or_fail(record_id: str) -> Any:  # the disk is full once
            if failures:
                failures.pop()
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_edit(record_id)

        with mock.patch.object(persistence.db, "edit_user_data", edit_or_fail):
            with self.assertRaises(OSError):
                await persistence.update_conversation("signup", (1, 1), "B")
            await persistence.update_conversation("signup", (2, 2), "X")  # carries (1, 1) -> B with it
        await persistence.flush()
        self.assertEqual(await self.persistence().get_conversations("signup"), {(1, 1): "B", (2, 2): "X"})

        failures.extend([1, 1])  # fails every time left: flush() names it
        with mock.patch.object(persistence.db, "edit_user_data", edit_or_fail):
            with self.assertRaises(OSError):
                await persistence.update_conversation("signup", (1, 1), "C")
            with self.assertRaisesRegex(JasonError, "conversations_signup: OSError"):
                await persistence.flush()

    async def test_a_pass_stores_the_users_data_before_their_conversation_state(self) -> None:
        import datetime

        persistence = self.persistence()
        stored: list[str] = []
        real_save, real_edit = persistence.db.save_user_data, persistence.db.edit_user_data

        async def slow_save(record_id: str, data: Any) -> None:
            await asyncio.sleep(0.05)
            await real_save(record_id, data)
            stored.append(record_id)

        @contextlib.asynccontextmanager
        async def logged_edit(record_id: str) -> AsyncIterator[Any]:
            async with real_edit(record_id) as data:
                yield data
            stored.append(record_id)

        # As Application.update_persistence hands a pass over: every change at once, in one gather.
        with mock.patch.object(persistence.db, "save_user_data", slow_save), \
                mock.patch.object(persistence.db, "edit_user_data", logged_edit):
            await asyncio.gather(persistence.update_conversation("signup", (7, 7), "CITY"),
                                 persistence.update_user_data(7, {"name": "Ann"}), return_exceptions=True)
            self.assertEqual(stored, ["user_7", "conversations_signup"])
            unstorable = {"name": "Ann", "at": datetime.date.today()}
            results = await asyncio.gather(persistence.update_conversation("signup", (7, 7), "AGE"),
                                           persistence.update_user_data(7, unstorable), return_exceptions=True)
        self.assertIsInstance(results[1], TypeError)
        self.assertEqual(await self.persistence().get_conversations("signup"), {(7, 7): "CITY"})  # not ahead of it
        with self.assertRaisesRegex(JasonError, "conversations_signup: 1 state.*user_7.*user_7: TypeError"):
            await persistence.flush()
        await persistence.update_user_data(7, {"name": "Ann", "age": 30})
        await persistence.flush()  # the state waiting for it goes too
        self.assertEqual(await self.persistence().get_conversations("signup"), {(7, 7): "AGE"})

    async def test_the_update_interval_is_honoured_and_defaults_to_one_second(self) -> None:
        self.assertEqual(self.persistence().update_interval, 1)
        self.assertEqual(self.persistence(update_interval=7.5).update_interval, 7.5)

    @per_file
    async def test_an_unchanged_record_is_not_rewritten(self) -> None:
        persistence = self.persistence()
        await persistence.update_bot_data({"a": [1, 2]})
        written = os.stat(self.path("bot_data"))
        await persistence.update_bot_data({"a": [1, 2]})  # the Application hands bot_data over every interval
        self.assertEqual(os.stat(self.path("bot_data")).st_ino, written.st_ino)  # a save makes a new file
        reopened = self.persistence()
        await reopened.get_bot_data()
        await reopened.update_bot_data({"a": [1, 2]})  # also after a restart
        self.assertEqual(os.stat(self.path("bot_data")).st_ino, written.st_ino)
        await reopened.update_bot_data({"a": [1, 2, 3]})
        self.assertNotEqual(os.stat(self.path("bot_data")).st_ino, written.st_ino)


@slow  # it imports aiogram (see AiogramStorageTest)
@needs(HAVE_AIOGRAM and HAVE_PTB, "aiogram and python-telegram-bot (pip install -r examples/requirements.txt)")
class SharedLocationTest(AdapterMixin):
    """An adapter's state and users' records never share a location: each refuses the other's, both ways."""

    @staticmethod
    def key(user: int = 7) -> Any:
        from aiogram.fsm.storage.base import StorageKey

        return StorageKey(bot_id=42, chat_id=user, user_id=user)

    async def test_a_jason_of_users_records_refuses_an_adapters_location_and_writes_nothing(self) -> None:
        storage = jason.AiogramStorage(self.adapter_db())
        await storage.set_state(self.key(5), "Form:age")
        before = await self.stored_bytes(5)
        users = self.open_db()
        for call in (users.save_user_data(5, {"orders": 1}), users.load_user_data(5), users.user_ids()):
            with self.assertRaisesRegex(JasonError, "holds the state of AiogramStorage"):
                await call
        with self.assertRaisesRegex(JasonError, "holds the state of AiogramStorage"):
            async with users.edit_user_data(5) as data:
                data["orders"] = 1
        self.assertEqual(await self.stored_bytes(5), before)
        # A reader mixes nothing: a script may read the state as plain JSON.
        self.assertEqual(await self.readonly_record("5"), {"bot 42 chat 5": {"state": "Form:age", "data": {}}})

    async def test_an_adapter_refuses_a_location_holding_users_records_and_writes_nothing(self) -> None:
        await self.db.save_user_data(5, {"name": "U2", "orders": 1})
        before = await self.stored_bytes(5)
        storage = jason.AiogramStorage(self.adapter_db())
        with self.assertRaisesRegex(JasonError, "holds records that are not AiogramStorage's"):
            await storage.set_state(self.key(5), "Form:age")
        persistence = jason.PTBPersistence(self.adapter_db())
        with self.assertRaisesRegex(JasonError, "holds records that are not PTBPersistence's"):
            await persistence.update_bot_data({"signed_up": 1})
        with self.assertRaisesRegex(JasonError, "bot_data"):  # flush() names every record left unsaved
            await persistence.flush()
        self.assertEqual(await self.stored_bytes(5), before)
        self.assertIsNone(await self.stored_bytes("bot_data"))
        self.assertEqual(await self.db.user_ids(), ["5"])  # and the users' JASON goes on

    async def test_two_adapters_refuse_each_others_location(self) -> None:
        persistence = jason.PTBPersistence(self.adapter_db())
        await persistence.update_bot_data({"signed_up": 1})
        await persistence.flush()
        with self.assertRaisesRegex(JasonError, "holds the state of PTBPersistence; give AiogramStorage"):
            await jason.AiogramStorage(self.adapter_db()).set_state(self.key(5), "Form:age")
        with self.assertRaisesRegex(ValueError, "holds the state of PTBPersistence; give AiogramStorage"):
            jason.AiogramStorage(persistence.db)  # one JASON given to both
        self.assertEqual(await persistence.db.user_ids(), ["bot_data"])

    def second_location(self) -> JASON:
        """Another empty location on the same backend, for a second database."""
        if self.backend == "folder":
            db = JASON(os.path.join(self._tmp.name, "second"))
            self._opened.append(db)
            return db
        return self.open_db(namespace=next(SERVERS.namespaces), default_structure=None)

    async def test_an_adapter_takes_over_its_unmarked_records_from_an_earlier_version(self) -> None:
        # Written as an earlier version wrote them, with no mark: by a plain JASON.
        await self.db.save_user_data(7, {"bot 42 chat 7": {"state": "Form:age", "data": {"name": "Ann"}}})
        storage = jason.AiogramStorage(self.adapter_db())
        self.assertEqual(await storage.get_data(self.key(7)), {"name": "Ann"})
        with self.assertRaisesRegex(JasonError, "holds the state of AiogramStorage"):  # marked now
            await self.open_db().save_user_data(8, {})

        earlier = self.second_location()
        earlier_records: list[tuple[str, dict[str, Any]]] = [("user_5", {"name": "Ann"}), ("chat_-100", {}),
                                                             ("bot_data", {"n": 1})]
        for record_id, data in earlier_records:
            await earlier.save_user_data(record_id, data)
        persistence = jason.PTBPersistence(earlier)
        self.assertEqual(await persistence.get_user_data(), {5: {"name": "Ann"}})
        self.assertEqual(await persistence.get_bot_data(), {"n": 1})

    @folder_only
    async def test_the_command_line_reads_an_adapters_records_and_copy_calls_them_records(self) -> None:
        persistence = jason.PTBPersistence(self.adapter_db())
        await persistence.update_user_data(5, {"name": "Ann"})
        await persistence.update_bot_data({"signed_up": 1})
        await persistence.flush()
        await persistence.db.close()

        checked = run_cli(self.folder, "check")
        self.assertEqual((checked.returncode, checked.stdout.splitlines()[-1][:16]), (0, "2 sound records;"))
        self.assertIn('"signed_up": 1', run_cli(self.folder, "get", "bot_data").stdout)
        target = os.path.join(self._tmp.name, "copied")
        copied = run_cli(self.folder, "copy", target)
        self.assertEqual(copied.returncode, 0, copied.stderr)
        self.assertIn("copied 2 records to", copied.stderr)
        self.assertNotIn("users", copied.stderr)
        with self.assertRaisesRegex(JasonError, "holds the state of PTBPersistence"):  # the copy is marked too
            async with JASON(target) as users:
                await users.user_ids()
        async with JASON(target) as copy:
            self.assertEqual(await jason.PTBPersistence(copy).get_bot_data(), {"signed_up": 1})
        # Nor do users' records go into an adapter's location.
        users_folder = os.path.join(self._tmp.name, "users2")
        async with JASON(users_folder) as users:
            await users.save_user_data(9, {"name": "Bo"})
        refused = run_cli(users_folder, "copy", target)
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("holds the state of PTBPersistence", refused.stderr)
        self.assertEqual(sorted(os.listdir(target)), [".jason-owner", ".jason.lock", "bot_data.json", "user_5.json"])


HAVE_TELEBOT = importable("telebot")


# A mixin of tests, collected only through the classes below; a test case to the type checker.
if TYPE_CHECKING:
    _TelebotContractBase = AdapterMixin
else:
    _TelebotContractBase = object


class TelebotContract(_TelebotContractBase):
    """pyTelegramBotAPI's StateStorageBase contract, the same tests for TeleBot's storage and AsyncTeleBot's."""

    storage: Any

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def make_storage(self, **options: Any) -> Any:
        raise NotImplementedError

    async def test_state_and_data_come_back_as_telebots_own_storage_gives_them(self) -> None:
        from telebot.states import State, StatesGroup

        class Form(StatesGroup):
            name = State()

        self.assertIsNone(await self.call("get_state", 10, 5))
        self.assertEqual(await self.call("get_data", 10, 5), {})
        with self.assertRaises(RuntimeError):  # data goes with a state, as in telebot's storages
            await self.call("set_data", 10, 5, "name", "Ann")
        self.assertTrue(await self.call("set_state", 10, 5, Form.name))
        self.assertEqual(await self.call("get_state", 10, 5), "Form:name")
        self.assertTrue(await self.call("set_data", 10, 5, "name", "Ann"))
        self.assertTrue(await self.call("set_state", 10, 5, "Form:age"))  # the data stays
        self.assertEqual(await self.call("get_data", 10, 5), {"name": "Ann"})
        self.assertTrue(await self.call("save", 10, 5, {"name": "Bo", "age": 3}))
        self.assertEqual(await self.call("get_data", 10, 5), {"name": "Bo", "age": 3})
        self.assertTrue(await self.call("reset_data", 10, 5))
        self.assertEqual(await self.call("get_data", 10, 5), {})
        self.assertTrue(await self.call("delete_state", 10, 5))
        self.assertFalse(await self.call("delete_state", 10, 5))
        self.assertFalse(await self.call("reset_data", 10, 5))
        self.assertFalse(await self.call("save", 10, 5, {}))
        self.assertIsNone(await self.call("get_state", 10, 5))

    async def test_every_part_of_the_key_is_a_place_of_its_own(self) -> None:
        places: list[dict[str, Any]] = [{}, {"bot_id": 42}, {"bot_id": 43}, {"bot_id": 42, "message_thread_id": 7},
                  {"bot_id": 42, "business_connection_id": "b:1"}, {"bot_id": 42, "business_connection_id": "b 1"}]
        for n, where in enumerate(places):
            await self.call("set_state", -100, 5, f"S:{n}", **where)
            await self.call("set_data", -100, 5, "n", n, **where)
        for n, where in enumerate(places):
            self.assertEqual((await self.call("get_state", -100, 5, **where), await self.call("get_data", -100, 5,
                                                                                                 **where)),
                             (f"S:{n}", {"n": n}))
        self.assertEqual(len(await self.readonly_record("5")), len(places))
        self.assertIn('bot 42 chat -100 business "b:1"', await self.readonly_record("5"))

    async def test_data_json_cannot_hold_raises_and_changes_nothing(self) -> None:
        await self.call("set_state", 1, 1, "S:a")
        await self.call("set_data", 1, 1, "n", 1)
        with self.assertRaisesRegex(TypeError, "datetime"):
            await self.call("set_data", 1, 1, "when", datetime.datetime(2026, 1, 1))
        with self.assertRaisesRegex(TypeError, "set"):
            await self.call("save", 1, 1, {"tags": {"a"}})
        self.assertEqual(await self.readonly_record("1"), {"chat 1": {"state": "S:a", "data": {"n": 1}}})

    async def test_state_and_data_expire_after_their_ttl_and_leave_nothing_behind(self) -> None:
        now = [1000.0]
        self.storage = self.make_storage(state_ttl=10, data_ttl=20, clock=lambda: now[0])
        await self.call("set_state", 1, 5, "S:a")
        await self.call("set_data", 1, 5, "name", "Ann")
        await self.call("set_state", 1, 6, "S:b")
        now[0] += 11
        self.assertEqual((await self.call("get_state", 1, 5), await self.call("get_data", 1, 5)),
                         (None, {"name": "Ann"}))
        now[0] += 10
        self.assertEqual(await self.call("get_data", 1, 5), {})
        self.assertEqual(await self.call("remove_expired"), 2)
        self.assertEqual((await self.readonly_record("5"), await self.readonly_record("6")), ({}, {}))

    async def test_it_refuses_a_location_holding_users_records(self) -> None:
        await self.call("set_state", 1, 1, "S:a")
        with self.assertRaisesRegex(JasonError, "holds the state of .*TelebotStateStorage"):
            await self.db.save_user_data(1, {"name": "U"})


@needs(HAVE_TELEBOT, "pyTelegramBotAPI, for jason.TelebotStateStorage (pip install -r examples/requirements.txt)")
class TelebotStateStorageTest(TelebotContract, AdapterMixin):
    """TeleBot's storage, over a SyncJASON; each call from a thread, as TeleBot's workers make them."""

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        await self.db.close()  # the folder's locks serve one loop: the SyncJASON's here
        self.sync = jason.SyncJASON(self.location, **self.options)  # type: ignore[arg-type]
        self.addCleanup(self.sync.close)
        self.storage = self.make_storage()
        self.db = AsyncOverSync(jason.SyncJASON(self.location, **self.options))  # type: ignore[assignment,arg-type]
        self._opened.append(self.db)

    def make_storage(self, **options: Any) -> Any:
        return jason.TelebotStateStorage(self.sync, **options)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.storage, method), *args, **kwargs)

    async def readonly_record(self, record_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.load_user_data, record_id)

    def test_teleBot_dispatches_a_form_through_it_across_a_restart(self) -> None:
        from telebot import TeleBot, custom_filters, types
        from telebot.states import State, StatesGroup

        class Form(StatesGroup):
            name = State()
            age = State()

        done: list[tuple[int, str, str]] = []

        def build(storage: Any) -> Any:
            bot = TeleBot("123:token", threaded=False, state_storage=storage)
            bot.add_custom_filter(custom_filters.StateFilter(bot))

            @bot.message_handler(commands=["start"])
            def start(message: Any) -> None:
                bot.set_state(message.from_user.id, Form.name, message.chat.id)

            @bot.message_handler(state=Form.name)
            def name(message: Any) -> None:
                bot.add_data(message.from_user.id, message.chat.id, name=message.text)
                bot.set_state(message.from_user.id, Form.age, message.chat.id)

            @bot.message_handler(state=Form.age)
            def age(message: Any) -> None:
                with bot.retrieve_data(message.from_user.id, message.chat.id) as data:
                    done.append((message.from_user.id, data["name"], message.text))
                bot.delete_state(message.from_user.id, message.chat.id)

            return bot

        def feed(bot: Any, step: int, text: str) -> None:
            bot.process_new_updates([types.Update.de_json(telebot_update(user, step, text)) for user in range(1, 21)])

        bot = build(self.storage)
        feed(bot, 1, "/start")
        feed(bot, 2, "Ann")
        self.sync.close()  # the bot stops; a new one starts on the same records
        with jason.SyncJASON(self.location, **self.options) as reopened:  # type: ignore[arg-type]
            feed(build(jason.TelebotStateStorage(reopened)), 3, "30")
            self.assertEqual(sorted(done), [(user, "Ann", "30") for user in range(1, 21)])
            self.assertEqual(reopened.load_user_data(7), {})  # every state deleted at the end


def telebot_update(user: int, step: int, text: str) -> dict[str, Any]:
    """A Telegram update of a private message from user, as the Bot API sends it."""
    message: dict[str, Any] = {"message_id": step, "date": 0, "chat": {"id": user, "type": "private"},
                               "from": {"id": user, "is_bot": False, "first_name": f"U{user}"}, "text": text}
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return {"update_id": user * 100 + step, "message": message}


@needs(HAVE_TELEBOT, "pyTelegramBotAPI, for jason.AsyncTelebotStateStorage (pip install -r examples/requirements.txt)")
class AsyncTelebotStateStorageTest(TelebotContract, AdapterMixin):
    """AsyncTeleBot's storage, over a JASON."""

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        self.storage = self.make_storage()

    def make_storage(self, **options: Any) -> Any:
        return jason.AsyncTelebotStateStorage(self.adapter_db(), **options)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.storage, method)(*args, **kwargs)

    async def test_async_teleBot_dispatches_a_form_through_it(self) -> None:
        from telebot import asyncio_filters, types
        from telebot.async_telebot import AsyncTeleBot
        from telebot.states import State, StatesGroup

        class Form(StatesGroup):
            name = State()
            age = State()

        done: list[tuple[int, str, str]] = []
        bot = AsyncTeleBot("123:token", state_storage=self.storage)
        bot.add_custom_filter(asyncio_filters.StateFilter(bot))

        @bot.message_handler(commands=["start"])  # type: ignore[misc]
        async def start(message: Any) -> None:
            await bot.set_state(message.from_user.id, Form.name, message.chat.id)

        @bot.message_handler(state=Form.name)  # type: ignore[misc]
        async def name(message: Any) -> None:
            await bot.add_data(message.from_user.id, message.chat.id, name=message.text)
            await bot.set_state(message.from_user.id, Form.age, message.chat.id)

        @bot.message_handler(state=Form.age)  # type: ignore[misc]
        async def age(message: Any) -> None:
            async with bot.retrieve_data(message.from_user.id, message.chat.id) as data:
                done.append((message.from_user.id, data["name"], message.text))
            await bot.delete_state(message.from_user.id, message.chat.id)

        for step, text in ((1, "/start"), (2, "Ann"), (3, "30")):
            await bot.process_new_updates([types.Update.de_json(telebot_update(user, step, text))
                                           for user in range(1, 21)])
        self.assertEqual(sorted(done), [(user, "Ann", "30") for user in range(1, 21)])


class AdapterImportTest(unittest.TestCase):
    def test_importing_jason_imports_no_framework(self) -> None:
        probe = """
            import sys, jason
            print(sorted(name for name in ("aiogram", "telegram", "telebot", "asyncpg", "redis")
                         if name in sys.modules))
        """
        self.assertEqual(run_child(probe).stdout.strip(), "[]")

    @slow  # a child that imports both frameworks: seconds
    def test_the_adapters_are_public_names_where_their_framework_is_installed(self) -> None:
        probe = """
            from jason import *
            import jason
            print(sorted(set(jason.__all__) - {"JASON", "SyncJASON", "JasonError", "InvalidUserIdError",
                                               "CorruptDataError", "DatabaseLockedError", "ReadOnlyError"}))
        """
        missing = run_child(probe, missing=("aiogram", "telegram", "telebot"))
        self.assertEqual(missing.stdout.strip(), "[]", missing.stderr)  # and `import *` still works
        if HAVE_AIOGRAM and HAVE_PTB and HAVE_TELEBOT:
            self.assertEqual(run_child(probe).stdout.strip(), "['AiogramStorage', 'AsyncTelebotStateStorage', "
                                                              "'PTBPersistence', 'TelebotStateStorage']")

    def test_a_missing_framework_names_its_install_command(self) -> None:
        probe = """
            import jason
            for name in ("AiogramStorage", "PTBPersistence", "TelebotStateStorage"):
                try:
                    getattr(jason, name)
                except ImportError as exc:
                    print(exc)
            try:
                jason.NoSuchThing
            except AttributeError as exc:
                print(exc)
        """
        lines = run_child(probe, missing=("aiogram", "telegram", "telebot")).stdout.splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertIn('jason.AiogramStorage needs aiogram', lines[0])
        self.assertIn("pip install aiogram", lines[0])
        self.assertIn("pip install python-telegram-bot", lines[1])
        self.assertIn("pip install pyTelegramBotAPI", lines[2])
        self.assertNotIn("jason-db", "".join(lines))  # on the package index, that name is the old release
        self.assertIn("has no attribute 'NoSuchThing'", lines[3])


# ---------------------------------------------------------------- every user in one loop


# Records in one save_stored_many: a folder shares them among its writer threads, unevenly.
UNEVEN_BATCH = jason.BATCH_WRITE_THREADS * 2 + 3


class ToolMethodsTest(FolderMixin):
    """The public methods the command line and the adapters use instead of reaching behind the library."""

    async def test_save_stored_many_then_load_stored_keep_records_exactly_as_given(self) -> None:
        records = [(user, {"$version": 2, "n": user, "flag": True}) for user in range(UNEVEN_BATCH)]
        await self.db.save_stored_many(records)
        found = await self.db.load_stored([*range(UNEVEN_BATCH), "missing"])
        self.assertEqual(found, [data for _, data in records] + [None])  # "$version" kept, no defaults merged
        self.assertEqual(await self.stored(7), {"$version": 2, "n": 7, "flag": True})
        await self.db.save_stored(7, {"n": -1})
        self.assertEqual(await self.db.load_stored([7]), [{"n": -1}])
        self.assertEqual(await self.db.load_user_data(7), {**DEFAULT, "n": -1})  # the cache saw the new record

    async def test_a_batch_with_one_bad_record_writes_nothing(self) -> None:
        await self.db.save_user_data(1, {"n": 1})
        before = await self.stored_bytes(1)
        for bad, error in [([(1, {"n": 2}), (2, {"n": float("nan")})], ValueError),
                           ([(1, {"n": 2}), ("1", {"n": 3})], ValueError),
                           ([(1, {"n": 2}), (3, ["not a dict"])], TypeError)]:
            with self.assertRaises(error):
                await self.db.save_stored_many(bad)  # type: ignore[arg-type]
        self.assertEqual(await self.stored_bytes(1), before)
        self.assertEqual(await self.db.user_ids(), ["1"])

    async def test_a_batch_waits_for_an_edit_of_one_of_its_users_and_loses_nothing(self) -> None:
        await self.db.save_user_data(5, {"n": 0})
        editing = asyncio.Event()

        async def edit() -> None:
            async with self.db.edit_user_data(5) as data:
                editing.set()
                await asyncio.sleep(0.05)
                data["n"] += 1

        edit_task = asyncio.ensure_future(edit())
        await editing.wait()
        await self.db.save_stored_many([(4, {"n": 4}), (5, {"n": 50})])  # held back until the edit ends
        await edit_task
        self.assertEqual(await self.stored(5), {"n": 50})

    async def test_check_and_sizes_see_every_record(self) -> None:
        await self.db.save_stored_many([(user, {"n": user}) for user in range(3)])
        self.assertEqual(await self.db.check(), (3, []))
        sizes, location_bytes = await self.db.sizes()
        self.assertEqual(sizes, {str(user): len(await self.stored_bytes(user) or b"") for user in range(3)})
        self.assertEqual(location_bytes is None, self.backend != "folder")

    @folder_only
    async def test_load_stored_returns_a_corrupt_record_as_its_error_and_check_reports_it(self) -> None:
        await self.db.save_user_data(1, {"n": 1})
        with open(self.path(2), "wb") as file:
            file.write(b"{not json")
        found = await self.db.load_stored([1, 2])
        self.assertEqual(found[0], {"n": 1})
        self.assertIsInstance(found[1], jason.CorruptDataError)
        sound, problems = await self.db.check()
        self.assertEqual((sound, [kind for kind, _, _ in problems]), (1, ["corrupt"]))


class UsersTest(FolderMixin):
    async def fill(self, count: int) -> dict[str, dict[str, Any]]:
        records = {str(user): {"challenge_balance": user, "profile": {"tags": [str(user)]}} for user in range(count)}
        for user, record in records.items():
            await self.db.save_user_data(user, record)
        return records

    async def test_a_loop_can_go_on_past_records_it_cannot_read_and_names_them(self) -> None:
        for user in range(100):
            await self.db.save_user_data(user, {"challenge_balance": user, "bad": user % 30 == 7})

        def refuse_bad(record: dict[str, Any]) -> None:
            if record["bad"]:
                raise ValueError("cannot migrate this one")

        migrating = self.open_db(migrations=[refuse_bad])
        with self.assertRaisesRegex(JasonError, "migrations\\[0\\] .* raised on user '37'"):
            async for _ in migrating.users(concurrency=8):
                pass
        skipped: list[tuple[str, JasonError]] = []
        seen = [user async for user, _ in migrating.users(concurrency=8, skipped=skipped)]
        self.assertEqual([user for user, _ in skipped], ["37", "67", "7", "97"])  # in id order, as listed
        self.assertTrue(all("cannot migrate this one" in str(error) for _, error in skipped))
        self.assertEqual(sorted(seen + [user for user, _ in skipped]), sorted(str(user) for user in range(100)))

    async def test_every_stored_user_once_as_a_load_returns_it(self) -> None:
        records = await self.fill(150)
        seen: dict[str, dict[str, Any]] = {}
        async for user_id, data in self.db.users(concurrency=7):
            self.assertNotIn(user_id, seen)
            seen[user_id] = data
            data["profile"]["tags"].append("changed by the loop")  # a fresh copy: nothing stored changes
        self.assertEqual(list(seen), sorted(records))
        for user_id, data in seen.items():
            data["profile"]["tags"].pop()
            self.assertEqual(data, await self.db.load_user_data(user_id))
            self.assertEqual(data["active_challenge"], None)  # defaults merged
        empty = self.open_db(namespace=next(SERVERS.namespaces)) if self.backend != "folder" else \
            JASON(os.path.join(self._tmp.name, "empty"))
        self.assertEqual([user async for user in empty.users()], [])
        await empty.close()

    async def test_saves_during_the_loop_are_not_blocked_and_not_lost(self) -> None:
        await self.fill(100)
        visited: dict[str, int] = {}
        async for user_id, data in self.db.users(concurrency=10):
            visited[user_id] = data["challenge_balance"]
            if user_id == "20":  # mid-loop: a user already visited, one not yet, a new one, a deleted one
                await asyncio.wait_for(self.db.save_user_data("0", {"challenge_balance": -1}), CHILD_TIMEOUT)
                async with self.db.edit_user_data("90") as later:
                    later["challenge_balance"] = -90
                await self.db.save_user_data("new", {"challenge_balance": 1})
                await self.db.delete_user_data("95")
        self.assertEqual(visited["90"], -90)  # read after the save, in a later batch
        self.assertEqual(visited["0"], 0)  # read before it
        self.assertNotIn("new", visited)  # listed after the loop began
        self.assertNotIn("95", visited)  # deleted before its turn
        self.assertEqual(len(visited), 99)
        self.assertEqual((await self.db.load_user_data("0"))["challenge_balance"], -1)
        self.assertEqual((await self.db.load_user_data("new"))["challenge_balance"], 1)

    async def test_concurrency_must_be_a_positive_int(self) -> None:
        for bad in (0, -1, 1.5, True):
            with self.subTest(concurrency=bad), self.assertRaises(ValueError):
                async for _ in self.db.users(concurrency=bad):  # type: ignore[arg-type]
                    pass

    @per_file
    async def test_a_corrupt_record_ends_the_loop_or_is_quarantined(self) -> None:
        await self.fill(5)
        with open(self.path("3"), "wb") as file:
            file.write(b"{torn")
        seen = []
        with self.assertRaises(CorruptDataError):
            async for user_id, _ in self.open_db().users(concurrency=1):  # a new instance: nothing cached
                seen.append(user_id)
        self.assertEqual(seen, ["0", "1", "2"])
        self.assertEqual(read_bytes(self.path("3")), b"{torn")
        quarantining = self.open_db(on_corrupt="quarantine")
        with self.assertLogs("jason", "WARNING"):
            visited = {user_id: data async for user_id, data in quarantining.users()}
        self.assertEqual(visited["3"], DEFAULT)
        self.assertEqual(sorted(visited), ["0", "1", "2", "3", "4"])
        self.assertFalse(os.path.exists(self.path("3")))

    @folder_only
    async def test_the_loop_leaves_the_cache_to_the_users_in_use(self) -> None:
        await self.fill(300)
        db = self.open_db(cache_size=10)
        hot = [str(user) for user in range(10)]
        for user in hot:
            await db.load_user_data(user)
        async for _ in db.users():
            pass
        self.assertEqual(await cached_users(db, iter(hot)), set(hot))

    @folder_only
    @slow
    @async_only
    async def test_memory_stays_flat_however_many_users(self) -> None:
        import tracemalloc

        asyncio.get_running_loop().set_debug(False)  # debug mode keeps a traceback per task, which would count
        fast = self.open_db(durable=False, cache_size=0)
        for start in range(0, 5_000, 100):
            await asyncio.gather(*(fast.save_user_data(user, {"pad": "x" * 1000, "n": user})
                                   for user in range(start, start + 100)))
        await fast.close()
        await self.db.close()  # the last checkpoint: no thread of it allocates while this measures
        db = self.open_db()
        tracemalloc.start()
        try:
            visited = [user_id async for user_id, _ in db.users()]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(len(visited), 5_000)
        # The ids (about 60 bytes each) and one batch of records; holding all 5,000 would take over 6 MB.
        self.assertLess(peak, 2_000_000)


# ---------------------------------------------------------------- records that evolve


def rename_score(record: dict[str, Any]) -> None:  # version 0 -> 1: "score" is now "points"
    record["points"] = record.pop("score", 0)


def split_tags(record: dict[str, Any]) -> dict[str, Any]:  # 1 -> 2: "a,b" becomes ["a", "b"]
    return {**record, "tags": record["tags"].split(",") if record["tags"] else []}


def add_level(record: dict[str, Any]) -> None:  # 2 -> 3: a level from the points; "legacy" is dropped
    record.pop("legacy", None)
    record["level"] = record["points"] // 10


MIGRATIONS = [rename_score, split_tags, add_level]


def migrated(record: dict[str, Any]) -> dict[str, Any]:
    """What the three migrations make of a version-0 record."""
    result = {key: value for key, value in record.items() if key not in ("score", "legacy", "tags")}
    result.update(points=record["score"], tags=record["tags"].split(",") if record["tags"] else [])
    result["level"] = record["score"] // 10
    return result


class MigrationTest(FolderMixin):
    OLD: ClassVar[dict[str, Any]] = {"name": "Ann", "score": 42, "tags": "a,b", "legacy": True}

    async def test_three_migrations_across_restarts(self) -> None:
        first = self.open_db(default_structure=None)
        await first.save_user_data(1, self.OLD)
        self.assertNotIn(b"$version", await self.stored_bytes(1) or b"")  # no migrations: records as before
        await first.close()

        one = self.open_db(default_structure=None, migrations=MIGRATIONS[:1])
        self.assertEqual(await one.load_user_data(1), {"name": "Ann", "points": 42, "tags": "a,b", "legacy": True})
        async with one.edit_user_data(1) as data:
            data["name"] = "Anna"
        self.assertEqual(json.loads(await self.stored_bytes(1) or b""),
                         {"$version": 1, "name": "Anna", "points": 42, "tags": "a,b", "legacy": True})
        await one.close()

        three = self.open_db(default_structure={"level": 0, "tags": []}, migrations=MIGRATIONS)
        expected = {"name": "Anna", "points": 42, "tags": ["a", "b"], "level": 4}
        self.assertEqual(await three.load_user_data(1), expected)
        self.assertEqual(json.loads(await self.stored_bytes(1) or b"")["$version"], 1)  # a load writes nothing
        self.assertEqual([item async for item in three.users()], [("1", expected)])
        await three.save_user_data(1, await three.load_user_data(1))
        self.assertEqual(json.loads(await self.stored_bytes(1) or b""), {"$version": 3, **expected})
        self.assertEqual(await three.load_user_data(2), {"level": 0, "tags": []})  # a new user: the defaults

    async def test_a_record_newer_than_the_code_is_refused_and_left_alone(self) -> None:
        await self.open_db(default_structure=None, migrations=MIGRATIONS).save_user_data(1, {"points": 1})
        stored = await self.stored_bytes(1)
        for older in (self.open_db(default_structure=None, migrations=MIGRATIONS[:2]),
                      self.open_db(default_structure=None)):
            with self.assertRaisesRegex(JasonError, "at version 3, newer than this code, which knows"):
                await older.load_user_data(1)
            with self.assertRaisesRegex(JasonError, "newer than this code"):
                async with older.edit_user_data(1):
                    pass
        self.assertEqual(await self.stored_bytes(1), stored)

    async def test_a_migration_that_raises_leaves_the_record_and_the_cache_alone(self) -> None:
        writer = self.open_db(default_structure=None)
        await writer.save_user_data(1, {"score": 5, "tags": 7})  # tags is not a str: split_tags raises
        await writer.close()
        db = self.open_db(default_structure=None, migrations=MIGRATIONS)
        stored = await self.stored_bytes(1)
        for _ in range(2):  # the second time too: nothing half-migrated was cached
            with self.assertRaisesRegex(JasonError, r"migrations\[1\] \(version 1 to 2\) raised on user '1': "
                                                    "AttributeError"):
                await db.load_user_data(1)
        self.assertEqual(await self.stored_bytes(1), stored)

    async def test_the_version_key_is_reserved_and_a_migration_must_give_a_dict(self) -> None:
        db = self.open_db(default_structure=None, migrations=MIGRATIONS)
        for plain in (db, self.open_db(default_structure=None)):
            with self.assertRaisesRegex(ValueError, r"'\$version' is the key JASON keeps"):
                await plain.save_user_data(1, {"$version": 9})
            with self.assertRaisesRegex(ValueError, r"'\$version'"):
                async with plain.edit_user_data(1) as data:
                    data["$version"] = 2
        self.assertIsNone(await self.stored_bytes(1))
        await db.save_user_data(2, {"points": 1})
        broken = self.open_db(default_structure=None, migrations=[*MIGRATIONS, lambda record: ["not", "a", "dict"]])
        with self.assertRaisesRegex(JasonError, r"migrations\[3\] returned list for user '2', not a dict"):
            await broken.load_user_data(2)
        with self.assertRaisesRegex(TypeError, r"migrations\[0\] must be a function"):
            self.open_db(migrations=["not callable"])


# ---------------------------------------------------------------- the migrate command


# The migrations above, as the module a user would name with --migrations records:MIGRATIONS.
MIGRATIONS_MODULE = "from typing import Any\n\n\n" + "\n\n".join(inspect.getsource(step) for step in MIGRATIONS) + \
    f"\n\nMIGRATIONS = [{', '.join(step.__name__ for step in MIGRATIONS)}]\n"


def read_record_files(folder: str) -> dict[str, dict[str, Any]]:
    """Every record as its file holds it, parsed: "$version" and all, whatever the version."""
    records = {}
    for name in jason_records(folder):
        key = jason._user_key_from_file_name(name)
        assert key is not None
        records[key] = json.loads(read_bytes(os.path.join(folder, name)))
    return records


class MigrateCommandTest(unittest.TestCase):
    """jason FOLDER migrate --migrations MODULE:NAME [--apply], on CLI_USERS users (2,000; 10,000 in CI; 300 quick)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-migrate-")
        self.addCleanup(self._tmp.cleanup)
        self.folder = os.path.join(self._tmp.name, "users")
        with open(os.path.join(self._tmp.name, "records.py"), "w", encoding="utf-8") as file:
            file.write(MIGRATIONS_MODULE)
        self.failing = {str(user) for user in range(0, CLI_USERS, CLI_USERS // 5)}  # tags that are not a str
        self.records: dict[str, dict[str, object]] = {
            str(user): {"name": f"user {user}", "score": user, "tags": 7 if str(user) in self.failing else "a,b",
                        "legacy": 1}
            for user in range(CLI_USERS)
        }
        fill_folder(self.folder, self.records)

    def migrate(self, *args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys, jason; sys.exit(jason.main(sys.argv[1:]))"
        result = subprocess.run([sys.executable, "-c", code, "--fast", self.folder, "migrate",
                                 "--migrations", "records:MIGRATIONS", *args], capture_output=True, text=True,
                                cwd=self._tmp.name, env=child_env(), timeout=CHILD_TIMEOUT * 5, check=False)
        self.assertNotIn("Traceback", result.stderr)
        return result

    def test_a_dry_run_changes_nothing_and_apply_migrates_all_but_the_failures(self) -> None:
        before = {name: read_bytes(os.path.join(self.folder, name)) for name in jason_records(self.folder)}
        dry = self.migrate()
        self.assertEqual(dry.returncode, 1)
        self.assertIn(f"{CLI_USERS} users: {CLI_USERS} at version 0; this code's version is 3", dry.stdout)
        self.assertIn(f"would migrate {CLI_USERS - len(self.failing)} users; {len(self.failing)} would fail",
                      dry.stdout)
        self.assertEqual({name: read_bytes(os.path.join(self.folder, name))
                          for name in jason_records(self.folder)}, before)

        applied = self.migrate("--apply")
        self.assertEqual(applied.returncode, 1)
        self.assertIn(f"migrated {CLI_USERS - len(self.failing)} users to version 3; {len(self.failing)} failed",
                      applied.stdout)
        failures = applied.stderr.strip().splitlines()
        self.assertEqual(len(failures), len(self.failing))
        self.assertTrue(all("migrations[1] (version 1 to 2) raised" in line for line in failures), failures)
        stored = read_record_files(self.folder)
        for user, record in self.records.items():
            if user in self.failing:  # left exactly as it was
                self.assertEqual(read_bytes(self.path(user)), before[os.path.basename(self.path(user))])
            else:
                self.assertEqual(stored[user], {"$version": 3, **migrated(record)})

        again = self.migrate("--apply")  # resumable: only the failures are left
        self.assertIn(f"{CLI_USERS - len(self.failing)} at version 3", again.stdout)
        self.assertIn(f"migrated 0 users to version 3; {len(self.failing)} failed", again.stdout)

    def path(self, user: str) -> str:
        return os.path.join(self.folder, jason._file_name(user))

    def test_a_kill_during_apply_leaves_each_record_old_or_new(self) -> None:
        code = "import sys, jason; sys.exit(jason.main(sys.argv[1:]))"
        child = subprocess.Popen([sys.executable, "-c", code, self.folder, "migrate", "--migrations",
                                  "records:MIGRATIONS", "--apply"], cwd=self._tmp.name, env=child_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT
            # Killed once some records, but not all, are at the new version.
            while b"$version" not in read_bytes(self.path(str(CLI_USERS // 3))):
                self.assertIsNone(child.poll(), "migrate finished before it could be killed")
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.001)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        stored = read_record_files(self.folder)  # every record parses
        states = {"old": 0, "new": 0}
        for user, record in self.records.items():
            if stored[user] == record:
                states["old"] += 1
            else:
                self.assertEqual(stored[user], {"$version": 3, **migrated(record)})
                states["new"] += 1
        self.assertGreater(states["new"], 0)
        self.assertGreater(states["old"], len(self.failing), "the kill came after the last record")
        finished = self.migrate("--apply")
        self.assertIn(f"{len(self.failing)} failed", finished.stdout)
        self.assertEqual(sum(1 for record in read_record_files(self.folder).values() if record.get("$version") == 3),
                         CLI_USERS - len(self.failing))


on_every_backend(ConstructionTest, LoadTest, SaveTest, EditTest, DeleteTest, UserIdsTest, UserIdMappingTest,
                 BadInputSweepTest, ConcurrencyTest, CloseTest, ReentryTest, AiogramStorageTest, PTBPersistenceTest,
                 SharedLocationTest, TelebotStateStorageTest, AsyncTelebotStateStorageTest, ToolMethodsTest,
                 UsersTest, MigrationTest)


# ---------------------------------------------------------------- the blocking API


class AsyncOverSync:
    """A SyncJASON behind JASON's async API, each call in a thread: so the API suite runs unchanged on it."""

    def __init__(self, sync: jason.SyncJASON) -> None:
        self.sync = sync
        # Threads of its own: an edit's block keeps one busy while the test's coroutine runs.
        self._threads: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            64, thread_name_prefix="sync-api-test")

    def __getattr__(self, name: str) -> Any:  # folder, location
        return getattr(self.sync, name)

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._threads is None:  # closed: as the SyncJASON itself says, in the calling thread
            return func(*args)
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(func, *args))

    async def load_user_data(self, user_id: Any) -> Any:
        return await self._in_thread(self.sync.load_user_data, user_id)

    async def save_user_data(self, user_id: Any, data: Any) -> None:
        await self._in_thread(self.sync.save_user_data, user_id, data)

    async def delete_user_data(self, user_id: Any) -> bool:
        return bool(await self._in_thread(self.sync.delete_user_data, user_id))

    async def user_exists(self, user_id: Any) -> bool:
        return bool(await self._in_thread(self.sync.user_exists, user_id))

    async def user_ids(self) -> list[str]:
        return list(await self._in_thread(self.sync.user_ids))

    async def users(self, concurrency: int = jason.USERS_CONCURRENCY, *,
                    skipped: list[Any] | None = None) -> AsyncIterator[tuple[str, Any]]:
        visits = self.sync.users(concurrency, skipped=skipped)
        done = object()
        try:
            while (item := await self._in_thread(next, visits, done)) is not done:
                yield item
        finally:
            await self._in_thread(visits.close)

    @contextlib.asynccontextmanager
    async def edit_user_data(self, user_id: Any) -> AsyncIterator[Any]:
        """The blocking edit, its `with` block held open in one thread while this block runs."""
        loop = asyncio.get_running_loop()
        entered: asyncio.Future[Any] = loop.create_future()
        outcome: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

        def block() -> None:
            with self.sync.edit_user_data(user_id) as data:
                loop.call_soon_threadsafe(entered.set_result, data)
                error = outcome.get()
                if error is not None:
                    raise error

        finished = asyncio.ensure_future(self._in_thread(block))
        await asyncio.wait([entered, finished], return_when=asyncio.FIRST_COMPLETED)
        if not entered.done():
            entered.cancel()
            await finished  # raises why the edit never began
        try:
            yield entered.result()
        except BaseException as exc:
            outcome.put(exc)
            with contextlib.suppress(BaseException):
                await finished
            raise
        outcome.put(None)
        await finished

    async def __aenter__(self) -> AsyncOverSync:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._threads is not None:
            await self._in_thread(self.sync.close)
            self._threads.shutdown()
            self._threads = None


class SyncJASONTest(FolderMixin):
    """What only the blocking API has: threads, its own loop, a `with` block."""

    def sync_db(self, **options: Any) -> jason.SyncJASON:
        if self.backend == "folder":
            options.setdefault("durable", False)  # the promise here is no lost update, not the fsyncs
        db: jason.SyncJASON = jason.SyncJASON(self.location, **{**self.options, **options})
        self.addCleanup(db.close)
        return db

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        await self.db.close()  # the folder's locks serve one loop: the SyncJASONs' here

    def test_16_threads_of_500_edits_of_8_users_keep_every_increment(self) -> None:  # 500 in CI, 200 in make test
        db = self.sync_db()
        edits = 500 if FULL else 100 if QUICK else 200

        def work(thread: int) -> None:
            for _ in range(edits):
                with db.edit_user_data(thread % 8) as data:
                    data["n"] = data.get("n", 0) + 1

        threads = [threading.Thread(target=work, args=(thread,)) for thread in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual({user: data["n"] for user, data in db.users()}, {str(user): 2 * edits for user in range(8)})

    def test_a_call_that_would_wait_for_the_same_threads_edit_raises_at_once(self) -> None:
        db = self.sync_db()
        with db.edit_user_data(5) as data:
            data["n"] = 1
            for call in (lambda: db.save_user_data(5, {}), lambda: db.delete_user_data(5),
                         lambda: db.edit_user_data("5").__enter__()):
                with self.assertRaisesRegex(JasonError, "in the same thread would wait for itself"):
                    call()
            db.save_user_data(6, {"other": True})  # another user is fine
        self.assertEqual(db.load_user_data(5), {"n": 1})

    def test_two_instances_share_a_folder_and_closing_one_leaves_the_other_working(self) -> None:
        first, second = self.sync_db(), self.sync_db()
        first.save_user_data(1, {"a": 1})
        self.assertEqual(second.load_user_data(1), {"a": 1})
        first.close()
        first.close()  # harmless
        with self.assertRaisesRegex(JasonError, "is closed"):
            first.load_user_data(1)
        second.save_user_data(2, {"b": 2})
        with jason.SyncJASON(self.location, **self.options) as third:  # type: ignore[arg-type]
            self.assertEqual(third.user_ids(), ["1", "2"])
        with self.assertRaisesRegex(JasonError, "is closed"):
            third.user_ids()

    def test_the_loop_thread_ends_with_the_last_instance(self) -> None:
        db = self.sync_db()
        db.save_user_data(1, {})
        self.assertIn("jason-sync", [thread.name for thread in threading.enumerate()])
        db.close()
        self.assertNotIn("jason-sync", [thread.name for thread in threading.enumerate()])


def on_the_blocking_api(*test_classes: type[FolderMixin]) -> None:
    """Run these test classes, on every backend, through SyncJASON: SyncLoadTest, SyncPostgresLoadTest, ..."""
    for test_class in test_classes:
        for variant in [test_class] + [globals()[f"{name}{test_class.__name__}"] for name in ("Postgres", "Redis")]:
            left_out = {attr: None for attr in dir(variant)
                        if attr.startswith("test_") and getattr(getattr(variant, attr), "async_only", False)}

            def open_db(self: FolderMixin, **options: object) -> Any:
                options.setdefault("default_structure", DEFAULT)
                db = AsyncOverSync(jason.SyncJASON(self.location, **{**self.options, **options}))  # type: ignore[arg-type]
                self._opened.append(db)  # type: ignore[arg-type]
                return db

            synced = type(f"Sync{variant.__name__}", (variant,), {"open_db": open_db, **left_out})
            globals()[synced.__name__] = slow(synced)  # make quick has SyncJASONTest


on_the_blocking_api(LoadTest, SaveTest, EditTest, DeleteTest, UserIdsTest, UsersTest)
on_every_backend(SyncJASONTest)


# ---------------------------------------------------------------- server backends


EDITING_PROCESS = """
import asyncio, sys, jason
location, namespace = sys.argv[1], sys.argv[2]
async def main():
    async with jason.JASON(location, namespace=namespace) as db:
        async def add_one():
            async with db.edit_user_data("shared") as data:
                value = data.get("n", 0)
                await asyncio.sleep(0)
                data["n"] = value + 1
        await asyncio.gather(*(add_one() for _ in range(250)))
asyncio.run(main())
"""


if TYPE_CHECKING:  # mixed into FolderMixin by the concrete classes below
    _ServerBase = FolderMixin
else:
    _ServerBase = object


class ServerBackendMixin(_ServerBase):
    """What only a server backend has: many writer processes, a server that can go away, settings, secrets."""

    async def server_names(self, namespace: str) -> list[str]:
        """The tables or keys the server holds for namespace."""
        raise NotImplementedError

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    async def server_connections(self) -> int:
        """How many clients the server has now."""
        raise NotImplementedError

    def put_raw(self, user_id: str, text: str) -> None:
        """Store text as user_id's record behind JASON's back."""
        raise NotImplementedError

    def stop_server(self) -> None:
        raise NotImplementedError

    def start_server(self) -> None:
        raise NotImplementedError

    async def test_edits_from_four_processes_lose_no_update(self) -> None:
        children = [subprocess.Popen([sys.executable, "-c", EDITING_PROCESS, self.location, self.options["namespace"]],
                                     env=child_env(), stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for child in children:
            _, stderr = await asyncio.to_thread(child.communicate, timeout=CHILD_TIMEOUT * 2)
            self.assertEqual(child.returncode, 0, stderr)
        self.assertEqual(await self.stored("shared"), {"n": 1000})

    async def test_a_save_in_one_process_is_seen_at_once_by_another(self) -> None:
        other = self.open_db()
        for version in range(20):
            await self.db.save_user_data(1, {"v": version})
            self.assertEqual((await other.load_user_data(1))["v"], version)  # no cache to go stale
        await other.delete_user_data(1)
        self.assertFalse(await self.db.user_exists(1))

    async def test_a_save_from_elsewhere_waits_for_an_open_edit(self) -> None:
        elsewhere = self.open_db()  # its own locks and connections: as good as another process
        await self.db.save_user_data(1, {"by": "first"})
        async with self.db.edit_user_data(1) as data:
            save = asyncio.create_task(elsewhere.save_user_data(1, {"by": "save"}))
            done, _ = await asyncio.wait({save}, timeout=0.3)
            self.assertEqual(done, set(), "a save landed inside another process's edit")
            data["by"] = "edit"
        await save
        self.assertEqual(await self.stored(1), {"by": "save"})  # the save came after the edit

    async def test_many_first_calls_at_once_share_one_connection_pool(self) -> None:
        before = await self.server_connections()
        fresh = self.open_db()
        await asyncio.gather(*(fresh.load_user_data(user) for user in range(200)))
        self.assertLessEqual(await self.server_connections() - before, 33)  # one pool: at most 32, and ours

    async def test_a_record_that_is_not_an_object_is_reported_or_quarantined(self) -> None:
        await self.db.save_user_data("neighbour", RECORD)
        for load in ("load", "edit"):
            with self.subTest(load):
                self.put_raw("victim", "[1, 2]")
                with self.assertRaises(CorruptDataError):
                    await self.db.load_user_data("victim")
                quarantining = self.open_db(on_corrupt="quarantine")
                with self.assertLogs("jason", "WARNING") as logs:
                    if load == "load":
                        self.assertEqual(await quarantining.load_user_data("victim"), DEFAULT)
                    else:
                        async with quarantining.edit_user_data("victim") as data:
                            self.assertEqual(data, DEFAULT)
                            data["fresh"] = True
                self.assertIn("corrupt", logs.output[0])
                expected = ["neighbour", "victim"] if load == "edit" else ["neighbour"]  # the edit saved afresh
                self.assertEqual(await self.db.user_ids(), expected)
                self.assertEqual(await self.db.load_user_data("neighbour"), RECORD)

    async def test_readonly_creates_nothing(self) -> None:
        reader = self.open_db(readonly=True, namespace="never_written")
        self.assertEqual(await reader.user_ids(), [])
        self.assertEqual(await reader.load_user_data(1), DEFAULT)
        self.assertFalse(await reader.user_exists(1))
        with self.assertRaises(ReadOnlyError):
            await reader.save_user_data(1, {})
        self.assertEqual(await self.server_names("never_written"), [])

    async def test_namespaces_keep_databases_apart(self) -> None:
        other = self.open_db(namespace=self.options["namespace"] + "_other")
        await self.db.save_user_data(1, {"mine": True})
        await other.save_user_data(2, {"theirs": True})
        self.assertEqual(await self.db.user_ids(), ["1"])
        self.assertEqual(await other.user_ids(), ["2"])
        with self.assertRaisesRegex(ValueError, "namespace"):
            self.open_db(namespace="bad name; DROP TABLE x")

    async def test_the_namespace_can_be_part_of_the_url(self) -> None:
        namespace = self.options["namespace"] + "_url"
        separator = "&" if "?" in self.location else "?"
        by_url = JASON(f"{self.location}{separator}namespace={namespace}")
        await by_url.save_user_data(1, {"by": "url"})
        await by_url.close()
        by_argument = self.open_db(namespace=namespace, default_structure={})
        self.assertEqual(await by_argument.load_user_data(1), {"by": "url"})
        self.assertEqual(await self.db.user_ids(), [])  # not the test's own namespace
        listed = await asyncio.to_thread(run_cli, f"{self.location}{separator}namespace={namespace}", "ls")
        self.assertEqual(listed.stdout.split(), ["1"], listed.stderr)
        with self.assertRaisesRegex(ValueError, "give one"):
            JASON(f"{self.location}{separator}namespace={namespace}", namespace="other")

    async def test_passwords_never_appear_in_errors_or_repr(self) -> None:
        scheme = {"postgres": "postgresql", "redis": "redis"}[self.backend]
        for url in [f"{scheme}://bot:hunter2secret@127.0.0.1:9/db", f"{scheme}://bot:hun/ter#2secret@127.0.0.1:9/0",
                    f"{scheme}://bot@127.0.0.1:9/0?password=hunter2secret",
                    f"{scheme}://bot@127.0.0.1:9/0?db=0&PASSWORD=hunter2secret&x=1"]:
            with self.subTest(url=url):
                db = JASON(url, durable=False)
                self.assertNotRegex(repr(db) + db.location, "hunter|2secret")
                self.assertIn("***", db.location)
                with self.assertRaises(Exception) as caught:
                    await db.load_user_data(1)
                self.assertNotRegex(f"{caught.exception} {caught.exception!r}", "hunter|2secret")
                await db.close()

    async def test_close_with_saves_in_flight_stores_exactly_the_saves_that_returned(self) -> None:
        db = self.open_db()
        outcome: dict[int, str] = {}

        async def save(user: int) -> None:
            try:
                await db.save_user_data(user, {"v": user})
                outcome[user] = "returned"
            except JasonError as exc:  # refused: nothing was written
                self.assertIn("was closed, so nothing was written", str(exc))
                outcome[user] = "refused"

        await db.save_user_data("warm", {})  # connected: the saves below reach the server at once
        saves = [asyncio.ensure_future(save(user)) for user in range(200)]
        await asyncio.sleep(0.005)  # some are under way
        await db.close()
        await asyncio.gather(*saves)  # any other error fails the test
        self.assertIn("returned", outcome.values())
        for user, result in outcome.items():
            self.assertEqual(await self.stored(user), {"v": user} if result == "returned" else None, (user, result))

    def test_a_missing_driver_names_the_command_that_installs_it(self) -> None:
        module, extra = {"postgres": ("asyncpg", "postgres"), "redis": ("redis", "redis")}[self.backend]
        package = module
        result = run_child(f"""
            import jason
            try:
                jason.JASON({self.location!r})
            except jason.JasonError as exc:
                print(exc)
        """, missing=(module,))
        self.assertIn(f"pip install {package} (from a JASON checkout: pip install \".[{extra}]\")", result.stdout,
                      result.stderr)
        self.assertNotIn("jason-db", result.stdout)

    async def test_copy_moves_10000_users_both_ways_exactly(self) -> None:  # 2,000 unless JASON_FULL=1
        records: dict[str, dict[str, object]] = {
            str(u): {"n": u, "name": f"user {u} ✓", "tags": ["a", "é"]} for u in range(CLI_USERS - len(ODD_IDS))}
        records.update({key: {"odd": key, "text": "non-ASCII: ÿ 😀 \x00"} for key in ODD_IDS})
        source, back = os.path.join(self._tmp.name, "source"), os.path.join(self._tmp.name, "back")
        await asyncio.to_thread(fill_folder, source, records)
        target = self.location
        server = self.options["namespace"]
        copy = await asyncio.to_thread(run_cli_with_namespace, server, source, "copy", target)
        self.assertEqual(copy.returncode, 0, copy.stderr)
        self.assertIn(f"copied {CLI_USERS} users", copy.stderr)
        self.assertIn(f"all {CLI_USERS} verified", copy.stderr)
        again = await asyncio.to_thread(run_cli_with_namespace, server, source, "copy", target)
        self.assertIn("copied 0 users", again.stderr)  # run again: nothing left to do, nothing replaced
        self.assertEqual(sorted(await self.db.user_ids()), sorted(records))
        home = await asyncio.to_thread(run_cli_with_namespace, server, target, "copy", back)
        self.assertEqual(home.returncode, 0, home.stderr)
        self.assertEqual(await asyncio.to_thread(read_folder, back), records)
        for command, expected in [(("ls", "--count"), f"{CLI_USERS}\n"), (("get", "Zoë"), None)]:
            result = await asyncio.to_thread(run_cli_with_namespace, server, target, *command)
            self.assertEqual(result.returncode, 0, result.stderr)
            if expected is not None:
                self.assertEqual(result.stdout, expected)
        await self.db.save_user_data("Zoë", {"changed": True})
        refused = await asyncio.to_thread(run_cli_with_namespace, server, source, "copy", target)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("1 user already exists with other data (Zoë); nothing was copied", refused.stderr)
        forced = await asyncio.to_thread(run_cli_with_namespace, server, source, "copy", target, "--overwrite")
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertEqual(await self.stored("Zoë"), records["Zoë"])

    async def test_the_same_instance_works_again_after_the_server_restarts(self) -> None:
        for user in range(20):
            await self.db.save_user_data(user, {"acknowledged": user})
        self.stop_server()
        try:
            with self.assertRaises(Exception) as caught:
                await self.db.save_user_data(99, {"during": "outage"})
            self.assertIsInstance(caught.exception, (OSError, JasonError, *self.driver_errors()))
        finally:
            self.start_server()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:  # the first calls after a restart may still meet the closed connections
            try:
                await self.db.save_user_data(100, {"after": "restart"})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        for user in range(20):
            self.assertEqual(await self.db.load_user_data(user), {**DEFAULT, "acknowledged": user})
        self.assertEqual((await self.db.load_user_data(100))["after"], "restart")


@slow
@unittest.skipUnless(HAVE_POSTGRES, "needs PostgreSQL and asyncpg")
class PostgresServerTest(ServerBackendMixin, FolderMixin):
    backend = "postgres"

    async def server_names(self, namespace: str) -> list[str]:
        import asyncpg

        connection = await asyncpg.connect(self.location)
        try:
            rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE $1", namespace + "%")
        finally:
            await connection.close()
        return [row[0] for row in rows]

    def put_raw(self, user_id: str, text: str) -> None:
        table = self.options["namespace"]
        SERVERS.run("psql", "-h", SERVERS.postgres_sockets, "-U", "postgres", "-c",
                    f"INSERT INTO {table} (user_id, data) VALUES ('{user_id}', '{text}') "
                    "ON CONFLICT (user_id) DO UPDATE SET data = EXCLUDED.data")

    async def server_connections(self) -> int:
        output = SERVERS.run("psql", "-h", SERVERS.postgres_sockets, "-U", "postgres", "-At", "-c",
                             "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        return int(output)

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        import asyncpg

        return (asyncpg.PostgresError, asyncpg.InterfaceError)

    def stop_server(self) -> None:
        SERVERS.run(*SERVERS.postgres_ctl, "-m", "immediate", "stop")

    def start_server(self) -> None:
        SERVERS.run(*SERVERS.postgres_start)

    async def test_records_stay_queryable_with_json_operators_even_with_a_nul(self) -> None:
        await self.db.save_user_data("nul", {"challenge_balance": 1, "text": "a\x00b \ue000 \\u0000"})
        await self.db.save_user_data("rich", {"challenge_balance": 150})
        self.assertEqual((await self.db.load_user_data("nul"))["text"], "a\x00b \ue000 \\u0000")
        table = self.options["namespace"]
        rows = SERVERS.run("psql", "-h", SERVERS.postgres_sockets, "-U", "postgres", "-At", "-c",
                           f"SELECT user_id FROM {table} WHERE (data->>'challenge_balance')::int > 100")
        self.assertEqual(rows, "rich\n")

    def test_the_command_line_reports_a_failed_connection_in_one_line(self) -> None:
        sockets = SERVERS.postgres_sockets
        for url, expected in [(f"postgresql://postgres:hunter2@/nosuchdb?host={sockets}", "nosuchdb"),
                              (f"postgresql://nosuchrole@/postgres?host={sockets}&password=hunter2", "nosuchrole"),
                              ("postgresql://postgres:hunter2@/postgres?host=/no/such/folder", "/no/such/folder")]:
            with self.subTest(url=url):
                result = run_cli(url, "ls")
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertIn(expected, result.stderr)
                self.assertIn("check that the server is running", result.stderr)
                self.assertNotIn("hunter2", result.stderr)

    async def test_more_busy_edits_than_connections_slow_down_never_hang(self) -> None:
        for user in range(40):
            await self.db.save_user_data(user, {"balance": 100})

        async def edit_and_look(user: int) -> None:  # a load of another user inside an edit
            async with self.db.edit_user_data(user) as data:
                data["seen"] = (await self.db.load_user_data(39 - user))["balance"]

        async def transfer(giver: int, taker: int) -> None:  # nested edits, in the same order everywhere
            first, second = sorted((giver, taker))
            async with self.db.edit_user_data(first) as a, self.db.edit_user_data(second) as b:
                (a if first == giver else b)["balance"] -= 10
                (b if first == giver else a)["balance"] += 10

        await asyncio.wait_for(asyncio.gather(*(edit_and_look(user) for user in range(20))), CHILD_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*(transfer(user, (user + 7) % 40) for user in range(40))),
                               CHILD_TIMEOUT)
        total = sum([(await self.db.load_user_data(user))["balance"] for user in range(40)])
        self.assertEqual(total, 4000)
        self.assertEqual((await self.db.load_user_data(0))["seen"], 100)

    async def test_durable_refuses_a_server_without_fsync(self) -> None:
        self.stop_server()
        SERVERS.run(*SERVERS.postgres_start[:-1], "-o", "-c fsync=off", "start")
        try:
            db = JASON(self.location, namespace=self.options["namespace"])
            with self.assertRaisesRegex(JasonError, "fsync=off.*durable=False"):
                await db.load_user_data(1)
            await db.close()
            fast = self.open_db(durable=False)
            await fast.save_user_data(1, {"fast": True})
        finally:
            self.stop_server()
            self.start_server()


@slow
@unittest.skipUnless(HAVE_REDIS, "needs Redis and redis-py")
class ThrowawayServersTest(unittest.TestCase):
    def test_servers_never_outlive_a_test_process_that_is_killed(self) -> None:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys, time, test_jason
            test_jason.SERVERS.url("redis")
            print(test_jason.SERVERS.redis_socket, flush=True)
            time.sleep(600)
        """)], cwd=HERE, env=child_env(), stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            socket_path = child.stdout.readline().strip()
            self.assertTrue(os.path.exists(socket_path), socket_path)
            pid = int(read_bytes(os.path.join(os.path.dirname(socket_path), "redis.pid")))
        finally:
            child.kill()
            child.wait(CHILD_TIMEOUT)
            child.stdout.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + CHILD_TIMEOUT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(os.path.exists(f"/proc/{pid}"), "the killed run's redis-server is still running")
        self.assertFalse(os.path.exists(os.path.dirname(os.path.dirname(socket_path))))  # nor its folder


@slow
@unittest.skipUnless(HAVE_REDIS, "needs Redis and redis-py")
class RedisServerTest(ServerBackendMixin, FolderMixin):
    backend = "redis"

    async def server_names(self, namespace: str) -> list[str]:
        return sorted(SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "--scan", "--pattern",
                                  namespace + "*").split())

    def put_raw(self, user_id: str, text: str) -> None:
        records = f"{self.options['namespace']}:users"
        SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "hset", records, user_id, text)

    async def server_connections(self) -> int:
        info = SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "info", "clients")
        return int(re.search(r"connected_clients:(\d+)", info)[1])  # type: ignore[index]

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        import redis

        return (redis.RedisError,)

    def stop_server(self) -> None:
        SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "shutdown")

    def start_server(self) -> None:
        SERVERS.run(*SERVERS.redis_start)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "ping").strip() != "PONG":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)

    async def test_durable_refuses_a_server_that_does_not_fsync_every_write(self) -> None:
        SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "config", "set", "appendfsync", "everysec")
        try:
            with self.assertRaisesRegex(JasonError, "appendfsync everysec.*appendfsync always.*durable=False"):
                JASON(self.location, namespace=self.options["namespace"])
            fast = self.open_db(durable=False)
            await fast.save_user_data(1, {"fast": True})
        finally:
            SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "config", "set", "appendfsync", "always")

    async def test_an_edit_that_lost_its_lock_writes_nothing(self) -> None:
        await self.db.save_user_data(1, {"v": "before"})
        lock_key = f"{self.options['namespace']}:lock:1"
        with self.assertRaisesRegex(JasonError, "lost its lock.*nothing was written"):
            async with self.db.edit_user_data(1) as data:
                SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "del", lock_key)  # as if it expired
                data["v"] = "after"
        self.assertEqual(await self.stored(1), {"v": "before"})

    def test_the_command_line_reports_a_failed_connection_in_one_line(self) -> None:
        for url, expected in [("unix:///no/such/redis.sock", "/no/such/redis.sock"),
                              (f"unix://nosuchuser:hunter2@{SERVERS.redis_socket}", "username-password")]:
            for argv in (["ls"], ["--fast", "ls"]):  # the durability check, then the first command
                with self.subTest(url=url, argv=argv):
                    result = run_cli(url, *argv)
                    self.assertEqual(result.returncode, 1, result.stderr)
                    self.assertNotIn("Traceback", result.stderr)
                    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                    self.assertIn(expected, result.stderr)
                    self.assertNotIn("hunter2", result.stderr)
        SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "config", "set", "appendfsync", "everysec")
        try:
            refused = run_cli(self.location, "set", "1", stdin="{}")
        finally:
            SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "config", "set", "appendfsync", "always")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("or give --fast", refused.stderr)
        self.assertNotIn("durable=False", refused.stderr)

    async def test_a_cancelled_edit_never_leaves_its_lock_behind(self) -> None:
        busy = self.open_db()
        rng = random.Random(7)

        async def keep_the_server_busy() -> None:
            while True:
                await asyncio.gather(*(busy.save_user_data(f"busy{n}", {"n": n}) for n in range(20)))

        noise = asyncio.ensure_future(keep_the_server_busy())
        try:
            for _ in range(60):
                async def edit() -> None:
                    async with self.db.edit_user_data(1) as data:
                        data["n"] = data.get("n", 0) + 1
                task = asyncio.ensure_future(edit())
                await asyncio.sleep(rng.random() * 0.003)  # often while its SET NX is in flight
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                locks = SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "--scan", "--pattern",
                                    f"{self.options['namespace']}:lock:*")
                self.assertEqual(locks.split(), [], "a cancelled edit left its lock behind")
        finally:
            noise.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await noise
        elsewhere = self.open_db()
        await asyncio.wait_for(elsewhere.save_user_data(1, {"n": -1}), 5)  # no 30 s wait for a leaked lock

    async def test_an_edit_held_by_a_dead_process_blocks_only_until_its_lock_expires(self) -> None:
        lock_key = f"{self.options['namespace']}:lock:1"
        SERVERS.run("redis-cli", "-s", SERVERS.redis_socket, "set", lock_key, "dead-process", "px", "300")
        started = time.monotonic()
        async with self.db.edit_user_data(1) as data:
            data["after"] = "the lock expired"
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual((await self.stored(1))["after"], "the lock expired")  # type: ignore[index]


# ---------------------------------------------------------------- durability: syscalls and power cuts

TRACED_SAVE = """
import asyncio, secrets, sys, jason
folder, durable = sys.argv[1], sys.argv[2] == "durable"
secrets.token_hex = lambda nbytes=None: "0" * 16  # a known temp name, so strace -P selects this save alone
db = jason.JASON(folder, durable=durable, journal=False)  # each save writes its own file
try:
    asyncio.run(db.save_user_data(1, {"version": "new"}))
except OSError as exc:
    print("error", exc.errno)
    sys.exit(3)
print("done")
"""
TRACED_TEMP_NAME = jason.TEMP_PREFIX + "0" * 16
OLD_RECORD = b'{"version":"old"}'
NEW_RECORD = b'{"version":"new"}'
RENAME_CALLS = ("rename", "renameat", "renameat2")
TRACED_JOURNAL_SAVE = """
import asyncio, concurrent.futures, functools, os, secrets, sys, jason
folder, marker = sys.argv[1], sys.argv[2]
secrets.token_hex = lambda nbytes=None: "0" * 16  # a known temp name, so strace -P selects this save alone
# strace counts a syscall's calls per thread: one thread does every traced call, so each has a number of its own.
jason.IO_THREADS, jason.JOURNAL_CHECKPOINT_SECONDS = 1, 3600  # the checkpoint is close()'s

class Inline:
    def submit(self, function, *args):
        done = concurrent.futures.Future()
        try:
            done.set_result(function(*args))
        except BaseException as exc:
            done.set_exception(exc)
        return done

jason._checkpoint_executor = Inline
async def main():
    loop = asyncio.get_running_loop()
    db = await loop.run_in_executor(jason._io_executor(), functools.partial(jason.JASON, folder, journal=True))
    try:
        await db.save_user_data(1, {"version": "new"})
        print("saved", flush=True)
        os.close(os.open(marker, os.O_RDONLY | os.O_CREAT))  # the trace shows where the save returned
    finally:
        await db.close()  # the last checkpoint
try:
    asyncio.run(main())
except OSError as exc:
    print("error", exc.errno)
    sys.exit(3)
print("closed")
"""
JOURNAL_CALLS = "openat,open,write,pwrite64,fsync,fdatasync,syncfs,unlink,unlinkat," + ",".join(RENAME_CALLS)


def strace_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0  # ptrace may be forbidden in a container


@needs(strace_works(), "a working strace on Linux (apt-get install strace)")
class SyscallTest(unittest.TestCase):
    """Trace and break real saves with strace, selecting only the save's own syscalls (-P)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-strace-")
        self.folder = os.path.join(self._tmp.name, "users")
        os.mkdir(self.folder)
        self.record = os.path.join(self.folder, "1.json")
        self.reset()

    def tearDown(self) -> None:
        self._tmp.cleanup()

    def reset(self) -> None:
        for name in os.listdir(self.folder):
            if name != jason.LOCK_FILE_NAME:
                os.unlink(os.path.join(self.folder, name))
        with open(self.record, "wb") as file:
            file.write(OLD_RECORD)

    def traced_save(self, *strace_options: str, durable: bool = True) -> subprocess.CompletedProcess[str]:
        paths = [os.path.join(self.folder, TRACED_TEMP_NAME), self.folder, self.record]
        command = ["strace", "-f", "-qq", "-y", *strace_options]
        for path in paths:
            command += ["-P", path]
        command += [sys.executable, "-c", TRACED_SAVE, self.folder, "durable" if durable else "fast"]
        return subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=child_env())

    def save_steps(self, durable: bool) -> list[str]:
        """The save's syscalls in order, named by what they touched; repeated writes fold into one."""
        trace_path = os.path.join(self._tmp.name, "trace.txt")
        calls = "openat,open,write,pwrite64,fsync,fdatasync," + ",".join(RENAME_CALLS)
        result = self.traced_save("-o", trace_path, "-e", f"trace={calls}", durable=durable)
        self.assertEqual(result.stdout.strip(), "done", result.stderr)
        steps: list[str] = []
        with open(trace_path, encoding="utf-8") as trace:
            for line in trace:
                match = re.match(r"\s*\d+\s+(\w+)\((.*)\)\s+=", line)
                if not match:
                    continue
                call, args = match.groups()  # with -y, a descriptor shows its path: 7</x/1.json>
                if call in RENAME_CALLS:
                    step = "rename temp -> record" if TRACED_TEMP_NAME in args and self.record in args else call
                else:
                    target = "temp" if TRACED_TEMP_NAME in args else "record" if self.record in args else "folder"
                    step = f"{call.replace('openat', 'open')} {target}"
                if step == "open temp":
                    self.assertIn("O_EXCL", args)
                if not steps or steps[-1] != step:
                    steps.append(step)
        return steps

    def test_a_durable_save_writes_fsyncs_renames_then_fsyncs_the_folder(self) -> None:
        self.assertEqual(self.save_steps(durable=True), [
            "open temp", "write temp", "fsync temp", "rename temp -> record", "open folder", "fsync folder",
        ])
        with open(self.record, "rb") as file:
            self.assertEqual(file.read(), NEW_RECORD)

    def test_a_fast_save_skips_both_fsyncs(self) -> None:
        self.assertEqual(self.save_steps(durable=False), ["open temp", "write temp", "rename temp -> record"])

    @slow
    def test_crash_or_fail_at_every_step_leaves_old_or_new(self) -> None:
        """SQLite's method: move the crash point forward one syscall at a time until the save completes."""
        rename = next(call for call in RENAME_CALLS if self.uses_syscall(call))
        for syscall in ("openat", "write", "fsync", rename):
            for action in ("signal=KILL", "error=EIO"):
                hits = 0
                for when in range(1, 20):
                    with self.subTest(syscall=syscall, action=action, when=when):
                        self.reset()
                        result = self.traced_save(
                            "-o", os.devnull, "-e", f"trace={syscall}", "-e", f"inject={syscall}:{action}:when={when}",
                        )
                        with open(self.record, "rb") as file:
                            on_disk = file.read()
                        self.assertIn(on_disk, (OLD_RECORD, NEW_RECORD))
                        reopened = JASON(self.folder, readonly=True)
                        self.assertEqual(asyncio.run(reopened.user_ids()), ["1"])
                        if result.stdout.strip() == "done":
                            self.assertEqual(on_disk, NEW_RECORD)
                            break
                        hits += 1
                        if action == "signal=KILL":
                            self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
                            asyncio.run(JASON(self.folder).close())  # the lock died with the process
                        else:
                            self.assertEqual(result.stdout.split(), ["error", str(errno.EIO)], result.stderr)
                            self.assertEqual(temp_files(self.folder), [])
                else:
                    self.fail(f"{syscall} {action}: the save never completed")
                self.assertGreater(hits, 0, f"{syscall} {action}: no injection landed in the save")

    # ---- the same proofs for journal=True: a save is an append and an fdatasync; close checkpoints it

    def traced_journal_save(self, *strace_options: str, marker: str | None = None) -> \
            subprocess.CompletedProcess[str]:
        checkpointing, journal = jason._journal_paths(self.folder)
        command = ["strace", "-f", "-qq", "-y", *strace_options]
        for path in [os.path.join(self.folder, TRACED_TEMP_NAME), self.folder, self.record, journal, checkpointing,
                     *([marker] if marker else [])]:
            command += ["-P", path]
        command += [sys.executable, "-c", TRACED_JOURNAL_SAVE, self.folder, marker or os.devnull]
        return subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=child_env())

    def test_a_journaled_save_is_synced_before_it_returns_and_its_journal_deleted_only_after_the_record(self) -> None:
        trace_path = os.path.join(self._tmp.name, "trace.txt")
        marker = os.path.join(self._tmp.name, "returned")
        result = self.traced_journal_save("-o", trace_path, "-e", f"trace={JOURNAL_CALLS}", marker=marker)
        self.assertEqual(result.stdout.split(), ["saved", "closed"], result.stderr)
        names = {os.path.join(self.folder, TRACED_TEMP_NAME): "temp", self.record: "record", marker: "returned",
                 os.path.join(self.folder, jason.JOURNAL_CHECKPOINTING_NAME): "checkpoint",
                 os.path.join(self.folder, jason.JOURNAL_NAME): "journal", self.folder: "folder"}
        steps: list[str] = []
        with open(trace_path, encoding="utf-8") as trace:
            for line in trace:
                match = re.match(r"\s*\d+\s+(\w+)\((.*)\)\s+= (-?\d+)", line)
                if not match or match[3] == "-1":  # the replay's look for journals left behind finds none
                    continue
                call, args, _ = match.groups()
                # Paths as strace shows them: "quoted", or <after a descriptor>.
                touched = [names[path] for pair in re.findall(r'"([^"]+)"|<([^>]+)>', args) for path in pair
                           if path in names]
                if call in RENAME_CALLS:
                    step = f"rename {touched[0]} -> {touched[1]}" if len(touched) == 2 else call
                else:
                    step = f"{call.replace('openat', 'open')} {touched[0]}"
                if step == "open returned":
                    step = "returned"
                if not steps or steps[-1] != step:
                    steps.append(step)
        self.assertEqual(steps, [
            "open journal", "pwrite64 journal", "open folder", "fsync folder",  # a new journal, durable
            "pwrite64 journal", "fdatasync journal", "returned",  # the save: one append, one sync
            "rename journal -> checkpoint", "open journal", "pwrite64 journal", "open folder", "fsync folder",
            "open temp", "write temp", "rename temp -> record",  # the checkpoint writes the record
            "open folder", "syncfs folder",  # makes it durable
            "unlink checkpoint", "open folder", "fsync folder",  # and only then deletes the old journal
            "unlink journal", "open folder", "fsync folder",  # close: the empty journal goes too
        ])
        with open(self.record, "rb") as file:
            self.assertEqual(file.read(), NEW_RECORD)

    @slow
    def test_a_crash_or_failure_at_every_step_of_a_journaled_save_and_its_checkpoint_leaves_old_or_new(self) -> None:
        for syscall in ("openat", "pwrite64", "fdatasync", "fsync", "rename", "syncfs", "unlink"):
            if not self.uses_syscall(syscall, journal=True):
                continue
            for action in ("signal=KILL", "error=EIO"):
                hits = 0
                for when in range(1, 30):
                    with self.subTest(syscall=syscall, action=action, when=when):
                        self.reset()
                        result = self.traced_journal_save(
                            "-o", os.devnull, "-e", f"trace={syscall}", "-e", f"inject={syscall}:{action}:when={when}",
                        )
                        words = result.stdout.split()
                        if action == "signal=KILL" and words[-1:] != ["closed"]:
                            self.assertEqual(result.returncode, -signal.SIGKILL, result.stderr)
                        elif words[-1:] != ["closed"]:
                            self.assertEqual(words[-2:], ["error", str(errno.EIO)], result.stderr)
                        recovered = asyncio.run(self.reopened_record())  # replays what journal remains
                        self.assertIn(recovered, (OLD_RECORD, NEW_RECORD))
                        if "saved" in words:
                            self.assertEqual(recovered, NEW_RECORD, "a save that returned was lost")
                        if action == "error=EIO":  # a killed save leaves its temp file, as documented
                            self.assertEqual(temp_files(self.folder), [])
                        if words[-1:] == ["closed"]:
                            break
                        hits += 1
                else:
                    self.fail(f"{syscall} {action}: the save never completed")
                self.assertGreater(hits, 0, f"{syscall} {action}: no injection landed in the save")

    async def reopened_record(self) -> bytes:
        async with JASON(self.folder) as db:  # a writer: it replays the journals first
            await db.user_ids()
        with open(self.record, "rb") as file:
            return file.read()

    def uses_syscall(self, call: str, journal: bool = False) -> bool:
        self.reset()
        trace_path = os.path.join(self._tmp.name, "probe.txt")
        (self.traced_journal_save if journal else self.traced_save)("-o", trace_path, "-e", f"trace={call}")
        with open(trace_path, encoding="utf-8") as trace:
            return any(re.match(rf"\s*\d+\s+{call}\(", line) for line in trace)


class PowerCutModel:
    """What a power cut would leave of a folder, the way LevelDB's fault-injection env tracks it.

    It wraps os.open/write/fsync/replace/unlink/close and records, per file,
    the bytes written and the bytes last fsynced, and, for the folder, its
    entries now and as of its last fsync. image() is the folder after a power
    cut: only the entries of the last folder fsync, each file cut back to its
    last fsynced bytes.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._real = {name: getattr(os, name)
                      for name in ("open", "write", "pwrite", "fsync", "fdatasync", "replace", "unlink", "close")}
        self._files: dict[int, dict[str, bytes]] = {}  # id -> {"written", "synced"}
        self._open_fds: dict[int, int | str] = {}  # fd -> file id, or "folder"
        self.entries: dict[str, int] = {}
        for name in os.listdir(folder):
            if name.endswith(".json") or name.startswith(jason.JOURNAL_NAME):  # what is there is durable
                content = read_bytes(os.path.join(folder, name))
                self.entries[name] = self._new_file(content)
        self.synced_entries = dict(self.entries)
        # Syncs can overlap: each applies what it saw only if no sync that saw later state has applied yet.
        self._sync_order = itertools.count(1)
        self._applied: dict[int | str, int] = {}  # file id, or "folder" -> order of the sync last applied
        self.folder_fsyncs = 0
        self.folder_fsync_seconds = 0.0
        self.before_sync: Callable[[int | str | None], None] = lambda target: None  # a test's hook

    def _new_file(self, content: bytes = b"") -> int:
        file_id = len(self._files)
        self._files[file_id] = {"written": content, "synced": content}
        return file_id

    def _open(self, path: str, flags: int, *args: object, **kwargs: object) -> int:
        fd: int = self._real["open"](path, flags, *args, **kwargs)
        with self._lock:
            if os.path.abspath(path) == self.folder:
                self._open_fds[fd] = "folder"
            elif os.path.dirname(os.path.abspath(path)) == self.folder and flags & os.O_CREAT:
                file_id = self._new_file()
                self.entries[os.path.basename(path)] = file_id
                self._open_fds[fd] = file_id
            elif os.path.dirname(os.path.abspath(path)) == self.folder and os.path.basename(path) in self.entries:
                self._open_fds[fd] = self.entries[os.path.basename(path)]  # a reader's: its sync syncs the file
        return fd

    def _write(self, fd: int, data: bytes) -> int:
        written: int = self._real["write"](fd, data)
        with self._lock:
            file_id = self._open_fds.get(fd)
            if isinstance(file_id, int):
                self._files[file_id]["written"] += bytes(data[:written])
        return written

    def _pwrite(self, fd: int, data: bytes, offset: int) -> int:  # the journal's appends
        written: int = self._real["pwrite"](fd, data, offset)
        with self._lock:
            file_id = self._open_fds.get(fd)
            if isinstance(file_id, int):
                before = self._files[file_id]["written"].ljust(offset, b"\0")
                self._files[file_id]["written"] = before[:offset] + bytes(data[:written]) + before[offset + written:]
        return written

    def _fsync(self, fd: int) -> None:
        # Only what was there when the fsync started is sure to be on disk when it returns.
        with self._lock:
            target = self._open_fds.get(fd)
            order = next(self._sync_order)
            entries = dict(self.entries)
            written = self._files[target]["written"] if isinstance(target, int) else b""
            if target == "folder":
                self.folder_fsyncs += 1
        if target == "folder":
            time.sleep(self.folder_fsync_seconds)  # a slow disk: renames pile up meanwhile
        self.before_sync(target)
        self._real["fsync"](fd)
        with self._lock:
            if target == "folder":
                self._apply_sync(order, entries, {})
            elif isinstance(target, int):
                self._apply_sync(order, None, {target: written})

    def _apply_sync(self, order: int, entries: dict[str, int] | None, files: dict[int, bytes]) -> None:
        if entries is not None and order > self._applied.get("folder", 0):
            self.synced_entries = entries
            self._applied["folder"] = order
        for file_id, content in files.items():
            if order > self._applied.get(file_id, 0):
                self._files[file_id]["synced"] = content
                self._applied[file_id] = order

    def _fdatasync(self, fd: int) -> None:  # the journal's: its data, which is all the model tracks
        self._fsync(fd)

    def _syncfs(self, folder: str) -> None:  # a checkpoint's: every file and every entry, as of the call
        with self._lock:
            order = next(self._sync_order)
            entries = dict(self.entries)
            written = {file_id: file["written"] for file_id, file in self._files.items()}
        self.before_sync("syncfs")
        self._real_syncfs(folder)
        with self._lock:
            self._apply_sync(order, entries, written)

    def _replace(self, source: str, target: str) -> None:
        self._real["replace"](source, target)
        with self._lock:
            self.entries[os.path.basename(target)] = self.entries.pop(os.path.basename(source))

    def _unlink(self, path: str) -> None:
        self._real["unlink"](path)
        with self._lock:
            self.entries.pop(os.path.basename(path), None)

    def _close(self, fd: int) -> None:
        with self._lock:  # forget it first: once closed, another thread may get the same number
            self._open_fds.pop(fd, None)
        self._real["close"](fd)

    def image(self) -> dict[str, bytes]:
        """The records and journals a power cut would leave."""
        with self._lock:
            return {name: self._files[file_id]["synced"] for name, file_id in self.synced_entries.items()
                    if name.endswith(".json") or name.startswith(jason.JOURNAL_NAME)}

    @contextlib.contextmanager
    def installed(self) -> Iterator[PowerCutModel]:
        with contextlib.ExitStack() as stack:
            for name in self._real:
                stack.enter_context(mock.patch(f"os.{name}", getattr(self, f"_{name}")))
            self._real_syncfs = jason._syncfs
            stack.enter_context(mock.patch("jason._syncfs", self._syncfs))
            yield self


class PowerCutTest(FolderMixin):
    journal = False  # how a save writes its own file

    async def run_saves(self, durable: bool) -> tuple[list[dict[str, bytes]], dict[str, list[bytes]], list[dict]]:
        """Save versions of 4 users; take a power-cut image after every returned save and inside every save."""
        for user in range(4):
            await self.db.save_user_data(user, {"user": user, "v": -1})
        db = self.open_db(durable=durable, default_structure={})
        model = PowerCutModel(self.folder)
        images_after, images_during, returned = [], [], {}
        versions: dict[str, list[bytes]] = {jason._file_name(str(u)): [] for u in range(4)}
        real_replace = model._replace

        def replace_with_a_cut_first(source: str, target: str) -> None:
            images_during.append(model.image())
            real_replace(source, target)

        model._replace = replace_with_a_cut_first  # type: ignore[method-assign]
        for user in range(4):
            versions[jason._file_name(str(user))].append(read_bytes(self.path(user)))
        with model.installed():
            for v in range(12):
                batch = [(v * 7 + k) % 4 for k in range(2)]
                for user in batch:
                    versions[jason._file_name(str(user))].append(
                        jason._dumps({"user": user, "v": v}))
                await asyncio.gather(*(db.save_user_data(user, {"user": user, "v": v}) for user in batch))
                for user in batch:
                    returned[jason._file_name(str(user))] = jason._dumps({"user": user, "v": v})
                images_after.append({"image": model.image(), "returned": dict(returned)})
        return images_during, versions, images_after

    async def test_durable_saves_that_returned_survive_a_power_cut(self) -> None:
        images_during, versions, images_after = await self.run_saves(durable=True)
        for cut in images_after:
            for name, content in cut["returned"].items():
                self.assertEqual(cut["image"].get(name), content, f"{name} lost a save that had returned")
        for image in images_during:
            self.assert_old_or_new(image, versions)

    async def test_fast_saves_stay_whole_and_the_model_sees_what_they_risk(self) -> None:
        images_during, versions, images_after = await self.run_saves(durable=False)
        for image in images_during + [cut["image"] for cut in images_after]:
            self.assert_old_or_new(image, versions)
        last = images_after[-1]
        lost = [name for name, content in last["returned"].items() if last["image"].get(name) != content]
        self.assertTrue(lost, "without fsync a power cut loses returned saves; a model that never sees it is blind")

    async def test_concurrent_durable_saves_share_folder_fsyncs_and_all_survive(self) -> None:
        db = self.open_db(default_structure={})
        model = PowerCutModel(self.folder)
        model.folder_fsync_seconds = 0.02
        with model.installed():
            await asyncio.gather(*(db.save_user_data(user, {"user": user}) for user in range(40)))
            image = model.image()
        for user in range(40):
            self.assertEqual(image.get(jason._file_name(str(user))), jason._dumps({"user": user}))
        self.assertLess(model.folder_fsyncs, 40, "every save paid for its own folder fsync")
        self.assertGreater(model.folder_fsyncs, 0)

    async def test_journaled_saves_that_returned_survive_a_power_cut(self) -> None:
        """journal=True, checkpoints every 20 ms: cut the power after every round of saves and before every sync."""
        await self.db.close()
        model = PowerCutModel(self.folder)
        returned: dict[str, dict[str, int]] = {}  # each user's last save that has returned
        in_flight: dict[str, dict[str, int]] = {}  # the saves under way
        during: list[tuple[dict[str, bytes], dict[str, dict[str, int]], dict[str, dict[str, int]]]] = []
        model.before_sync = lambda target: during.append((model.image(), dict(returned), dict(in_flight)))
        after: list[tuple[dict[str, bytes], dict[str, dict[str, int]]]] = []
        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 0.02), model.installed():
            db = self.open_db(journal=True, default_structure={})  # its journal is made under the model
            for v in range(40):
                batch = {str((v * 3 + k) % 5): {"v": v, "k": k} for k in range(3)}
                in_flight.update(batch)
                await asyncio.gather(*(db.save_user_data(user, record) for user, record in batch.items()))
                in_flight.clear()
                returned.update(batch)
                after.append((model.image(), dict(returned)))
                if v % 8 == 7:
                    await asyncio.sleep(0.05)  # a checkpoint runs: rotation, records written, journal deleted
            await db.close()
            after.append((model.image(), dict(returned)))
        self.assertGreater(len(during), 40)
        self.assertTrue(any(name.startswith(jason.JOURNAL_NAME) for image, _ in after for name in image))
        self.assertFalse([name for name in after[-1][0] if name.startswith(jason.JOURNAL_NAME)])  # close: none left
        for image, expected in after:
            self.assertEqual(await recovered_records(image), expected)
        for image, expected, maybe_newer in during:  # a save under way may or may not have made it
            recovered = await recovered_records(image)
            for user in set(expected) | set(maybe_newer):
                self.assertIn(recovered.get(user), [expected.get(user), maybe_newer.get(user)], user)

    async def test_a_reader_in_another_process_never_shows_a_save_a_power_cut_could_undo(self) -> None:
        """A readonly reader reads the journal just after each append, before the writer's sync of it."""
        await self.db.close()
        model = PowerCutModel(self.folder)
        users = ["0", "1", "2"]
        shown: list[tuple[dict[str, bytes], dict[str, Any]]] = []  # (a cut just after a read, what it showed)
        reading = threading.Event()  # the reader's own syncs pass through the hook too

        with model.installed():
            db = self.open_db(journal=True, default_structure={})
            reader = jason.SyncJASON(self.folder, {}, readonly=True)  # reads the journal as another process does
            self.addCleanup(reader.close)

            def read_before_the_sync(target: int | str | None) -> None:
                if isinstance(target, int) and not reading.is_set():
                    reading.set()
                    try:
                        reader.user_exists("someone else")  # reads the new entries, and need not sync them
                        seen = {user: reader.load_user_data(user) for user in users if reader.user_exists(user)}
                        shown.append((model.image(), seen))
                    finally:
                        reading.clear()

            model.before_sync = read_before_the_sync
            for v in range(8):
                await asyncio.gather(*(db.save_user_data(user, {"v": v}) for user in users))
            model.before_sync = lambda target: None
            await db.close()
        self.assertGreater(len(shown), 8)
        self.assertTrue(any(seen for _, seen in shown))
        for image, seen in shown:
            self.assertEqual(await recovered_records(image), seen)

    async def test_a_storm_of_journaled_edits_survives_a_power_cut_in_order(self) -> None:
        """Edits of one user that each read the last before it was durable: cut the power before every sync."""
        await self.db.close()
        model = PowerCutModel(self.folder)
        returned = {"0": 0, "1": 0}  # each user's count after the last edit that returned
        attempted = dict(returned)  # ... and after the last edit that began
        during: list[tuple[dict[str, bytes], dict[str, int], dict[str, int]]] = []
        model.before_sync = lambda target: during.append((model.image(), dict(returned), dict(attempted)))

        async def increment(db: JASON, user: str) -> None:
            async with db.edit_user_data(user) as data:
                data["n"] += 1
                attempted[user] = data["n"]
            returned[user] = max(returned[user], data["n"])

        with mock.patch.object(jason, "JOURNAL_CHECKPOINT_SECONDS", 0.02), model.installed():
            db = self.open_db(journal=True, default_structure={"n": 0})
            for round_number in range(6):
                await asyncio.gather(*(increment(db, str(k % 2)) for k in range(30)))
                if round_number % 2:
                    await asyncio.sleep(0.05)  # a checkpoint runs
            await db.close()
            final = model.image()
        self.assertEqual({user: data["n"] for user, data in (await recovered_records(final)).items()},
                         {"0": 90, "1": 90})
        self.assertGreater(len(during), 6)
        for image, before, begun in during:
            recovered = await recovered_records(image)
            for user in returned:
                n = recovered.get(user, {"n": 0})["n"]
                self.assertGreaterEqual(n, before[user], f"user {user} lost an edit that had returned")
                self.assertLessEqual(n, begun[user])

    def assert_old_or_new(self, image: dict[str, bytes], versions: dict[str, list[bytes]]) -> None:
        for name, content in image.items():
            self.assertIn(content, versions[name], f"{name} holds bytes no save wrote")
            json.loads(content)


# ---------------------------------------------------------------- serialisation parity


if TYPE_CHECKING:  # the concrete parity classes mix in unittest.TestCase
    _ParityBase = unittest.TestCase
else:
    _ParityBase = object


class ParityChecks(_ParityBase):
    """Checks that every codec must pass; subclasses bind dumps and loads."""

    dumps = staticmethod(jason._dumps_stdlib)
    loads = staticmethod(jason._loads_stdlib)

    STORABLE: tuple[dict[str, object], ...] = (
        {}, {"a": None, "b": True, "c": False}, {"int": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1]},
        {"float": [0.0, -0.0, 0.1, 1.5e300, 5e-324, 123456789.125]}, {"text": "é😀\u2028\x00\x1f\"\\/"},
        {"nested": {"a": [{"b": [[]]}]}}, {"ключ": "значение"}, {"": ""},
    )

    def test_storable_values_round_trip(self) -> None:
        for value in self.STORABLE:
            for pretty in (False, True):
                jason._check_storable(value)
                self.assertEqual(self.loads(self.dumps(value, pretty)), value)

    def test_bytes_match_the_stdlib_except_float_spelling(self) -> None:
        for value in self.STORABLE:
            if "float" not in value:
                for pretty in (False, True):
                    self.assertEqual(self.dumps(value, pretty), jason._dumps_stdlib(value, pretty))

    def test_non_ascii_is_written_as_utf8_not_escaped(self) -> None:
        self.assertEqual(self.dumps({"a": "é"}), '{"a":"é"}'.encode())

    def test_subclasses_are_stored_as_their_base_type(self) -> None:
        import enum
        from collections import OrderedDict

        class Level(enum.IntEnum):
            HIGH = 3

        value = OrderedDict(level=Level.HIGH, items=type("L", (list,), {})([1]))
        jason._check_storable(value)
        self.assertEqual(self.loads(self.dumps(value)), {"level": 3, "items": [1]})

    def test_refused_values_raise_the_same_errors(self) -> None:
        import datetime
        import decimal

        class MyFloat(float):
            pass

        deep = nested_dicts(jason.MAX_DEPTH + 2)
        refused: list[tuple[Any, type[Exception]]] = [
            ({1: "a"}, TypeError), ({None: 1}, TypeError), ({"t": (1, 2)}, TypeError),
            ({"s": {1}}, TypeError),
            ({"b": b"x"}, TypeError), ({"d": datetime.datetime(2026, 1, 1)}, TypeError),
            ({"x": decimal.Decimal(1)}, TypeError), ({"f": MyFloat(1.0)}, TypeError),
            ({"n": float("nan")}, ValueError), ({"i": float("-inf")}, ValueError),
            ({"big": 2**64}, ValueError), ({"small": -(2**63) - 1}, ValueError),
            ({"s": "a\udc80"}, ValueError), ({"\ud800": 1}, ValueError), (deep, ValueError),
        ]
        for value, error in refused:
            with self.subTest(value=str(value)[:60]), self.assertRaises(error):
                jason._check_storable(value)

    def test_parsing_refuses_the_same_inputs(self) -> None:
        for label, raw in CORRUPT_CONTENTS.items():
            if label in {"a list", "a string"}:
                continue  # valid JSON: refused later, for not being an object
            with self.subTest(label), self.assertRaises(ValueError):
                self.loads(raw)

    def test_parsing_agrees_on_edge_values(self) -> None:
        raw = b'{"big": 18446744073709551615, "huge": 18446744073709551616, "dup": 1, "dup": 2, "e": 1E2}'
        expected = {"big": 2**64 - 1, "huge": 1.8446744073709552e19, "dup": 2, "e": 100.0}
        self.assertEqual(self.loads(raw), expected)


class StdlibParityTest(ParityChecks, unittest.TestCase):
    pass


@(unittest.skipIf(OPTIONAL_PACKAGES_BLOCKED, "orjson is blocked in this run") if OPTIONAL_PACKAGES_BLOCKED
   else needs(jason.HAVE_ORJSON, "orjson (pip install orjson)"))
class OrjsonParityTest(ParityChecks, unittest.TestCase):
    # Without orjson the class is skipped; the stdlib functions only stand in for the names.
    dumps = staticmethod(getattr(jason, "_dumps_orjson", jason._dumps_stdlib))
    loads = staticmethod(getattr(jason, "_loads_orjson", jason._loads_stdlib))


# ---------------------------------------------------------------- command line


def run_cli(*args: str, stdin: str | bytes | None = None, blocked: bool = False,
            timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `python jason.py ARGS` in a child, as a user would; blocked hides orjson and aiofiles."""
    code = (OPTIONAL_BLOCK if blocked else "") + "import sys, jason; sys.exit(jason.main(sys.argv[1:]))"
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run([sys.executable, "-c", code, *args], input=data, capture_output=True,
                            timeout=timeout, env=child_env(), check=False)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode("utf-8", "backslashreplace"),
                                       result.stderr.decode("utf-8", "backslashreplace"))


def run_cli_with_namespace(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """run_cli on a test's own namespace (a folder ignores it)."""
    return run_cli("--namespace", namespace, *args, timeout=CHILD_TIMEOUT * 5)


ODD_IDS = ["Zoë", "Привет", "a.b", "../up", "new\nline", "CON", "x y", "😀", "-100123", "%41"]


class CLITest(unittest.TestCase):
    """The command line on a real folder of 2,000 users (10,000 with JASON_FULL=1, 500 in make quick)."""

    _tmp: ClassVar[tempfile.TemporaryDirectory[str]]
    folder: ClassVar[str]
    expected: ClassVar[dict[str, dict[str, object]]]

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory(prefix="jason-cli-")
        cls.folder = os.path.join(cls._tmp.name, "users")
        cls.expected = {str(u): {"n": u, "name": f"user {u} ✓", "tags": ["a", "é"]} for u in range(CLI_USERS - 10)}
        cls.expected.update({key: {"odd": key, "text": "non-ASCII: ÿ 😀"} for key in ODD_IDS})

        fill_folder(cls.folder, cls.expected)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tmp.cleanup()

    def scratch(self) -> str:
        folder = tempfile.mkdtemp(dir=self._tmp.name)
        return os.path.join(folder, "db")

    def assert_fails(self, result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
        self.assertEqual(result.returncode, code, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        if code == 1:
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        else:  # the usage, then one line
            self.assertTrue(result.stderr.startswith("usage:"), result.stderr)
            self.assertNotIn("\njason: ", result.stderr.strip().split("\njason: error: ", 1)[1], result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def test_version_matches_the_module(self) -> None:
        result = run_cli("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"jason {jason.__version__}"))

    def test_selftest_passes_with_the_installed_back_ends(self) -> None:
        result = run_cli("--selftest")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("selftest passed", result.stdout)

    def test_selftest_passes_on_the_standard_library_alone(self) -> None:
        result = run_cli("--selftest", blocked=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("orjson off, aiofiles off", result.stdout)

    def test_no_command_is_a_usage_error(self) -> None:
        self.assert_fails(run_cli(), 2, "give a folder and a command")
        self.assertEqual(run_cli(self.folder, "frobnicate").returncode, 2)

    def test_ls_lists_every_user_one_per_line(self) -> None:
        result = run_cli(self.folder, "ls")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), CLI_USERS)
        self.assertIn('"new\\nline"', lines)  # a line break in an id is shown as a JSON string
        self.assertEqual({json.loads(line) if line.startswith('"') else line for line in lines}, set(self.expected))
        self.assertEqual(run_cli(self.folder, "ls", "--count").stdout, f"{CLI_USERS}\n")

    def test_get_prints_the_record_as_stored(self) -> None:
        for key in ("42", "Zoë", "../up"):
            result = run_cli(self.folder, "get", key)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(json.loads(result.stdout), self.expected[key])  # no defaults merged in
            self.assertIn("\n  ", result.stdout)  # pretty

    def test_set_and_rm_change_one_user(self) -> None:
        folder = self.scratch()
        self.assertEqual(run_cli(folder, "import", "-", stdin='{"user_id": "a", "data": {}}\n').returncode, 0)
        result = run_cli(folder, "set", "Zoë", stdin='{"balance": 5, "name": "Zoë"}')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(run_cli(folder, "get", "Zoë").stdout), {"balance": 5, "name": "Zoë"})
        self.assertEqual(run_cli(folder, "rm", "Zoë").returncode, 0)
        self.assert_fails(run_cli(folder, "get", "Zoë"), 1, "no user Zoë")
        self.assert_fails(run_cli(folder, "rm", "Zoë"), 1, "no user Zoë")
        self.assertEqual(temp_files(folder), [])

    def test_every_error_is_one_clear_line(self) -> None:
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": 1, "data": {"ok": true}}\n')
        with open(os.path.join(folder, "2.json"), "w", encoding="utf-8") as file:
            file.write('{"a": 1,}')
        missing = os.path.join(self._tmp.name, "missing")
        self.assert_fails(run_cli(missing, "ls"), 1, "no JASON folder at", missing)
        self.assert_fails(run_cli(missing, "set", "1", stdin="{}"), 1, "no JASON folder")
        self.assertFalse(os.path.exists(missing))
        self.assert_fails(run_cli(folder, "get", ""), 1, "invalid user id", "empty")
        self.assert_fails(run_cli(folder, "get", "x" * 300), 1, "invalid user id", "255")
        self.assert_fails(run_cli(folder, "get", "2"), 1, "corrupt record", "2.json", "line 1")
        bad_json = '{"a": 1,\n "b": }'
        self.assert_fails(run_cli(folder, "set", "1", stdin=bad_json), 1, "stdin is not valid JSON", "line 2")
        self.assert_fails(run_cli(folder, "set", "1", stdin="[1, 2]"), 1, "must be a JSON object")
        self.assertEqual(json.loads(run_cli(folder, "get", "1").stdout), {"ok": True})

    def test_writing_commands_fail_clearly_while_a_bot_holds_the_folder(self) -> None:
        folder = self.scratch()
        bot = JASON(folder)
        try:
            asyncio.run(bot.save_user_data(1, {"kept": True}))
            writing = [(("set", "1"), "{}"), (("rm", "1"), None), (("import", "-"), '{"user_id": 3, "data": {}}'),
                       (("check", "--fix-temp"), None)]
            for args, stdin in writing:
                with self.subTest(args=args):
                    result = run_cli(folder, *args, stdin=stdin)
                    self.assert_fails(result, 1, "is open for writing by", f"process {os.getpid()}",
                                      "stop it first", "read-only commands")
                    self.assertNotIn("readonly=True", result.stderr)  # a library option the CLI cannot pass
            self.assertEqual(run_cli(folder, "get", "1").returncode, 0)  # reading works beside the bot
            self.assertEqual(run_cli(folder, "ls").stdout, "1\n")
        finally:
            asyncio.run(bot.close())

    def test_check_reports_problems_and_fix_temp_removes_only_temp_files(self) -> None:
        self.assertEqual(run_cli(self.folder, "check").returncode, 0)
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": 1, "data": {}}\n{"user_id": 2, "data": {}}\n')
        corrupt = os.path.join(folder, "2.json")
        with open(corrupt, "wb") as file:
            file.write(b'{"a": [1, 2')
        extra = {jason.TEMP_PREFIX + "00ff": b"{", "notes.txt": b"hi", "Bad.json": b"{}",
                 "9.json" + jason.QUARANTINE_MARK + "20261130T000000Z-abcdef": b""}
        for name, content in extra.items():
            with open(os.path.join(folder, name), "wb") as file:
                file.write(content)
        result = run_cli(folder, "check")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"corrupt: {corrupt}: ", result.stdout)
        self.assertIn("line 1", result.stdout)
        for kind in ("temp", "stray", "bad-name", "quarantined"):
            self.assertRegex(result.stdout, rf"(?m)^{kind}: ")
        self.assertIn("1 sound records; 1 corrupt, 1 temp, 1 quarantined, 1 bad-name, 1 stray, 0 journal",
                      result.stdout)
        result = run_cli(folder, "check", "--fix-temp")
        self.assertIn("removed: ", result.stdout)
        self.assertEqual(temp_files(folder), [])
        self.assertEqual(read_bytes(corrupt), b'{"a": [1, 2')  # check never changes a record
        self.assertEqual(len(os.listdir(folder)), 6)  # the lock, 2 records and 3 other files

    def test_jsonl_export_round_trips_every_user_exactly(self) -> None:
        out = os.path.join(self._tmp.name, "users.jsonl")
        result = run_cli(self.folder, "export", "--format", "jsonl", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"exported {CLI_USERS} users", result.stderr)
        with open(out, encoding="utf-8") as file:
            lines = [json.loads(line) for line in file]
        self.assertEqual({line["user_id"]: line["data"] for line in lines}, self.expected)
        self.assertEqual(run_cli(self.folder, "export", "-").stdout.encode(), read_bytes(out))
        folder = self.scratch()
        result = run_cli(folder, "import", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"imported {CLI_USERS} users", result.stderr)

        self.assertEqual(read_folder(folder), self.expected)

    def test_sqlite_export_holds_every_user_as_queryable_json(self) -> None:
        import sqlite3

        out = os.path.join(self._tmp.name, "users.sqlite")
        result = run_cli(self.folder, "export", "--format", "sqlite", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        with contextlib.closing(sqlite3.connect(out)) as connection:
            rows = dict(connection.execute("SELECT user_id, data FROM users"))
            name = connection.execute("SELECT json_extract(data, '$.name') FROM users WHERE user_id = '7'").fetchone()
        self.assertEqual({key: json.loads(data) for key, data in rows.items()}, self.expected)
        self.assertEqual(name, ("user 7 ✓",))
        self.assert_fails(run_cli(self.folder, "export", "--format", "sqlite", "-"), 1, "needs a file name")
        folder = self.scratch()
        result = run_cli(folder, "import", out)  # the SQLite export imports back, told apart by its header
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(read_folder(folder), self.expected)

    def test_a_failed_export_leaves_no_file(self) -> None:
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": 1, "data": {}}\n')
        out = os.path.join(os.path.dirname(folder), "out.jsonl")
        os.mkdir(out)  # the final rename onto OUT fails
        self.assert_fails(run_cli(folder, "export", out), 1, "out.jsonl")
        self.assertEqual(sorted(os.listdir(os.path.dirname(out))), ["db", "out.jsonl"])
        self.assertEqual(os.listdir(out), [])

    def test_an_export_keeps_every_sound_record_and_names_the_corrupt_ones(self) -> None:
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": 1, "data": {"a": 1}}\n{"user_id": 3, "data": {}}\n')
        with open(os.path.join(folder, "2.json"), "w", encoding="utf-8") as file:
            file.write("[]")
        out = os.path.join(os.path.dirname(folder), "out.jsonl")
        result = run_cli(folder, "export", out)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertRegex(result.stderr, r"corrupt, left out: .*2\.json: holds a JSON list")
        self.assertIn("1 corrupt records were left out", result.stderr.splitlines()[-1])
        with open(out, encoding="utf-8") as file:
            self.assertEqual([json.loads(line) for line in file],
                             [{"user_id": "1", "data": {"a": 1}}, {"user_id": "3", "data": {}}])

    def test_export_takes_the_format_from_the_name_or_refuses(self) -> None:
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": 1, "data": {"a": 1}}\n')
        for name, magic in [("b.sqlite", b"SQLite format 3"), ("b.db", b"SQLite format 3"), ("b.jsonl", b'{"user_id"')]:
            with self.subTest(name=name):
                out = os.path.join(os.path.dirname(folder), name)
                self.assertEqual(run_cli(folder, "export", out).returncode, 0)
                self.assertTrue(read_bytes(out).startswith(magic))
        self.assert_fails(run_cli(folder, "export", os.path.join(os.path.dirname(folder), "backup")), 1,
                          "cannot tell the format", "--format")

    def test_the_cli_refuses_integers_beyond_64_bits_as_the_api_does(self) -> None:
        folder = self.scratch()
        big = '{"n": 18446744073709551616}'
        self.assert_fails(run_cli(folder, "set", "u", stdin=big), 1, "18446744073709551616", "64 bits")
        self.assert_fails(run_cli(folder, "import", "-", stdin='{"user_id": "u", "data": ' + big + "}\n"), 1,
                          "line 1", "64 bits")
        self.assertEqual(run_cli(folder, "import", "-", stdin='{"user_id": "u", "data": {"n": 18446744073709551615}}'
                                 ).returncode, 0)
        self.assertEqual(json.loads(run_cli(folder, "get", "u").stdout), {"n": 2**64 - 1})

    def test_usual_argument_mistakes_get_a_hint(self) -> None:
        result = run_cli(self.folder)
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"no command after {self.folder}; try: jason {self.folder} ls", result.stderr)
        result = run_cli("ls", "users")
        self.assertEqual(result.returncode, 2)
        self.assertIn("the folder comes first: jason users ls", result.stderr)
        result = run_cli(self.folder, "set", "5", '{"a":1}')
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"set reads the record from stdin: echo '{{\"a\":1}}' | jason {self.folder} set 5",
                      result.stderr)
        for result in (run_cli(), run_cli(self.folder, "frobnicate"), run_cli(self.folder, "ls", "extra")):
            self.assertNotIn("Traceback", result.stderr)
            self.assertEqual(result.returncode, 2)

    @slow  # a dozen child processes
    def test_import_refuses_bad_files_whole_with_the_line_number(self) -> None:
        folder = self.scratch()
        run_cli(folder, "import", "-", stdin='{"user_id": "old", "data": {"v": 1}}\n')
        cases = [
            ('{"user_id": 1, "data": {}}\n{"user_id": 2, "data": {}\n', "line 2", "not valid JSON"),
            ('{"user_id": 1, "data": {}}\n\n{"user": 3}\n', "line 3", "expected"),
            ('{"user_id": "", "data": {}}\n', "line 1", "invalid user id"),
            ('{"user_id": 1, "data": {}}\n{"user_id": "1", "data": {}}\n', "line 2", "already on line 1"),
            ('{"user_id": 1, "data": {"deep": ' + "[" * 200 + "]" * 200 + "}}\n", "line 1", "nested deeper"),
            ('{"user_id": "old", "data": {"v": 2}}\n', "already exist", "--overwrite"),
        ]
        for text, *fragments in cases:
            with self.subTest(fragments=fragments):
                self.assert_fails(run_cli(folder, "import", "-", stdin=text), 1, *fragments)
                self.assertEqual(run_cli(folder, "ls").stdout, "old\n")  # nothing imported
        result = run_cli(folder, "import", "-", "--overwrite", stdin='{"user_id": "old", "data": {"v": 2}}\n')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(run_cli(folder, "get", "old").stdout), {"v": 2})
        self.assert_fails(run_cli(folder, "import", os.path.join(self._tmp.name, "nope.jsonl")), 1, "No such file")

    def start_cli(self, *args: str) -> subprocess.Popen[str]:
        """The command in a child that takes Ctrl-C, and whose JSON work takes a millisecond a record, so that
        Ctrl-C comes while it runs however fast the disk and however busy the machine."""
        slowed = """
            import signal, sys, time, jason
            # Ctrl-C must reach it: a shell starts a command in the background with SIGINT ignored, and
            # `make test` starts one of its two processes so (the children inherit that).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            def slowed(function):
                def slow(*args, **kwargs):
                    time.sleep(0.001)
                    return function(*args, **kwargs)
                return slow
            jason._loads, jason._dumps = slowed(jason._loads), slowed(jason._dumps)
            sys.exit(jason.main(sys.argv[1:]))
        """
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(slowed), *args], env=child_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def interrupt_when(self, process: subprocess.Popen[str], ready: Callable[[], bool]) -> tuple[int, str]:
        """Send Ctrl-C (SIGINT) once ready() holds; return the exit status and stderr."""
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not ready():
            self.assertIsNone(process.poll(), "the command ended before it could be interrupted")
            self.assertLess(time.monotonic(), deadline, "the command never got going")
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=CHILD_TIMEOUT)
        return process.returncode, stderr

    @slow
    @unittest.skipIf(sys.platform == "win32", "SIGINT")
    def test_ctrl_c_during_export_leaves_no_half_file(self) -> None:
        out = os.path.join(self._tmp.name, "interrupted.jsonl")
        process = self.start_cli(self.folder, "export", out)
        partial = f".{os.path.basename(out)}."
        status, stderr = self.interrupt_when(
            process, lambda: any(name.startswith(partial) for name in os.listdir(self._tmp.name)))
        self.assertEqual(status, 130, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertEqual(stderr.strip().splitlines()[-1], f"jason: interrupted: {out} was not written")
        self.assertEqual([name for name in os.listdir(self._tmp.name) if "interrupted" in name], [])

    @unittest.skipIf(sys.platform == "win32", "SIGINT")
    @slow
    def test_an_interrupted_import_says_how_far_it_got_and_resumes(self) -> None:
        source = os.path.join(self._tmp.name, "all.jsonl")
        self.assertEqual(run_cli(self.folder, "export", source).returncode, 0)
        folder = self.scratch()
        process = self.start_cli(folder, "import", source)
        status, stderr = self.interrupt_when(
            process, lambda: os.path.isdir(folder) and len(os.listdir(folder)) > 200)
        self.assertEqual(status, 130, stderr)
        self.assertNotIn("Traceback", stderr)
        last = stderr.strip().splitlines()[-1]
        self.assertRegex(last, rf"^jason: interrupted after importing at least \d+ of {CLI_USERS} users; "
                               "run the same command again")
        done = int(re.search(r"importing at least (\d+) of", last)[1])  # type: ignore[index]
        self.assertLessEqual(done, len(os.listdir(folder)))  # at least that many landed
        result = run_cli(folder, "import", source)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, r"imported \d+ users into .* \((\d+) already there, unchanged\)")
        self.assertEqual(read_folder(folder), self.expected)

    def test_an_import_onto_a_full_disk_reports_once_how_far_it_got(self) -> None:
        source = os.path.join(self._tmp.name, "some.jsonl")
        with open(source, "w", encoding="utf-8") as file:
            for user in range(300):
                file.write(json.dumps({"user_id": user, "data": {"n": user}}) + "\n")
        folder = self.scratch()
        result = run_child(f"""
            import errno, os, sys, threading, time, jason
            real_replace, calls, counting = os.replace, [], threading.Lock()
            def replace(source, target):  # called from several writer threads at once
                with counting:
                    calls.append(target)
                    full, slow = len(calls) > 100, len(calls) > 90
                if full:
                    raise OSError(errno.ENOSPC, "No space left on device")
                if slow:  # still under way when other threads fail: the count must wait for them
                    time.sleep(0.3)
                return real_replace(source, target)
            os.replace = replace
            sys.exit(jason.main([{folder!r}, "import", {source!r}]))
        """)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)  # no tracebacks, no logs
        self.assertRegex(result.stderr, r"imported 100 of 300 users, then user \S+ failed: .*No space left")
        self.assertEqual(len(jason_records(folder)), 100)
        result = run_cli(folder, "import", source)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("imported 200 users", result.stderr)
        self.assertIn("(100 already there, unchanged)", result.stderr)
        self.assertEqual(read_folder(folder), {str(user): {"n": user} for user in range(300)})

    def test_an_import_refuses_only_users_stored_with_other_data(self) -> None:
        folder = self.scratch()
        lines = '{"user_id": 1, "data": {"v": 1}}\n{"user_id": 2, "data": {"v": 2}}\n'
        self.assertEqual(run_cli(folder, "import", "-", stdin=lines).returncode, 0)
        again = run_cli(folder, "import", "-", stdin=lines)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("imported 0 users into", again.stderr)
        self.assertIn("(2 already there, unchanged)", again.stderr)
        self.assert_fails(run_cli(folder, "import", "-", stdin=lines.replace('"v": 2', '"v": 3')), 1,
                          "1 user already exists with other data (2)", "--overwrite")

    @slow
    def test_check_and_stats_ignore_a_live_writers_saves_in_progress(self) -> None:
        folder = self.scratch()
        os.makedirs(folder)
        leftover = os.path.join(folder, jason.TEMP_PREFIX + "f" * 16)
        with open(leftover, "wb") as file:
            file.write(b"{")
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))  # from a crash an hour ago
        log_path = os.path.join(self._tmp.name, "storm.log")
        writer = start_storm_writer(folder, log_path)
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT
            while len(jason_records(folder)) < 20:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.01)
            for _ in range(15):
                checked = run_cli(folder, "check")
                self.assertEqual(checked.returncode, 1, checked.stdout + checked.stderr)
                self.assertIn("20 sound records; 0 corrupt, 1 temp,", checked.stdout)  # only the old leftover
                self.assertIn(f"temp: {leftover}: ", checked.stdout)
                stats = run_cli(folder, "stats")
                self.assertEqual(stats.returncode, 0, stats.stderr)
                self.assertIn("users: 20\n", stats.stdout)
        finally:
            writer.kill()
            writer.wait(CHILD_TIMEOUT)

    def test_stats_counts_users_and_bytes(self) -> None:
        result = run_cli(self.folder, "stats")
        self.assertEqual(result.returncode, 0, result.stderr)
        sizes = [os.path.getsize(os.path.join(self.folder, n)) for n in os.listdir(self.folder) if n.endswith(".json")]
        self.assertIn(f"users: {CLI_USERS}\n", result.stdout)
        self.assertRegex(result.stdout, rf"records: {sum(sizes):,} bytes \(\d+\.\d [KM]B\)\n")
        self.assertIn(f"largest: {max(sizes):,} bytes", result.stdout)

    def test_a_closed_pipe_is_a_quiet_exit(self) -> None:
        env = child_env()
        command = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'jason.py'))} "
        command += f"{shlex.quote(self.folder)} ls | head -n 1"
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
        self.assertEqual(len(result.stdout.splitlines()), 1)
        self.assertEqual(result.stderr, "")




OLD_RELEASE_WRITER = """
import asyncio, json, sys, jason_db
async def main():
    db = jason_db.JASON(sys.argv[1], {"balance": 0})
    for user_id, data in json.loads(sys.argv[2]):
        assert await db.save_user_data(user_id, data)
asyncio.run(main())
"""


@slow
class CLIMistakesTest(unittest.TestCase):
    """What users get wrong on the command line: one line and an exit status, never a traceback."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jason-cli-")
        self.addCleanup(self._tmp.cleanup)
        self.folder = os.path.join(self._tmp.name, "users")
        fill_folder(self.folder, {"1": {"premium": True, "n": 1.0}, "2": {"tags": [1, True]}})

    def assert_one_line(self, result: subprocess.CompletedProcess[str], status: int = 1) -> None:
        self.assertEqual(result.returncode, status, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_copy_and_import_compare_json_exactly_not_with_python_equality(self) -> None:
        target = os.path.join(self._tmp.name, "target")
        fill_folder(target, {"1": {"premium": 1, "n": 1}, "2": {"tags": [True, 1]}})  # == in Python, not in JSON
        refused = run_cli(self.folder, "copy", target)
        self.assert_one_line(refused)
        self.assertIn("2 users already exist with other data", refused.stderr)
        self.assertEqual(run_cli(self.folder, "copy", target, "--overwrite").returncode, 0)
        self.assertEqual(read_folder(target), read_folder(self.folder))
        self.assertIs(read_folder(target)["1"]["premium"], True)
        fill_folder(target, {"1": {"premium": 1, "n": 1}})
        exported = run_cli(self.folder, "export", "-").stdout
        self.assertEqual(run_cli(target, "import", "-", "--overwrite", stdin=exported).returncode, 0)
        self.assertIs(read_folder(target)["1"]["premium"], True)
        self.assertIsInstance(read_folder(target)["1"]["n"], float)

    def test_global_options_work_before_or_after_the_location(self) -> None:
        for argv in ([self.folder, "--fast", "set", "3"], ["--fast", self.folder, "set", "3"],
                     [self.folder, "--namespace", "jason", "--fast", "set", "3"]):
            with self.subTest(argv=argv):
                result = run_cli(*argv, stdin='{"v": 3}')
                self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(run_cli(self.folder, "--namespace", "jason", "ls").stdout.split(), ["1", "2", "3"])
        self.assertEqual(run_cli(self.folder, "--namespace=jason", "ls", "--count").stdout.strip(), "3")

    def test_migrate_reports_bad_input_in_one_line_and_migrates_past_a_bad_record(self) -> None:
        with open(os.path.join(self._tmp.name, "records.py"), "w", encoding="utf-8") as file:
            file.write("def add_one(record):\n    record['n'] = record.get('n', 0) + 1\n\nMIGRATIONS = [add_one]\n")
        with open(os.path.join(self.folder, "bad.json"), "w", encoding="utf-8") as file:
            file.write('{"$version": [0]}')

        def migrate(spec: str, *args: str) -> subprocess.CompletedProcess[str]:
            code = "import sys, jason; sys.exit(jason.main(sys.argv[1:]))"
            return subprocess.run([sys.executable, "-c", code, self.folder, "migrate", "--migrations", spec, *args],
                                  capture_output=True, text=True, cwd=self._tmp.name, env=child_env(),
                                  timeout=CHILD_TIMEOUT, check=False)

        for spec in ("records.MIGRATIONS", "records:add_one", "records:NOTHING", "no_such_module:MIGRATIONS"):
            with self.subTest(spec=spec):
                self.assert_one_line(migrate(spec))
        applied = migrate("records:MIGRATIONS", "--apply")
        self.assertEqual(applied.returncode, 1, applied.stderr)
        self.assertNotIn("Traceback", applied.stderr)
        self.assertIn("failed: user bad", applied.stderr)
        self.assertIn("migrated 2 users to version 1; 1 failed", applied.stdout)
        self.assertEqual(json.loads(read_bytes(os.path.join(self.folder, "2.json"))),
                         {"$version": 1, "tags": [1, True], "n": 1})

    def test_a_misspelt_url_is_refused_and_creates_no_folder(self) -> None:
        for argv in (["postgress://bot:hunter2@/db?host=/tmp", "ls"], [self.folder, "copy", "postgress://bot:hunter2@/db"]):
            with self.subTest(argv=argv):
                result = subprocess.run([sys.executable, "-c", "import sys, jason; sys.exit(jason.main(sys.argv[1:]))",
                                         *argv], capture_output=True, text=True, cwd=self._tmp.name, env=child_env(),
                                        timeout=CHILD_TIMEOUT, check=False)
                self.assert_one_line(result)
                self.assertIn("JASON knows no postgress:// location", result.stderr)
                self.assertNotIn("hunter2", result.stderr)
                self.assertEqual(sorted(os.listdir(self._tmp.name)), ["users"])


class UpgradeTest(unittest.TestCase):
    """A real jason-db 0.2.0 folder, made by the published package, upgraded with `upgrade`."""

    _tmp: ClassVar[tempfile.TemporaryDirectory[str]]
    package: ClassVar[str]

    USERS: ClassVar[list[tuple[int | str, dict[str, object]]]] = [
        (12345, {"balance": 5, "profile": {"name": "Ann", "tags": ["a"]}}),
        (-100123, {"balance": -1, "group": True}),
        ("carol", {"balance": 0}),
        ("Alice", {"balance": 7, "z": {"b": 1, "a": 2}}),
        ("BOB", {"balance": 1}),
        ("a.b", {"balance": 2}),
        ("Zoë Ünal", {"balance": 3, "text": "non-ASCII ✓"}),
    ]

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory(prefix="jason-upgrade-")
        cls.package = os.path.join(cls._tmp.name, "jason-db-0.2.0")
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", cls.package,
             "jason-db==0.2.0"],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if install.returncode != 0:
            raise unittest.SkipTest(f"jason-db 0.2.0 could not be installed from the registry: {install.stderr[-300:]}")

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tmp.cleanup()

    def make_old_folder(self) -> str:
        folder = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "users")
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # 0.2.0 needs orjson
        env["PYTHONPATH"] = self.package
        result = subprocess.run([sys.executable, "-c", OLD_RELEASE_WRITER, folder, json.dumps(self.USERS)],
                                capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env, check=False)
        if result.returncode != 0:
            self.skipTest(f"jason-db 0.2.0 does not run here: {result.stderr.strip().splitlines()[-1]}")
        with open(os.path.join(folder, "12345.json.tmp"), "wb") as file:
            file.write(b'{\n  "balance": 6,\n  "pro')  # a save 0.2.0 never finished
        with open(os.path.join(folder, "ghost.json"), "wb"):
            pass  # the empty file a crash of 0.2.0 could leave
        return folder

    def test_upgrade_then_every_user_loads_with_identical_data(self) -> None:
        folder = self.make_old_folder()
        with open(os.path.join(folder, "Alice.json"), "rb") as file:
            self.assertEqual(file.read()[:4], b'{\n  ')  # really 0.2.0's pretty, sorted output

        async def load(user_ids: list[int | str]) -> list[dict[str, object]]:
            async with JASON(folder, readonly=True) as db:
                return [await db.load_user_data(user_id) for user_id in user_ids]

        plain = [user_id for user_id, _ in self.USERS[:3]]  # numeric and lowercase: already fine
        self.assertEqual(asyncio.run(load(plain)), [data for _, data in self.USERS[:3]])

        before = sorted(os.listdir(folder))
        dry = run_cli(folder, "upgrade")
        self.assertEqual(dry.returncode, 1, dry.stderr)  # the empty file is a problem to look at
        self.assertEqual(sorted(os.listdir(folder)), before, "the dry run changed the folder")
        for old in ("Alice.json", "BOB.json", "a.b.json", "Zoë Ünal.json"):
            self.assertIn(f"would rename: {os.path.join(folder, old)} -> ", dry.stdout)
        self.assertIn("would remove: " + os.path.join(folder, "12345.json.tmp"), dry.stdout)
        self.assertIn("problem: " + os.path.join(folder, "ghost.json") + ": empty or corrupt", dry.stdout)

        applied = run_cli(folder, "upgrade", "--apply")
        self.assertEqual(applied.returncode, 1, applied.stderr)
        self.assertIn("4 renames, 1 old temp files, 1 problems: applied", applied.stdout)
        everyone = [user_id for user_id, _ in self.USERS]
        self.assertEqual(asyncio.run(load(everyone)), [data for _, data in self.USERS])
        self.assertEqual(read_bytes(os.path.join(folder, "ghost.json")), b"")  # still there, untouched
        with self.assertRaises(CorruptDataError):
            asyncio.run(load(["ghost"]))
        self.assertFalse(os.path.exists(os.path.join(folder, "12345.json.tmp")))
        ids = asyncio.run(JASON(folder, readonly=True).user_ids())
        self.assertEqual(sorted(ids), sorted([str(user_id) for user_id, _ in self.USERS] + ["ghost"]))

        again = run_cli(folder, "upgrade")
        self.assertIn("0 renames, 0 old temp files, 1 problems", again.stdout)  # the empty file is still reported
        self.assertIn("ghost.json", again.stdout)

    def test_a_running_bot_blocks_apply_and_names_that_would_clash_are_refused(self) -> None:
        folder = self.make_old_folder()
        with open(os.path.join(folder, "%41lice.json"), "w", encoding="utf-8") as file:
            file.write('{"balance": 99}')  # what this version would name Alice: the two must not merge silently
        bot = JASON(folder)
        try:
            self.assertIn("is open for writing", run_cli(folder, "upgrade", "--apply").stderr)
        finally:
            asyncio.run(bot.close())
        result = run_cli(folder, "upgrade", "--apply")
        self.assertIn("Alice.json: not renamed: %41lice.json already stands for user Alice", result.stdout)
        self.assertIn("%41lice.json: ambiguous", result.stdout)
        self.assertTrue(os.path.exists(os.path.join(folder, "Alice.json")))
        self.assertEqual(read_bytes(os.path.join(folder, "%41lice.json")), b'{"balance": 99}')


@needs(postgres_bin_dir() and shutil.which("psql"), "PostgreSQL (apt-get install postgresql)")
@slow
class PostgresTest(unittest.TestCase):
    """The documented PostgreSQL commands (docs/servers.md), run against a throwaway server on a Unix socket."""

    def test_the_readme_commands_load_the_jsonl_export_into_jsonb(self) -> None:
        with open(os.path.join(HERE, "docs", "servers.md"), encoding="utf-8") as file:
            (sql,) = re.findall(r"```sql\n(.*?)```", file.read(), re.DOTALL)
        records: dict[str, dict[str, object]] = {
            key: {"odd": key, "text": "ÿ 😀 \\ \" \t", "n": [1, 2.5, None]} for key in ODD_IDS}
        records["42"] = {"challenge_balance": 7, "nested": {"a": {"b": []}}}
        with tempfile.TemporaryDirectory(prefix="jason-pg-") as work:
            os.chmod(work, 0o755)
            folder, export = os.path.join(work, "users"), os.path.join(work, "users.jsonl")
            fill_folder(folder, records)
            self.assertEqual(run_cli(folder, "export", export).returncode, 0)
            with self.postgres(work) as psql:
                script = os.path.join(work, "load.sql")
                with open(script, "w", encoding="utf-8") as file:
                    file.write(sql.replace("'users.jsonl'", f"'{export}'"))
                psql("-f", script)
                rows = psql("-At", "-c", "SELECT json_agg(json_build_array(user_id, data)) FROM users")
                loaded = {key: data for key, data in json.loads(rows)}
                self.assertEqual(loaded, records)
                query = "SELECT user_id FROM users WHERE (data->>'challenge_balance')::int > 5"
                self.assertEqual(psql("-At", "-c", query), "42\n")

    @contextlib.contextmanager
    def postgres(self, work: str) -> Iterator[Callable[..., str]]:
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None
        data, socket_dir = os.path.join(work, "pgdata"), os.path.join(work, "sock")
        os.mkdir(socket_dir)
        as_server = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # the server refuses to run as root
            import pwd
            nobody = pwd.getpwnam("nobody")
            os.chown(socket_dir, nobody.pw_uid, nobody.pw_gid)
            os.mkdir(data, 0o700)
            os.chown(data, nobody.pw_uid, nobody.pw_gid)
            as_server = ["runuser", "-u", "nobody", "--"]

        def run(*command: str) -> str:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=work)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            return result.stdout

        run(*as_server, os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C")
        pg_ctl = [*as_server, os.path.join(bin_dir, "pg_ctl"), "-D", data, "-w"]
        run(*pg_ctl, "-o", f"-c listen_addresses='' -k {socket_dir}", "-l", os.path.join(socket_dir, "log"), "start")
        try:
            yield lambda *args: run("psql", "-h", socket_dir, "-U", "postgres", "-v", "ON_ERROR_STOP=1", *args)
        finally:
            run(*pg_ctl, "-m", "fast", "stop")


TYPED_BOT = """
from typing import Any, TypedDict

from typing_extensions import assert_type

from jason import JASON


class UserRecord(TypedDict):
    balance: int


async def handler(db: JASON[UserRecord], untyped: JASON) -> None:
    assert_type(await db.load_user_data(1), UserRecord)
    assert_type(await untyped.load_user_data(1), dict[str, Any])
    async with db.edit_user_data(1) as user:
        user["balance"] = "lots"  # type: ignore[typeddict-item]
"""


@unittest.skipIf(OPTIONAL_PACKAGES_BLOCKED, "builds once, in the run with the optional packages")
@slow
class PackagingTest(unittest.TestCase):
    """pip install . and .[fast] from a clean virtualenv (needs the package registry for the build tools)."""

    def test_the_wheel_holds_jason_py_as_a_typed_package_and_installs_a_working_command(self) -> None:
        with tempfile.TemporaryDirectory(prefix="jason-wheel-") as work:
            source, dist, venv = (os.path.join(work, name) for name in ("source", "dist", "venv"))
            os.mkdir(source)
            for name in ("jason.py", "setup.py", "pyproject.toml", "README.md", "LICENSE"):
                shutil.copy(os.path.join(HERE, name), source)

            def run(*command: str) -> str:
                env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
                result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                return result.stdout

            run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, source)
            (wheel,) = os.listdir(dist)
            with zipfile.ZipFile(os.path.join(dist, wheel)) as archive:
                names = archive.namelist()
            self.assertEqual(sorted(name for name in names if ".dist-info/" not in name),
                             ["jason/__init__.py", "jason/__main__.py", "jason/py.typed"])
            with zipfile.ZipFile(os.path.join(dist, wheel)) as archive:
                self.assertEqual(archive.read("jason/__init__.py"), read_bytes(os.path.join(HERE, "jason.py")))

            run(sys.executable, "-m", "venv", venv)
            bin_dir = os.path.join(venv, "Scripts" if sys.platform == "win32" else "bin")
            python = os.path.join(bin_dir, "python")
            run(python, "-m", "pip", "install", "--quiet", os.path.join(dist, wheel))
            self.assertEqual(run(os.path.join(bin_dir, "jason"), "--version").strip(), f"jason {jason.__version__}")
            self.assertIn("orjson off, aiofiles off", run(python, "-m", "jason", "--selftest"))

            run(python, "-m", "pip", "install", "--quiet", f"{os.path.join(dist, wheel)}[fast]")
            self.assertIn("orjson on, aiofiles off", run(os.path.join(bin_dir, "jason"), "--selftest"))

            # PEP 561: mypy reads the installed package's own types (no "missing library stubs").
            run(python, "-m", "pip", "install", "--quiet", "-r", os.path.join(HERE, "requirements-lint.txt"))
            with open(os.path.join(work, "bot.py"), "w", encoding="utf-8") as file:
                file.write(TYPED_BOT)
            run(python, "-m", "mypy", "--strict", "--warn-unused-ignores", os.path.join(work, "bot.py"))


class SuiteTest(unittest.TestCase):
    """The suite itself: its children run in the same mode, and the README cites real tests."""

    def test_children_see_the_same_optional_packages_as_the_suite(self) -> None:
        probe = """
            try:
                import orjson
                print("importable")
            except ImportError:
                print("blocked or missing")
        """
        try:
            import orjson  # noqa: F401

            here = "importable"
        except ImportError:
            here = "blocked or missing"
        self.assertEqual(run_child(probe).stdout.strip(), here)
        self.assertEqual(jason.HAVE_ORJSON, here == "importable")

    def test_every_test_the_readme_cites_exists(self) -> None:
        """The README and docs/: in test_jason.py, or (the framework tests) in examples/test_examples.py."""
        readme = ""
        for path in [os.path.join(HERE, "README.md"), *sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))]:
            with open(path, encoding="utf-8") as file:
                readme += file.read()
        cited = set(re.findall(r"`([A-Z]\w+Test)(?:\.(test_\w+))?`", readme))
        self.assertGreater(len(cited), 40)
        # The examples' tests are read, not imported: importing them imports the frameworks (seconds).
        with open(os.path.join(HERE, "examples", "test_examples.py"), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        example_classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

        def example_methods(name: str) -> set[str]:
            node = example_classes[name]
            own = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
            bases = [base.id for base in node.bases if isinstance(base, ast.Name) and base.id in example_classes]
            return own.union(*(example_methods(base) for base in bases))

        for class_name, method in sorted(cited):
            with self.subTest(test=f"{class_name}.{method}"):
                if class_name in globals():
                    self.assertTrue(not method or hasattr(globals()[class_name], method),
                                    f"the README cites {class_name}.{method}")
                else:
                    self.assertIn(class_name, sorted(example_classes),
                                  f"the README cites {class_name}, which does not exist")
                    if method:
                        self.assertIn(method, example_methods(class_name), f"the README cites {class_name}.{method}")


# ---------------------------------------------------------------- how the suite runs
#
# `make test` runs the suite in two processes at once, one per core of the machines this project is
# built on. Each loads every test class and, when it reaches one, claims it by creating a file named
# after it in JASON_CLAIMS: the first to create it runs the class, the other passes it by. So the
# work is shared as it goes, and the heaviest classes are reached first.
HEAVY_FIRST = ("RedisServerTest", "PostgresServerTest", "SyscallTest", "ProcessesTest", "CLITest",
               "MigrateCommandTest", "PackagingTest", "UpgradeTest", "JournalTest", "PostgresTest")

# `make test-stdlib` runs again with orjson blocked. Only the JSON codec changes with it, so that pass
# runs the codec's own checks (parity with orjson, byte for byte and error for error) and the folder
# API and command line that go through it, not every server and framework test a second time.
STDLIB_PASS = {"StdlibParityTest", "ConstructionTest", "LoadTest", "SaveTest", "EditTest", "DeleteTest",
               "UserIdMappingTest", "CorruptionTest", "QuarantineTest", "BadInputSweepTest", "CacheTest",
               "ConcurrencyTest", "UsersTest", "MigrationTest", "JournalTest", "CLITest", "CLIMistakesTest",
               "SuiteTest"}


# Classes that import a framework (seconds for aiogram): claimed as one, so only one process imports it.
CLAIMED_TOGETHER = {"AiogramStorageTest": "frameworks", "PTBPersistenceTest": "frameworks",
                    "SharedLocationTest": "frameworks"}


class _ClaimedSuite(unittest.TestSuite):
    """One test class's tests, run by the process that claims the class first (see JASON_CLAIMS)."""

    def __init__(self, name: str, tests: unittest.TestSuite) -> None:
        super().__init__(tests)
        self.name = name

    def run(self, result: unittest.TestResult, debug: bool = False) -> unittest.TestResult:
        claims = os.environ.get("JASON_CLAIMS")
        if claims:
            short = self.name.rsplit(".", 1)[-1]
            claim = os.path.join(claims, CLAIMED_TOGETHER.get(short, self.name))
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            except FileExistsError:
                with open(claim) as file:
                    if file.read() != str(os.getpid()):
                        return result  # the other process runs it
        return super().run(result, debug)


def claimed(tests: unittest.TestSuite, keep: Callable[[str], bool] = lambda name: True) -> unittest.TestSuite:
    """tests, one _ClaimedSuite per test class, the heaviest first; only the classes keep() accepts."""
    by_class: dict[str, list[unittest.TestCase]] = {}

    def collect(suite: unittest.TestSuite | unittest.TestCase) -> None:
        if isinstance(suite, unittest.TestSuite):
            for test in suite:
                collect(test)
        else:
            by_class.setdefault(f"{type(suite).__module__}.{type(suite).__qualname__}", []).append(suite)

    collect(tests)
    def rank(name: str) -> int:
        short = name.rsplit(".", 1)[-1]
        return HEAVY_FIRST.index(short) if short in HEAVY_FIRST else len(HEAVY_FIRST)

    order = sorted(by_class, key=rank)  # stable: the rest keep the order they are defined in
    return unittest.TestSuite(_ClaimedSuite(name, unittest.TestSuite(by_class[name]))
                              for name in order if keep(name.rsplit(".", 1)[-1]))


def load_tests(loader: unittest.TestLoader, tests: unittest.TestSuite, pattern: str | None) -> unittest.TestSuite:
    return claimed(tests, (lambda name: name in STDLIB_PASS) if OPTIONAL_PACKAGES_BLOCKED else lambda name: True)


if __name__ == "__main__":
    unittest.main()
