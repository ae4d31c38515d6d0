"""A sign-up form on aiogram 3 whose FSM state lives in JASON, so it survives a restart.

Run it with a token from @BotFather:

    BOT_TOKEN=123456:ABC... python examples/aiogram_form_bot.py

/form asks for a name, an age and a city, one message each; /cancel stops.
A user halfway through the form when the bot restarts carries on where they
were. FSM records go to data/fsm (or $JASON_FSM_FOLDER), one per user.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiogram import Bot, Dispatcher, F, Router
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import Message

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON, AiogramStorage  # in your bot: vendored beside your code, or pip-installed

router = Router()


class Form(StatesGroup):
    name = State()
    age = State()
    city = State()


@router.message(Command("form"))
async def start_form(message: Message, state: FSMContext) -> None:
    await state.set_state(Form.name)
    await message.answer("What is your name?")


@router.message(Command("cancel"))
async def cancel(message: Message, state: FSMContext) -> None:
    await state.clear()
    await message.answer("Cancelled.")


@router.message(Form.name, F.text)
async def got_name(message: Message, state: FSMContext) -> None:
    await state.update_data(name=message.text)
    await state.set_state(Form.age)
    await message.answer("How old are you?")


@router.message(Form.age, F.text)
async def got_age(message: Message, state: FSMContext) -> None:
    if not message.text.isdigit():
        await message.answer("Please send your age as a number.")
        return
    await state.update_data(age=int(message.text))
    await state.set_state(Form.city)
    await message.answer("Which city do you live in?")


@router.message(Form.city, F.text)
async def got_city(message: Message, state: FSMContext) -> None:
    data = await state.update_data(city=message.text)
    await state.clear()
    await message.answer(f"Thanks, {data['name']} ({data['age']}) from {data['city']}!")


def build_dispatcher() -> Dispatcher:
    storage = AiogramStorage(JASON(os.environ.get("JASON_FSM_FOLDER", "data/fsm")))
    # The dispatcher closes the storage when polling stops (Ctrl-C, SIGTERM): it waits for the handlers still
    # running, each holding an isolation lock, then closes the JASON. No update in flight is dropped.
    dispatcher = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    dispatcher.include_router(router)
    return dispatcher


async def main() -> None:
    token = os.environ.get("BOT_TOKEN") or sys.exit("Set BOT_TOKEN to the token @BotFather gave you.")
    await build_dispatcher().start_polling(Bot(token))


if __name__ == "__main__":
    asyncio.run(main())
