"""A challenge bot on aiogram 3 that keeps each user's data in JASON.

Run it with a token from @BotFather:

    BOT_TOKEN=123456:ABC... python examples/aiogram_bot.py

Commands: /start, /join NAME, /done, /me. Records go to data/users (or $JASON_FOLDER).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from aiogram import Bot, Dispatcher, Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import Message

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON  # in your bot: vendored beside your code, or pip-installed

DEFAULT_USER: dict[str, Any] = {"name": None, "challenges": {}, "active_challenge": None, "challenge_balance": 0}

router = Router()


@router.message(CommandStart())
async def start(message: Message, db: JASON) -> None:
    async with db.edit_user_data(message.from_user.id) as data:
        data["name"] = message.from_user.first_name
    await message.answer("Welcome! Join a challenge with /join NAME, then send /done each time you do it.")


@router.message(Command("join"))
async def join(message: Message, command: CommandObject, db: JASON) -> None:
    if not command.args:
        await message.answer("Usage: /join NAME")
        return
    name = command.args.strip()
    async with db.edit_user_data(message.from_user.id) as data:
        data["active_challenge"] = name
        data["challenges"].setdefault(name, 0)
    await message.answer(f"You joined {name}.")


@router.message(Command("done"))
async def done(message: Message, db: JASON) -> None:
    # edit_user_data holds this user's lock from load to save: two /done at once both count.
    async with db.edit_user_data(message.from_user.id) as data:
        challenge = data["active_challenge"]
        if challenge is not None:
            data["challenges"][challenge] += 1
            data["challenge_balance"] += 1
    if challenge is None:
        await message.answer("Join a challenge first: /join NAME")
    else:
        balance = data["challenge_balance"]
        await message.answer(f"Done! {challenge}: {data['challenges'][challenge]}, balance {balance}.")


@router.message(Command("me"))
async def me(message: Message, db: JASON) -> None:
    data = await db.load_user_data(message.from_user.id)
    await message.answer(json.dumps(data, ensure_ascii=False, indent=2))


async def open_db(dispatcher: Dispatcher) -> None:
    dispatcher["db"] = JASON(os.environ.get("JASON_FOLDER", "data/users"), DEFAULT_USER)


async def close_db(dispatcher: Dispatcher) -> None:
    await dispatcher["db"].close()


def build_dispatcher() -> Dispatcher:
    dispatcher = Dispatcher()
    dispatcher.include_router(router)
    dispatcher.startup.register(open_db)  # the database opens once, when polling starts
    dispatcher.shutdown.register(close_db)  # and closes when it stops
    return dispatcher


async def main() -> None:
    token = os.environ.get("BOT_TOKEN") or sys.exit("Set BOT_TOKEN to the token @BotFather gave you.")
    await build_dispatcher().start_polling(Bot(token))


if __name__ == "__main__":
    asyncio.run(main())
