#!/usr/bin/env python3
"""JASON: a small async database that keeps each user's data as one JSON file.

Made for chatbots and app MVPs: name a folder and a default structure, then
load and save one user's dict at a time. No server, no schema, no setup::

    from jason import JASON

    db = JASON("data/users", default_structure={"balance": 0, "history": []})
    data = await db.load_user_data(12345)
    data["balance"] += 1
    await db.save_user_data(12345, data)

Guarantees: a save is atomic (a unique temp file, fsync, os.replace, folder
fsync; or, with journal=True, an entry in the folder's journal that one
fdatasync makes durable together with every save waiting), so a record is
always the old or the new version, never a mix; a
corrupt record raises CorruptDataError and is never overwritten with defaults;
no user id can name a file outside the folder, and two ids never share a file;
operations on one user are serialised, so no update is lost; every load
returns a fresh deep copy; a second writer process is refused.

Limits: one writer process per folder; each save rewrites that user's whole
record; no queries across users; records are meant to be small (kilobytes).
The standard library is enough; orjson, when installed, makes JSON faster.

When the bot outgrows one machine, give a URL instead of the folder:
JASON("postgresql://...") or JASON("redis://...") keeps the same records, with
the same API and checks, on a server that many processes share (asyncpg or
redis-py, imported only then); `python jason.py FOLDER copy URL` moves them.

A bot framework's own state can live in a JASON of its own too:
jason.AiogramStorage(db) is aiogram 3's FSM storage and
jason.PTBPersistence(db) python-telegram-bot's persistence; each imports its
framework on first use.
"""

from __future__ import annotations

__all__ = [
    "JASON",
    "SyncJASON",
    "JasonError",
    "InvalidUserIdError",
    "CorruptDataError",
    "DatabaseLockedError",
    "ReadOnlyError",
]
__version__ = "1.0.0"

import asyncio
import concurrent.futures
import contextlib
import contextvars
import errno
import functools
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Final, Generic, Literal, NoReturn, Optional, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterator,
        Awaitable,
        Coroutine,
        Generator,
        Iterable,
        Iterator,
        Sequence,
    )

    from typing_extensions import TypeVar as TypeVarWithDefault

    # The type of a record: a TypedDict for JASON[UserRecord], dict[str, Any] when not given
    # (a type parameter default, PEP 696; type checkers read it from typing_extensions).
    Record = TypeVarWithDefault("Record", bound=Mapping[str, object], default=dict[str, Any])
else:
    Record = TypeVar("Record")

# ---------------------------------------------------------------- optional packages

try:
    import orjson

    HAVE_ORJSON = True
except ImportError:
    HAVE_ORJSON = False

# aiofiles is detected and reported, but not imported, since JASON's I/O does
# not go through it: each aiofiles call is its own thread hop, and a cold load
# through it (open, read, close) measured twice as slow as one hop for the read.
HAVE_AIOFILES = importlib.util.find_spec("aiofiles") is not None

# The framework adapters are made on first use (see __getattr__), and making one imports its
# framework: they are public names where the framework is installed, so `from jason import *`
# works everywhere. find_spec looks for a package without importing it.
__all__ += [name for name, framework in (("AiogramStorage", "aiogram"), ("PTBPersistence", "telegram"),
                                         ("TelebotStateStorage", "telebot"), ("AsyncTelebotStateStorage", "telebot"))
            if importlib.util.find_spec(framework) is not None]

if sys.platform == "win32":  # Windows: byte-range locks
    import msvcrt
else:  # POSIX: flock, whose lock dies with the process
    import fcntl

# ---------------------------------------------------------------- constants

RECORD_SUFFIX: Final = ".json"
LOCK_FILE_NAME: Final = ".jason.lock"
TEMP_PREFIX: Final = ".jason-tmp-"
# journal=True: the writer's saves, appended here and written to the records at each checkpoint.
JOURNAL_NAME: Final = ".jason-journal"
JOURNAL_CHECKPOINTING_NAME: Final = ".jason-journal-checkpoint"  # the journal a checkpoint is applying
# Records a framework adapter keeps are marked as its own (see JASON._ready): in a folder, this file;
# on PostgreSQL, the table's comment; on Redis, the key "<namespace>:owner". Each holds OWNER_MARK + name.
OWNER_FILE_NAME: Final = ".jason-owner"
OWNER_MARK: Final = "JASON records of "
# A checkpoint starts this long after the first save into an empty journal, or once the journal is
# this big: the most a record's file lags its latest save, and the most a replay after a crash reads.
JOURNAL_CHECKPOINT_SECONDS: Final = 1.0
JOURNAL_CHECKPOINT_BYTES: Final = 16 << 20
JOURNAL_PREALLOCATED_BYTES: Final = JOURNAL_CHECKPOINT_BYTES + (1 << 20)
# A quarantined record is renamed <name>.corrupt-<UTC time>-<random>: it no
# longer ends in .json, so it is never listed or loaded, and JASON never deletes it.
QUARANTINE_MARK: Final = ".corrupt-"
CORRUPT_POLICIES: Final = ("raise", "quarantine")
# Most file systems (ext4, APFS, NTFS) cap one name at 255 bytes.
MAX_FILE_NAME_BYTES: Final = 255
# orjson refuses to write deeper than 254 levels and the stdlib recurses once
# per level; one limit, well inside both, keeps the two codecs equal.
MAX_DEPTH: Final = 128
# The integers orjson can write and read back exactly; both codecs use it.
MIN_INT: Final = -(2**63)
MAX_INT: Final = 2**64 - 1
# 10,000 users of ~1 KB take about 10 MB: the whole user base of a typical bot.
DEFAULT_CACHE_SIZE: Final = 10_000
# Where a record's version lives when the database declares migrations: a key
# of the record itself, so the file stays plain JSON. JASON reserves it: loads
# take it out, saves put it in, and data that holds it is refused.
VERSION_KEY: Final = "$version"
# How many records users() reads at once.
USERS_CONCURRENCY: Final = 32
# How many records a tool moves at once (check, stats, export, import, copy, migrate): one thread hop
# or server round trip reads a batch, and the saves of a batch overlap their fsyncs.
RECORDS_PER_BATCH: Final = 256
BATCH_WRITE_THREADS: Final = 16  # the threads a folder's batch write is shared among (see _FolderStore.write_many)
# Blocking I/O runs in a pool of its own. A durable save spends most of its
# time waiting in fsync, and the file system commits concurrent fsyncs
# together, so more waiting threads mean more saves a second: with 100
# clients, 64 threads gave about twice the durable saves of asyncio's default
# pool (6 threads on 2 cores). Idle threads cost no CPU.
IO_THREADS: Final = 64
# A checkpoint's writes at once, in a pool of their own. Few: their Python competes with the event loop
# for the interpreter (8 gave the chat mix a p99 of 19-23 ms here, 2 gave 14-22 ms).
CHECKPOINT_THREADS: Final = 2
# An antivirus or indexer holds a file for a few milliseconds; retrying for
# about a second outlasts it without hanging a save forever.
REPLACE_RETRY_DELAYS: Final = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
# Windows: access denied, sharing violation, lock violation.
_WINDOWS_BUSY_ERRORS: Final = frozenset({5, 32, 33})

_O_BINARY: Final = getattr(os, "O_BINARY", 0)  # Windows only; no newline translation
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)  # keep lock and data fds out of children
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)  # never follow a record out of its folder
_O_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)  # a FIFO named like a record must not hang a load

_log = logging.getLogger("jason")

# ---------------------------------------------------------------- errors


class JasonError(Exception):
    """Base class of every error that JASON raises itself."""


class InvalidUserIdError(JasonError, ValueError):
    """A user id that cannot name a record: empty, or too long for a file name."""

    def __init__(self, user_id: object, reason: str) -> None:
        super().__init__(user_id, reason)
        self.user_id = user_id
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid user id {self.user_id!r}: {self.reason}"


class CorruptDataError(JasonError):
    """A record that is not a UTF-8 JSON object. The file is left untouched."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"corrupt record {self.path}: {self.reason}. JASON left the file as it is; "
            "repair it by hand or restore it from a backup"
        )


class DatabaseLockedError(JasonError):
    """Another process, or a forked parent, holds the folder's writer lock."""

    def __init__(self, folder: str, holder: str) -> None:
        super().__init__(folder, holder)
        self.folder = folder
        self.holder = holder

    def __str__(self) -> str:
        return (
            f"{self.folder} is open for writing by {self.holder}; stop that process "
            "first, or open the folder with readonly=True to read beside it"
        )


class ReadOnlyError(JasonError):
    """A write was asked of an instance opened with readonly=True."""

    def __init__(self, folder: str, operation: str) -> None:
        super().__init__(folder, operation)
        self.folder = folder
        self.operation = operation

    def __str__(self) -> str:
        return (
            f"{self.operation} refused: {self.folder} was opened with readonly=True; "
            "open it without readonly to write"
        )


# ---------------------------------------------------------------- serialisation
#
# Both codecs store the same values and refuse the same ones, because every
# value is checked here first, in one place:
#
#   value                               stored as / raises
#   dict (str keys), list, str, bool,   JSON, UTF-8, non-ASCII kept readable
#     None, int, float
#   subclasses of dict, list, str, int  their base type (an IntEnum as its int)
#   non-str dict keys                   TypeError (json would turn 1 into "1")
#   tuple, set, bytes, datetime, other  TypeError (orjson would store some)
#   float subclasses                    TypeError (orjson refuses them)
#   NaN, Infinity                       ValueError (orjson would write null)
#   int outside [-2**63, 2**64-1]       ValueError (orjson cannot store it)
#   str with a lone surrogate           ValueError (not encodable as UTF-8)
#   nesting deeper than MAX_DEPTH       ValueError (not a RecursionError)
#
# Files are byte-identical across codecs except for the spelling of some
# floats (orjson writes 1e-5 where json writes 1e-05); they parse equal.

class _Unstorable(Exception):
    """Raised inside the value check; carries the path to the bad value."""

    def __init__(self, error_type: type[Exception], message: str) -> None:
        super().__init__(error_type, message)
        self.error_type = error_type
        self.message = message
        self.path: list[str] = []


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Unstorable(ValueError, "a str with a lone surrogate is not valid UTF-8") from None


def _checked_key(key: object) -> str:
    if type(key) is not str:
        if not isinstance(key, str):
            raise _Unstorable(TypeError, f"dict keys must be str, not {type(key).__name__} {key!r}")
        key = str.__str__(key)
    _check_text(key)
    return key


def _storable_value(value: object, depth: int) -> object:
    """value as it will be serialised, checked; raises _Unstorable.

    A subclass of dict, list, str or int becomes its base type, read through
    the base type's own methods: orjson reads a dict's or an int's storage,
    not an overridden items() or comparison, so the check must look at what
    is really written, and both codecs must be given the same plain value.
    Plain values come back as the same objects, so the common case copies
    nothing.
    """
    cls = type(value)
    if cls is str:
        _check_text(value)  # type: ignore[arg-type]
        return value
    if cls is bool or value is None:
        return value
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _Unstorable(ValueError, f"{value!r} is not valid JSON")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        number = value if cls is int else int.__int__(value)
        if not MIN_INT <= number <= MAX_INT:
            raise _Unstorable(ValueError, "integers must fit in 64 bits")
        return number
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise _Unstorable(ValueError, f"nested deeper than {MAX_DEPTH} levels")
        pairs: list[tuple[str, object]] | None = None if cls is dict else []  # made once something changes
        for index, (key, item) in enumerate(dict.items(value)):
            plain_key = key if type(key) is str and key.isascii() else _checked_key(key)
            plain_item = _storable_item(item, depth + 1, plain_key)
            if pairs is None and (plain_key is not key or plain_item is not item):
                pairs = list(dict.items(value))[:index]  # the ones before it, unchanged
            if pairs is not None:
                pairs.append((plain_key, plain_item))
        return value if pairs is None else dict(pairs)
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            raise _Unstorable(ValueError, f"nested deeper than {MAX_DEPTH} levels")
        items: list[object] | None = None if cls is list else []  # as pairs above
        for index, item in enumerate(list.__iter__(value)):
            plain_item = _storable_item(item, depth + 1, index)
            if items is None and plain_item is not item:
                items = list(list.__iter__(value))[:index]
            if items is not None:
                items.append(plain_item)
        return value if items is None else items
    if isinstance(value, str):
        text = str.__str__(value)
        _check_text(text)
        return text
    raise _Unstorable(
        TypeError,
        f"{type(value).__name__} is not JSON; use dict, list, str, int, float, bool or None",
    )


def _storable_item(item: object, depth: int, label: str | int) -> object:
    """_storable_value of a dict's or a list's item, labelled in the error's path.

    The common plain values are checked here, inline: a call of
    _storable_value for each costs most of a save's check.
    """
    kind = type(item)
    if ((kind is str and item.isascii()) or kind is bool or item is None  # type: ignore[attr-defined]
            or (kind is int and MIN_INT <= item <= MAX_INT)  # type: ignore[operator]
            or (kind is float and math.isfinite(item))):  # type: ignore[arg-type]
        return item
    try:
        return _storable_value(item, depth)
    except _Unstorable as exc:
        exc.path.append(f"[{label!r}]")
        raise


def _check_storable(data: Mapping[str, Any], name: str = "data") -> dict[str, Any]:
    """data as a plain dict that both codecs write alike.

    Raises TypeError or ValueError naming the bad value's place (under name)
    if data cannot round-trip.
    """
    try:
        return _storable_value(data, 0)  # type: ignore[return-value]
    except _Unstorable as exc:
        where = name + "".join(reversed(exc.path))
        raise exc.error_type(f"cannot store {where}: {exc.message}") from None


def _dumps_stdlib(data: Mapping[str, Any], pretty: bool = False) -> bytes:
    if pretty:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, indent=2)
    else:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float_stdlib(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # orjson refuses 1e400 too
        raise ValueError(f"number {text} is too large")
    return value


def _parse_int_stdlib(text: str) -> int | float:
    value = int(text)
    if MIN_INT <= value <= MAX_INT:
        return value
    return _parse_float_stdlib(text)  # orjson reads such an integer as a float


def _find_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return not value.isascii() and any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, dict):
        return any(_find_lone_surrogate(k) or _find_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_find_lone_surrogate(item) for item in value)
    return False


def _parse_int_storable(text: str) -> int:
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise ValueError(f"integer {text} does not fit in 64 bits, so it cannot be stored")
    return value


def _loads_stdlib(raw: bytes, parse_int: Callable[[str], int | float] = _parse_int_stdlib) -> Any:
    """Parse JSON as strictly as orjson does: UTF-8 only, no NaN, no lone surrogates."""
    try:
        value = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_parse_float_stdlib,
            parse_int=parse_int,
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if b"\\u" in raw and _find_lone_surrogate(value):  # only escapes can spell one
        raise ValueError("a lone surrogate escape is not valid UTF-8 text")
    return value


if HAVE_ORJSON:

    def _dumps_orjson(data: Mapping[str, Any], pretty: bool = False) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 if pretty else 0)

    def _loads_orjson(raw: bytes) -> Any:
        return orjson.loads(raw)

    _dumps = _dumps_orjson
    _loads = _loads_orjson
else:
    _dumps = _dumps_stdlib
    _loads = _loads_stdlib


def _loads_input(raw: bytes) -> Any:
    """Parse JSON given to the command line, refusing what a save would refuse.

    Both codecs read an integer beyond 64 bits as a float; for input that
    would silently change the number, so such input is refused instead.
    """
    return _loads_stdlib(raw, parse_int=_parse_int_storable)


def _encode_record(data: Mapping[str, Any], pretty: bool, name: str = "data") -> tuple[bytes, bytes]:
    """Check data and return (compact bytes for the cache, bytes for the file)."""
    plain = _check_storable(data, name)
    # orjson's result keeps a buffer about four times its length; an exact copy
    # is what the cache should hold.
    compact = bytes(memoryview(_dumps(plain)))
    stored = _dumps(plain, True) + b"\n" if pretty else compact
    return compact, stored


def _parse_record(raw: bytes, path: str) -> dict[str, Any]:
    try:
        value = _loads(raw)
    except ValueError as exc:  # both codecs' decode errors, and UnicodeDecodeError
        reason = "the file is empty" if not raw.strip() else f"not valid JSON ({exc})"
        raise CorruptDataError(path, reason) from exc
    if not isinstance(value, dict):
        raise CorruptDataError(path, f"holds a JSON {type(value).__name__}, not an object")
    return value


def _copy_json(value: Any) -> Any:
    """Deep copy of a checked JSON value, several times faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def _merge_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Add every key of defaults missing from data, recursing into dicts; never overwrite."""
    for key, default in defaults.items():
        if key not in data:
            data[key] = _copy_json(default)
        elif isinstance(default, dict) and isinstance(data[key], dict):
            _merge_defaults(data[key], default)


# ---------------------------------------------------------------- user id <-> file name
#
# Percent-encoding (RFC 3986) of the id's UTF-8 bytes, with lowercase hex:
# a-z, 0-9, "-" and "_" stand for themselves and every other character
# becomes %xx. So "12345" -> 12345.json, "Alice" -> %41lice.json, "a.b" ->
# a%2eb.json. A name never holds a capital letter or a non-ASCII character,
# so ids that differ only in case or in Unicode normalisation still get
# different files on macOS and Windows; never a "/", "\", "." or space, so no
# name can leave the folder, be hidden, or end in a dot or space; and a
# Windows device name (con, nul, com1...) gets its first letter escaped.

_PLAIN_ID: Final = re.compile(r"[a-z0-9_-]+")
_WINDOWS_DEVICE: Final = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])")
_ESCAPE: Final = re.compile(rb"%([0-9a-f]{2})")


def _user_key(user_id: object) -> str:
    """The canonical str form of an id: 5 and "5" are the same user."""
    if isinstance(user_id, str):
        key = str.__str__(user_id)
    elif isinstance(user_id, int) and not isinstance(user_id, bool):
        key = int.__repr__(user_id)
    else:
        raise TypeError(f"user id must be int or str, not {type(user_id).__name__}")
    if not key:
        raise InvalidUserIdError(user_id, "it is empty")
    return key


def _escape_char(char: str) -> str:
    return "".join(f"%{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))


def _file_name(key: str) -> str:
    """The record's file name for a canonical id; raises InvalidUserIdError if too long."""
    if _PLAIN_ID.fullmatch(key):
        stem = key
    else:
        stem = "".join(ch if _PLAIN_ID.fullmatch(ch) else _escape_char(ch) for ch in key)
    if _WINDOWS_DEVICE.fullmatch(stem):
        stem = _escape_char(stem[0]) + stem[1:]
    name = stem + RECORD_SUFFIX
    if len(name) > MAX_FILE_NAME_BYTES:
        raise InvalidUserIdError(
            key, f"its file name would be {len(name)} bytes, over the {MAX_FILE_NAME_BYTES}-byte limit"
        )
    return name


def _user_key_from_file_name(name: str) -> str | None:
    """The id a file name stands for, or None when it is not a record JASON wrote."""
    if not name.endswith(RECORD_SUFFIX) or not name.isascii():
        return None
    stem = name[: -len(RECORD_SUFFIX)].encode("ascii")
    try:
        key = _ESCAPE.sub(lambda m: bytes.fromhex(m[1].decode()), stem).decode("utf-8", "surrogatepass")
        # Only the one canonical spelling counts: "%61.json" is not user "a".
        return key if key and _file_name(key) == name else None
    except (UnicodeDecodeError, InvalidUserIdError):
        return None


# ---------------------------------------------------------------- blocking file helpers


def _open_regular_file_sync(path: str, refuse: Callable[[str], Exception]) -> tuple[int, os.stat_result] | None:
    """(fd, its stat) of path opened for reading, or None when it does not exist; refuse(why) for a link or a non-file.

    Non-blocking: a FIFO planted under a record's or a journal's name must not hang the open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse("it is a symbolic link, which JASON never follows") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise refuse("it is not a regular file")
    return fd, info


def _read_record_sync(path: str) -> bytes | None:
    """The file's bytes, or None when there is no record. Refuses symlinks and non-files."""
    opened = _open_regular_file_sync(path, functools.partial(CorruptDataError, path))
    if opened is None:
        return None
    fd, info = opened
    try:
        chunks: list[bytes] = []
        while True:  # until end of file: os.read may return less than asked
            chunk = os.read(fd, info.st_size + 1)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _quarantine_sync(folder: str, name: str, durable: bool) -> str:
    """Move a corrupt record aside, to a name never listed as a user; return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = f"{QUARANTINE_MARK}{stamp}-{secrets.token_hex(3)}"
    target = os.path.join(folder, name[: MAX_FILE_NAME_BYTES - len(suffix)] + suffix)
    os.rename(os.path.join(folder, name), target)
    if durable:
        _fsync_dir(folder)
    return target


def _is_record_sync(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _write_all_sync(fd: int, data: bytes) -> None:
    """Write every byte: os.write may store only part of them (a short write)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write stored no bytes")
        view = view[written:]


def _fsync_file(fd: int) -> None:
    if sys.platform == "darwin":  # macOS: plain fsync stops at the drive's cache
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # a file system without F_FULLFSYNC (some network ones): fsync is all there is
    os.fsync(fd)


def _fsync_dir(folder: str) -> None:
    """Make a rename or unlink in folder durable: without it, a power cut can undo it."""
    if sys.platform == "win32":  # Windows: folders cannot be opened; NTFS journals renames
        return
    fd = os.open(folder, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_sync(source: str, target: str) -> None:
    """os.replace, retried briefly while another program has the target open (Windows)."""
    for delay in REPLACE_RETRY_DELAYS:
        try:
            os.replace(source, target)
            return
        except PermissionError as exc:
            if getattr(exc, "winerror", None) not in _WINDOWS_BUSY_ERRORS:
                raise
        time.sleep(delay)
    os.replace(source, target)


def _record_mode_sync(path: str) -> int | None:
    """The permission bits to give a record's new version: the old version's, on POSIX.

    A save replaces the file, so without this a record chmod 600 by its owner
    would come back 644. None (a new record, or Windows): the umask decides.
    """
    if not hasattr(os, "fchmod"):  # Windows: no permission bits to keep
        return None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None


def _make_folder_sync(folder: str, durable: bool) -> None:
    """Create folder and its missing parents; when durable, make each new entry survive a power cut."""
    missing = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    os.makedirs(folder, exist_ok=True)
    if durable:
        # A new folder is an entry in its parent: until the parent is
        # fsynced, a power cut can lose the folder and every record in it.
        for created in missing:
            _fsync_dir(created)
            _fsync_dir(os.path.dirname(created))


def _write_atomic_sync(
    folder: str, name: str, data: bytes, durable: bool, folder_sync: _GroupSync | None = None,
    sync_folder: bool = True,
) -> None:
    """Replace folder/name with data so that a crash leaves the old or the new file, whole.

    When durable, the file is fsynced before the rename and the folder after
    it (unless sync_folder is False, when the caller does), through
    folder_sync when given (shared between concurrent saves).
    """
    path = os.path.join(folder, name)
    mode = _record_mode_sync(path)
    temp_path = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(8))
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC, 0o666)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all_sync(fd, data)
            if durable:
                # If this fails, never rename: the kernel may have dropped the
                # pages, and a retry must write a new file from memory.
                _fsync_file(fd)
        finally:
            os.close(fd)
        _replace_sync(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to report
            os.unlink(temp_path)
        raise
    if durable and sync_folder:
        if folder_sync is None:
            _fsync_dir(folder)
        else:
            folder_sync.sync_after_change()


def _write_many_sync(folder: str, records: Sequence[tuple[str, bytes]], durable: bool,
                     folder_sync: _GroupSync | None) -> None:
    """Write each (name, data) atomically, in order; when durable, sync the folder once, after the last.

    When one fails, those renamed before it are synced too: a caller told how
    far the batch got can rely on that much.
    """
    try:
        for name, data in records:
            _write_atomic_sync(folder, name, data, durable, sync_folder=False)
    finally:
        if durable:
            if folder_sync is None:
                _fsync_dir(folder)
            else:
                folder_sync.sync_after_change()


class _GroupSync:
    """One sync call shared by the writes that finish together (a group commit).

    A write (a rename in a folder, an append to the journal) is durable once a
    sync that started after it has completed. So a writer waits for the sync
    in progress, if any, and then either finds that a later one covered it or
    runs the next one itself, covering every write announced by then. Under
    load, one sync serves many writes; alone, a write pays for exactly one.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._changed = threading.Condition()
        self._renames = 0  # renames announced
        self._covered = 0  # renames that a completed folder fsync covers
        self._running = False

    def sync_after_change(self) -> None:
        with self._changed:
            self._renames += 1
            mine = self._renames
            while self._covered < mine:
                if not self._running:
                    self._running = True
                    covers = self._renames
                    break
                self._changed.wait()
            else:
                return  # a folder fsync that started after our rename has completed
        try:
            self._sync()
        except BaseException:
            with self._changed:  # a waiter covered by this attempt will try again itself
                self._running = False
                self._changed.notify_all()
            raise
        with self._changed:
            self._covered = max(self._covered, covers)
            self._running = False
            self._changed.notify_all()


def _delete_sync(folder: str, name: str, durable: bool) -> bool:
    try:
        os.unlink(os.path.join(folder, name))
    except FileNotFoundError:
        return False
    if durable:
        _fsync_dir(folder)
    return True


def _list_user_keys_sync(folder: str) -> list[str]:
    keys = []
    with os.scandir(folder) as entries:
        for entry in entries:
            key = _user_key_from_file_name(entry.name)
            if key is not None and entry.is_file(follow_symlinks=False):
                keys.append(key)
    keys.sort()
    return keys


if sys.platform == "win32":  # Windows: lock the first byte; the lock dies with the handle

    def _try_lock_sync(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

else:  # POSIX: flock, not lockf, whose lock any close of the file would drop

    def _try_lock_sync(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lock_folder_sync(folder: str) -> int:
    """Take the folder's writer lock and return its fd; DatabaseLockedError if held."""
    # The lock file is never deleted: deleting it would let a second process
    # lock a new file while the first still holds the old one.
    path = os.path.join(folder, LOCK_FILE_NAME)
    try:
        # Never follow a link: the pid written below would truncate its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JasonError(f"{path} is a symbolic link, which JASON never follows; "
                             "remove it (the lock file holds only a process id)") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JasonError(f"{path} is not a regular file; remove it (the lock file holds only a process id)")
        try:
            _try_lock_sync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                raise
            raise DatabaseLockedError(folder, _lock_holder_sync(path)) from None
        if sys.platform != "win32":  # a locked byte cannot be read on Windows
            os.ftruncate(fd, 0)
            _write_all_sync(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)  # closing releases the lock too: a failed open must not keep the folder locked
        raise
    return fd


def _lock_holder_sync(path: str) -> str:
    try:
        with open(path, "rb") as file:
            pid = file.read(32).strip().decode("ascii", "replace")
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


# ---------------------------------------------------------------- the journal
#
# With journal=True a durable save is one entry appended to the folder's
# journal, made durable by an fdatasync that every save appended by then
# shares (a group commit), instead of a new file, two fsyncs and a rename
# per save. The records' files catch up at each checkpoint: the journal is
# renamed aside, every record saved since the last checkpoint is written to
# its file the ordinary durable way, and the old journal is deleted. Anyone
# who opens the folder to write replays what journals remain first, and
# readers look in them for records newer than the files.
#
# A journal file starts with a header: b"JH" and 14 random bytes, its
# generation. A reader in another process tells journals apart by it: the
# file system reuses a deleted journal's inode, so an inode names no journal.
# Entries follow: b"JE", the length of the rest (4 bytes), the CRC-32 of the
# rest (4 bytes), then the rest: kind (1 byte, 1 = save, 2 = delete), the
# key's length (2 bytes), the key (UTF-8) and the record. A torn or stray
# tail, where the CRC or the length does not match, ends the journal. A
# journal without a header (written by JASON 1.0.0) is entries from byte 0.

_JOURNAL_FILE_HEADER: Final = struct.Struct("<2s14s")
_JOURNAL_FILE_MAGIC: Final = b"JH"
_JOURNAL_HEADER: Final = struct.Struct("<2sII")
_JOURNAL_KEY: Final = struct.Struct("<BH")
_JOURNAL_MAGIC: Final = b"JE"
_SAVE, _DELETE = 1, 2

if TYPE_CHECKING:
    # What a journal holds for one key: (record,) or (None,) for a delete. A fresh
    # tuple per save, so a checkpoint can tell a save made while it ran apart.
    _Newer = tuple[Optional[bytes]]


def _journal_entry(key: str, data: bytes | None) -> bytes:
    key_bytes = key.encode("utf-8", "surrogatepass")
    rest = _JOURNAL_KEY.pack(_DELETE if data is None else _SAVE, len(key_bytes)) + key_bytes + (data or b"")
    return _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, len(rest), zlib.crc32(rest)) + rest


def _parse_journal(raw: bytes) -> tuple[list[tuple[str, bytes | None]], int]:
    """The whole entries at the start of raw, and where they end: the first bad one ends the journal."""
    entries = []
    offset = 0
    while offset + _JOURNAL_HEADER.size <= len(raw):
        magic, length, crc = _JOURNAL_HEADER.unpack_from(raw, offset)
        end = offset + _JOURNAL_HEADER.size + length
        if magic != _JOURNAL_MAGIC or end > len(raw) or length < _JOURNAL_KEY.size:
            break
        rest = raw[offset + _JOURNAL_HEADER.size:end]
        if zlib.crc32(rest) != crc:
            break
        kind, key_length = _JOURNAL_KEY.unpack_from(rest)
        key = rest[_JOURNAL_KEY.size:_JOURNAL_KEY.size + key_length].decode("utf-8", "surrogatepass")
        entries.append((key, None if kind == _DELETE else rest[_JOURNAL_KEY.size + key_length:]))
        offset = end
    return entries, offset


def _entry_may_continue(rest: bytes) -> bool:
    """True when rest, the bytes after the last whole entry, may be the start of one not read in full yet."""
    if len(rest) < _JOURNAL_HEADER.size:
        return _JOURNAL_MAGIC.startswith(rest[:2])
    magic, length, _ = _JOURNAL_HEADER.unpack_from(rest)
    return bool(magic == _JOURNAL_MAGIC and _JOURNAL_HEADER.size + length > len(rest))


def _open_journal_sync(path: str) -> int | None:
    """A journal opened for reading, or None when there is none; JasonError for a link or a non-file."""
    opened = _open_regular_file_sync(
        path, lambda why: JasonError(f"{path}: {why}, so it is no journal of JASON's; move it out of the folder"))
    return None if opened is None else opened[0]


def _journal_generation_sync(fd: int) -> tuple[bytes | None, int]:
    """The journal's generation (None without a header) and where its entries start."""
    os.lseek(fd, 0, os.SEEK_SET)
    head = os.read(fd, _JOURNAL_FILE_HEADER.size)
    if len(head) == _JOURNAL_FILE_HEADER.size and head.startswith(_JOURNAL_FILE_MAGIC):
        return head, _JOURNAL_FILE_HEADER.size
    return None, 0


def _read_journal_sync(fd: int, start: int) -> tuple[list[tuple[str, bytes | None]], int]:
    """The whole entries of an open journal from start on, and where they end.

    It reads only as far as the entries go: a journal is preallocated, and
    the zeros after its last entry end it like a torn tail.
    """
    entries: list[tuple[str, bytes | None]] = []
    os.lseek(fd, start, os.SEEK_SET)
    buffer = b""
    end = start
    while chunk := os.read(fd, 1 << 16):
        found, used = _parse_journal(buffer + chunk)
        entries += found
        buffer = (buffer + chunk)[used:]
        end += used
        if buffer and not _entry_may_continue(buffer):
            break
    return entries, end


def _journal_paths(folder: str) -> tuple[str, str]:
    """The journal being checkpointed, then the current one: the order their entries were written in."""
    return os.path.join(folder, JOURNAL_CHECKPOINTING_NAME), os.path.join(folder, JOURNAL_NAME)


def _replay_journals_sync(folder: str) -> int:
    """Write what journals a writer left (a crash, or a writer still running when it was killed) into
    the records, durably, then delete them; before anything is read. How many records it wrote."""
    latest: dict[str, bytes | None] = {}
    paths = _journal_paths(folder)
    for path in paths:
        fd = _open_journal_sync(path)
        if fd is None:
            continue
        try:
            latest.update(_read_journal_sync(fd, _journal_generation_sync(fd)[1])[0])
        finally:
            os.close(fd)
    for key, data in latest.items():
        if data is None:
            _delete_sync(folder, _file_name(key), durable=True)
        else:
            _write_atomic_sync(folder, _file_name(key), data, durable=True)
    removed = False
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed = True
    if removed:
        _fsync_dir(folder)
    return len(latest)


class _JournalFile:
    """One journal file open for appending, with the group commit of its fdatasyncs.

    It is preallocated where the system can: an fdatasync after an append that
    grows the file must also commit its new size, one after an append into
    space already allocated need not (about a fifth fewer µs a save here).
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                with contextlib.suppress(OSError):  # a file system without it: the journal grows as it goes
                    os.posix_fallocate(self.fd, 0, JOURNAL_PREALLOCATED_BYTES)
            header = _JOURNAL_FILE_HEADER.pack(_JOURNAL_FILE_MAGIC, secrets.token_bytes(14))
            _write_at_sync(self.fd, header, 0)  # durable with the first entry's fdatasync
        except BaseException:
            os.close(self.fd)
            raise
        self.size = len(header)  # where the next entry goes: the end of the last whole one
        self.holds_entries = False
        self.sync = _GroupSync(functools.partial(_fdatasync, self.fd))
        self.appending = 0  # appends not finished yet: a checkpoint waits for them before it applies
        self.idle = threading.Condition()


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), through ctypes: every file of one file system made durable in one call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


@functools.cache
def _syncfs_function() -> Callable[[int], int] | None:
    """syncfs, looked up at the first checkpoint (ctypes costs `import jason` 10 ms), or None."""
    return _load_syncfs()


def _syncfs(folder: str) -> None:
    """Make every write to folder's file system durable: the checkpoint's files and their renames."""
    syncfs = _syncfs_function()
    assert syncfs is not None
    fd = os.open(folder, os.O_RDONLY | _O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            import ctypes

            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), folder)
    finally:
        os.close(fd)


def _write_at_sync(fd: int, data: bytes, offset: int) -> None:
    """Write every byte of data at offset (os.pwrite where there is one)."""
    view = memoryview(data)
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:  # Windows
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write stored no bytes")
        view = view[written:]
        offset += written


def _fdatasync(fd: int) -> None:
    if sys.platform == "darwin" or not hasattr(os, "fdatasync"):
        _fsync_file(fd)  # macOS: F_FULLFSYNC; Windows: no fdatasync, fsync flushes the file
    else:
        os.fdatasync(fd)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def _settle_on_their_loops(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """From any thread: settle each future on its own loop (a loop closed meanwhile has no one to tell).

    One asyncio.run() may end and another begin while a journal's job runs,
    and a save of the new loop must not be settled on the closed one.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, settled, error)


class _Journal:
    """Everything the writer's journal does, in one place: commits, pending records, checkpoints, the end.

    - queue(): a save (or delete) joins the queue and becomes pending at
      once, so every later read sees it, and gets a number: its place in
      the journal. One job in the I/O pool appends everything queued with
      one write and one fdatasync, then wakes whoever waits in synced() for
      a number up to the batch's last; it takes whatever arrived meanwhile
      next. Entries become durable in journal order, so a write is never
      durable without every write queued before it.
    - unsynced() and synced(): JASON releases a user's lock once a write is
      queued, and returns to its caller once it is durable; a read that saw
      a write not yet durable returns once it is (see JASON._until_durable).
      So an edit of one user need not wait for the sync of the one before,
      and nothing a crash could undo is ever returned.
    - newer(): the records the journal holds that their files do not have
      yet (pending), which the folder store reads before the files.
    - checkpoints run in a thread of the journal's own, never in an event
      loop, so a loop that ends (asyncio.run() returning) cuts none short:
      JOURNAL_CHECKPOINT_SECONDS after the first save into an empty journal,
      or at once when it holds JOURNAL_CHECKPOINT_BYTES, the journal is
      renamed aside, the pending records are written to their files (once
      their entries are durable) and synced, and the old journal is
      deleted. Every step is recorded here as it happens, so a checkpoint
      cut short is finished by the next one.
    - a failed append or fdatasync breaks the journal: writes queued after
      it may have read what failed, so they fail too, and so does a read of
      a record that failed. Nothing more is checkpointed; the next open
      replays what the journal made durable.
    - finish_sync() and delete_if_idle(): close() checkpoints until nothing
      is pending, then deletes the empty journal, unless an instance opened
      meanwhile, which goes on using it.
    """

    def __init__(self, folder: str, folder_sync: _GroupSync) -> None:
        self.folder = folder
        self.checkpointing_path, self.path = _journal_paths(folder)
        self._folder_sync = folder_sync
        self._append_lock = threading.Lock()  # one append at a time
        self._broken: str | None = None
        self._file = _JournalFile(self.path)
        self._old: _JournalFile | None = None  # renamed aside by a checkpoint, not yet deleted
        _fsync_dir(folder)  # the journal must exist after a power cut before any save relies on it
        self._pending: dict[str, _Newer] = {}
        self._pending_lock = threading.Lock()
        # Under _registry_lock, where close() checks that nothing is queued before it deletes the journal.
        # Read without it by unsynced(), in the event loop: one dict lookup and one int, each atomic.
        self._queue: list[tuple[str, bytes | None, int]] = []
        self._queued = 0  # the number of the last write queued
        self._synced = 0  # every write up to this number is durable
        self._unsynced: dict[str, int] = {}  # key -> the number of its last write, until that one is durable
        self._waiters: list[tuple[int, bool, asyncio.Future[None]]] = []  # (write, read, its future)
        self._failed: tuple[int, int, BaseException] | None = None  # the first batch that failed, and why
        self._durable = threading.Condition()  # notified when a batch is durable or has failed
        self._commit_job: concurrent.futures.Future[None] | None = None
        self._checkpoint_lock = threading.Lock()  # one checkpoint at a time: the thread's, or close()'s
        self._due = threading.Condition()
        self._due_at: float | None = None  # when the next checkpoint starts; None: nothing to checkpoint
        self._closed = False
        threading.Thread(target=self._checkpoint_loop, name="jason-checkpoints", daemon=True).start()

    # ---- commits

    def queue(self, check: Callable[[], None], key: str, data: bytes | None) -> int:
        """Journal a save (data None: a delete) if check() passes; every read from now on sees it.

        Returns its number: the write is durable once synced(number) returns.
        """
        with _registry_lock:  # as a write's registration: refused here, or committed before close() ends
            check()
            if self._broken is not None:
                raise self._broken_error()
            self._queued += 1
            self._queue.append((key, data, self._queued))
            self._unsynced[key] = self._queued
            with self._pending_lock:
                self._pending[key] = (data,)
            if self._commit_job is None:
                self._commit_job = _io_executor().submit(self._commit_batches)
            return self._queued

    def unsynced(self, key: str | None) -> int | None:
        """The number of key's last write (None: of any key's) while it is not durable yet; else None."""
        write = self._queued if key is None else self._unsynced.get(key, 0)
        return write if write > self._synced else None

    async def synced(self, write: int, read: bool) -> None:
        """Return once write (a number from queue()) is durable; raise its error if it failed.

        read: the caller read the write rather than made it, so a failure is
        the journal's, not the caller's.
        """
        if write <= self._synced:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with _registry_lock:
            if write <= self._synced:
                return
            if self._failed is not None:  # in the batch that failed, or after it: never durable
                first, last, error = self._failed
                raise error if first <= write <= last and not read else self._broken_error()
            self._waiters.append((write, read, done))
        await done  # cancelled, it is skipped when its batch is done; the write goes on, and every read sees it

    def _wait_until_durable(self, write: int) -> bool:
        """Block until every write up to this number is durable: True; False if one failed first."""
        with self._durable:
            while self._synced < write and self._failed is None:
                self._durable.wait()
            return self._synced >= write

    @property
    def broken(self) -> str | None:
        """Why the journal failed, or None: see the class."""
        return self._broken

    def _broken_error(self) -> JasonError:
        return JasonError(f"the journal of {self.folder} failed earlier ({self._broken}); nothing more is saved. "
                          "Close this JASON and open the folder again: opening replays the journal")

    def _commit_batches(self) -> None:
        """In the I/O pool: append what is queued, sync, tell the waiters; again until nothing is queued."""
        while True:
            with _registry_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._commit_job = None
                    return
            error: BaseException | None = None
            try:
                self._append(b"".join(_journal_entry(key, data) for key, data, _ in batch))
            except BaseException as exc:
                error = exc
            last = batch[-1][2]
            with _registry_lock:
                if error is None:
                    self._synced = last
                    for key, _, write in batch:
                        if self._unsynced.get(key) == write:
                            del self._unsynced[key]
                elif self._failed is None:
                    self._failed = (batch[0][2], last, error)
                told = [(read, done) for write, read, done in self._waiters if write <= last]
                self._waiters = [waiter for waiter in self._waiters if waiter[0] > last]
            with self._durable:  # a checkpoint may wait for this batch (see _wait_until_durable)
                self._durable.notify_all()
            _settle_on_their_loops([done for read, done in told if not read], error)
            _settle_on_their_loops([done for read, done in told if read], error and self._broken_error())

    def _append(self, data: bytes) -> None:
        """Append data and make it durable; on any failure the journal is broken (see the class)."""
        with self._append_lock:
            if self._broken is not None:
                raise self._broken_error()
            journal = self._file
            try:
                _write_at_sync(journal.fd, data, journal.size)
            except BaseException as exc:  # a torn tail ends the journal there when it is replayed
                self._broken = f"an append failed: {exc}"
                raise
            journal.size += len(data)
            journal.holds_entries = True
            with journal.idle:
                journal.appending += 1
        try:
            journal.sync.sync_after_change()
        except OSError as exc:
            # After a failed fdatasync the kernel may have dropped the pages: a later one succeeding
            # would prove nothing about this entry, so no save may be reported durable any more.
            self._broken = f"fdatasync failed: {exc}"
            raise
        finally:
            with journal.idle:
                journal.appending -= 1
                journal.idle.notify_all()
        self._schedule_checkpoint(journal.size >= JOURNAL_CHECKPOINT_BYTES)

    # ---- what the journal holds that the files do not

    def newer(self, key: str) -> _Newer | None:
        with self._pending_lock:
            return self._pending.get(key)

    def newer_all(self) -> dict[str, bytes | None]:
        with self._pending_lock:
            return {key: newer[0] for key, newer in self._pending.items()}

    # ---- checkpoints

    def _schedule_checkpoint(self, now: bool) -> None:
        with self._due:
            soonest = time.monotonic() + (0 if now else JOURNAL_CHECKPOINT_SECONDS)
            if self._due_at is None or soonest < self._due_at:
                self._due_at = soonest
                self._due.notify()

    def _checkpoint_loop(self) -> None:
        """The journal's own thread: a checkpoint whenever one is due, until the journal is closed."""
        while True:
            with self._due:
                while not self._closed and (self._due_at is None or self._due_at > time.monotonic()):
                    self._due.wait(None if self._due_at is None else self._due_at - time.monotonic())
                if self._closed:
                    return
                self._due_at = None
            try:
                self.checkpoint_sync()
            except Exception as exc:  # the journal keeps every save; try again later
                _log.error("checkpoint of %s failed (%s); the journal keeps every save, and the next checkpoint "
                           "tries again", self.folder, exc)
                self._schedule_checkpoint(now=False)

    def checkpoint_sync(self) -> None:
        """Write every pending record to its file, durably, then delete the journal that held them."""
        with self._checkpoint_lock:
            if self._closed or not (self._old is not None or self._pending or self._file.holds_entries):
                return
            if self._broken is not None:  # what is pending may have failed: the next open replays the journal
                return
            if self._old is None:  # else a checkpoint cut short set one aside: finish it first
                self._rotate()
            with self._pending_lock:
                snapshot = list(self._pending.items())
            # A write is pending from its queueing, so that reads see it: the snapshot may hold some not
            # durable yet. None may reach a file before its entry is durable: a crash would then leave it
            # there while replaying an earlier write of another record, or keep a save that failed.
            if not self._wait_until_durable(self._queued):
                return  # an append failed: the next open replays what the journals made durable
            durable_each = _syncfs_function() is None  # else one syncfs makes them all durable: far cheaper
            # In threads of their own: the saves and loads under way never queue behind a checkpoint.
            # Every write ends before the checkpoint does, failed or not: one left running could land
            # an old record after the next checkpoint wrote a newer one.
            writes = [_checkpoint_executor().submit(self._apply, key, newer, durable_each) for key, newer in snapshot]
            concurrent.futures.wait(writes)
            for write in writes:
                write.result()
            if not durable_each:
                _syncfs(self.folder)
            old, self._old = self._old, None
            assert old is not None
            os.close(old.fd)
            os.unlink(self.checkpointing_path)
            _fsync_dir(self.folder)

    def _rotate(self) -> None:
        """Start a new journal for the saves to come; the old one is renamed aside for the checkpoint."""
        with self._append_lock:
            old = self._file
            os.replace(self.path, self.checkpointing_path)
            self._old = old  # recorded before anything else can fail: the next checkpoint finishes it
            try:
                self._file = _JournalFile(self.path)
                _fsync_dir(self.folder)  # the rename and the new journal, together
            except OSError as exc:
                self._broken = f"a new journal could not be started: {exc}"
                raise
        with old.idle:  # every save appended to it has finished: durable and pending, or failed
            while old.appending:
                old.idle.wait()

    def _apply(self, key: str, newer: _Newer, durable_each: bool) -> None:
        """Write one pending record to its file; durable only once the checkpoint's sync has run."""
        data = newer[0]
        if data is None:
            _delete_sync(self.folder, _file_name(key), durable_each)
        else:
            _write_atomic_sync(self.folder, _file_name(key), data, durable_each, self._folder_sync)
        with self._pending_lock:
            if self._pending.get(key) is newer:  # not saved again meanwhile; the journal still has it
                del self._pending[key]

    # ---- the end

    def finish_sync(self) -> None:
        """At close: wait for the commits under way, then checkpoint what is pending (blocking)."""
        while True:
            with _registry_lock:
                job = self._commit_job
            if job is None:
                break
            concurrent.futures.wait([job])
        if self._broken is not None:  # each write it failed has raised already; the next open replays it
            _log.warning("the journal of %s failed earlier (%s); it stays in the folder, and the next open "
                         "replays what it made durable", self.folder, self._broken)
            return
        self.checkpoint_sync()

    def delete_if_idle(self) -> bool:
        """Under _registry_lock: delete the journal if it holds nothing and nothing is queued; True if deleted."""
        with self._checkpoint_lock, self._append_lock:
            if (self._queue or self._commit_job is not None or self._pending or self._old is not None
                    or self._file.holds_entries):
                return False
            self._stop()
            os.unlink(self.path)
            _fsync_dir(self.folder)
            return True

    def abandon(self) -> None:
        """Under _registry_lock, after a failed last checkpoint: stop, and leave the journal for the next open."""
        with self._checkpoint_lock, self._append_lock:
            self._stop()
            if self._old is not None and self._old is not self._file:  # the same when no new journal could start
                os.close(self._old.fd)

    def _stop(self) -> None:
        with self._due:
            self._closed = True
            self._due.notify()
        os.close(self._file.fd)


def _sync_what_was_read(fd: int) -> None:
    """Make the entries just read from a journal durable, from the reader's side.

    The writer appends an entry, then syncs it: a reader in between would
    show a save that a power cut could still undo. A sync from here covers
    every byte written to the file so far, whoever wrote it. Where the
    system cannot sync a file opened for reading (Windows), or the folder is
    on a read-only file system (no writer there), the entries are shown as
    they are.
    """
    try:
        _fdatasync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EROFS):
            raise


class _JournalReader:
    """What the writer's journals hold, for a reader in another process: newer than the files.

    Each journal is read from where the last read stopped, as long as it is
    the same journal: the same generation, from its header (an inode is no
    name, since a deleted journal's inode is reused). The current journal is
    read before the one being checkpointed, and both before any file: a
    record moves from the current journal to the one set aside, then to its
    file, before that journal is deleted, so a reader that misses it in one
    place finds it, as new or newer, in the next. Entries are synced before
    they are returned (see _sync_what_was_read), and only then: a sync for
    every load beside a busy writer cost the reader a third of its loads.
    """

    def __init__(self, folder: str) -> None:
        self._paths = _journal_paths(folder)
        # generation -> (offset read up to, the latest entry of each key, keys read but not synced by this reader)
        self._seen: dict[bytes, tuple[int, dict[str, bytes | None], set[str]]] = {}
        self._lock = threading.Lock()

    def newer(self, key: str) -> _Newer | None:
        latest = self._newer({key})
        return (latest[key],) if key in latest else None

    def newer_all(self) -> dict[str, bytes | None]:
        """key -> the newest record (None: deleted) in the journals, as of this call (blocking)."""
        return self._newer(None)

    def _newer(self, wanted: set[str] | None) -> dict[str, bytes | None]:
        """Every key's newest record; those of wanted (None: all) durable."""
        checkpointing, current = self._paths
        with self._lock:
            seen: dict[bytes, tuple[int, dict[str, bytes | None], set[str]]] = {}
            newest = self._read(current, seen, wanted)
            merged = {**self._read(checkpointing, seen, wanted), **newest}
            self._seen = seen  # journals gone since the last call are forgotten
            return merged

    def _read(self, path: str, seen: dict[bytes, tuple[int, dict[str, bytes | None], set[str]]],
              wanted: set[str] | None) -> dict[str, bytes | None]:
        fd = _open_journal_sync(path)
        if fd is None:
            return {}
        try:
            generation, start = _journal_generation_sync(fd)
            offset, latest, unsynced = self._seen.get(generation, (start, {}, set())) if generation is not None \
                else (start, {}, set())
            entries, end = _read_journal_sync(fd, offset)
            latest = {**latest, **dict(entries)}
            unsynced = unsynced | {key for key, _ in entries}
            if unsynced and (wanted is None or not unsynced.isdisjoint(wanted)):
                _sync_what_was_read(fd)
                unsynced = set()
        finally:
            os.close(fd)
        if generation is not None:
            seen[generation] = (end, latest, unsynced)
        return latest


# ---------------------------------------------------------------- cache and per-user locks

_NOT_CACHED: Final = object()


class _RecordCache:
    """LRU of user key -> compact record bytes, or None for "no record on disk"."""

    def __init__(self, max_size: int | None) -> None:
        self.max_size = max_size
        self._entries: OrderedDict[str, bytes | None] = OrderedDict()

    def get(self, key: str) -> object:
        """The cached bytes or None, or _NOT_CACHED."""
        try:
            self._entries.move_to_end(key)
        except KeyError:
            return _NOT_CACHED
        return self._entries[key]

    def put(self, key: str, value: bytes | None) -> None:
        if self.max_size == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        if self.max_size is not None and len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class _LockEntry:
    """One user's lock, the task holding it, and how many tasks hold or await it."""

    __slots__ = ("holder", "lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holder: asyncio.Task[Any] | None = None
        self.users = 0


class _HeldByThisTask(Exception):
    """The task asking for a user's lock already holds it (an edit of that user is open)."""


class _WouldDeadlock(Exception):
    """Waiting for this user's lock would close a cycle of tasks waiting on each other."""

    def __init__(self, key: str, holder_waits_for: str) -> None:
        super().__init__(key, holder_waits_for)
        self.key = key
        self.holder_waits_for = holder_waits_for


class _UserLocks:
    """One asyncio.Lock per user key, kept only while someone holds or awaits it.

    Locks are made inside the running loop on first use and forgotten when the
    last holder leaves, so memory follows the users in flight, not every user
    ever seen. The registry serves one event loop at a time: a later loop takes
    over once the earlier one has stopped (successive asyncio.run() calls), but
    a second loop running at the same time in another thread is refused, since
    an asyncio.Lock cannot serialise tasks of two loops.

    Waits are checked before they start, as a database checks for deadlocks:
    a task asking again for a lock it holds gets _HeldByThisTask, and a task
    whose wait would close a cycle (A holds 1 and waits for 2 while B holds 2
    and waits for 1) gets _WouldDeadlock, instead of hanging forever.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _LockEntry] = {}
        self._waiting: dict[asyncio.Task[Any], str] = {}  # task -> the key it waits for
        self._loop: asyncio.AbstractEventLoop | None = None
        self._binding = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def check_loop(self, where: str) -> None:
        """Bind the registry to the running loop, or raise JasonError if another loop is using it."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        with self._binding:
            previous = self._loop
            if previous is not None and previous is not loop and previous.is_running():
                raise JasonError(
                    f"{where} is in use by an event loop running in another thread; JASON serves one "
                    "loop at a time. Use it from one thread's loop, or give each thread its own folder"
                )
            if self._entries:  # tasks of a stopped loop still hold locks that this loop cannot use
                raise JasonError(f"{where} still has operations of a stopped event loop in flight")
            self._loop = loop

    def check_wait(self, key: str) -> None:
        """Raise _HeldByThisTask or _WouldDeadlock if the current task must not wait for key."""
        entry = self._entries.get(key)
        if entry is None or entry.holder is None:
            return
        task = asyncio.current_task()
        if entry.holder is task:
            raise _HeldByThisTask(key)
        holder: asyncio.Task[Any] | None = entry.holder
        for _ in range(len(self._waiting) + 1):  # a chain cannot be longer than the tasks waiting
            wanted = self._waiting.get(holder)  # type: ignore[arg-type]
            if wanted is None:
                return
            next_entry = self._entries.get(wanted)
            holder = None if next_entry is None else next_entry.holder
            if holder is task:
                raise _WouldDeadlock(key, wanted)
            if holder is None:
                return

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        self.check_wait(key)
        task = asyncio.current_task()
        assert task is not None  # check_loop ran: we are inside a task
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _LockEntry()
        entry.users += 1
        try:
            self._waiting[task] = key
            try:
                await entry.lock.acquire()
            finally:
                del self._waiting[task]
            entry.holder = task
            try:
                yield
            finally:
                entry.holder = None
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]


# ---------------------------------------------------------------- threads and fork
#
# Blocking file work runs in a pool of threads of JASON's own (IO_THREADS),
# and checkpoints in another; a process forked from a writer forgets the
# folders it inherited, since only the parent holds their locks.

_T = TypeVar("_T")

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_checkpoint_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _checkpoint_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The journal's checkpoints' own few threads, made on first use (and again in a forked child)."""
    global _checkpoint_pool
    if _checkpoint_pool is None:
        _checkpoint_pool = concurrent.futures.ThreadPoolExecutor(max_workers=CHECKPOINT_THREADS,
                                                                 thread_name_prefix="jason-checkpoint")
    return _checkpoint_pool


def _io_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The pool for blocking I/O, made on first use (and again in a forked child)."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="jason-io")
    return _executor


def _forget_folders_after_fork() -> None:
    # The child must not write under its parent's lock. Closing its copy of the
    # descriptor leaves the parent's lock in place; instances made before the
    # fork see the pid change and refuse to write. The I/O pool's threads did
    # not survive the fork, so the child starts a pool of its own; a lock that
    # another thread held at the fork would never be released, so it is new too.
    global _executor, _checkpoint_pool, _registry_lock, _sync_loop
    _executor = _checkpoint_pool = None
    _sync_loop = None  # SyncJASON's loop thread did not survive either
    _registry_lock = threading.Lock()
    for shared in _shared_folders.values():
        if shared.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(shared.lock_fd)
            shared.lock_fd = None
    _shared_folders.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_folders_after_fork)


async def _wait_for_futures(futures: list[concurrent.futures.Future[Any]]) -> None:
    """Wait until every future is done, through cancellation too; their errors are their callers'."""
    waiters = [asyncio.wrap_future(future) for future in futures]
    cancelled = False
    while not all(waiter.done() for waiter in waiters):
        try:
            await asyncio.wait(waiters)
        except asyncio.CancelledError:
            cancelled = True
    for waiter in waiters:
        if not waiter.cancelled():
            waiter.exception()  # retrieved here, so asyncio does not log it as lost
    if cancelled:
        raise asyncio.CancelledError


async def _wait_for_thread(running: concurrent.futures.Future[_T]) -> _T:
    """The result of blocking work started in the I/O pool; on cancellation, still wait for it.

    A thread cannot be stopped. Releasing the user's lock while its write is
    still running would let a later save land first and then be overwritten.
    A write that fails after its caller was cancelled reports nothing: the
    caller has already been told (by the cancellation) that the outcome is unknown.
    """
    try:
        return await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        # Cancelling the wrapper stops a job still queued, not a thread that has started.
        await _wait_for_futures([running])
        raise


async def _all_done(writes: Iterable[Awaitable[Any]]) -> None:
    """Await writes together; once every one has ended, raise the first failure.

    asyncio.gather raises as soon as one fails and leaves the rest running: the
    caller would release its users' locks, and a later save of theirs could land
    first and be overwritten, or a count of what landed come too soon.
    """
    for outcome in await asyncio.gather(*writes, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking function that writes nothing in the I/O pool."""
    return await _wait_for_thread(_io_executor().submit(func, *args))


class _Busy:
    """A count of operations under way, and every coroutine waiting for them to end (a close, a barrier).

    Each waiter has a future of its own, made in its own loop, so any number may wait at once.
    """

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[asyncio.Future[None]] = []

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(self, idle: Callable[[], bool]) -> None:
        """Wait until idle() holds; it is checked again whenever the count reaches zero or wake() is called."""
        while not idle():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


# ---------------------------------------------------------------- the store interface
#
# A store is where a JASON's records live: a folder, a PostgreSQL table or a
# Redis hash. JASON itself keeps what is the same everywhere (ids, value
# checks, defaults, fresh copies, per-user locks, the cache); a store keeps
# the rest. Keys are canonical user ids; records are compact JSON bytes.


class _Records(Protocol):
    """What an edit reads and writes through: the store itself for a folder; on a server, an object
    bound to the edit's transaction (PostgreSQL) or lock token (Redis)."""

    async def read(self, key: str) -> bytes | None: ...
    # Returns once every later read sees data; durable then, except through a journal (see unsynced).
    async def write(self, key: str, data: bytes, operation: str) -> None: ...
    async def quarantine(self, key: str, operation: str) -> str: ...  # move a corrupt record aside; where to


class _Store(_Records, Protocol):
    location: str  # where the records are, fit to show (never a password)
    caches: bool  # True when JASON may cache records: no other process can change them
    closed: bool
    readonly: bool
    locks: _UserLocks  # the per-user lock registry (shared by the instances of one folder)

    @property
    def folder(self) -> str: ...  # the folder's path; JasonError for a server

    def check_writable(self, operation: str) -> None: ...  # raise unless a write may happen now
    def share_cache(self, cache: _RecordCache) -> None: ...  # let invalidate() reach this cache
    def invalidate(self, key: str) -> None: ...  # drop key from every cache that shares the records
    def where(self, key: str) -> str: ...  # where one record is, for messages
    async def write_many(self, records: Sequence[tuple[str, bytes]], operation: str) -> None: ...  # each atomic
    async def delete(self, key: str, operation: str) -> bool: ...  # True when there was a record
    # A journal's writes are seen before they are durable: the number of key's last write (None: any
    # key's) while it is not durable yet, else None; synced(number, read) returns once it is, or raises
    # (read: the caller only read it, so a failure is not its own but the store's).
    def unsynced(self, key: str | None) -> int | None: ...
    async def synced(self, write: int, read: bool) -> None: ...
    async def exists(self, key: str) -> bool: ...
    async def keys(self) -> list[str]: ...  # every stored key, sorted
    # Several records read together (one thread hop, one round trip): each the bytes, None, or why it is unreadable.
    async def read_many(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]: ...
    async def owner(self) -> str | None: ...  # the adapter these records are marked as the state of, or None
    async def claim(self, owner: str, operation: str) -> None: ...  # mark the records as owner's
    # For JASON.check() and JASON.sizes(): (sound records, problems as (kind, where, detail)); the records'
    # sizes, and the bytes the location takes (None where it cannot tell).
    async def check(self, fix_temp: bool) -> tuple[int, list[tuple[str, str, str]]]: ...
    async def sizes(self) -> tuple[dict[str, int], int | None]: ...

    # An edit's records: cross-process exclusion where the store needs it, and the records inside it.
    def transaction(self, key: str) -> contextlib.AbstractAsyncContextManager[_Records]: ...
    # Hold a named lock that every process sharing these records respects (aiogram's event isolation).
    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]: ...
    # A write's turn, taken before the user's lock: where writes share a few connections, so many wait.
    def admit(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def close(self) -> None: ...  # after the writes under way


class _NoWait:
    """An admit() that waits for nothing: one shared object, so a save makes no context manager for it."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_WAIT: Final = _NoWait()


def _owner_in_mark(mark: str | bytes | None) -> str | None:
    """The adapter named by an owner mark (see OWNER_MARK); None for no mark, or text that is not one."""
    text = mark.decode("utf-8", "replace") if isinstance(mark, bytes) else mark
    if text is None or not text.startswith(OWNER_MARK):
        return None
    return text[len(OWNER_MARK):].strip() or None


def _check_open_for_writing(location: str, closed: bool, readonly: bool, operation: str) -> None:
    """What every store's write guard checks first: the store is open, and not readonly."""
    if closed:
        raise JasonError(
            f"{operation} refused: this JASON for {location} was closed, so nothing was written; open a new one"
        )
    if readonly:
        raise ReadOnlyError(location, operation)


# ---------------------------------------------------------------- the folder store


# What check and stats read in a folder, safe beside a running bot.

def _read_record_file_sync(path: str) -> dict[str, Any] | None:
    """The record in the file at path, as stored (defaults not merged); None when there is none."""
    raw = _read_record_sync(path)
    return None if raw is None else _parse_record(raw, path)


def _process_alive(pid: int) -> bool:
    if sys.platform == "win32":  # Windows: no cheap probe; assume it runs, which only hides young temp files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _live_writer_since_sync(folder: str) -> float | None:
    """When the writer named in the lock file is running: the time it took the lock. Else None.

    The lock file is not locked to find out (a bot starting at that moment
    would be refused); its pid is probed instead. The writer rewrites the file
    when it takes the lock, so its mtime says when that was.
    """
    path = os.path.join(folder, LOCK_FILE_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK)
    except OSError:
        return None  # no lock file: no writer has ever opened the folder
    try:
        info = os.fstat(fd)
        text = os.read(fd, 32).strip() if stat.S_ISREG(info.st_mode) else b""
    finally:
        os.close(fd)
    if not text.isdigit() or not _process_alive(int(text)):
        return None
    return info.st_mtime


def _classify_entries_sync(folder: str, newer: dict[str, bytes | None]) -> tuple[int, list[tuple[str, str, str]]]:
    """Scan folder: the number of sound records, and (kind, path, detail) for everything else.

    newer: what the journals hold (key -> record, None for a delete), read
    in place of those keys' files, as every read of the folder does. Safe
    beside a running bot: a temp file made since its writer took the lock
    may be a save in progress, and is not reported; files that vanish while
    the scan runs were a save's or a delete's, and are skipped.
    """
    writer_since = _live_writer_since_sync(folder)
    sound = 0
    problems = []
    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries)
    for name in names:
        path = os.path.join(folder, name)
        key = _user_key_from_file_name(name)
        if name in (LOCK_FILE_NAME, UPGRADE_MARKER_NAME, OWNER_FILE_NAME):
            continue
        if name in (JOURNAL_NAME, JOURNAL_CHECKPOINTING_NAME):
            if writer_since is None:  # a live writer's journal is its saves in flight
                problems.append(("journal", path, "saves of a writer that stopped without closing; the next "
                                 "writer to open the folder writes them into the records"))
        elif name.startswith(TEMP_PREFIX):
            try:
                made = os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            if writer_since is None or made < writer_since:
                problems.append(("temp", path, "left by an interrupted save"))
        elif QUARANTINE_MARK in name:
            problems.append(("quarantined", path, "a corrupt record moved aside"))
        elif key is not None:
            if key in newer:
                continue
            try:
                if _read_record_file_sync(os.path.join(folder, name)) is not None:
                    sound += 1
            except CorruptDataError as exc:
                problems.append(("corrupt", path, exc.reason))
        elif name.endswith(RECORD_SUFFIX):
            problems.append(("bad-name", path, "not the file name of any user id"))
        else:
            problems.append(("stray", path, "not a JASON file"))
    for key, data in newer.items():
        if data is not None:
            try:
                _parse_record(data, os.path.join(folder, _file_name(key)))
                sound += 1
            except CorruptDataError as exc:
                problems.append(("corrupt", exc.path, exc.reason))
    return sound, problems


def _folder_sizes_sync(folder: str) -> tuple[dict[str, int], int]:
    """({user key: record size}, bytes of everything in the folder), safe beside a running bot."""
    sizes: dict[str, int] = {}
    folder_bytes = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # gone since the listing: a save's temp file, or a deleted user
                continue
            folder_bytes += info.st_size
            key = _user_key_from_file_name(entry.name)
            if key is not None and stat.S_ISREG(info.st_mode):
                sizes[key] = info.st_size
    return sizes, folder_bytes




# One folder's state shared by every JASON of it in this process: the writer lock, the
# per-user locks, the caches to invalidate, the writes under way and the journal.

class _SharedFolder:
    """What every writing JASON of one folder in this process shares.

    One writer lock (flock is per open file, so a second open in the same
    process would lock itself out), one lock registry (so two instances never
    write one user at once), the caches (so a save through one drops the
    stale copy from the others'), the journal with journal=True, and the
    writes under way in threads, so that the writer lock is released only
    after the last of them has landed.
    """

    def __init__(self, folder: str, lock_fd: int, journal: bool) -> None:
        self.folder = folder
        self.lock_fd: int | None = lock_fd
        self.locks = _UserLocks()
        self.named_locks = _UserLocks()  # exclusive(): names, never user ids, so a registry of their own
        self.folder_sync = _GroupSync(functools.partial(_fsync_dir, folder))
        self.journal = _Journal(folder, self.folder_sync) if journal else None
        self.stores: weakref.WeakSet[_FolderStore] = weakref.WeakSet()
        self.caches: weakref.WeakSet[_RecordCache] = weakref.WeakSet()
        self.writes: set[concurrent.futures.Future[Any]] = set()

    def start_write(self, store: _FolderStore, operation: str, func: Callable[..., _T], *args: Any) -> \
            concurrent.futures.Future[_T]:
        """Run func in the I/O pool as a write of store, if store may still write.

        The check and the registration happen under the registry lock, which
        close() takes too: a write is either refused or waited for, never left
        to land after the lock is released.
        """
        with _registry_lock:
            store.check_writable(operation)
            running = _io_executor().submit(func, *args)
            self.writes.add(running)
        running.add_done_callback(self._write_done)
        return running

    def _write_done(self, running: concurrent.futures.Future[Any]) -> None:
        with _registry_lock:
            self.writes.discard(running)

    async def detach(self, store: _FolderStore) -> None:
        """Forget store; when it was the last, finish every write and the journal, then release the lock.

        An instance may open the folder while this one finishes: it then keeps
        the lock and the journal, and nothing it saves is deleted with them.
        """
        with _registry_lock:
            self.stores.discard(store)
            if self.stores:
                return
        while True:
            with _registry_lock:
                writes = list(self.writes)
            if writes:
                await _wait_for_futures(writes)
            elif await _in_thread(self._finish_sync):
                return

    def _finish_sync(self) -> bool:
        """The last instance's close, blocking: the last checkpoint, then the journal and the lock go.

        False when writes came in meanwhile and it must run again; True when
        done, or when an instance opened meanwhile and goes on with it all.
        """
        failure: OSError | None = None
        if self.journal is not None:
            try:
                self.journal.finish_sync()
            except OSError as exc:  # the journal stays, and the next open replays it
                failure = exc
        with _registry_lock:
            if self.stores:
                return True
            if self.writes:
                return False
            if self.journal is not None:
                if failure is not None or self.journal.broken is not None:
                    self.journal.abandon()
                elif not self.journal.delete_if_idle():
                    return False  # saves came in while the last checkpoint ran
            self._release_lock()
        if failure is not None:
            raise failure
        return True

    def _release_lock(self) -> None:
        """Under _registry_lock: forget the folder and close the lock file, which releases flock."""
        if _shared_folders.get(self.folder) is self:
            del _shared_folders[self.folder]
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


_shared_folders: dict[str, _SharedFolder] = {}
# Guards _shared_folders and every _SharedFolder's stores and writes: JASON
# objects may be made and closed in several threads at once.
_registry_lock = threading.Lock()
class _FolderStore:
    """Records as JSON files in one folder, written atomically; one writer process at a time."""

    def __init__(self, folder: str | os.PathLike[str], *, durable: bool, readonly: bool,
                 journal: bool | None) -> None:
        if journal and not durable:
            raise ValueError("journal=True makes durable saves cheaper; with durable=False there is nothing to journal")
        self.folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        self.location = self.folder
        self.durable = durable
        self.readonly = readonly
        # A readonly instance keeps no cache: the writer may be another
        # process, and only the file itself is never stale.
        self.caches = not readonly
        self.closed = False
        self._pid = os.getpid()
        if readonly:
            if not os.path.isdir(self.folder):
                raise FileNotFoundError(errno.ENOENT, "JASON folder does not exist", self.folder)
            self._shared: _SharedFolder | None = None
            self.locks = _UserLocks()
            self._named_locks = _UserLocks()
            self._folder_sync: _GroupSync | None = None
            # What the writer's journal holds that the files do not, if it journals: read before any file.
            self._newer: _Journal | _JournalReader | None = _JournalReader(self.folder)
            self._journal: _Journal | None = None
        else:
            _make_folder_sync(self.folder, durable)
            self._shared = self._attach_shared_folder(journal)
            self.locks = self._shared.locks
            self._named_locks = self._shared.named_locks
            self._folder_sync = self._shared.folder_sync
            self._newer = self._journal = self._shared.journal

    def _attach_shared_folder(self, journal: bool | None) -> _SharedFolder:
        """The folder's shared state, made by the first writer here: with a journal if journal (None:
        if durable). A later instance joins it, and journal=None joins either mode."""
        real_folder = os.path.realpath(self.folder)
        with _registry_lock:  # two threads opening one folder must share one lock, not race for it
            shared = _shared_folders.get(real_folder)
            if shared is None:
                lock_fd = _lock_folder_sync(self.folder)
                try:
                    # Whatever the mode: a journal left by a writer that died holds saves it returned.
                    _replay_journals_sync(real_folder)
                    shared = _SharedFolder(real_folder, lock_fd, self.durable if journal is None else journal)
                except BaseException:
                    os.close(lock_fd)
                    raise
                _shared_folders[real_folder] = shared
            elif journal is not None and (shared.journal is not None) != journal:
                raise ValueError(f"{self.folder} is open in this process with journal={not journal}; every JASON "
                                 "of one folder must use the same (leave journal unset to join either)")
            shared.stores.add(self)
        return shared

    def check_writable(self, operation: str) -> None:
        """The one guard of every write: open, not readonly, not a forked copy of the writer."""
        _check_open_for_writing(self.location, self.closed, self.readonly, operation)
        if os.getpid() != self._pid:
            raise DatabaseLockedError(
                self.location,
                f"process {self._pid}, which opened this JASON before forking; open a new JASON in this process",
            )

    def share_cache(self, cache: _RecordCache) -> None:
        if self._shared is not None:
            self._shared.caches.add(cache)

    def invalidate(self, key: str) -> None:
        if self._shared is not None:
            for cache in list(self._shared.caches):
                cache.drop(key)

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, _file_name(key))

    def where(self, key: str) -> str:
        """Where key's record is, for messages: its file's path."""
        return self._path(key)

    async def _write_in_thread(self, operation: str, func: Callable[..., _T], *args: Any) -> _T:
        if self._shared is None:
            raise ReadOnlyError(self.location, operation)
        return await _wait_for_thread(self._shared.start_write(self, operation, func, *args))

    # The one read path: what the journal holds that the file does not yet, else the file. The
    # journal is looked at first: a record leaves it only after its file has it.

    def _read_sync(self, key: str) -> bytes | None:
        newer = self._newer.newer(key) if self._newer is not None else None
        return _read_record_sync(self._path(key)) if newer is None else newer[0]

    def _exists_sync(self, key: str) -> bool:
        newer = self._newer.newer(key) if self._newer is not None else None
        return _is_record_sync(self._path(key)) if newer is None else newer[0] is not None

    def _keys_sync(self) -> list[str]:
        newer = self._newer.newer_all() if self._newer is not None else {}
        keys = _list_user_keys_sync(self.folder)
        if not newer:
            return keys
        stored = set(keys) | {key for key, data in newer.items() if data is not None}
        return sorted(stored - {key for key, data in newer.items() if data is None})

    async def read(self, key: str) -> bytes | None:
        return await _in_thread(self._read_sync, key)

    async def exists(self, key: str) -> bool:
        return await _in_thread(self._exists_sync, key)

    async def keys(self) -> list[str]:
        return await _in_thread(self._keys_sync)

    def _read_many_sync(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]:
        found: list[bytes | CorruptDataError | None] = []
        for key in keys:
            try:
                found.append(self._read_sync(key))
            except CorruptDataError as exc:  # a link or a FIFO in the record's place
                found.append(exc)
        return found

    async def read_many(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]:
        return await _in_thread(self._read_many_sync, keys)

    async def check(self, fix_temp: bool) -> tuple[int, list[tuple[str, str, str]]]:
        if fix_temp:
            self.check_writable("check with fix_temp")  # the writer lock: no save of this folder uses a temp file
        await self._checkpoint()
        newer = await _in_thread(self._newer.newer_all) if self._newer is not None else {}
        sound, problems = await _in_thread(_classify_entries_sync, self.folder, newer)
        if fix_temp:
            for at, (kind, path, _) in enumerate(problems):
                if kind == "temp":
                    await _in_thread(os.unlink, path)
                    problems[at] = ("removed", path, "a temp file left by an interrupted save")
        return sound, problems

    async def sizes(self) -> tuple[dict[str, int], int | None]:
        await self._checkpoint()
        return await _in_thread(_folder_sizes_sync, self.folder)

    async def _checkpoint(self) -> None:
        """Bring every record's file up to date with this process's journal: what check and sizes look at."""
        if self._journal is not None:
            await _in_thread(self._journal.checkpoint_sync)

    def unsynced(self, key: str | None) -> int | None:
        return None if self._journal is None else self._journal.unsynced(key)

    async def synced(self, write: int, read: bool) -> None:
        assert self._journal is not None  # only a journal's writes are seen before they are durable
        await self._journal.synced(write, read)

    async def write(self, key: str, data: bytes, operation: str) -> None:
        if self._journal is not None:
            self._journal.queue(functools.partial(self.check_writable, operation), key, data)
            return
        await self._write_in_thread(
            operation, _write_atomic_sync, self.folder, _file_name(key), data, self.durable, self._folder_sync
        )

    async def write_many(self, records: Sequence[tuple[str, bytes]], operation: str) -> None:
        if self._journal is not None:  # one group commit takes them all
            for key, data in records:
                self._journal.queue(functools.partial(self.check_writable, operation), key, data)
            return
        # A rename costs most of a write here, and renames in several threads overlap (on ext4, 16
        # threads took a third of one thread's time): so a batch is written in a few threads' shares.
        named = [(_file_name(key), data) for key, data in records]
        share = -(-len(named) // BATCH_WRITE_THREADS)
        await _all_done(
            self._write_in_thread(operation, _write_many_sync, self.folder, named[start:start + share],
                                  self.durable, self._folder_sync)
            for start in range(0, len(named), share))

    async def delete(self, key: str, operation: str) -> bool:
        if self._journal is not None:
            if not await self.exists(key):
                self.check_writable(operation)
                return False
            self._journal.queue(functools.partial(self.check_writable, operation), key, None)
            return True
        return await self._write_in_thread(operation, _delete_sync, self.folder, _file_name(key), self.durable)

    async def quarantine(self, key: str, operation: str) -> str:
        return await self._write_in_thread(operation, _quarantine_sync, self.folder, _file_name(key), self.durable)

    async def owner(self) -> str | None:
        return _owner_in_mark(await _in_thread(_read_record_sync, os.path.join(self.folder, OWNER_FILE_NAME)))

    async def claim(self, owner: str, operation: str) -> None:
        await self._write_in_thread(operation, _write_atomic_sync, self.folder, OWNER_FILE_NAME,
                                    f"{OWNER_MARK}{owner}\n".encode(), self.durable, self._folder_sync)

    @contextlib.asynccontextmanager
    async def transaction(self, key: str) -> AsyncIterator[_FolderStore]:
        # One writer process, and JASON holds the user's lock: nothing else can change the file.
        yield self

    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        # A folder has one writer process, so a lock in this process excludes every writer.
        return self._named_locks.hold(name)

    def admit(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _NO_WAIT  # a write here waits for nothing that another write could hold

    async def close(self) -> None:
        with _registry_lock:  # a write is either registered before this, and waited for, or refused
            self.closed = True
        if self._shared is not None:
            await self._shared.detach(self)


# ---------------------------------------------------------------- the server stores
#
# The same records on PostgreSQL (asyncpg) or Redis (redis-py's asyncio client),
# for a bot that has outgrown one process: many processes and machines may
# write at once, so these stores allow no cache, and an edit excludes the
# other processes' writes of that user (PostgreSQL: a row lock; Redis: a lock
# key that every write checks). Records are the same compact JSON bytes as in
# a folder, so a copy between any two locations is exact.

_SERVER_SCHEMES: Final = {
    "postgresql": "postgres", "postgres": "postgres", "redis": "redis", "rediss": "redis", "unix": "redis",
}
# kind -> (the driver's module, the pip package that installs it, this project's extra). The name
# jason-db on the package index is the old 0.2.0 release, so messages name the driver's own package.
_DRIVERS: Final = {"postgres": ("asyncpg", "asyncpg", "postgres"), "redis": ("redis", "redis", "redis")}
DEFAULT_NAMESPACE: Final = "jason"
_NAMESPACE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")
# How long a Redis edit lock lives without renewal: a process that dies inside
# an edit blocks that user for at most this long. A live edit renews it.
EDIT_LOCK_SECONDS: Final = 30


# A PostgreSQL location keeps a pool of this many connections per event loop; an open edit holds
# one for as long as its block runs, and at most this many saves, edits and deletes run at once
# (more wait their turn, holding nothing). exclusive()'s locks have a pool of the same size.
POSTGRES_POOL_SIZE: Final = 16
# Set for the task running a write (and the tasks it starts): it was admitted, and whether it holds
# a connection of the records pool. A call made while it holds one is a nested call.
_ADMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("jason_admitted", default=False)
_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("jason_holding", default=False)


def _server_kind(location: object) -> str | None:
    """"postgres" or "redis" for a server URL, None for a folder path."""
    if not isinstance(location, str) or "://" not in location:
        return None
    return _SERVER_SCHEMES.get(location.split("://", 1)[0].lower())


_URL_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_PASSWORD_PARAMETER: Final = re.compile(r"([?&](?:password|pass|pwd)=)[^&#]*", re.IGNORECASE)


def _redacted(url: str) -> str:
    """url without its password, fit for messages, repr, logs and names: the user part and any password=."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    if "@" in rest:
        # The user part ends at the last "@": a URL parser is led astray by a password holding "/" or "#".
        user_part, host = rest.rsplit("@", 1)
        user = user_part.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in user_part else rest
    return f"{scheme}://{_PASSWORD_PARAMETER.sub(lambda m: m[1] + '***', rest)}"


def _import_driver(kind: str) -> Any:
    module, package, extra = _DRIVERS[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise JasonError(f"a {kind} location needs the {module} package: pip install {package} "
                         f"(from a JASON checkout: pip install \".[{extra}]\")") from None


# PostgreSQL's text type cannot hold NUL or a lone surrogate, both valid in ids:
# those, and "%" itself, are written as %xx of their UTF-8 bytes. Every other id
# is stored as it is, so the user_id column stays readable.
_SQL_UNSAFE_ID: Final = re.compile("[%\x00\ud800-\udfff]")


def _sql_id(key: str) -> str:
    return _SQL_UNSAFE_ID.sub(lambda m: _escape_char(m[0]), key) if _SQL_UNSAFE_ID.search(key) else key


def _key_from_sql_id(text: str) -> str:
    if "%" not in text:
        return text
    return _ESCAPE.sub(lambda m: bytes.fromhex(m[1].decode()), text.encode("utf-8")).decode("utf-8", "surrogatepass")


# PostgreSQL cannot turn a \u0000 escape into text, and one such record makes every
# JSON query over the table fail. So a record is stored with each NUL as the two
# private-use characters U+E000 U+E001, and each U+E000 as U+E000 U+E000: the
# stored text has no NUL, and reading reverses it exactly. Escaped backslashes
# are matched first, so a literal "\\u0000" in a string is left alone.
_NUL_OR_MARK: Final = re.compile(rb"\\\\|\\u0000|\xee\x80\x80")
_MARKED: Final = re.compile(rb"\xee\x80\x80(\xee\x80[\x80\x81])")
_MARK_FOR: Final = {b"\\\\": b"\\\\", b"\\u0000": b"\xee\x80\x80\xee\x80\x81",
                    b"\xee\x80\x80": b"\xee\x80\x80\xee\x80\x80"}


def _without_nul(data: bytes) -> bytes:
    if b"\\u0000" not in data and b"\xee\x80\x80" not in data:
        return data
    return _NUL_OR_MARK.sub(lambda m: _MARK_FOR[m[0]], data)


def _with_nul(data: bytes) -> bytes:
    if b"\xee\x80\x80" not in data:
        return data
    return _MARKED.sub(lambda m: b"\\u0000" if m[1] == b"\xee\x80\x81" else b"\xee\x80\x80", data)


class _ServerStore:
    """What both server stores share: no cache, a lock registry of their own, the guard, one client per loop."""

    caches = False

    def __init__(self, url: str, kind: str, *, namespace: str, durable: bool, readonly: bool) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must be a letter or _ then up to 40 letters, digits or _, not {namespace!r}")
        self.driver = _import_driver(kind)
        self.url = url
        self.location = _redacted(url)
        self.namespace = namespace
        self.durable = durable
        self.readonly = readonly
        self.closed = False
        self.locks = _UserLocks()
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        # close() waits for the plain calls under way (each a statement or two); an edit, or a lock
        # held by exclusive(), may be what calls close(), so the last of those closes the client instead.
        self._calls = _Busy()
        self._open_edits = 0
        self._connecting: asyncio.Lock | None = None
        self._connecting_loop: asyncio.AbstractEventLoop | None = None

    @property
    def folder(self) -> str:
        raise JasonError(f"{self.location} is a server location, not a folder")

    def check_writable(self, operation: str) -> None:
        _check_open_for_writing(self.location, self.closed, self.readonly, operation)

    def share_cache(self, cache: _RecordCache) -> None:
        pass  # no cache to share: the cache is off for servers

    def invalidate(self, key: str) -> None:
        pass

    def where(self, key: str) -> str:
        return f"{self.location} user {key!r}"

    def unsynced(self, key: str | None) -> int | None:
        return None  # a server's write is durable when it returns

    async def synced(self, write: int, read: bool) -> None:
        raise AssertionError("a server's writes are durable when they return")

    def admit(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _NO_WAIT  # Redis: a connection is held only for one command, never across user code

    async def client(self) -> Any:
        """The connection pool or client for the running loop, made once, on first use."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is loop:
            return self._client
        if self._connecting is None or self._connecting_loop is not loop:
            # Made here, in the loop that uses it: an asyncio.Lock belongs to one loop.
            self._connecting, self._connecting_loop = asyncio.Lock(), loop
        async with self._connecting:  # the first calls at once must make one pool, not one each
            if self._client is None or self._client_loop is not loop:
                # A pool belongs to the loop that made it: successive asyncio.run() calls get new ones.
                try:
                    self._client = await self._connect()
                except JasonError:
                    raise
                except Exception as exc:  # the driver's own errors: a wrong password, no server, no database
                    raise self._cannot_connect(exc) from exc
                self._client_loop = loop
        return self._client

    def _cannot_connect(self, exc: BaseException) -> JasonError:
        """A JasonError saying what failed when connecting, and what to check."""
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FileNotFoundError):  # a Unix socket that is not there; the driver omits its path
            from urllib.parse import parse_qs, urlsplit

            where = exc.filename or parse_qs(urlsplit(self.url).query).get("host", [urlsplit(self.url).path])[0]
            detail = f"no server socket at {where}"
        return JasonError(f"cannot connect to {self.location} ({detail}); check that the server is running, "
                          "and the URL's host or socket path, database, user and password")

    async def _connect(self) -> Any:
        raise NotImplementedError

    async def keys(self) -> list[str]:
        raise NotImplementedError

    async def read_many(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]:
        raise NotImplementedError

    async def write(self, key: str, data: bytes, operation: str) -> None:
        raise NotImplementedError

    async def write_many(self, records: Sequence[tuple[str, bytes]], operation: str) -> None:
        await _all_done(self.write(key, data, operation) for key, data in records)

    async def _each_record(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every stored record, read a batch at a time."""
        keys = await self.keys()
        for start in range(0, len(keys), RECORDS_PER_BATCH):
            batch = keys[start:start + RECORDS_PER_BATCH]
            for key, raw in zip(batch, await self.read_many(batch)):
                if isinstance(raw, bytes):  # None: deleted since the listing
                    yield key, raw

    async def check(self, fix_temp: bool) -> tuple[int, list[tuple[str, str, str]]]:
        """Read every record: the number of sound ones, and the corrupt ones."""
        if fix_temp:
            raise JasonError("fix_temp is for folders: a server leaves no temp files")
        sound = 0
        problems = []
        async for key, raw in self._each_record():
            try:
                _parse_record(raw, self.where(key))
                sound += 1
            except CorruptDataError as exc:
                problems.append(("corrupt", exc.path, exc.reason))
        return sound, problems

    async def sizes(self) -> tuple[dict[str, int], int | None]:
        return {key: len(raw) async for key, raw in self._each_record()}, None  # the server's own size is its own

    async def close(self) -> None:
        """Close the client once the calls under way have finished and no edit is open.

        A save that is under way when close() is called finishes and returns;
        one that starts later is refused and writes nothing.
        """
        self.closed = True
        await self._calls.until(lambda: self._calls.count == 0)
        if self._open_edits == 0:
            await self._release_client()

    @contextlib.asynccontextmanager
    async def _call(self, operation: str | None = None) -> AsyncIterator[None]:
        """A plain call, counted for close(); a write (operation given) is checked in the same step."""
        if operation is not None:
            self.check_writable(operation)
        with self._calls.counting():
            yield

    async def _release_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await self._disconnect(client)

    @contextlib.asynccontextmanager
    async def _counting_edit(self) -> AsyncIterator[None]:
        """Count an open edit (or exclusive lock), so that close() never waits for the one that calls it."""
        self._open_edits += 1
        try:
            yield
        finally:
            self._open_edits -= 1
            if self.closed and self._open_edits == 0:  # close() was called meanwhile: the last edit closes
                await self._release_client()

    async def _disconnect(self, client: Any) -> None:
        raise NotImplementedError


class _PostgresStore(_ServerStore):
    """Records as rows (user_id text PRIMARY KEY, data json) of one table, by default "jason".

    The json type keeps the record's text exactly (jsonb would reorder keys
    and respell numbers), and PostgreSQL's JSON operators work on it:
    SELECT user_id FROM jason WHERE (data->>'balance')::int > 100.
    """

    def __init__(self, url: str, *, namespace: str, durable: bool, readonly: bool) -> None:
        super().__init__(url, "postgres", namespace=namespace, durable=durable, readonly=readonly)
        self.table = f'"{namespace}"'
        self._schema_ready = False
        self._lock_pool: Any = None  # exclusive()'s connections, made with the records pool

    async def _connect(self) -> Any:
        pool = await self.driver.create_pool(self.url, min_size=0, max_size=POSTGRES_POOL_SIZE,
                                             server_settings=self._settings())
        if self.durable:
            fsync = await pool.fetchval("SHOW fsync")
            if fsync != "on":
                await pool.close()
                raise JasonError(f"{self.location} runs with fsync={fsync}, so a commit may not survive a crash "
                                 "of its machine; turn fsync on in postgresql.conf, or pass durable=False")
        # exclusive() holds a connection for as long as its lock: from a pool of its own, so that
        # holders doing their work through the records pool can never starve each other of connections.
        # Each pool connects only when first used.
        self._lock_pool = await self.driver.create_pool(self.url, min_size=0, max_size=POSTGRES_POOL_SIZE)
        self._admission = asyncio.Semaphore(POSTGRES_POOL_SIZE)  # made in the loop of the pool
        return pool

    def _settings(self) -> dict[str, str]:
        return {"synchronous_commit": "on" if self.durable else "off"}

    async def _disconnect(self, client: Any) -> None:
        await self._lock_pool.close()
        await client.close()

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A turn for a write, taken before the user's lock: at most POSTGRES_POOL_SIZE run at once.

        A write holds its user's lock while it waits for a connection; with
        no more writes under way than the pool has connections, one is always
        free or about to be, however the writes wait for each other's users.
        """
        if _ADMITTED.get():  # inside an edit: the edit's turn covers it
            yield
            return
        await self.client()
        async with self._admission:
            admitted = _ADMITTED.set(True)
            try:
                yield
            finally:
                _ADMITTED.reset(admitted)

    async def _pool(self, writing: bool = False) -> Any:
        pool = await self.client()
        if writing and not self._schema_ready:
            # Made by the first write, never by a readonly instance. CREATE TABLE IF NOT EXISTS
            # is not atomic: processes making it at once take turns under an advisory lock.
            async with self._connection(pool) as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.table)
                await connection.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (user_id text PRIMARY KEY, data json)")
            self._schema_ready = True
        return pool

    @contextlib.asynccontextmanager
    async def _connection(self, pool: Any) -> AsyncIterator[Any]:
        """A connection of the records pool; inside an edit, one that never waits for an edit to end.

        Outside any edit a call waits its turn for the pool, so a bot with
        more busy users than connections slows down. Inside an edit (a load or
        a nested edit of another user, in this task or one it started),
        waiting for any shared connection could last forever, since each may
        be held by an edit that waits for this one: such a call opens a
        connection of its own for its duration (a few milliseconds on a local
        socket). A pool of them was tried: a connect cut short by its
        timeout left the pool unable to close.
        """
        if not _HOLDING.get():
            async with pool.acquire() as connection:
                yield connection
            return
        connection = await self.driver.connect(self.url, server_settings=self._settings())
        try:
            yield connection
        finally:
            await connection.close()

    async def _read_with(self, connection: Any, key: str, lock: str = "") -> bytes | None:
        try:
            text = await connection.fetchval(
                f"SELECT data FROM {self.table} WHERE user_id = $1{lock}", _sql_id(key))
        except self.driver.UndefinedTableError:
            return None  # nothing written yet (a readonly instance creates no table)
        return None if text is None else _with_nul(text.encode("utf-8"))

    async def read(self, key: str) -> bytes | None:
        async with self._call(), self._connection(await self._pool()) as connection:
            return await self._read_with(connection, key)

    async def read_many(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]:
        async with self._call(), self._connection(await self._pool()) as connection:
            try:
                rows = await connection.fetch(f"SELECT user_id, data FROM {self.table} "
                                              "WHERE user_id = ANY($1::text[]) AND data IS NOT NULL",
                                              [_sql_id(key) for key in keys])
            except self.driver.UndefinedTableError:
                rows = []
        found = {_key_from_sql_id(row[0]): _with_nul(row[1].encode("utf-8")) for row in rows}
        return [found.get(key) for key in keys]

    async def write(self, key: str, data: bytes, operation: str) -> None:
        async with self._call(operation), self._connection(await self._pool(writing=True)) as connection:
            await _postgres_upsert(connection, self.table, key, data)

    async def delete(self, key: str, operation: str) -> bool:
        async with self._call(operation), self._connection(await self._pool(writing=True)) as connection:
            status = await connection.execute(f"DELETE FROM {self.table} WHERE user_id = $1 AND data IS NOT NULL",
                                              _sql_id(key))
        return bool(status != "DELETE 0")

    async def exists(self, key: str) -> bool:
        return await self.read(key) is not None

    async def keys(self) -> list[str]:
        async with self._call(), self._connection(await self._pool()) as connection:
            try:
                rows = await connection.fetch(f"SELECT user_id FROM {self.table} WHERE data IS NOT NULL")
            except self.driver.UndefinedTableError:
                return []
        return sorted(_key_from_sql_id(row[0]) for row in rows)

    async def quarantine(self, key: str, operation: str) -> str:
        async with self._call(operation), self._connection(await self._pool(writing=True)) as connection, \
                connection.transaction():
            return await self._quarantine_with(connection, key, operation)

    async def _quarantine_with(self, connection: Any, key: str, operation: str) -> str:
        """Move the user's row to the table <namespace>_corrupt, in connection's transaction."""
        self.check_writable(operation)
        corrupt = f'"{self.namespace}_corrupt"'
        await connection.execute(f"CREATE TABLE IF NOT EXISTS {corrupt} "
                                 "(user_id text, data text, moved_at timestamptz DEFAULT now())")
        await connection.execute(f"INSERT INTO {corrupt} (user_id, data) SELECT user_id, data::text "
                                 f"FROM {self.table} WHERE user_id = $1", _sql_id(key))
        await connection.execute(f"DELETE FROM {self.table} WHERE user_id = $1", _sql_id(key))
        return f"{self.location} table {self.namespace}_corrupt"

    async def owner(self) -> str | None:
        async with self._call(), self._connection(await self._pool()) as connection:
            comment = await connection.fetchval("SELECT obj_description(to_regclass($1), 'pg_class')", self.table)
        return _owner_in_mark(comment)

    async def claim(self, owner: str, operation: str) -> None:
        mark = (OWNER_MARK + owner).replace("'", "''")  # COMMENT takes no parameter: a quoted literal
        async with self._call(operation), self._connection(await self._pool(writing=True)) as connection:
            await connection.execute(f"COMMENT ON TABLE {self.table} IS '{mark}'")

    @contextlib.asynccontextmanager
    async def transaction(self, key: str) -> AsyncIterator[_PostgresEdit]:
        """A transaction holding the user's row lock: other processes' writes of the user wait for it."""
        pool = await self._pool(writing=True)
        async with self._counting_edit(), self._connection(pool) as connection, connection.transaction():
            # A user with no row yet gets one (data NULL), so there is a row to lock; it is
            # never seen by others, since the transaction either stores the record or rolls back.
            await connection.execute(f"INSERT INTO {self.table} (user_id, data) VALUES ($1, NULL) "
                                     "ON CONFLICT (user_id) DO NOTHING", _sql_id(key))
            holding = _HOLDING.set(True)
            try:
                yield _PostgresEdit(self, connection)
            finally:
                _HOLDING.reset(holding)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A session advisory lock, named by a 64-bit hash of the namespace and name.

        Two names sharing a hash only take turns; they never see each other's data.
        """
        await self.client()
        lock_name = f"{self.namespace}:{name}"
        async with self._counting_edit(), self._lock_pool.acquire() as connection:
            await connection.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_name)
            try:
                yield
            finally:
                # asyncpg's pool also drops a connection's advisory locks when it takes it back.
                await connection.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_name)


async def _postgres_upsert(connection: Any, table: str, key: str, data: bytes) -> None:
    await connection.execute(f"INSERT INTO {table} (user_id, data) VALUES ($1, $2) "
                             "ON CONFLICT (user_id) DO UPDATE SET data = EXCLUDED.data",
                             _sql_id(key), _without_nul(data).decode("utf-8"))


class _PostgresEdit:
    """The records of one edit, inside its transaction."""

    def __init__(self, store: _PostgresStore, connection: Any) -> None:
        self.store = store
        self.connection = connection

    async def read(self, key: str) -> bytes | None:
        return await self.store._read_with(self.connection, key, lock=" FOR UPDATE")

    async def write(self, key: str, data: bytes, operation: str) -> None:
        self.store.check_writable(operation)
        # An upsert, not an UPDATE: a quarantine inside this edit may have moved the row away.
        await _postgres_upsert(self.connection, self.store.table, key, data)

    async def quarantine(self, key: str, operation: str) -> str:
        return await self.store._quarantine_with(self.connection, key, operation)


# KEYS: the records hash, the user's lock key. ARGV: the user's field, the record ("" to
# delete), the writer's lock token ("" outside an edit), "1" to release the lock with the
# write. A write waits while another process edits (0); an edit whose lock has expired
# writes nothing (-1); an edit's final write releases its lock in the same step.
_REDIS_WRITE: Final = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[3] then return 0 end
if ARGV[3] ~= '' then
  if holder ~= ARGV[3] then return -1 end
  if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
end
if ARGV[2] == '' then return redis.call('HDEL', KEYS[1], ARGV[1]) + 1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
_REDIS_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_REDIS_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def _backoff() -> AsyncIterator[None]:
    """Yield at once, then again and again after waits growing from 2 ms to 50 ms: for a retry loop."""
    delay = 0.002
    while True:
        yield
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _outcome(running: asyncio.Future[_T]) -> _T:
    """running's result, waited for through cancellation too; a cancellation is raised after it.

    For a step that must not be abandoned half-way: a lock taken or given
    back on the server, whose caller must know which it was.
    """
    cancelled = False
    while not running.done():
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            if running.cancelled():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return running.result()


class _RedisStore(_ServerStore):
    """Records as fields of one hash, "<namespace>:users", each the record's compact JSON.

    An edit holds a lock key, "<namespace>:lock:<id>", renewed while it is
    open; every write is a script that first checks the lock, so no process
    writes a user another process is editing.
    """

    def __init__(self, url: str, *, namespace: str, durable: bool, readonly: bool) -> None:
        super().__init__(url, "redis", namespace=namespace, durable=durable, readonly=readonly)
        self.hash = f"{namespace}:users".encode()
        if durable and not readonly:
            self._check_durability()

    def _check_durability(self) -> None:
        """Refuse durable=True unless the server fsyncs every write before it answers."""
        client = self.driver.Redis.from_url(self.url, socket_timeout=10)
        try:
            config = client.config_get("append*")
        except (self.driver.AuthenticationError, self.driver.ConnectionError, OSError) as exc:
            raise self._cannot_connect(exc) from exc
        except self.driver.ResponseError as exc:  # CONFIG disabled, as on some managed servers
            if "auth" in str(exc).lower():  # a password the server does not take
                raise self._cannot_connect(exc) from exc
            raise JasonError(f"cannot read the persistence settings of {self.location} ({exc}); "
                             "durable=True needs appendonly yes and appendfsync always: pass durable=False "
                             "to accept what the server does") from None
        finally:
            client.close()
        appendonly = config.get(b"appendonly", config.get("appendonly"))
        appendfsync = config.get(b"appendfsync", config.get("appendfsync"))
        if appendonly not in (b"yes", "yes") or appendfsync not in (b"always", "always"):
            shown = [value.decode() if isinstance(value, bytes) else value for value in (appendonly, appendfsync)]
            raise JasonError(
                f"{self.location} has appendonly {shown[0]} and appendfsync {shown[1]}, so a write it "
                "acknowledges can be lost in a crash of its machine; set appendonly yes and appendfsync "
                "always (CONFIG SET, or redis.conf), or pass durable=False"
            )

    async def _connect(self) -> Any:
        # A blocking pool: past max_connections a call waits for a free connection, where the default
        # pool would raise "Too many connections" under a burst of saves.
        pool = self.driver.asyncio.BlockingConnectionPool.from_url(self.url, max_connections=32, timeout=None)
        client = self.driver.asyncio.Redis(connection_pool=pool)
        try:
            await client.ping()  # redis-py connects lazily: a wrong URL or password shows here, not mid-save
        except BaseException:
            await self._disconnect(client)
            raise
        self._write_script = client.register_script(_REDIS_WRITE)
        self._renew_script = client.register_script(_REDIS_RENEW)
        self._release_script = client.register_script(_REDIS_RELEASE)
        return client

    async def _disconnect(self, client: Any) -> None:
        await client.aclose()
        await client.connection_pool.disconnect()  # a pool given to the client is not closed with it

    @staticmethod
    def _field(key: str) -> bytes:
        return key.encode("utf-8", "surrogatepass")

    def _lock_key(self, key: str) -> bytes:
        return f"{self.namespace}:lock:".encode() + self._field(key)

    async def read(self, key: str) -> bytes | None:
        async with self._call():
            value: bytes | None = await (await self.client()).hget(self.hash, self._field(key))
        return value

    async def read_many(self, keys: Sequence[str]) -> list[bytes | CorruptDataError | None]:
        if not keys:
            return []
        async with self._call():
            values: list[bytes | None] = await (await self.client()).hmget(self.hash, [self._field(k) for k in keys])
        return list(values)

    async def _write(self, key: str, data: bytes, operation: str, token: bytes = b"", release: bool = False) -> int:
        """Run the write script, waiting while another process edits the user; its answer."""
        async with self._call(operation):
            await self.client()
            async for _ in _backoff():  # while another process edits this user: wait for its lock
                done = int(await self._write_script(keys=[self.hash, self._lock_key(key)],
                                                    args=[self._field(key), data, token, b"1" if release else b"0"]))
                if done != 0:
                    return done
        raise AssertionError("unreachable: _backoff() never ends")

    async def write(self, key: str, data: bytes, operation: str) -> None:
        await self._write(key, data, operation)

    async def delete(self, key: str, operation: str) -> bool:
        return await self._write(key, b"", operation) == 2

    async def exists(self, key: str) -> bool:
        async with self._call():
            return bool(await (await self.client()).hexists(self.hash, self._field(key)))

    async def keys(self) -> list[str]:
        async with self._call():
            fields = await (await self.client()).hkeys(self.hash)
        return sorted(field.decode("utf-8", "surrogatepass") for field in fields)

    async def quarantine(self, key: str, operation: str) -> str:
        return await self._quarantine_as(key, operation, b"")

    async def _quarantine_as(self, key: str, operation: str, token: bytes) -> str:
        """Move the user's field to the hash <namespace>:corrupt, writing as the holder of token ("" for none)."""
        async with self._call(operation):
            raw = await self.read(key)
            corrupt = f"{self.namespace}:corrupt".encode()
            if raw is not None:
                await (await self.client()).hset(corrupt, self._field(key), raw)
            await self._write(key, b"", operation, token)
        return f"{self.location} hash {corrupt.decode()}"

    async def owner(self) -> str | None:
        async with self._call():
            return _owner_in_mark(await (await self.client()).get(f"{self.namespace}:owner"))

    async def claim(self, owner: str, operation: str) -> None:
        async with self._call(operation):
            await (await self.client()).set(f"{self.namespace}:owner", OWNER_MARK + owner)

    @contextlib.asynccontextmanager
    async def transaction(self, key: str) -> AsyncIterator[_RedisEdit]:
        """Hold the user's lock key for the edit: every other process's write of the user waits for it."""
        async with self._counting_edit(), self._lease(self._lock_key(key)) as edit:
            yield edit

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        async with self._counting_edit(), self._lease(f"{self.namespace}:exclusive:".encode() + self._field(name)):
            yield

    @contextlib.asynccontextmanager
    async def _lease(self, lock_key: bytes) -> AsyncIterator[_RedisEdit]:
        """Hold lock_key with a token of our own, renewing it while held; a dead holder's expires."""
        client = await self.client()
        token = secrets.token_hex(16).encode()
        milliseconds = EDIT_LOCK_SECONDS * 1000
        async for _ in _backoff():  # while another process holds it
            # A SET cut short by a cancellation may still take the lock on the server: its answer is
            # awaited all the same, and a lock it took is given back before the cancellation goes on.
            taking = asyncio.ensure_future(client.set(lock_key, token, nx=True, px=milliseconds))
            try:
                if await _outcome(taking):
                    break
            except asyncio.CancelledError:
                if not taking.cancelled() and taking.exception() is None and taking.result():
                    await _outcome(asyncio.ensure_future(self._release_script(keys=[lock_key], args=[token])))
                raise

        async def renew() -> None:
            while True:
                await self._renew_script(keys=[lock_key], args=[token, milliseconds])
                await asyncio.sleep(EDIT_LOCK_SECONDS / 3)

        # Most leases end in milliseconds: renewal starts only for one still held after a third of the TTL.
        renewing: list[asyncio.Future[None]] = []
        later = asyncio.get_running_loop().call_later(
            EDIT_LOCK_SECONDS / 3, lambda: renewing.append(asyncio.ensure_future(renew())))
        edit = _RedisEdit(self, token)
        try:
            yield edit
        finally:
            later.cancel()
            for task in renewing:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if not edit.released:  # an edit's write released the lock with the record; else release it now
                await _outcome(asyncio.ensure_future(self._release_script(keys=[lock_key], args=[token])))


class _RedisEdit:
    """The records of one edit, under its lock key."""

    def __init__(self, store: _RedisStore, token: bytes) -> None:
        self.store = store
        self.token = token
        self.released = False

    async def read(self, key: str) -> bytes | None:
        return await self.store.read(key)

    async def write(self, key: str, data: bytes, operation: str) -> None:
        done = await self.store._write(key, data, operation, self.token, release=True)
        self.released = done != -1
        if done == -1:
            raise JasonError(f"{operation} of user {key!r} lost its lock on {self.store.location} (it was "
                             f"held past {EDIT_LOCK_SECONDS} s without renewal); nothing was written")

    async def quarantine(self, key: str, operation: str) -> str:
        return await self.store._quarantine_as(key, operation, self.token)


_NAMESPACE_PARAMETER: Final = re.compile(r"([?&])namespace=([^&#]*)&?")


def _namespace_in_url(url: str, namespace: str) -> tuple[str, str]:
    """(url without its ?namespace=NAME, the namespace): a deployment sets it with the URL, by environment.

    The drivers would take the parameter for a setting of their own, so it is taken out. Given both
    ways, they must agree.
    """
    match = _NAMESPACE_PARAMETER.search(url)
    if match is None:
        return url, namespace
    from urllib.parse import unquote

    named = unquote(match[2])
    if namespace not in (DEFAULT_NAMESPACE, named):
        raise ValueError(f"the URL names namespace {named!r} and the namespace argument {namespace!r}; give one")
    rest = url[match.end():]
    kept = url[:match.start()] + (match[1] + rest if rest else "")  # the next parameter takes its separator
    return kept, named


def _refuse_unknown_url(location: object) -> None:
    """ValueError for a URL of a scheme JASON does not know: as a folder, it would be named after the URL."""
    if _server_kind(location) is None and isinstance(location, str) and _URL_SCHEME.match(location):
        scheme = location.split("://", 1)[0]
        raise ValueError(f"{_redacted(location)} looks like a URL, but JASON knows no {scheme}:// location: use "
                         "postgresql://, postgres://, redis://, rediss:// or unix://, or a folder path")


def _open_store(location: str | os.PathLike[str], *, namespace: str, durable: bool, readonly: bool,
                journal: bool | None = None) -> _Store:
    """The store for a folder path or a server URL."""
    kind = _server_kind(location)
    _refuse_unknown_url(location)
    if kind is not None and journal:
        raise ValueError("journal=True is for a folder: a server has a log of its own")
    if kind is not None:
        location, namespace = _namespace_in_url(str(location), namespace)
    if kind == "postgres":
        return _PostgresStore(str(location), namespace=namespace, durable=durable, readonly=readonly)
    if kind == "redis":
        return _RedisStore(str(location), namespace=namespace, durable=durable, readonly=readonly)
    if namespace != DEFAULT_NAMESPACE:
        raise ValueError("namespace names a table or key prefix on a server; a folder is its own namespace")
    return _FolderStore(location, durable=durable, readonly=readonly, journal=journal)


# ---------------------------------------------------------------- the database


class JASON(Generic[Record]):
    """Per-user JSON records, loaded and saved through asyncio.

    Every method is a coroutine. Operations on one user run one at a time;
    different users run in parallel. Use as ``async with JASON(...) as db:``
    or call ``await db.close()`` when done.

    Typed records: ``db: JASON[UserRecord] = JASON(...)`` with a TypedDict
    makes loads and edits give UserRecord to a type checker (nothing is
    checked at run time); without it a record is dict[str, Any].
    """

    def __init__(
        self,
        db_folder: str | os.PathLike[str],
        default_structure: Mapping[str, Any] | None = None,
        *,
        pretty: bool = False,
        durable: bool = True,
        cache_size: int | None = DEFAULT_CACHE_SIZE,
        readonly: bool = False,
        on_corrupt: Literal["raise", "quarantine"] = "raise",
        namespace: str = DEFAULT_NAMESPACE,
        migrations: Sequence[Callable[[dict[str, Any]], dict[str, Any] | None]] = (),
        journal: bool | None = None,
    ) -> None:
        """Open (and, unless readonly, create) the location db_folder: a folder path, or a server URL.

        (db_folder is the name jason-db 0.2.0 gave the argument, kept so that
        its callers' keyword still works; it is the database's location.)

        A URL postgresql://... or postgres://... keeps the records in a
        PostgreSQL table, redis://..., rediss://... or unix://... in a Redis
        hash; namespace names that table or key prefix, so several databases
        can share one server. Server locations need their driver (asyncpg,
        redis), imported only then, and keep no cache.

        on_corrupt="raise" (the default) makes a load of a corrupt record raise
        CorruptDataError and leaves the file alone. "quarantine" moves the file
        aside (see QUARANTINE_MARK), logs a warning on the "jason" logger and
        starts the user from the default structure; a readonly instance still
        raises, since it never writes.

        journal: a durable folder keeps a journal (unless journal=False): a
        save is one append to the folder's journal, synced together with
        every save made at the same time, instead of a file of its own with
        two fsyncs. Each record's file catches up within about
        JOURNAL_CHECKPOINT_SECONDS, every reader (JASON, the command line)
        sees the latest save at once, close() leaves every file current and
        no journal, and opening the folder after a crash replays the journal
        first. journal=False writes each record's file at each save. Every
        writing JASON of one folder in a process shares the mode of the
        first; journal=None (the default) joins either. See the README.

        migrations brings old records up to date: migrations[n] takes a
        record of version n (a dict, without its version) and returns it at
        version n + 1 (or changes it in place and returns None). The version
        is len(migrations), stored in each saved record as "$version"
        (VERSION_KEY); a record without one is version 0. A load runs the
        migrations a record needs, and the next save stores the result. Only
        ever append to migrations: a record is never downgraded, and one of a
        newer version raises JasonError.

        Raises TypeError or ValueError for a default structure that cannot be
        stored, FileNotFoundError for a missing folder in readonly mode, and
        DatabaseLockedError when another process writes to the folder.
        """
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt must be one of {CORRUPT_POLICIES}, not {on_corrupt!r}")
        if cache_size is not None and (not isinstance(cache_size, int) or isinstance(cache_size, bool)):
            raise TypeError(f"cache_size must be an int or None, not {type(cache_size).__name__}")
        if cache_size is not None and cache_size < 0:
            raise ValueError(f"cache_size must be 0 or more, not {cache_size}")
        if default_structure is None:
            default_structure = {}
        if not isinstance(default_structure, Mapping):
            raise TypeError(f"default_structure must be a dict, not {type(default_structure).__name__}")
        self._default_bytes, _ = _encode_record(dict(default_structure), pretty=False, name="default_structure")
        self._defaults: dict[str, Any] = _loads(self._default_bytes)
        self._pretty = pretty
        self._readonly = readonly
        self._quarantine = on_corrupt == "quarantine" and not readonly
        self._migrations = tuple(migrations)
        for step, migration in enumerate(self._migrations):
            if not callable(migration):
                raise TypeError(f"migrations[{step}] must be a function, not {type(migration).__name__}")
        self._store: _Store = _open_store(db_folder, namespace=namespace, durable=durable, readonly=readonly,
                                          journal=journal)
        self._locks: _UserLocks = self._store.locks
        self._cache = _RecordCache(cache_size if self._store.caches else 0)
        self._store.share_cache(self._cache)
        # Whose records these are: None for users' records, else the adapter's name (see _ready).
        self._owner: str | None = None
        self._looks_owned: Callable[[str, dict[str, Any]], bool] = lambda key, data: False
        self._owner_checked = False

    def __repr__(self) -> str:
        mode = "readonly" if self._readonly else "closed" if self._store.closed else "open"
        return f"<JASON {self._store.location!r} {mode}>"

    async def __aenter__(self) -> JASON[Record]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def folder(self) -> str:
        """The absolute path of the database folder; JasonError for a server location."""
        return self._store.folder

    @property
    def location(self) -> str:
        """The folder's absolute path, or the server URL without its password."""
        return self._store.location

    async def close(self) -> None:
        """Forget the cache and release the writer lock once no other instance here uses it.

        Writes already under way (each one file operation) are waited for
        before the lock is released; an edit still open, or a save still
        waiting for its user, fails with JasonError and writes nothing. Every
        later call on this instance raises JasonError. Closing twice is harmless.
        """
        if self._store.closed:
            return
        self._cache.clear()
        await self._store.close()

    async def load_user_data(self, user_id: int | str) -> Record:
        """The user's data, migrated to the current version, with missing default keys filled in (recursively).

        An unknown user gets a copy of the default structure; nothing is
        written. Each call returns a new, fully independent copy, of what is
        stored: inside edit_user_data, a load of the user being edited returns
        the record as it was before the edit. Raises CorruptDataError when the
        stored file is not a JSON object, and JasonError when a migration
        raises or the record is newer than the migrations.
        """
        key = self._key(user_id)
        if not self._owner_checked:  # a cached load takes ~3 µs: it spares itself the coroutine
            await self._ready()
        data = self._or_defaults(await self._read(key))
        if (seen := self._store.unsynced(key)) is not None:
            await self._store.synced(seen, read=True)  # see _until_durable
        return cast("Record", data)

    async def save_user_data(self, user_id: int | str, data: Record) -> None:
        """Store data as the user's whole record, atomically (durably, unless durable=False).

        data is checked and serialised before anything is touched: TypeError or
        ValueError leave file and cache as they were. An OSError from the disk
        propagates; the record is then the old one, or the new one when only
        the final folder fsync failed, and the next load reads whichever it is.
        Inside edit_user_data of the same user, raises JasonError at once.
        """
        key = self._key(user_id)
        self._store.check_writable("save_user_data")
        await self._ready()
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict, not {type(data).__name__}")
        compact, stored = self._encode(data)
        async with self._hold(key, "save_user_data"):
            written = await self._write_locked(key, compact, stored, "save_user_data", self._store)
        await self._until_durable(written)

    @contextlib.asynccontextmanager
    async def edit_user_data(self, user_id: int | str) -> AsyncIterator[Record]:
        """Read-modify-write under the user's lock: saved on clean exit, dropped on exception.

        ``async with db.edit_user_data(uid) as data: data["n"] += 1``

        Edits of different users may nest. A nested edit (or save or delete)
        of the user already being edited, or one whose wait would deadlock
        with another task, raises JasonError at once and changes nothing.
        """
        key = self._key(user_id)
        self._store.check_writable("edit_user_data")
        await self._ready()
        seen: int | None = None  # the write this edit read or made, while it is not durable yet
        try:
            async with self._hold(key, "edit_user_data"), self._store.transaction(key) as records:
                data = self._or_defaults(await self._read(key, records))
                seen = self._store.unsynced(key)
                yield cast("Record", data)
                compact, stored = self._encode(data)
                seen = await self._write_locked(key, compact, stored, "edit_user_data", records)
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):  # closed unfinished, it may not await
                await self._until_durable(seen, read=True)  # what it read; it wrote nothing
            raise
        await self._until_durable(seen)

    async def delete_user_data(self, user_id: int | str) -> bool:
        """Delete the user's record; True when there was one."""
        key = self._key(user_id)
        self._store.check_writable("delete_user_data")
        await self._ready()
        async with self._hold(key, "delete_user_data"):
            try:
                existed = await self._store.delete(key, "delete_user_data")
            finally:
                self._forget(key)
            self._cache.put(key, None)
            written = self._store.unsynced(key)
        await self._until_durable(written)
        return existed

    async def user_exists(self, user_id: int | str) -> bool:
        """True when the user has a stored record."""
        key = self._key(user_id)
        if not self._owner_checked:
            await self._ready()
        cached = self._cache.get(key)
        exists = cached is not None if cached is not _NOT_CACHED else await self._store.exists(key)
        if (seen := self._store.unsynced(key)) is not None:
            await self._store.synced(seen, read=True)  # see _until_durable
        return exists

    async def user_ids(self) -> list[str]:
        """Every stored user's id as a str, sorted; never a temp, lock or stray file."""
        self._enter()
        await self._ready()
        keys = await self._store.keys()
        await self._until_durable(self._store.unsynced(None), read=True)
        return keys

    async def users(self, concurrency: int = USERS_CONCURRENCY, *,
                    skipped: list[tuple[str, JasonError]] | None = None) -> AsyncIterator[tuple[str, Record]]:
        """Every stored user once, as (id, data), in id order: ``async for uid, data in db.users():``.

        Each data is what load_user_data would return (a fresh copy, migrated,
        with defaults). Records are read `concurrency` at a time and never
        cached, so memory stays flat however many users there are, and no
        user's lock is held between reads: the bot's saves during the loop go
        on, and each user is seen as it was when read. The ids are listed
        when the loop starts: a user added later is not visited, one deleted
        before its turn is skipped. A corrupt record raises CorruptDataError
        (ending the loop) or, with on_corrupt="quarantine", is moved aside and
        visited with the defaults, as a load would.

        skipped: give a list to go on past records that cannot be read (a
        corrupt record, a migration that raises, a record newer than the
        code): each is left out of the loop and added to the list as
        (id, the JasonError), so a broadcast reaches everyone else and can
        say whom it missed. Without it, the first such record ends the loop.
        """
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, not {concurrency!r}")
        keys = await self.user_ids()
        for start in range(0, len(keys), concurrency):
            self._enter()  # closed meanwhile: the loop ends with the error every call gives
            batch = keys[start:start + concurrency]
            results = await asyncio.gather(*(self._read(key, visiting=True) for key in batch),
                                           return_exceptions=True)
            await self._until_durable(self._last_unsynced(batch), read=True)
            for key, data in zip(batch, results):
                if isinstance(data, JasonError) and skipped is not None:
                    skipped.append((key, data))
                elif isinstance(data, BaseException):
                    raise data
                elif data is not None:
                    yield key, cast("Record", data)

    # -------------------------------------------------- for tools and adapters
    #
    # What the command line and the framework adapters need, public so that
    # neither reaches behind the library, and a tool or adapter of your own
    # need not either.

    async def load_stored(self, user_ids: Sequence[int | str]) -> list[dict[str, Any] | CorruptDataError | None]:
        """The records of user_ids exactly as stored, read together: how a tool reads many records.

        Each is the stored dict ("$version" included; not migrated, no
        defaults, not from the cache), None where the user has no record, or
        the CorruptDataError a load would raise: returned, not raised, so that
        one bad record does not stop a batch. One thread hop for a folder, one
        round trip for a server: read a few hundred at a time.
        """
        keys = [self._key(user_id) for user_id in user_ids]
        await self._ready()
        found: list[dict[str, Any] | CorruptDataError | None] = []
        stored = await self._store.read_many(keys)
        await self._until_durable(self._last_unsynced(keys), read=True)
        for key, raw in zip(keys, stored):
            if isinstance(raw, bytes):
                try:
                    found.append(_parse_record(raw, self._where(key)))
                except CorruptDataError as exc:
                    found.append(exc)
            else:
                found.append(raw)
        return found

    async def save_stored(self, user_id: int | str, data: Mapping[str, Any], *, operation: str = "save_stored") -> None:
        """Store data exactly as given, "$version" included: how a tool puts back what load_stored read.

        Checked, atomic and durable as save_user_data is; operation names the
        call in messages (the command line gives its command's name).
        """
        key = self._key(user_id)
        self._store.check_writable(operation)
        await self._ready()
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict, not {type(data).__name__}")
        compact, stored = _encode_record(data, self._pretty)
        async with self._hold(key, operation):
            written = await self._write_locked(key, compact, stored, operation, self._store)
        await self._until_durable(written)

    async def save_stored_many(self, records: Sequence[tuple[int | str, Mapping[str, Any]]], *,
                               operation: str = "save_stored") -> None:
        """save_stored of many records at once: how a tool writes a batch (one thread hop for a folder).

        Every record is checked before anything is written, and each is
        written atomically; when an OSError stops the batch, some may be
        written and others not (save them again: saving is idempotent), and
        it is raised once every write of the batch has ended. The users'
        locks are taken in id order, so two batches never wait for each
        other in a circle.
        """
        self._enter()
        self._store.check_writable(operation)
        encoded: dict[str, tuple[bytes, bytes]] = {}
        for user_id, data in records:
            key = self._key(user_id)
            if not isinstance(data, Mapping):
                raise TypeError(f"data of user {key!r} must be a dict, not {type(data).__name__}")
            if key in encoded:
                raise ValueError(f"user {key!r} is given twice")
            encoded[key] = _encode_record(data, self._pretty, name=f"data of user {key!r}")
        await self._ready()
        async with contextlib.AsyncExitStack() as held:
            await held.enter_async_context(self._store.admit())  # one turn for the batch (see admit)
            for key in sorted(encoded):
                self._check_may_wait(key, operation)
                await held.enter_async_context(self._locks.hold(key))
            try:
                await self._store.write_many([(key, stored) for key, (_, stored) in encoded.items()], operation)
            finally:
                for key in encoded:
                    self._forget(key)
            for key, (compact, _) in encoded.items():
                self._cache.put(key, compact)
            written = self._last_unsynced(list(encoded))
        await self._until_durable(written)

    async def check(self, *, fix_temp: bool = False) -> tuple[int, list[tuple[str, str, str]]]:
        """Read every record: (how many are sound, a (kind, where, detail) for everything else).

        Kinds: "corrupt" anywhere; in a folder also "temp" (left by an
        interrupted save), "quarantined", "journal" (a dead writer's saves,
        replayed by the next writer), "bad-name" and "stray". Safe beside a
        running bot. fix_temp=True (a folder, not readonly) deletes the temp
        files, each then reported as "removed".
        """
        self._enter()
        await self._ready()
        return await self._store.check(fix_temp)

    async def sizes(self) -> tuple[dict[str, int], int | None]:
        """({user id: size of the stored record in bytes}, bytes the folder takes, or None on a server)."""
        self._enter()
        await self._ready()
        return await self._store.sizes()

    def where(self, user_id: int | str) -> str:
        """Where the user's record is, for messages: its file's path, or the server location and id."""
        return self._store.where(_user_key(user_id))

    @property
    def default_structure(self) -> dict[str, Any]:
        """A copy of the structure a new user starts from."""
        return _loads(self._default_bytes)  # type: ignore[no-any-return]

    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with db.exclusive(name):`` holds a lock named name, respected by every process sharing the records.

        PostgreSQL: a session advisory lock; Redis: a lease key, renewed
        while held; a folder, which has one writer process: a lock in this
        process. aiogram's event isolation is made of it.
        """
        self._enter()
        return self._store.exclusive(name)

    async def holder(self) -> str | None:
        """The adapter whose state this location is marked as holding (see hold_state_of), or None."""
        self._enter()
        return await self._store.owner()

    def hold_state_of(self, adapter: str,
                      looks_like_its_records: Callable[[str, dict[str, Any]], bool] | None = None) -> None:
        """Make this JASON hold an adapter's state, in a location marked as that adapter's.

        From the next call on, it refuses a location marked by another
        adapter, or holding records that looks_like_its_records(id, record)
        rejects; it marks an empty one (or one of such records) as adapter's.
        A writable JASON of users' records refuses a marked location. See
        docs/frameworks.md.
        """
        if self._owner not in (None, adapter):
            raise ValueError(f"this JASON holds the state of {self._owner}; give {adapter} a JASON of its own")
        self._owner, self._owner_checked = adapter, False
        self._looks_owned = looks_like_its_records or (lambda key, data: False)

    # -------------------------------------------------- private helpers

    async def _ready(self) -> None:
        """Once, before an instance's first call goes on: these are the records it is for.

        A framework adapter marks the records it keeps as its own (see
        OWNER_MARK), so that its state and users' records never mix: a
        writable JASON of users' records refuses a location an adapter marked,
        and an adapter refuses one holding other records. An adapter claims an
        unmarked location that is empty or already holds records like its own
        (those of a version that did not mark them). A readonly JASON of users'
        records may read any location: it mixes nothing.
        """
        if self._owner_checked:
            return
        if self._owner is None and self._readonly:
            self._owner_checked = True
            return
        marked = await self._store.owner()
        if marked != self._owner:
            if self._owner is None:
                raise JasonError(f"{self._store.location} holds the state of {marked} (a framework adapter); a "
                                 "JASON of users' records must not write there: give the users' records another "
                                 "folder or namespace (readonly=True may read the adapter's records)")
            if marked is not None:
                raise JasonError(f"{self._store.location} holds the state of {marked}; give {self._owner} a "
                                 "JASON of its own: another folder, or another namespace on a server")
            await self._claim_unmarked(self._owner)
        self._owner_checked = True

    async def _claim_unmarked(self, owner: str) -> None:
        """Mark an unmarked location as owner's, unless its first records are not like owner's."""
        for key in (await self._store.keys())[:20]:
            raw = await self._store.read(key)
            try:
                data = None if raw is None else _parse_record(raw, self._where(key))
            except CorruptDataError:
                continue  # says nothing about whose it is; a load reports it
            if data is not None and not self._looks_owned(key, data):
                raise JasonError(f"{self._store.location} holds records that are not {owner}'s (user {key!r} "
                                 f"is one); give {owner} a JASON of its own: another folder, or another "
                                 "namespace on a server")
        if not self._readonly:
            await self._store.claim(owner, f"{owner} marking its records")


    def _enter(self) -> None:
        """Every public call starts here: the instance is open and used from one event loop."""
        if self._store.closed:
            raise JasonError(f"this JASON for {self._store.location} is closed; open a new one")
        self._locks.check_loop(f"the JASON database {self._store.location}")

    def _key(self, user_id: object) -> str:
        """The canonical id of user_id, checked: the one place every call checks its id.

        Every backend takes just the ids a folder can name, so that records
        can move between backends: an id too long for a file name fails here.
        """
        self._enter()
        key = _user_key(user_id)
        _file_name(key)
        return key

    def _hold(self, key: str, operation: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The user's lock for a write; JasonError at once where waiting for it could never end."""
        self._check_may_wait(key, operation)
        return self._holding(key)

    def _check_may_wait(self, key: str, operation: str) -> None:
        """JasonError when this task waiting for the user's lock could never end."""
        try:
            self._locks.check_wait(key)
        except _HeldByThisTask:
            raise JasonError(
                f"{operation}({key!r}) inside edit_user_data({key!r}) in the same task would wait for "
                "itself forever; change the dict that edit_user_data gave you instead (it is saved when "
                "the block ends)"
            ) from None
        except _WouldDeadlock as exc:
            raise JasonError(
                f"{operation}({key!r}) would deadlock: user {key!r} is held by a task that waits for user "
                f"{exc.holder_waits_for!r}, which this task holds. Nothing was changed; edit one user at "
                "a time, or nest edits of several users in the same order everywhere"
            ) from None

    @contextlib.asynccontextmanager
    async def _holding(self, key: str) -> AsyncIterator[None]:
        """The store's admission for a write (see _PostgresStore.admit), then the user's lock."""
        async with self._store.admit(), self._locks.hold(key):
            yield

    def _current(self, key: str, data: dict[str, Any]) -> dict[str, Any]:
        """A stored record as a load returns it: without its version, migrated, with the defaults."""
        version = data.pop(VERSION_KEY, 0)
        if version != len(self._migrations):
            data = self._migrate(key, data, version)
        _merge_defaults(data, self._defaults)
        return data

    def _migrate(self, key: str, data: dict[str, Any], version: object) -> dict[str, Any]:
        latest = len(self._migrations)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CorruptDataError(self._where(key), f"its {VERSION_KEY} is {version!r}, not a version number")
        if version > latest:
            raise JasonError(f"the record of user {key!r} is at version {version}, newer than this code, which "
                             f"knows {latest} migration(s); run the code that wrote it (records are never "
                             "downgraded)")
        for step in range(version, latest):
            try:
                migrated = self._migrations[step](data)
            except Exception as exc:
                raise JasonError(f"migrations[{step}] (version {step} to {step + 1}) raised on user {key!r}: "
                                 f"{type(exc).__name__}: {exc}; the stored record is unchanged") from exc
            data = data if migrated is None else migrated
            if not isinstance(data, dict):
                raise JasonError(f"migrations[{step}] returned {type(data).__name__} for user {key!r}, not a "
                                 "dict (return the record, or None after changing it in place)")
        return data

    def _encode(self, data: Mapping[str, Any]) -> tuple[bytes, bytes]:
        """data as a save stores it: checked, with the version when there are migrations."""
        if not isinstance(data, dict):
            data = dict(data)
        if VERSION_KEY in data:
            raise ValueError(f"{VERSION_KEY!r} is the key JASON keeps a record's version in; "
                             "give that value another name")
        if self._migrations:
            data = {VERSION_KEY: len(self._migrations), **data}
        return _encode_record(data, self._pretty)

    # The one read path: the cache, else the store, under the user's lock where it can be taken.

    async def _read(self, key: str, records: _Records | None = None, *, visiting: bool = False) -> \
            dict[str, Any] | None:
        """The user's record as a load returns it (migrated, with the defaults), or None when there is none.

        The cache first. Else the record is read under the user's lock, so
        that what is read may be cached and a corrupt record quarantined: an
        edit gives its records, and holds the lock already. Read without the
        lock: on a store with no cache to keep and no quarantine (a server, a
        readonly folder); where waiting could never end (the holder waits for
        this task); and for users() (visiting), whose reads of every user
        leave the cache to the users in use. A corrupt record met there, with
        on_corrupt="quarantine", is read again under the lock and moved aside.
        """
        cached = self._cache.get(key)
        if cached is not _NOT_CACHED:
            return None if cached is None else self._current(key, _loads(cached))  # type: ignore[arg-type]
        if records is not None:
            return await self._read_stored(key, records, locked=True)
        if visiting or (not self._store.caches and not self._quarantine):
            try:
                return await self._read_stored(key, self._store, locked=False)
            except CorruptDataError:
                if not (visiting and self._quarantine):
                    raise
            return self._or_defaults(await self._read_holding(key))  # moved aside: visited as a load gives it
        return await self._read_holding(key)

    async def _read_holding(self, key: str) -> dict[str, Any] | None:
        """_read under the user's lock, or without it where waiting for it could never end."""
        try:
            self._locks.check_wait(key)
        except _HeldByThisTask:  # inside this task's own edit of the user: nothing can change the record
            return await self._read_stored(key, self._store, locked=True)
        except _WouldDeadlock:  # the holder waits for us: read the record as it is, without the lock
            return await self._read_stored(key, self._store, locked=False)
        async with self._holding(key):
            return await self._read_stored(key, self._store, locked=True)

    async def _read_stored(self, key: str, records: _Records, locked: bool) -> dict[str, Any] | None:
        """_read's read of the store; locked: the caller holds the user's lock, so the cache cannot go stale."""
        if locked:
            cached = self._cache.get(key)  # filled while this task waited for the lock
            if cached is not _NOT_CACHED:
                return None if cached is None else self._current(key, _loads(cached))  # type: ignore[arg-type]
        raw = await records.read(key)
        try:
            data = None if raw is None else _parse_record(raw, self._where(key))
        except CorruptDataError as exc:
            if not (locked and self._quarantine):
                raise
            moved_to = await records.quarantine(key, "quarantine")
            _log.warning("corrupt record %s (%s): moved it to %s and started user %r afresh from the "
                         "default structure", exc.path, exc.reason, moved_to, key)
            data = None
        if data is None:
            if locked:
                self._cache.put(key, None)
            return None
        current = self._current(key, data)  # a migration that raises leaves nothing cached
        if locked:
            self._cache.put(key, raw)  # the bytes as read: parsing them gives the same data
        return current

    def _or_defaults(self, data: dict[str, Any] | None) -> dict[str, Any]:
        """data, or for a user with no record a fresh copy of the default structure."""
        return _loads(self._default_bytes) if data is None else data

    async def _write_locked(self, key: str, compact: bytes, stored: bytes, operation: str,
                            records: _Records) -> int | None:
        """Write under the user's lock; the write's number while it is not durable yet (see _until_durable)."""
        try:
            await records.write(key, stored, operation)
        finally:
            # Other instances' copies are stale either way; so is ours if the
            # write failed, when the store may hold the old or the new record.
            self._forget(key)
        self._cache.put(key, compact)
        return self._store.unsynced(key)

    # Through a journal, a write is seen by every later read as soon as it is
    # queued, so the user's lock is released then and the next edit of the
    # user need not wait for this one's sync: a storm of edits of one user
    # shares group commits. What a crash could undo must still never reach the
    # caller: a write returns only once it is durable, and so does a read (a
    # load, an edit, a listing) that saw a write not durable yet. The journal
    # makes entries durable in order, so an edit's own write covers what it
    # read. Elsewhere a write is durable when it returns and this costs nothing.

    async def _until_durable(self, write: int | None, read: bool = False) -> None:
        """Return once write (a number the store's unsynced() gave, or None) is durable.

        read: the caller only read that write, so if it failed, the caller
        gets the store's JasonError, not the write's own error.
        """
        if write is not None:
            await self._store.synced(write, read)

    def _last_unsynced(self, keys: Sequence[str]) -> int | None:
        """The last write of any of keys that is not durable yet, or None."""
        return max((write for key in keys if (write := self._store.unsynced(key)) is not None), default=None)

    def _forget(self, key: str) -> None:
        self._cache.drop(key)
        self._store.invalidate(key)

    def _where(self, key: str) -> str:
        return self._store.where(key)


# ---------------------------------------------------------------- the blocking API


class _EditDropped(Exception):
    """Raised inside a blocking edit's async block when the caller's block raised: nothing is saved."""


class _SyncLoop:
    """The event loop every SyncJASON of the process runs on, in a thread of its own.

    One loop for all of them, since JASON's per-user locks serve one loop at
    a time and two SyncJASONs may share a folder. Started by the first
    SyncJASON, ended when the last one closes.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jason-sync", daemon=True)
        self.users = 0
        self.thread.start()

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


_sync_loop: _SyncLoop | None = None


def _take_sync_loop() -> _SyncLoop:
    global _sync_loop
    with _registry_lock:
        if _sync_loop is None:
            _sync_loop = _SyncLoop()
        _sync_loop.users += 1
        return _sync_loop


def _give_back_sync_loop(runner: _SyncLoop) -> None:
    global _sync_loop
    with _registry_lock:
        runner.users -= 1
        if runner.users > 0 or _sync_loop is not runner:
            return
        _sync_loop = None
    runner.end()


class SyncJASON(Generic[Record]):
    """JASON for blocking code (TeleBot, Flask, scripts): the same constructor, methods and errors, without await.

    ``db = SyncJASON("data/users", default_structure={"n": 0})``, then
    ``db.load_user_data(uid)``, ``with db.edit_user_data(uid) as data:``...
    One JASON works underneath, on an event loop in a thread of JASON's own
    (one for every SyncJASON of the process, ended when the last closes):
    each call hands its coroutine to that loop and waits for the outcome, so
    the guarantees are JASON's, and any number of threads may call at once
    (edits of one user take turns). In an edit, a call that would wait for
    the user being edited by the same thread raises JasonError at once, as
    in JASON. In one process, use a folder either through SyncJASON or from
    one event loop through JASON: its per-user locks serve one loop.
    """

    def __init__(self, db_folder: str | os.PathLike[str], default_structure: Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        self._db: JASON[Record] = JASON(db_folder, default_structure, **options)
        self._runner: _SyncLoop | None = _take_sync_loop()
        self._editing = threading.local()  # the users each thread is editing

    def __repr__(self) -> str:
        return "<Sync" + repr(self._db)[1:]

    def __enter__(self) -> SyncJASON[Record]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def folder(self) -> str:
        return self._db.folder

    @property
    def location(self) -> str:
        return self._db.location

    def _call(self, work: Awaitable[_T]) -> _T:
        """Run work on the JASON's loop and wait for its outcome, in the calling thread."""

        async def run() -> _T:
            return await work

        try:
            running = self._submit(run())
        except JasonError:
            getattr(work, "close", lambda: None)()  # never started: no "never awaited" warning
            raise
        return running.result()

    def _refuse_nested(self, user_id: int | str, operation: str) -> None:
        key = _user_key(user_id)
        if key in getattr(self._editing, "keys", ()):
            raise JasonError(f"{operation}({key!r}) inside edit_user_data({key!r}) in the same thread would wait for "
                             "itself forever; change the dict that edit_user_data gave you instead (it is saved "
                             "when the block ends)")

    @property
    def default_structure(self) -> dict[str, Any]:
        return self._db.default_structure

    def hold_state_of(self, adapter: str,
                      looks_like_its_records: Callable[[str, dict[str, Any]], bool] | None = None) -> None:
        """JASON.hold_state_of: this SyncJASON holds an adapter's state (TelebotStateStorage's)."""
        self._db.hold_state_of(adapter, looks_like_its_records)

    def load_user_data(self, user_id: int | str) -> Record:
        return self._call(self._db.load_user_data(user_id))

    def save_user_data(self, user_id: int | str, data: Record) -> None:
        self._refuse_nested(user_id, "save_user_data")
        self._call(self._db.save_user_data(user_id, data))

    def delete_user_data(self, user_id: int | str) -> bool:
        self._refuse_nested(user_id, "delete_user_data")
        return self._call(self._db.delete_user_data(user_id))

    def user_exists(self, user_id: int | str) -> bool:
        return self._call(self._db.user_exists(user_id))

    def user_ids(self) -> list[str]:
        return self._call(self._db.user_ids())

    def users(self, concurrency: int = USERS_CONCURRENCY, *,
              skipped: list[tuple[str, JasonError]] | None = None) -> Generator[tuple[str, Record], None, None]:
        """JASON.users() as a plain iterator: ``for uid, data in db.users():``."""
        visits = cast("AsyncGenerator[tuple[str, Record], None]", self._db.users(concurrency, skipped=skipped))
        try:
            while True:
                try:
                    yield self._call(visits.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._runner is not None:
                self._call(visits.aclose())

    @contextlib.contextmanager
    def edit_user_data(self, user_id: int | str) -> Iterator[Record]:
        """Read-modify-write under the user's lock: saved when the block ends, dropped if it raises."""
        self._refuse_nested(user_id, "edit_user_data")
        given: concurrent.futures.Future[Record] = concurrent.futures.Future()
        release: concurrent.futures.Future[bool] = concurrent.futures.Future()  # True: save

        async def edit() -> None:
            try:
                async with self._db.edit_user_data(user_id) as data:
                    given.set_result(data)
                    if not await asyncio.wrap_future(release):
                        raise _EditDropped
            except _EditDropped:
                pass
            except BaseException as exc:
                if given.done():
                    raise
                given.set_exception(exc)  # the edit never began

        running = self._submit(edit())
        try:
            data = given.result()
        except BaseException:
            running.result()
            raise
        editing = getattr(self._editing, "keys", [])
        self._editing.keys = [*editing, _user_key(user_id)]
        try:
            yield data
        except BaseException:
            release.set_result(False)
            running.result()
            raise
        else:
            release.set_result(True)
            running.result()  # the save's error, if any
        finally:
            self._editing.keys = editing

    def _submit(self, work: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """work started on the JASON's loop; JasonError (and work never started) where it could not run."""
        runner = self._runner
        if runner is None or threading.current_thread() is runner.thread:
            work.close()
            raise JasonError(f"this SyncJASON for {self._db.location} is closed; open a new one" if runner is None
                             else "a SyncJASON call from its own event loop's thread would wait for itself forever; "
                                  "use the JASON underneath (await) there")
        return asyncio.run_coroutine_threadsafe(work, runner.loop)

    def close(self) -> None:
        """Close the JASON (after the calls under way), then end its loop and thread. Closing twice is harmless."""
        if self._runner is None:
            return
        try:
            self._call(self._db.close())
        finally:
            runner, self._runner = self._runner, None
            _give_back_sync_loop(runner)


# ---------------------------------------------------------------- framework adapters
#
# The state a bot framework keeps for itself, in a JASON of its own:
# jason.AiogramStorage (aiogram 3's FSM storage) and jason.PTBPersistence
# (python-telegram-bot's persistence). Each needs its framework's base class,
# so each class is made on first use of its name (the module __getattr__
# below) and `import jason` imports no framework. The logic lives in the
# plain classes here; the made class only adds the framework's base.


def _own_database(db: object, adapter: str, looks_owned: Callable[[str, dict[str, Any]], bool]) -> JASON:
    """db, if it can hold an adapter's records: a JASON opened without a default structure.

    looks_owned tells the adapter's records from others, where an earlier
    version left them unmarked (see JASON._ready).
    """
    if not isinstance(db, JASON):
        raise TypeError(f"{adapter} needs a JASON instance, not {type(db).__name__}: "
                        f"{adapter}(JASON(\"data/...\"))")
    if db.default_structure:
        raise ValueError(f"{adapter} needs a JASON of its own, opened without default_structure: its "
                         "records hold the framework's state, and defaults merged into them would change it")
    db.hold_state_of(adapter, looks_owned)
    return db


def _aiogram_place(key: Any) -> tuple[int | str, str]:
    """(record id, entry name) of an aiogram StorageKey.

    One record per Telegram user, one entry per place the user has state in:
    "bot 42 chat 12345", plus " thread 7", " business \\"id\\"" and
    " destiny \\"name\\"" where the key has them. Strings are written as JSON
    strings, so two different keys never share an entry.
    """
    entry = f"bot {key.bot_id} chat {key.chat_id}"
    if key.thread_id is not None:
        entry += f" thread {key.thread_id}"
    if key.business_connection_id is not None:
        entry += " business " + json.dumps(key.business_connection_id, ensure_ascii=False)
    if key.destiny != "default":
        entry += " destiny " + json.dumps(key.destiny, ensure_ascii=False)
    return key.user_id, entry


class _Expiry:
    """state_ttl and data_ttl of an adapter's entries, in seconds (None: never), as aiogram's RedisStorage has them.

    Setting a state (or data) with a TTL stamps the entry with the time it
    expires ("state_expires", "data_expires": Unix time, from clock). From
    then on a read sees no state (or empty data); every edit of the user's
    record drops what expired, in all its entries; and sweep() does that for
    every record holding something expired, so that the entries of users who
    never come back do not pile up, on a folder too, where nothing expires by
    itself. The adapters start a sweep by themselves at most once per
    SWEEP_SECONDS, in the background.
    """

    SWEEP_SECONDS: Final = 60.0

    def __init__(self, state_ttl: float | None, data_ttl: float | None, clock: Callable[[], float]) -> None:
        for name, ttl in (("state_ttl", state_ttl), ("data_ttl", data_ttl)):
            if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
                raise ValueError(f"{name} must be a positive number of seconds or None, not {ttl!r}")
        self.ttl = {"state": state_ttl, "data": data_ttl}
        self.clock = clock
        self._last_sweep = clock()

    @property
    def on(self) -> bool:
        return any(ttl is not None for ttl in self.ttl.values())

    def stamp(self, entry: dict[str, Any], part: str) -> None:
        """part ("state" or "data") of entry was just set: it expires a TTL from now, if it has one."""
        ttl = self.ttl[part]
        if ttl is None:
            entry.pop(f"{part}_expires", None)
        else:
            entry[f"{part}_expires"] = self.clock() + ttl

    def current(self, entry: dict[str, Any]) -> dict[str, Any]:
        """entry as a read sees it now: an expired state None, expired data empty."""
        now = self.clock()
        if entry.get("state_expires", now + 1) <= now:
            entry = {**entry, "state": None}
            entry.pop("state_expires")
        if entry.get("data_expires", now + 1) <= now:
            entry = {**entry, "data": {}}
            entry.pop("data_expires")
        return entry

    def prune(self, record: dict[str, Any]) -> bool:
        """Drop what expired from every entry of record, and entries left empty; True when anything went."""
        changed = False
        for name, entry in list(record.items()):
            if not isinstance(entry, dict):
                continue
            now_entry = self.current(entry)
            if now_entry is not entry:
                changed = True
                if now_entry.get("state") is None and not now_entry.get("data"):
                    del record[name]
                else:
                    record[name] = now_entry
        return changed

    def sweep_due(self) -> bool:
        """True at most once per SWEEP_SECONDS, when TTLs are on: time to start a sweep."""
        if not self.on or self.clock() - self._last_sweep < self.SWEEP_SECONDS:
            return False
        self._last_sweep = self.clock()
        return True

    def expired_in(self, record: dict[str, Any]) -> bool:
        return self.prune(_copy_json(record))


def _sweep_in_background(sweeps: set[asyncio.Future[int]], sweep: Coroutine[Any, Any, int]) -> None:
    """Run sweep as a task kept in sweeps until done; a failure is logged, and the next sweep tries again."""
    task = asyncio.ensure_future(sweep)
    sweeps.add(task)

    def done(task: asyncio.Future[int]) -> None:
        sweeps.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning("removing expired states failed: %r; the next sweep tries again", task.exception())

    task.add_done_callback(done)


async def _remove_expired(records: AsyncIterator[tuple[str, dict[str, Any]]],
                          edit: Callable[[str], contextlib.AbstractAsyncContextManager[dict[str, Any]]],
                          expiry: _Expiry) -> int:
    """Edit every record holding something expired (each read again under its lock); how many changed."""
    changed = 0
    async for record_id, record in records:
        if expiry.expired_in(record):
            async with edit(record_id) as current:
                changed += expiry.prune(current)
    return changed


_AIOGRAM_ENTRY: Final = re.compile(r"bot -?[0-9]+ chat -?[0-9]+( .*)?", re.DOTALL)


def _looks_like_aiogram_state(key: str, data: dict[str, Any]) -> bool:
    """A Telegram user's record of entries named as _aiogram_place names them."""
    return re.fullmatch(r"-?[0-9]+", key) is not None and all(_AIOGRAM_ENTRY.fullmatch(name) for name in data)


class _AiogramStorage:
    """aiogram 3's FSM storage over a JASON: ``jason.AiogramStorage(JASON("data/fsm"))``.

    Each Telegram user has one record, holding their state and data in every
    chat (see _aiogram_place): ``{"bot 42 chat 12345": {"state": "Form:age",
    "data": {"name": "Ann"}}}``. An entry whose state is None and data empty
    is removed; the record itself stays. Every change is one edit of the
    record, so it is durable when the call returns and never lost to another
    change at the same time. close() closes the JASON once the updates under
    way have finished: aiogram closes the storage when polling stops, while
    handlers may still run, and each of them holds an isolation lock.
    """

    def __init__(self, db: JASON, state_ttl: float | None = None, data_ttl: float | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = _own_database(db, "AiogramStorage", _looks_like_aiogram_state)
        self._expiry = _Expiry(state_ttl, data_ttl, clock)  # clock: for tests, which cannot wait an hour
        self._sweeps: set[asyncio.Future[int]] = set()
        self._locks_held: dict[asyncio.Task[Any] | None, int] = {}  # isolation locks held (or awaited), by task
        self._locks_released = _Busy()

    async def _entry(self, key: Any) -> dict[str, Any]:
        user, name = _aiogram_place(key)
        self._sweep_if_due()
        record = await self.db.load_user_data(user)
        return self._expiry.current(self._checked_entry(record, name, user))

    def _sweep_if_due(self) -> None:
        if self._expiry.sweep_due():
            _sweep_in_background(self._sweeps, self.remove_expired())

    async def remove_expired(self) -> int:
        """Drop every expired state and data (see state_ttl): the number of records changed."""
        return await _remove_expired(self.db.users(), self.db.edit_user_data, self._expiry)

    def _checked_entry(self, record: dict[str, Any], name: str, user: int | str) -> dict[str, Any]:
        entry = record.get(name, {"state": None, "data": {}})
        if not (isinstance(entry, dict) and isinstance(entry.get("data"), dict)
                and isinstance(entry.get("state"), (str, type(None)))):
            raise CorruptDataError(self.db.where(user),
                                   f"{name!r} is not an FSM entry {{\"state\": ..., \"data\": {{...}}}}")
        return entry

    @contextlib.asynccontextmanager
    async def _editing(self, key: Any) -> AsyncIterator[dict[str, Any]]:
        """The key's entry, stored when the block ends; removed when it holds nothing."""
        user, name = _aiogram_place(key)
        self._sweep_if_due()
        async with self.db.edit_user_data(user) as record:
            self._expiry.prune(record)
            entry = self._checked_entry(record, name, user)
            yield entry
            if entry["state"] is None and not entry["data"]:
                record.pop(name, None)
            else:
                record[name] = entry

    async def set_state(self, key: Any, state: Any = None) -> None:
        from aiogram.fsm.state import State

        if isinstance(state, State):
            state = state.state
        if state is not None and not isinstance(state, str):
            raise TypeError(f"an FSM state must be a State, a str or None, not {type(state).__name__}")
        async with self._editing(key) as entry:
            entry["state"] = state
            self._expiry.stamp(entry, "state")

    async def get_state(self, key: Any) -> str | None:
        state: str | None = (await self._entry(key))["state"]
        return state

    async def set_data(self, key: Any, data: Mapping[str, Any]) -> None:
        from aiogram.exceptions import DataNotDictLikeError

        if not isinstance(data, dict):
            raise DataNotDictLikeError(f"Data must be a dict or dict-like object, got {type(data).__name__}")
        plain = _check_storable(data, "FSM data")  # a value JSON cannot hold fails here, not later
        async with self._editing(key) as entry:
            entry["data"] = plain
            self._expiry.stamp(entry, "data")

    async def get_data(self, key: Any) -> dict[str, Any]:
        data: dict[str, Any] = (await self._entry(key))["data"]
        return data

    async def get_value(self, storage_key: Any, dict_key: str, default: Any = None) -> Any:
        return (await self._entry(storage_key))["data"].get(dict_key, default)

    async def update_data(self, key: Any, data: Mapping[str, Any]) -> dict[str, Any]:
        """Merge data into the key's data in one edit: two updates at once both land."""
        async with self._editing(key) as entry:
            entry["data"].update(data)
            entry["data"] = _check_storable(entry["data"], "FSM data")
            self._expiry.stamp(entry, "data")
        return _copy_json(entry["data"])  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Close the JASON once every update under way (each holding an isolation lock) has finished."""
        current = asyncio.current_task()
        await self._locks_released.until(lambda: not any(task is not current for task in self._locks_held))
        for sweep in list(self._sweeps):  # a sweep is done again later; the updates' own edits were waited for
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError, JasonError):
                await sweep
        await self.db.close()

    @contextlib.asynccontextmanager
    async def _holding_lock(self) -> AsyncIterator[None]:
        """Count an isolation lock held (or awaited) for close()."""
        task = asyncio.current_task()
        self._locks_held[task] = self._locks_held.get(task, 0) + 1
        try:
            yield
        finally:
            self._locks_held[task] -= 1
            if not self._locks_held[task]:
                del self._locks_held[task]
            self._locks_released.wake()

    def create_isolation(self) -> Any:
        """An event isolation for Dispatcher(events_isolation=...): one update per key at a time.

        On PostgreSQL and Redis it holds across every process sharing the
        database; on a folder, which has one writer process, within it.
        """
        return _adapter_class("AiogramIsolation")(self)


class _AiogramIsolation:
    """aiogram's BaseEventIsolation over the store's named locks; made by AiogramStorage.create_isolation()."""

    def __init__(self, storage: _AiogramStorage) -> None:
        self.storage = storage
        self.db = storage.db

    @contextlib.asynccontextmanager
    async def lock(self, key: Any) -> AsyncIterator[None]:
        user, name = _aiogram_place(key)
        async with self.storage._holding_lock(), self.db.exclusive(f"{_user_key(user)} {name}"):
            yield

    async def close(self) -> None:
        pass  # the storage closes the JASON


_PTB_RECORD: Final = re.compile(r"(user|chat)_-?[0-9]+|bot_data|callback_data|conversations_.+", re.DOTALL)


def _looks_like_ptb_state(key: str, data: dict[str, Any]) -> bool:
    """A record named as _PTBPersistence names them."""
    return _PTB_RECORD.fullmatch(key) is not None


def _ptb_conversation_key(name: str, key: tuple[Any, ...]) -> str:
    """A ConversationHandler key as a JSON array, "[chat, user]": ints and strs come back as they were."""
    if not isinstance(key, tuple) or not all(isinstance(part, (int, str)) for part in key):
        raise TypeError(f"conversation {name!r}: a key must be a tuple of ints and strs, not {key!r}")
    _check_storable({"key": list(key)}, f"conversation {name!r}")
    return json.dumps(list(key), ensure_ascii=False)


class _PTBPersistence:
    """python-telegram-bot's persistence over a JASON: ``jason.PTBPersistence(JASON("data/ptb"))``.

    user_data, chat_data, bot_data, callback_data and each persistent
    ConversationHandler's states are records of their own: "user_<id>",
    "chat_<id>", "bot_data", "callback_data" and "conversations_<name>", the
    last keyed by each conversation's key as a JSON array ("[chat, user]").
    The Application hands changes over every update_interval seconds; each
    changed record is then saved durably, and an unchanged one is skipped.
    A value JSON cannot hold raises TypeError or ValueError naming it, which
    the Application passes to its error handlers (or logs); and flush(), the
    last step of Application.shutdown(), raises JasonError while any record is
    still unsaved. The JASON stays open: close it in post_shutdown.
    """

    def __init__(self, db: JASON, store_data: Any = None, update_interval: float = 1) -> None:
        super().__init__(store_data=store_data, update_interval=update_interval)  # type: ignore[call-arg]
        self.db = _own_database(db, "PTBPersistence", _looks_like_ptb_state)
        self.store_data: Any
        self._stored: dict[str, bytes] = {}  # record id -> digest of the bytes last read or saved
        self._unsaved: dict[str, str] = {}  # record id -> why its latest version could not be saved
        self._conversation_changes: dict[str, dict[str, Any]] = {}  # record id -> changes not saved yet
        self._conversation_locks: dict[str, asyncio.Lock] = {}
        # The Application hands a pass's data and conversation states over at once (one gather): the
        # states wait for the data saves under way, so that after a crash no user's state is newer
        # than their data.
        self._data_saves = _Busy()

    @staticmethod
    def _digest(compact: bytes) -> bytes:
        import hashlib

        return hashlib.blake2b(compact, digest_size=16).digest()

    async def _load(self, record_id: str) -> dict[str, Any] | None:
        if not await self.db.user_exists(record_id):
            return None
        record = await self.db.load_user_data(record_id)
        self._stored[record_id] = self._digest(_encode_record(record, pretty=False)[0])
        return record

    async def _save(self, record_id: str, data: object, what: str) -> None:
        """Save data as record_id unless it is what was stored last; remember a failure for flush()."""
        with self._data_saves.counting():
            await self._save_data(record_id, data, what)

    async def _save_data(self, record_id: str, data: object, what: str) -> None:
        try:
            if not isinstance(data, Mapping):
                raise TypeError(f"cannot store {what}: PTBPersistence stores dicts, not {type(data).__name__}")
            compact, _ = _encode_record(data, pretty=False, name=what)
            digest = self._digest(compact)
            if self._stored.get(record_id) != digest:
                self._stored.pop(record_id, None)  # unknown until the save returns
                await self.db.save_user_data(record_id, cast("dict[str, Any]", data))
                self._stored[record_id] = digest
        except Exception as exc:
            self._unsaved[record_id] = f"{type(exc).__name__}: {exc}"
            raise
        self._unsaved.pop(record_id, None)

    async def _drop(self, record_id: str) -> None:
        self._stored.pop(record_id, None)
        await self.db.delete_user_data(record_id)
        self._unsaved.pop(record_id, None)

    async def _load_kind(self, kind: str) -> dict[int, Any]:
        """Every user_<id> or chat_<id> record, by id, read a batch at a time."""
        prefix = f"{kind}_"
        record_ids = [record_id for record_id in await self.db.user_ids() if record_id.startswith(prefix)]
        loaded: dict[int, Any] = {}
        for start in range(0, len(record_ids), 100):
            batch = record_ids[start:start + 100]
            for record_id, record in zip(batch, await asyncio.gather(*(self._load(name) for name in batch))):
                number = record_id[len(prefix):]
                if not re.fullmatch(r"-?[1-9][0-9]*|0", number):
                    raise CorruptDataError(self.db.where(record_id), f"not a {kind} id python-telegram-bot uses")
                if record is not None:  # deleted since the listing
                    loaded[int(number)] = record
        return loaded

    async def get_user_data(self) -> dict[int, Any]:
        return await self._load_kind("user") if self.store_data.user_data else {}

    async def get_chat_data(self) -> dict[int, Any]:
        return await self._load_kind("chat") if self.store_data.chat_data else {}

    async def get_bot_data(self) -> Any:
        return (await self._load("bot_data") or {}) if self.store_data.bot_data else {}

    async def get_callback_data(self) -> Any:
        if not self.store_data.callback_data:
            return None
        record = await self._load("callback_data")
        if record is None:
            return None
        # Stored as lists, since JSON has no tuples; handed back as the tuples PTB keeps.
        return [tuple(button) for button in record["buttons"]], record["queries"]

    async def get_conversations(self, name: str) -> dict[tuple[Any, ...], object]:
        record = await self._load(f"conversations_{name}") or {}
        return {tuple(json.loads(key)): state for key, state in record.items()}

    async def update_user_data(self, user_id: int, data: Any) -> None:
        if self.store_data.user_data:
            await self._save(f"user_{user_id}", data, f"user_data[{user_id}]")

    async def update_chat_data(self, chat_id: int, data: Any) -> None:
        if self.store_data.chat_data:
            await self._save(f"chat_{chat_id}", data, f"chat_data[{chat_id}]")

    async def update_bot_data(self, data: Any) -> None:
        if self.store_data.bot_data:
            await self._save("bot_data", data, "bot_data")

    async def update_callback_data(self, data: Any) -> None:
        if self.store_data.callback_data:
            buttons, queries = data
            record = {"buttons": [list(button) for button in buttons], "queries": queries}
            await self._save("callback_data", record, "callback_data")

    async def update_conversation(self, name: str, key: tuple[Any, ...], new_state: object | None) -> None:
        """Record one key's new state (None ends it); changes waiting together are saved in one edit.

        The state is saved after the data saves under way (those the same
        update pass handed over), and not while the data of a user or chat
        in its key could not be saved: a state is never newer than its data.
        A change that could not be saved is kept and saved with the next, or
        named by flush().
        """
        conversation = _ptb_conversation_key(name, key)
        _check_storable({conversation: new_state}, f"conversation {name!r}")  # fails here, for its caller
        record_id = f"conversations_{name}"
        self._conversation_changes.setdefault(record_id, {})[conversation] = new_state
        await asyncio.sleep(0)  # every update of this pass has started: its data saves are counted
        await self._data_saves.until(lambda: self._data_saves.count == 0)
        await self._save_conversations(record_id)

    def _data_unsaved(self, conversation: str) -> str | None:
        """The record of a user or chat in this conversation's key whose data could not be saved, if any."""
        for part in json.loads(conversation):
            for record_id in (f"user_{part}", f"chat_{part}"):
                if record_id in self._unsaved:
                    return record_id
        return None

    async def _save_conversations(self, record_id: str) -> None:
        lock = self._conversation_locks.setdefault(record_id, asyncio.Lock())
        async with lock:
            changes = self._conversation_changes.pop(record_id, {})
            held = {conversation: state for conversation, state in changes.items()
                    if self._data_unsaved(conversation)}
            ready = {conversation: state for conversation, state in changes.items() if conversation not in held}
            try:
                if ready:
                    async with self.db.edit_user_data(record_id) as states:
                        for conversation, state in ready.items():
                            if state is None:
                                states.pop(conversation, None)
                            else:
                                states[conversation] = state
            except Exception as exc:
                held.update(ready)
                self._unsaved[record_id] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if held:  # kept, under any newer change made meanwhile, for the next save or flush()
                    pending = self._conversation_changes.setdefault(record_id, {})
                    for conversation, state in held.items():
                        pending.setdefault(conversation, state)
            if held:
                waiting = sorted({self._data_unsaved(conversation) or "" for conversation in held})
                self._unsaved[record_id] = f"{len(held)} state(s) wait for unsaved data: {', '.join(waiting)}"
            else:
                self._unsaved.pop(record_id, None)

    async def drop_user_data(self, user_id: int) -> None:
        await self._drop(f"user_{user_id}")

    async def drop_chat_data(self, chat_id: int) -> None:
        await self._drop(f"chat_{chat_id}")

    async def refresh_user_data(self, user_id: int, user_data: Any) -> None:
        pass  # this process saved the Application's copy: it is the latest

    async def refresh_chat_data(self, chat_id: int, chat_data: Any) -> None:
        pass

    async def refresh_bot_data(self, bot_data: Any) -> None:
        pass

    async def flush(self) -> None:
        """Every change was saved when it was handed over; raise JasonError for any that could not be.

        Conversation changes kept after a failure are tried once more first.
        """
        for record_id in list(self._conversation_changes):
            with contextlib.suppress(Exception):  # still failing: named below
                await self._save_conversations(record_id)
        if self._unsaved:
            failures = "; ".join(f"{record_id}: {why}" for record_id, why in sorted(self._unsaved.items()))
            raise JasonError(f"PTBPersistence could not save {len(self._unsaved)} record(s) of "
                             f"{self.db.location}, which keep their last saved version: {failures}")


# name -> (the logic, the framework module and base class, the pip package that installs the framework)
def _telebot_place(chat_id: int | str, user_id: int | str, business_connection_id: str | None,
                   message_thread_id: int | None, bot_id: int | None) -> tuple[int | str, str]:
    """(record id, entry name) of a pyTelegramBotAPI state key: named as _aiogram_place names aiogram's."""
    entry = f"bot {bot_id} chat {chat_id}" if bot_id is not None else f"chat {chat_id}"
    if message_thread_id is not None:
        entry += f" thread {message_thread_id}"
    if business_connection_id is not None:
        entry += " business " + json.dumps(business_connection_id, ensure_ascii=False)
    return user_id, entry


# What each state storage call does to a user's record, written once for TeleBot and AsyncTeleBot: each
# takes the record (changed in place, inside one edit) and the entry's name, and returns the call's answer.

def _telebot_set_state(record: dict[str, Any], entry: str, state: Any) -> bool:
    record.setdefault(entry, {"state": None, "data": {}})["state"] = getattr(state, "name", state)
    return True


def _telebot_delete_state(record: dict[str, Any], entry: str) -> bool:
    return record.pop(entry, None) is not None


def _telebot_set_data(record: dict[str, Any], entry: str, key: str, value: Any) -> bool:
    if entry not in record:  # as telebot's own storages do: data goes with a state
        raise RuntimeError(f"no state is set for {entry}: set_state first")
    _check_storable({"value": value}, f"state data {key!r}")
    record[entry]["data"][key] = value
    return True


def _telebot_reset_data(record: dict[str, Any], entry: str) -> bool:
    if entry not in record:
        return False
    record[entry]["data"] = {}
    return True


def _telebot_save(record: dict[str, Any], entry: str, data: Any) -> bool:
    if entry not in record:
        return False
    record[entry]["data"] = _check_storable(data, "state data")
    return True


# The part of the entry each change sets, which starts its time to live again.
_TELEBOT_SETS: Final = {_telebot_set_state: "state", _telebot_set_data: "data", _telebot_save: "data"}


def _telebot_change(expiry: _Expiry, change: Callable[..., bool], record: dict[str, Any], entry: str,
                    *args: Any) -> bool:
    """change applied to record inside its edit, with what expired dropped first and the TTL stamped after."""
    expiry.prune(record)
    answer = change(record, entry, *args)
    part = _TELEBOT_SETS.get(change)
    if answer and part is not None and entry in record:
        expiry.stamp(record[entry], part)
    return answer


class _TelebotStateStorage:
    """pyTelegramBotAPI's state storage for TeleBot over a SyncJASON: ``TeleBot(token, state_storage=
    jason.TelebotStateStorage(SyncJASON("data/states")))``.

    One record per Telegram user, one entry per chat (and thread, business
    connection and bot) they have a state in, as AiogramStorage keeps them:
    ``{"bot 42 chat 12345": {"state": "Form:age", "data": {"name": "Ann"}}}``.
    Every call is one edit of the record: durable when it returns, never lost
    to another thread's call. The answers are telebot's own storages' (True,
    False where there was nothing to change; set_data without a state raises
    RuntimeError).
    """

    def __init__(self, db: SyncJASON[Any], state_ttl: float | None = None, data_ttl: float | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._expiry = _Expiry(state_ttl, data_ttl, clock)  # clock: for tests, which cannot wait an hour
        if not isinstance(db, SyncJASON):
            raise TypeError(f"TelebotStateStorage needs a SyncJASON, not {type(db).__name__}; AsyncTeleBot takes "
                            "AsyncTelebotStateStorage(JASON(...))")
        if db.default_structure:
            raise ValueError("TelebotStateStorage needs a SyncJASON of its own, opened without default_structure: "
                             "defaults merged into its records would change the states")
        db.hold_state_of("TelebotStateStorage", _looks_like_telebot_state)
        self.db = db

    def _edit(self, change: Callable[..., bool], chat_id: int | str, user_id: int | str, *args: Any,
              business_connection_id: str | None = None, message_thread_id: int | None = None,
              bot_id: int | None = None) -> bool:
        record_id, entry = _telebot_place(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        self._sweep_if_due()
        with self.db.edit_user_data(record_id) as record:
            return _telebot_change(self._expiry, change, record, entry, *args)

    def _entry(self, chat_id: int | str, user_id: int | str, business_connection_id: str | None = None,
               message_thread_id: int | None = None, bot_id: int | None = None) -> dict[str, Any]:
        record_id, entry = _telebot_place(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        self._sweep_if_due()
        found = self.db.load_user_data(record_id).get(entry)
        return self._expiry.current(found) if isinstance(found, dict) else {}

    def _sweep_if_due(self) -> None:
        if self._expiry.sweep_due():
            threading.Thread(target=self._sweep, name="jason-telebot-sweep", daemon=True).start()

    def _sweep(self) -> None:
        try:
            self.remove_expired()
        except Exception as exc:  # a thread of its own: logged, and the next sweep tries again
            _log.warning("removing expired states failed: %r; the next sweep tries again", exc)

    def remove_expired(self) -> int:
        """Drop every expired state and data (see state_ttl): the number of records changed."""
        changed = 0
        for record_id, record in self.db.users():
            if self._expiry.expired_in(record):
                with self.db.edit_user_data(record_id) as current:
                    changed += self._expiry.prune(current)
        return changed

    def set_state(self, chat_id: int, user_id: int, state: Any, **where: Any) -> bool:
        return self._edit(_telebot_set_state, chat_id, user_id, state, **where)

    def get_state(self, chat_id: int, user_id: int, **where: Any) -> str | None:
        state: str | None = self._entry(chat_id, user_id, **where).get("state")
        return state

    def delete_state(self, chat_id: int, user_id: int, **where: Any) -> bool:
        return self._edit(_telebot_delete_state, chat_id, user_id, **where)

    def set_data(self, chat_id: int, user_id: int, key: str, value: Any, **where: Any) -> bool:
        return self._edit(_telebot_set_data, chat_id, user_id, key, value, **where)

    def get_data(self, chat_id: int, user_id: int, **where: Any) -> dict[str, Any]:
        data: dict[str, Any] = self._entry(chat_id, user_id, **where).get("data", {})
        return data

    def reset_data(self, chat_id: int, user_id: int, **where: Any) -> bool:
        return self._edit(_telebot_reset_data, chat_id, user_id, **where)

    def save(self, chat_id: int, user_id: int, data: dict[str, Any], business_connection_id: str | None = None,
             message_thread_id: int | None = None, bot_id: int | None = None) -> bool:
        return self._edit(_telebot_save, chat_id, user_id, data, business_connection_id=business_connection_id,
                          message_thread_id=message_thread_id, bot_id=bot_id)

    def get_interactive_data(self, chat_id: int, user_id: int, **where: Any) -> Any:
        """``with storage.get_interactive_data(chat, user) as data:``: saved when the block ends."""
        context = importlib.import_module("telebot.storage.base_storage").StateDataContext
        return context(self, chat_id=chat_id, user_id=user_id, **where)


class _AsyncTelebotStateStorage:
    """TelebotStateStorage for AsyncTeleBot, over a JASON: ``AsyncTeleBot(token, state_storage=
    jason.AsyncTelebotStateStorage(JASON("data/states")))``. The same records and answers."""

    def __init__(self, db: JASON[Any], state_ttl: float | None = None, data_ttl: float | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.db = _own_database(db, "AsyncTelebotStateStorage", _looks_like_telebot_state)
        self._expiry = _Expiry(state_ttl, data_ttl, clock)
        self._sweeps: set[asyncio.Future[int]] = set()

    async def _edit(self, change: Callable[..., bool], chat_id: int | str, user_id: int | str, *args: Any,
                    business_connection_id: str | None = None, message_thread_id: int | None = None,
                    bot_id: int | None = None) -> bool:
        record_id, entry = _telebot_place(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        self._sweep_if_due()
        async with self.db.edit_user_data(record_id) as record:
            return _telebot_change(self._expiry, change, record, entry, *args)

    async def _entry(self, chat_id: int | str, user_id: int | str, business_connection_id: str | None = None,
                     message_thread_id: int | None = None, bot_id: int | None = None) -> dict[str, Any]:
        record_id, entry = _telebot_place(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        self._sweep_if_due()
        found = (await self.db.load_user_data(record_id)).get(entry)
        return self._expiry.current(found) if isinstance(found, dict) else {}

    def _sweep_if_due(self) -> None:
        if self._expiry.sweep_due():
            _sweep_in_background(self._sweeps, self.remove_expired())

    async def remove_expired(self) -> int:
        """Drop every expired state and data (see state_ttl): the number of records changed."""
        return await _remove_expired(self.db.users(), self.db.edit_user_data, self._expiry)

    async def set_state(self, chat_id: int, user_id: int, state: Any, **where: Any) -> bool:
        return await self._edit(_telebot_set_state, chat_id, user_id, state, **where)

    async def get_state(self, chat_id: int, user_id: int, **where: Any) -> str | None:
        state: str | None = (await self._entry(chat_id, user_id, **where)).get("state")
        return state

    async def delete_state(self, chat_id: int, user_id: int, **where: Any) -> bool:
        return await self._edit(_telebot_delete_state, chat_id, user_id, **where)

    async def set_data(self, chat_id: int, user_id: int, key: str, value: Any, **where: Any) -> bool:
        return await self._edit(_telebot_set_data, chat_id, user_id, key, value, **where)

    async def get_data(self, chat_id: int, user_id: int, **where: Any) -> dict[str, Any]:
        data: dict[str, Any] = (await self._entry(chat_id, user_id, **where)).get("data", {})
        return data

    async def reset_data(self, chat_id: int, user_id: int, **where: Any) -> bool:
        return await self._edit(_telebot_reset_data, chat_id, user_id, **where)

    async def save(self, chat_id: int, user_id: int, data: dict[str, Any], business_connection_id: str | None = None,
                   message_thread_id: int | None = None, bot_id: int | None = None) -> bool:
        return await self._edit(_telebot_save, chat_id, user_id, data, business_connection_id=business_connection_id,
                                message_thread_id=message_thread_id, bot_id=bot_id)

    def get_interactive_data(self, chat_id: int, user_id: int, **where: Any) -> Any:
        """``async with storage.get_interactive_data(chat, user) as data:``: saved when the block ends."""
        context = importlib.import_module("telebot.asyncio_storage.base_storage").StateDataContext
        return context(self, chat_id=chat_id, user_id=user_id, **where)

_TELEBOT_ENTRY: Final = re.compile(r"(bot -?[0-9]+ )?chat -?[0-9]+( .*)?", re.DOTALL)


def _looks_like_telebot_state(key: str, data: dict[str, Any]) -> bool:
    """A Telegram user's record of entries named as _telebot_place names them."""
    return re.fullmatch(r"-?[0-9]+", key) is not None and all(_TELEBOT_ENTRY.fullmatch(name) for name in data)


_ADAPTERS: Final = {
    "AiogramStorage": (_AiogramStorage, "aiogram.fsm.storage.base", "BaseStorage", "aiogram"),
    "AiogramIsolation": (_AiogramIsolation, "aiogram.fsm.storage.base", "BaseEventIsolation", "aiogram"),
    "PTBPersistence": (_PTBPersistence, "telegram.ext", "BasePersistence", "python-telegram-bot"),
    "TelebotStateStorage": (_TelebotStateStorage, "telebot.storage.base_storage", "StateStorageBase",
                            "pyTelegramBotAPI"),
    "AsyncTelebotStateStorage": (_AsyncTelebotStateStorage, "telebot.asyncio_storage.base_storage",
                                 "StateStorageBase", "pyTelegramBotAPI"),
}
_adapter_classes: dict[str, type] = {}


def _adapter_class(name: str) -> type:
    """The adapter class called name, made on first use from its logic and its framework's base."""
    made = _adapter_classes.get(name)
    if made is None:
        logic, module, base, package = _ADAPTERS[name]
        try:
            framework_base = getattr(importlib.import_module(module), base)
        except ImportError as exc:
            raise ImportError(f"jason.{name} needs {module.split('.')[0]}, which could not be imported "
                              f"({exc}): pip install {package}") from exc
        made = type(name, (logic, framework_base), {"__module__": __name__, "__doc__": logic.__doc__})
        _adapter_classes[name] = made
    return made


def __getattr__(name: str) -> Any:
    """The framework adapters (jason.AiogramStorage, ...), made on first use (PEP 562)."""
    if name in ("AiogramStorage", "PTBPersistence", "TelebotStateStorage", "AsyncTelebotStateStorage"):
        return _adapter_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- command line


def _expect(ok: bool, message: str) -> None:
    if not ok:  # not assert: python -O would skip the self-test's checks
        raise AssertionError(message)


async def _selftest_checks(folder: str) -> list[str]:
    """Run the built-in checks in folder; return the names of those that passed."""
    passed = []
    default = {"balance": 0, "profile": {"name": "", "tags": []}}
    async with JASON(folder, default) as db:
        record = {"balance": 7, "profile": {"name": "Zoë ✓", "tags": ["a"]}, "ratio": 0.5}
        await db.save_user_data(-100123, record)
        loaded = await db.load_user_data("-100123")
        _expect(loaded == record, f"round trip gave {loaded!r}")
        loaded["profile"]["tags"].append("leak")
        _expect((await db.load_user_data(-100123)) == record, "a returned copy shared state")
        passed.append("round trip")

        async def add_one() -> None:
            async with db.edit_user_data("counter") as data:
                data["balance"] += 1

        await asyncio.gather(*(add_one() for _ in range(200)))
        balance = (await db.load_user_data("counter"))["balance"]
        _expect(balance == 200, f"200 concurrent increments gave {balance}")
        passed.append("concurrency")

        path = os.path.join(folder, _file_name("-100123"))
        before = _read_record_sync(path)
        try:
            await db.save_user_data(-100123, {"bad": float("nan")})
        except ValueError:
            pass
        else:
            raise AssertionError("NaN was accepted")
        _expect(_read_record_sync(path) == before, "a refused save changed the file")
        leftovers = [name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX)]
        _expect(not leftovers, f"temp files left behind: {leftovers}")
        _expect(await db.user_ids() == ["-100123", "counter"], "user_ids() is wrong")
        passed.append("atomic replace")

    sample = {"text": "héllo \u2028 \x00", "n": [1, -2, 2**63, 1.5, True, None], "nested": {"a": {}}}
    for pretty in (False, True):
        stdlib = _dumps_stdlib(sample, pretty)
        _expect(_loads_stdlib(stdlib) == sample, "the stdlib codec does not round-trip")
        _expect(_loads(stdlib) == sample, "the active codec cannot read the stdlib's output")
        _expect(_dumps(sample, pretty) == stdlib, "the codecs wrote different bytes")
    passed.append("stdlib fallback")
    return passed


def _run_selftest() -> int:
    import tempfile

    packages = f"orjson {'on' if HAVE_ORJSON else 'off'}, aiofiles {'on' if HAVE_AIOFILES else 'off'}"
    with tempfile.TemporaryDirectory(prefix="jason-selftest-") as folder:
        try:
            passed = asyncio.run(_selftest_checks(folder))
        except Exception as exc:  # report any failure as a failed self-test, not a traceback
            print(f"selftest FAILED: {type(exc).__name__}: {exc} ({packages})", file=sys.stderr)
            return 1
    print(f"selftest passed: {', '.join(passed)} ({packages}, Python {sys.version.split()[0]})")
    return 0


class _CommandError(Exception):
    """A command's failure, reported as one line on stderr with exit status 1."""


class _UsageError(Exception):
    """A mistake in the command's words: usage, the error and a hint on stderr, exit status 2."""


_READ_ONLY_COMMANDS: Final = "ls, get, check, export and stats"
_AS_FOUND: Final = "*"  # no adapter's name: a command writes the records it finds as they are


@contextlib.asynccontextmanager
async def _opened(location: str, *, write: bool = False, create: bool = False, durable: bool = True,
                  namespace: str = DEFAULT_NAMESPACE, migrations: Sequence[Any] = (),
                  state_of: str | None = _AS_FOUND) -> AsyncIterator[JASON]:
    """A folder or server URL opened for a command, closed after it; a missing folder is an error unless create is set.

    A writing command writes the records it finds, an adapter's too (see
    JASON.hold_state_of); state_of instead names whose records it writes
    where that must match, as copy's target does: None for users', or an
    adapter's name.
    """
    _refuse_unknown_url(location)
    if _server_kind(location) is None:
        if not create and not os.path.isdir(os.path.expanduser(location)):  # noqa: ASYNC240 (a command blocks nothing)
            raise _CommandError(f"no JASON folder at {location}")
        namespace = DEFAULT_NAMESPACE  # a folder is its own namespace
    try:
        # journal=False: a command writes each record's file as it goes, so that a failure is reported at
        # the record it hit (and a folder's journal, had a writer left one, is replayed on opening anyway).
        journal = False if _server_kind(location) is None and write else None
        db: JASON = JASON(location, readonly=not write, durable=durable, namespace=namespace, migrations=migrations,
                          journal=journal)
    except DatabaseLockedError as exc:  # the library's advice (readonly=True) means nothing here
        raise _CommandError(
            f"{exc.folder} is open for writing by {exc.holder}; stop it first "
            f"(the read-only commands {_READ_ONLY_COMMANDS} work beside it)"
        ) from None
    async with db:
        if write:
            holder = await db.holder() if state_of == _AS_FOUND else state_of
            if holder is not None:
                db.hold_state_of(holder)
        yield db


def _command_key(text: str) -> str:
    key = _user_key(text)
    _file_name(key)  # the same check as the API's, before anything is opened
    return key


def _shown_id(key: str) -> str:
    """An id as one line of output: as it is, or as a JSON string when it holds a line break or the like."""
    return key if key.isprintable() else json.dumps(key)


async def _stored_record(db: JASON, key: str) -> dict[str, Any] | None:
    """The user's record as stored ($version and all, no defaults); None when there is none."""
    (found,) = await db.load_stored([key])
    if isinstance(found, CorruptDataError):
        raise found
    return found


def _count(number: int, noun: str) -> str:
    """ "1 user", "2 users"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _size(size: int) -> str:
    """A size for people: "1,234 bytes (1.2 KB)"."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size:,} bytes ({size / scale:.1f} {unit})"
    return f"{size:,} bytes"


def _json_error_position(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):  # orjson's error is a subclass
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return str(exc)


async def _cmd_ls(args: Any) -> int:
    async with _opened(args.location, namespace=args.namespace) as db:
        keys = await db.user_ids()
    if args.count:
        print(len(keys))
    else:
        for key in keys:
            print(_shown_id(key))
    return 0


async def _cmd_get(args: Any) -> int:
    key = _command_key(args.user_id)
    async with _opened(args.location, namespace=args.namespace) as db:
        data = await _stored_record(db, key)
        if data is None:
            raise _CommandError(f"no user {_shown_id(key)} in {db.location}")
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


async def _cmd_set(args: Any) -> int:
    key = _command_key(args.user_id)
    try:
        data = _loads_input(sys.stdin.buffer.read())
    except ValueError as exc:
        raise _CommandError(f"stdin is not valid JSON: {_json_error_position(exc)}") from None
    if not isinstance(data, dict):
        raise _CommandError(f"stdin holds a JSON {type(data).__name__}; a record must be a JSON object")
    async with _opened(args.location, write=True, durable=not args.fast, namespace=args.namespace) as db:
        await db.save_stored(key, data, operation="set")
    return 0


async def _cmd_rm(args: Any) -> int:
    key = _command_key(args.user_id)
    async with _opened(args.location, write=True, durable=not args.fast, namespace=args.namespace) as db:
        if not await db.delete_user_data(key):
            raise _CommandError(f"no user {_shown_id(key)} in {db.location}")
    return 0


async def _cmd_check(args: Any) -> int:
    async with _opened(args.location, write=args.fix_temp, namespace=args.namespace) as db:
        sound, problems = await db.check(fix_temp=args.fix_temp)
    for kind, path, detail in problems:
        print(f"removed: {path}" if kind == "removed" else f"{kind}: {path}: {detail}")
    problems = [problem for problem in problems if problem[0] != "removed"]
    counts = {kind: sum(1 for problem in problems if problem[0] == kind)
              for kind in ("corrupt", "temp", "quarantined", "bad-name", "stray", "journal")}
    print(f"{sound} sound records; " + ", ".join(f"{count} {kind}" for kind, count in counts.items()))
    return 1 if problems else 0


class _Progress:
    """A counter on stderr, shown only on a terminal and only for large folders."""

    def __init__(self, verb: str, total: int, noun: str = "user") -> None:
        self.verb = verb
        self.total = total
        self.noun = noun  # "record" for an adapter's records, which are not all users
        self.shown = total >= 1000 and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.shown and (done % 500 == 0 or done == self.total):
            sys.stderr.write(f"\r{self.verb} {done} of {_count(self.total, self.noun)}")
            sys.stderr.flush()

    def finish(self, done: int, where: str) -> None:
        sys.stderr.write(f"{chr(13) if self.shown else ''}{self.verb} {_count(done, self.noun)} {where}\n")


async def _stored_batches(db: JASON, keys: Sequence[str]) -> \
        AsyncIterator[tuple[int, list[tuple[str, dict[str, Any] | CorruptDataError]]]]:
    """The one record pump of export, import, copy and migrate: (keys done, the batch's stored records).

    RECORDS_PER_BATCH at a time, each batch one load_stored; a user deleted
    since keys were listed is left out. Memory holds one batch.
    """
    for start in range(0, len(keys), RECORDS_PER_BATCH):
        batch = keys[start:start + RECORDS_PER_BATCH]
        found = await db.load_stored(batch)
        yield start + len(batch), [(key, record) for key, record in zip(batch, found) if record is not None]


class _ExportRun:
    """The records of a location, read in batches; corrupt ones are reported and left out."""

    def __init__(self, db: JASON, keys: list[str], verb: str = "exported", noun: str = "user") -> None:
        self.db = db
        self.keys = keys
        self.progress = _Progress(verb, len(keys), noun)
        self.exported = 0
        self.corrupt = 0

    async def batches(self) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
        async for done, found in _stored_batches(self.db, self.keys):
            batch = []
            for key, record in found:
                if isinstance(record, CorruptDataError):
                    self.corrupt += 1
                    print(f"{chr(13) if self.progress.shown else ''}corrupt, left out: {record.path}: "
                          f"{record.reason}", file=sys.stderr)
                else:
                    batch.append((key, record))
            self.exported += len(batch)
            self.progress.update(done)
            yield batch


def _jsonl_lines(batch: list[tuple[str, dict[str, Any]]]) -> bytes:
    lines = []
    for key, data in batch:
        try:
            lines.append(_dumps({"user_id": key, "data": data}) + b"\n")
        except (TypeError, ValueError) as exc:  # only an id with a lone surrogate gets here
            raise _CommandError(f"user {_shown_id(key)} cannot be exported as JSON: {exc}") from exc
    return b"".join(lines)


async def _write_jsonl(out: Any, run: _ExportRun) -> None:
    async for batch in run.batches():
        out.write(_jsonl_lines(batch))


async def _write_sqlite(path: str, run: _ExportRun) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute("CREATE TABLE users (user_id TEXT PRIMARY KEY, data TEXT NOT NULL)")
            async for batch in run.batches():
                connection.executemany("INSERT INTO users (user_id, data) VALUES (?, ?)",
                                       [(key, _dumps(data).decode("utf-8")) for key, data in batch])
    finally:
        connection.close()


_FORMAT_BY_SUFFIX: Final = {".jsonl": "jsonl", ".ndjson": "jsonl", ".sqlite": "sqlite", ".sqlite3": "sqlite",
                            ".db": "sqlite"}


def _export_format(out: str, given: str | None) -> str:
    if given is not None:
        return given
    if out == "-":
        return "jsonl"
    inferred = _FORMAT_BY_SUFFIX.get(os.path.splitext(out)[1].lower())
    if inferred is None:
        raise _CommandError(f"cannot tell the format from the name {out}: name it .jsonl or .sqlite, "
                            "or add --format jsonl or --format sqlite")
    return inferred


async def _cmd_export(args: Any) -> int:
    export_format = _export_format(args.out, args.format)
    async with _opened(args.location, namespace=args.namespace) as db:
        run = _ExportRun(db, await db.user_ids())
        if args.out == "-":
            if export_format == "sqlite":
                raise _CommandError("a SQLite export needs a file name, not -")
            args.interrupted = lambda: f" after {run.exported} users: the export on stdout is incomplete"
            await _write_jsonl(sys.stdout.buffer, run)
            sys.stdout.flush()
            where = "to stdout"
        else:
            # Write beside OUT and rename at the end, so a failed export never leaves half a file as OUT.
            out = os.path.abspath(args.out)  # noqa: ASYNC240 (a command blocks nothing else)
            temp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{secrets.token_hex(4)}.partial")
            args.interrupted = lambda: f": {out} was not written"
            try:
                if export_format == "jsonl":
                    with open(temp, "xb") as file:  # noqa: ASYNC230 (a command blocks nothing else)
                        await _write_jsonl(file, run)
                else:
                    await _write_sqlite(temp, run)
                os.replace(temp, out)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            where = f"to {out}"
    run.progress.finish(run.exported, where)
    if run.corrupt:
        raise _CommandError(f"{run.corrupt} corrupt records were left out of the export (listed above); "
                            "repair or restore them, then export again")
    return 0


_SQLITE_MAGIC: Final = b"SQLite format 3\x00"


class _ImportFile:
    """Every (key, data) of an export file, all checked before anything is written."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._first_seen: dict[str, str] = {}

    def add(self, document: object, position: str) -> None:
        where = f"{self.name} {position}"
        if not (isinstance(document, dict) and "user_id" in document and isinstance(document.get("data"), dict)):
            raise _CommandError(f'{where}: expected {{"user_id": ..., "data": {{...}}}}')
        try:
            key = _command_key(document["user_id"])
            data = _check_storable(document["data"])
        except (TypeError, ValueError) as exc:
            raise _CommandError(f"{where}: {exc}") from None
        if key in self._first_seen:
            raise _CommandError(f"{where}: user {_shown_id(key)} is already on {self._first_seen[key]}")
        self._first_seen[key] = position
        self.records.append((key, data))

    def read_jsonl(self, source: Any) -> None:
        for line_number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                document = _loads_input(line)
            except ValueError as exc:
                raise _CommandError(
                    f"{self.name} line {line_number}: not valid JSON: {_json_error_position(exc)}"
                ) from None
            self.add(document, f"line {line_number}")

    def read_sqlite(self, path: str) -> None:
        import sqlite3

        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            try:
                rows = connection.execute("SELECT user_id, data FROM users ORDER BY rowid").fetchall()
            except sqlite3.OperationalError as exc:
                raise _CommandError(f"{self.name}: not a JASON export ({exc}); export writes a table "
                                    "users(user_id, data)") from None
        finally:
            connection.close()
        for row_number, (user_id, text) in enumerate(rows, 1):
            try:
                raw = text.encode("utf-8") if isinstance(text, str) else text if isinstance(text, bytes) else b""
                data = _loads_input(raw)
            except (ValueError, TypeError) as exc:
                raise _CommandError(f"{self.name} row {row_number}: data is not valid JSON: {exc}") from None
            self.add({"user_id": user_id, "data": data}, f"row {row_number}")


def _read_import_file(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The records of a JSONL or SQLite export (told apart by the SQLite header), or of stdin for -."""
    if path == "-":
        source = _ImportFile("stdin")
        source.read_jsonl(sys.stdin.buffer)
        return source.records
    source = _ImportFile(path)
    with open(path, "rb") as file:
        if file.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
            source.read_sqlite(path)
        else:
            file.seek(0)
            source.read_jsonl(file)
    return source.records


def _same_json(a: object, b: object) -> bool:
    """True when a and b are the same JSON: Python's == takes true, 1 and 1.0 for one value; JSON does not."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        other = cast("dict[str, object]", b)
        return a.keys() == other.keys() and all(_same_json(value, other[key]) for key, value in a.items())
    if isinstance(a, list):
        items = cast("list[object]", b)
        return len(a) == len(items) and all(_same_json(x, y) for x, y in zip(a, items))
    return a == b


class _Transfer:
    """Records saved into a location as they are, a batch at a time: import's and copy's one run.

    plan() looks at what the target holds first: a user stored with exactly
    the given data is skipped, so an interrupted run is simply run again; one
    stored with other data is a clash, and nothing is written unless
    overwrite. run() then saves the rest, each batch's saves overlapping; it
    stops at the end of the first batch in which a save failed. With verify,
    each batch is read back and compared. Memory holds a batch, not the data.
    """

    def __init__(self, target: JASON, keys: list[str],
                 fetch: Callable[[Sequence[str]], Awaitable[list[tuple[str, dict[str, Any]]]]], verb: str,
                 noun: str = "user") -> None:
        # fetch gives the records of some keys, in order: those still there.
        self.target = target
        self.keys = keys
        self.fetch = fetch
        self.verb = verb
        self.noun = noun
        self.same: set[str] = set()
        self.saved = 0
        self.verified = 0
        self.to_save = 0
        self.progress = _Progress(verb, 0, noun)

    async def plan(self, overwrite: bool) -> None:
        existing = set(await self.target.user_ids())
        clashes = []
        async for _, given in self._batches([key for key in self.keys if key in existing]):
            stored = await self.target.load_stored([key for key, _ in given])
            for (key, data), there in zip(given, stored):
                if isinstance(there, dict) and _same_json(there, data):
                    self.same.add(key)
                else:  # other data, or a corrupt record, which differs from anything given
                    clashes.append(key)
        if clashes and not overwrite:
            shown = ", ".join(_shown_id(key) for key in clashes[:5]) + (", ..." if len(clashes) > 5 else "")
            raise _CommandError(
                f"{_count(len(clashes), self.noun)} already {'exists' if len(clashes) == 1 else 'exist'} with other "
                f"data ({shown}); nothing was {self.verb}. Use --overwrite to replace them"
            )
        self.to_save = len(self.keys) - len(self.same)
        self.progress = _Progress(self.verb, self.to_save, self.noun)

    async def _batches(self, keys: list[str]) -> AsyncIterator[tuple[int, list[tuple[str, dict[str, Any]]]]]:
        for start in range(0, len(keys), RECORDS_PER_BATCH):
            batch = keys[start:start + RECORDS_PER_BATCH]
            yield start + len(batch), await self.fetch(batch)

    async def run(self, verify: bool) -> None:
        operation = "import" if self.verb == "imported" else "copy"
        async for _, batch in self._batches([key for key in self.keys if key not in self.same]):
            try:
                await self.target.save_stored_many(batch, operation=operation)
                self.saved += len(batch)
            except Exception:
                # Some of the batch may be saved: those stored as given are counted, and the rest saved
                # one at a time, to name the record that fails.
                stored = await self.target.load_stored([key for key, _ in batch])
                unsaved = [(key, data) for (key, data), there in zip(batch, stored)
                           if not (isinstance(there, dict) and _same_json(there, data))]
                self.saved += len(batch) - len(unsaved)
                for key, data in unsaved:
                    try:
                        await self.target.save_stored(key, data, operation=operation)
                    except Exception as exc:
                        raise _CommandError(f"{self.verb} {self.saved} of {_count(self.to_save, self.noun)}, then "
                                            f"{self.noun} {_shown_id(key)} failed: {exc}; {self.rerun()}") from None
                    self.saved += 1
            self.progress.update(self.saved)
            if verify:
                await self._verify(batch)

    async def _verify(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for (key, data), there in zip(batch, await self.target.load_stored([key for key, _ in batch])):
            if not (isinstance(there, dict) and _same_json(there, data)):
                raise _CommandError(f"{self.noun} {_shown_id(key)} reads back different from "
                                    f"{self.target.location}: the copy is not verified; run it again")
            self.verified += 1

    def rerun(self) -> str:
        verb = "import" if self.verb == "imported" else "copy"
        return f"run the same command again to {verb} the rest ({self.noun}s already {self.verb} are skipped)"

    def how_far(self) -> str:
        doing = "importing" if self.verb == "imported" else "copying"
        # Saves under way may still land after this is said: a rerun can find more.
        return f" after {doing} at least {self.saved} of {_count(self.to_save, self.noun)}; {self.rerun()}"


async def _cmd_import(args: Any) -> int:
    records = dict(_read_import_file(args.file))

    async def fetch(keys: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        return [(key, records[key]) for key in keys]

    async with _opened(args.location, write=True, create=True, durable=not args.fast,
                       namespace=args.namespace) as db:
        run = _Transfer(db, list(records), fetch, "imported")
        await run.plan(args.overwrite)
        args.interrupted = run.how_far
        await run.run(verify=False)
    already = f" ({len(run.same)} already there, unchanged)" if run.same else ""
    run.progress.finish(run.saved, f"into {db.location}{already}")
    return 0


async def _cmd_copy(args: Any) -> int:
    """Copy every user to another location, verifying each batch against the source as it goes."""
    async with _opened(args.location, namespace=args.namespace) as source:
        # An adapter's records (bot_data, a chat's...) are not all users; its target is marked as its own.
        state_of = await source.holder()
        noun = "user" if state_of is None else "record"
        keys = await source.user_ids()
        # A corrupt source record stops the copy before anything is written: one pass reads them all first.
        reader = _ExportRun(source, keys, verb="read", noun=noun)
        async for _ in reader.batches():
            pass
        if reader.corrupt:
            raise _CommandError(f"{_count(reader.corrupt, 'corrupt record')} in {source.location} (listed above); "
                                "nothing was copied: repair or restore them first")

        async def fetch(batch: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
            found = []
            for key, record in zip(batch, await source.load_stored(batch)):
                if isinstance(record, CorruptDataError):
                    raise _CommandError(f"{record}; it went corrupt during the copy: repair it and run again")
                if record is not None:  # None: deleted since the listing
                    found.append((key, record))
            return found

        async with _opened(args.target, write=True, create=True, durable=not args.fast,
                           namespace=args.target_namespace or args.namespace, state_of=state_of) as target:
            run = _Transfer(target, keys, fetch, "copied", noun)
            await run.plan(args.overwrite)
            args.interrupted = run.how_far
            await run.run(verify=True)
    already = f", {len(run.same)} already there" if run.same else ""
    verified = run.verified + len(run.same)  # the users already there were compared by the plan
    run.progress.finish(run.saved, f"to {target.location}{already}; all {verified} verified against the source")
    return 0


def _import_migrations(spec: str) -> tuple[Any, ...]:
    """The migrations named "module:attribute", imported with the current folder on the path."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _CommandError(f"--migrations takes MODULE:NAME (for example bot.records:MIGRATIONS), not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        migrations = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise _CommandError(f"cannot load the migrations {spec}: {exc}") from None
    if not isinstance(migrations, (list, tuple)) or not all(callable(step) for step in migrations):
        raise _CommandError(f"{spec} is a {type(migrations).__name__}; it must be the list of migration functions, "
                            "migrations[n] taking version n to n + 1")
    return tuple(migrations)


async def _cmd_migrate(args: Any) -> int:
    migrations = _import_migrations(args.migrations)
    latest = len(migrations)
    async with _opened(args.location, write=args.apply, durable=not args.fast, namespace=args.namespace,
                              migrations=migrations) as db:
        keys = await db.user_ids()
        versions: dict[object, int] = {}
        failures: list[str] = []
        migrated = 0
        progress = _Progress("migrated" if args.apply else "checked", len(keys))

        async def migrate(key: str, stored: dict[str, Any] | CorruptDataError) -> None:
            nonlocal migrated
            try:
                if isinstance(stored, CorruptDataError):
                    raise stored
                version = stored.get(VERSION_KEY, 0)
                shown = version if type(version) is int else json.dumps(version)  # a bad one is still counted
                versions[shown] = versions.get(shown, 0) + 1
                if version == latest:
                    return
                if args.apply:
                    async with db.edit_user_data(key):  # the load migrates; the save stores the result
                        pass
                else:
                    await db.load_user_data(key)  # readonly: the migrations run, and nothing is written
                migrated += 1
            except JasonError as exc:  # a migration raised, the record is newer, or it is corrupt
                failures.append(f"user {_shown_id(key)}: {exc}")

        async for done, batch in _stored_batches(db, keys):
            await asyncio.gather(*(migrate(key, stored) for key, stored in batch))
            progress.update(done)
    shown = ", ".join(f"{count} at version {version}" for version, count in
                      sorted(versions.items(), key=lambda item: str(item[0])))
    print(f"{sum(versions.values())} users: {shown or 'none'}; this code's version is {latest}")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    if args.apply:
        print(f"migrated {_count(migrated, 'user')} to version {latest}; {len(failures)} failed "
              "and " + ("was" if len(failures) == 1 else "were") + " left unchanged")
    else:
        print(f"would migrate {_count(migrated, 'user')}; {len(failures)} would fail (dry run: nothing was written; "
              "add --apply, with the bot stopped)")
    return 1 if failures else 0


async def _cmd_stats(args: Any) -> int:
    async with _opened(args.location, namespace=args.namespace) as db:
        sizes, folder_bytes = await db.sizes()
    print(f"users: {len(sizes)}")
    print(f"records: {_size(sum(sizes.values()))}")
    if sizes:
        largest = max(sorted(sizes), key=lambda key: sizes[key])
        print(f"largest: {_size(sizes[largest])} (user {_shown_id(largest)})")
    if folder_bytes is not None:
        print(f"folder: {_size(folder_bytes)}")
    return 0


# What jason-db 0.2.0 left behind: <raw id>.json, and <raw id>.json.tmp from a save it never finished.
_OLD_TEMP_SUFFIX: Final = RECORD_SUFFIX + ".tmp"
# Left by `upgrade --apply`. Names alone cannot tell an upgraded folder from a
# 0.2.0 one (0.2.0's "%41" was a literal "%41"); after this, they are new names.
UPGRADE_MARKER_NAME: Final = ".jason-upgraded"


def _is_intact_sync(path: str) -> bool:
    """True when path holds a record that loads."""
    try:
        return _read_record_file_sync(path) is not None
    except CorruptDataError:
        return False


def _plan_upgrade_sync(folder: str, upgraded: bool) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """Read a jason-db 0.2.0 folder: ({old name: new name}, old temp files, [(path, problem)]).

    0.2.0 named a record f"{user_id}.json" with the raw id. A name that is
    already this version's name for that same id stays; any other is renamed
    to the id's new name. Corrupt records are renamed too (so a load reports
    them) but never changed.
    """
    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries)
    renames: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name in names:
        path = os.path.join(folder, name)
        if not name.endswith(RECORD_SUFFIX) or name.startswith("."):
            continue
        if not _is_intact_sync(path):
            problems.append((path, "empty or corrupt: kept byte for byte; repair it or restore it by hand"))
        raw_id = name[: -len(RECORD_SUFFIX)]
        new_key = _user_key_from_file_name(name)
        if new_key is not None:
            if new_key != raw_id and not upgraded:  # 0.2.0 never escaped: its "%41" was a literal "%41"
                problems.append((path, f"ambiguous: this version reads it as user {_shown_id(new_key)}, 0.2.0 as "
                                       f"user {_shown_id(raw_id)}; left alone, rename it by hand"))
            continue
        try:
            new_name = _file_name(_user_key(raw_id))
        except InvalidUserIdError as exc:
            problems.append((path, f"not renamed: {exc}"))
            continue
        if new_name in names or new_name in renames.values():
            problems.append((path, f"not renamed: {new_name} already stands for user {_shown_id(raw_id)}; "
                                   "merge the two by hand"))
            continue
        renames[name] = new_name
    temps = [name for name in names if name.endswith(_OLD_TEMP_SUFFIX)]
    return renames, temps, problems


async def _cmd_upgrade(args: Any) -> int:
    if _server_kind(args.location) is not None:
        raise _CommandError("upgrade renames the files of a jason-db 0.2.0 folder; it has nothing to do on a server")
    # --apply takes the writer lock: the bot must be stopped
    async with _opened(args.location, write=args.apply) as db:
        folder = db.folder
        marker_path = os.path.join(folder, UPGRADE_MARKER_NAME)
        upgraded = os.path.exists(marker_path)  # noqa: ASYNC240 (a command blocks nothing else)
        renames, temps, problems = _plan_upgrade_sync(folder, upgraded)
        verb = "renamed" if args.apply else "would rename"
        for old, new in renames.items():
            if args.apply:
                os.rename(os.path.join(folder, old), os.path.join(folder, new))  # no one else writes: we hold the lock
            print(f"{verb}: {os.path.join(folder, old)} -> {new}")
        for temp in temps:
            record = temp[: -len(".tmp")]
            record_now = renames.get(record, record) if args.apply else record
            temp_path = os.path.join(folder, temp)
            if not _is_intact_sync(os.path.join(folder, record_now)):
                problems.append((temp_path, f"left by an interrupted 0.2.0 save while {record} is missing or corrupt: "
                                            "kept, it may hold the only copy"))
            elif args.apply:
                os.unlink(temp_path)
                print(f"removed: {temp_path} (its record is intact)")
            else:
                print(f"would remove: {temp_path} (its record is intact)")
        if args.apply:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            marker = f"renamed from jason-db 0.2.0 names by jason {__version__} at {stamp}\n"
            _write_atomic_sync(folder, UPGRADE_MARKER_NAME, marker.encode(), durable=True)  # fsyncs the renames too
    for path, why in problems:
        print(f"problem: {path}: {why}")
    outcome = "applied" if args.apply else "dry run, nothing changed; run again with --apply to do it"
    print(f"{len(renames)} renames, {len(temps)} old temp files, {len(problems)} problems: {outcome}")
    return 1 if problems else 0


_Argument = tuple[tuple[str, ...], dict[str, Any]]  # (flags, argparse options)


def _command_table() -> list[tuple[str, Callable[[Any], Awaitable[int]], str, list[_Argument]]]:
    """Each command: (name, handler, summary, [(flags, argparse options)]): the parser is made from it."""
    overwrite = (("--overwrite",), {"action": "store_true", "help": "replace users stored there with other data"})
    apply = (("--apply",), {"action": "store_true", "help": "do it (needs the bot stopped); without it, only show"})
    user_id = (("user_id",), {"metavar": "ID"})
    return [
        ("ls", _cmd_ls, "list the user ids, one per line",
         [(("--count",), {"action": "store_true", "help": "print only how many users there are"})]),
        ("get", _cmd_get, "print a user's record as stored (defaults not merged)", [user_id]),
        ("set", _cmd_set, "replace a user's record with the JSON object on stdin", [user_id]),
        ("rm", _cmd_rm, "delete a user's record", [user_id]),
        ("check", _cmd_check, "report corrupt records, temp, quarantined and stray files",
         [(("--fix-temp",), {"action": "store_true", "help": "remove leftover temp files (needs the bot stopped)"})]),
        ("export", _cmd_export, "write every user to a JSONL or SQLite file",
         [(("--format",), {"choices": ("jsonl", "sqlite"), "default": None,
                           "help": "default: from OUT's name (.jsonl, .ndjson; .sqlite, .sqlite3, .db)"}),
          (("out",), {"metavar": "OUT", "help": "the file to write; - for stdout (JSONL only)"})]),
        ("import", _cmd_import, "load a JSONL or SQLite export into the folder",
         [(("file",), {"metavar": "FILE", "help": "the export to read; - for JSONL on stdin"}), overwrite]),
        ("stats", _cmd_stats, "number of users, record sizes and folder size", []),
        ("copy", _cmd_copy, "copy every user to another location, then verify each copy",
         [(("target",), {"metavar": "TARGET", "help": "the folder or server URL to copy to"}), overwrite,
          (("--target-namespace",), {"metavar": "NAME",
                                      "help": "on a server: TARGET's namespace (default: --namespace)"})]),
        ("migrate", _cmd_migrate, "bring every record to the current version of its migrations",
         [(("--migrations",), {"required": True, "metavar": "MODULE:NAME", "help": "the list of migration "
                               "functions, e.g. bot.records:MIGRATIONS (imported from here)"}), apply]),
        ("upgrade", _cmd_upgrade, "rename a jason-db 0.2.0 folder's files to this version's names", [apply]),
    ]


def _build_parser() -> Any:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # main() adds a hint for the usual slips
            raise _UsageError(message)

    parser = Parser(
        prog="jason",
        description="JASON: a per-user JSON file database for chatbots. "
        "Read-only commands work while a bot runs; writing ones need the bot stopped.",
    )
    parser.add_argument("--version", action="version", version=f"jason {__version__}")
    parser.add_argument("--selftest", action="store_true", help="run the built-in self-check and exit")
    parser.add_argument("location", nargs="?", metavar="LOCATION",
                        help="the database: a folder, or a postgresql:// or redis:// URL")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, metavar="NAME",
                        help=f"on a server: the table or key prefix of the database (default {DEFAULT_NAMESPACE})")
    parser.add_argument("--fast", action="store_true",
                        help="writing commands: do not wait for each save to reach the disk (durable=False)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, handler, summary, arguments in _command_table():
        command = commands.add_parser(name, help=summary)
        for flags, options in arguments:
            command.add_argument(*flags, **options)
        command.set_defaults(handler=handler)
    return parser


def _usage_hint(argv: list[str]) -> str | None:
    """What the user probably meant, for the slips newcomers make."""
    import shlex

    commands = [name for name, _, _, _ in _command_table()]
    words = [word for word in argv if not word.startswith("-")]
    if len(words) == 1 and words[0] not in commands:
        return f"no command after {words[0]}; try: jason {words[0]} ls (commands: {', '.join(commands)})"
    if len(words) >= 2 and words[0] in commands and words[1] not in commands and not os.path.isdir(words[0]):
        rest = " ".join(words[2:])
        return f"the folder comes first: jason {words[1]} {words[0]}{' ' + rest if rest else ''}"
    if len(words) >= 4 and words[1] == "set":
        return f"set reads the record from stdin: echo {shlex.quote(words[3])} | jason {words[0]} set {words[2]}"
    return None


def _global_options_first(argv: list[str]) -> list[str]:
    """argv with --fast and --namespace NAME moved to the front: users write them after the location too."""
    options: list[str] = []
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--fast" or word.startswith("--namespace="):
            options.append(word)
        elif word == "--namespace":
            options += [word, next(words, "")]
        else:
            rest.append(word)
    return options + rest


def _driver_error(exc: BaseException) -> bool:
    """True for an error of a server's driver (asyncpg, redis-py): a failure to report, not a bug."""
    return type(exc).__module__.split(".")[0] in ("asyncpg", "redis")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: exit 0 on success, 1 on failure, 2 on a usage error, 130 on Ctrl-C."""
    import sqlite3

    argv = _global_options_first(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"jason: error: {exc}", file=sys.stderr)
        hint = _usage_hint(argv)
        if hint:
            print(f"jason: {hint}", file=sys.stderr)
        return 2
    if args.selftest:
        return _run_selftest()
    if args.location is None or args.command is None:
        parser.print_usage(sys.stderr)
        print("jason: error: give a folder and a command, or --selftest", file=sys.stderr)
        return 2
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args.interrupted = None  # a command may name here what Ctrl-C would leave undone
    try:
        status: int = asyncio.run(args.handler(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # `jason DIR ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (_CommandError, JasonError, OSError, ValueError, sqlite3.Error) as exc:
        # The library's advice names its arguments; here they are options.
        print(f"jason: {exc}".replace("pass durable=False", "give --fast"), file=sys.stderr)
        return 1
    except Exception as exc:
        if not _driver_error(exc):
            raise
        print(f"jason: {_redacted(args.location)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        note = args.interrupted() if args.interrupted is not None else ""
        print(f"\njason: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
