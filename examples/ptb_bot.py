"""A challenge bot on python-telegram-bot (21 or newer) that keeps each user's data in JASON.

Run it with a token from @BotFather:

    BOT_TOKEN=123456:ABC... python examples/ptb_bot.py

Commands: /start, /join NAME, /done, /me. Records go to data/users (or $JASON_FOLDER).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from telegram import Update
from telegram.ext import Application, ApplicationBuilder, CommandHandler, ContextTypes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON  # in your bot: vendored beside your code, or pip-installed

DEFAULT_USER: dict[str, Any] = {"name": None, "challenges": {}, "active_challenge": None, "challenge_balance": 0}


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    db: JASON = context.bot_data["db"]
    async with db.edit_user_data(update.effective_user.id) as data:
        data["name"] = update.effective_user.first_name
    await update.message.reply_text("Welcome! Join a challenge with /join NAME, then send /done each time you do it.")


async def join(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    if not context.args:
        await update.message.reply_text("Usage: /join NAME")
        return
    name = " ".join(context.args)
    db: JASON = context.bot_data["db"]
    async with db.edit_user_data(update.effective_user.id) as data:
        data["active_challenge"] = name
        data["challenges"].setdefault(name, 0)
    await update.message.reply_text(f"You joined {name}.")


async def done(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    db: JASON = context.bot_data["db"]
    # edit_user_data holds this user's lock from load to save: two /done at once both count.
    async with db.edit_user_data(update.effective_user.id) as data:
        challenge = data["active_challenge"]
        if challenge is not None:
            data["challenges"][challenge] += 1
            data["challenge_balance"] += 1
    if challenge is None:
        await update.message.reply_text("Join a challenge first: /join NAME")
    else:
        balance = data["challenge_balance"]
        await update.message.reply_text(f"Done! {challenge}: {data['challenges'][challenge]}, balance {balance}.")


async def me(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    db: JASON = context.bot_data["db"]
    data = await db.load_user_data(update.effective_user.id)
    await update.message.reply_text(json.dumps(data, ensure_ascii=False, indent=2))


async def open_db(application: Application) -> None:
    application.bot_data["db"] = JASON(os.environ.get("JASON_FOLDER", "data/users"), DEFAULT_USER)


async def close_db(application: Application) -> None:
    await application.bot_data["db"].close()


def build_application(builder: ApplicationBuilder) -> Application:
    application = (
        builder.post_init(open_db)  # the database opens once, when the bot starts
        .post_shutdown(close_db)  # and closes when it stops
        .concurrent_updates(True)  # updates run at once; edit_user_data keeps each user's changes whole
        .build()
    )
    for command, callback in {"start": start, "join": join, "done": done, "me": me}.items():
        application.add_handler(CommandHandler(command, callback))
    return application


def main() -> None:
    token = os.environ.get("BOT_TOKEN") or sys.exit("Set BOT_TOKEN to the token @BotFather gave you.")
    build_application(ApplicationBuilder().token(token)).run_polling()


if __name__ == "__main__":
    main()
