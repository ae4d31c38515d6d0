"""Typed records: JASON[UserRecord] with a TypedDict, so a type checker knows every record's shape.

    python examples/typed_records.py

`make lint` type-checks this file with mypy --strict --warn-unused-ignores:
the assert_type lines below must hold, and each `# type: ignore[...]` marks a
mistake mypy must catch (an ignore that catches nothing fails the check).
Nothing is checked at run time: JASON stores what it is given.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, TypedDict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON  # in your bot: vendored beside your code, or pip-installed


class UserRecord(TypedDict):
    name: str | None
    balance: int
    history: list[str]


DEFAULT_USER: UserRecord = {"name": None, "balance": 0, "history": []}


async def top_up(db: JASON[UserRecord], user_id: int, amount: int) -> int:
    async with db.edit_user_data(user_id) as user:  # user is a UserRecord
        user["balance"] += amount
        user["history"].append(f"+{amount}")
        return user["balance"]


async def main(folder: str) -> None:
    db: JASON[UserRecord] = JASON(folder, default_structure=DEFAULT_USER)
    async with db:
        await top_up(db, 42, 10)
        user = await db.load_user_data(42)
        user["name"] = "Ann"
        await db.save_user_data(42, user)
        async for user_id, record in db.users():
            print(user_id, record["name"], record["balance"], record["history"])


if TYPE_CHECKING:
    from typing_extensions import assert_type

    async def what_the_type_checker_sees(db: JASON[UserRecord], folder: str) -> None:
        assert_type(await db.load_user_data(1), UserRecord)
        async with db.edit_user_data(1) as user:
            assert_type(user, UserRecord)
            user["balance"] = "lots"  # type: ignore[typeddict-item]
            user["nickname"] = "A"  # type: ignore[typeddict-unknown-key]
        async for user_id, record in db.users():
            assert_type(user_id, str)
            assert_type(record, UserRecord)
        await db.save_user_data(1, {"name": None})  # type: ignore[typeddict-item]
        untyped = JASON(folder)  # no type given: records are dict[str, Any], as before
        assert_type(await untyped.load_user_data(1), dict[str, Any])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(folder))
