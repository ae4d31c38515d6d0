"""A sign-up conversation on python-telegram-bot (21 or newer) that JASON keeps across restarts.

Run it with a token from @BotFather:

    BOT_TOKEN=123456:ABC... python examples/ptb_conversation_bot.py

/form asks for a name, an age and a city, one message each; /cancel stops;
/count counts your messages in user_data, the chat's in chat_data and everyone's
in bot_data. The ConversationHandler is persistent: a user halfway through the
form when the bot restarts carries on where they were. Records go to data/ptb
(or $JASON_PTB_FOLDER).
"""

from __future__ import annotations

import os
import sys

from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON, PTBPersistence  # in your bot: vendored beside your code, or pip-installed

NAME, AGE, CITY = range(3)


async def start_form(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text("What is your name?")
    return NAME


async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["name"] = update.message.text
    await update.message.reply_text("How old are you?")
    return AGE


async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    if not update.message.text.isdigit():
        await update.message.reply_text("Please send your age as a number.")
        return AGE
    context.user_data["age"] = int(update.message.text)
    await update.message.reply_text("Which city do you live in?")
    return CITY


async def got_city(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    user = context.user_data
    user["city"] = update.message.text
    context.bot_data["signed_up"] = context.bot_data.get("signed_up", 0) + 1
    await update.message.reply_text(f"Thanks, {user['name']} ({user['age']}) from {user['city']}!")
    return ConversationHandler.END


async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text("Cancelled.")
    return ConversationHandler.END


async def count(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    context.user_data["messages"] = context.user_data.get("messages", 0) + 1
    context.chat_data["messages"] = context.chat_data.get("messages", 0) + 1
    context.bot_data["messages"] = context.bot_data.get("messages", 0) + 1
    await update.message.reply_text(f"You: {context.user_data['messages']}, everyone: {context.bot_data['messages']}")


def build_application(builder: ApplicationBuilder, update_interval: float = 1) -> Application:
    # Changes reach the JASON every update_interval seconds (what a crash can lose: docs/frameworks.md).
    db = JASON(os.environ.get("JASON_PTB_FOLDER", "data/ptb"))

    async def close_db(application: Application) -> None:
        await db.close()  # after the Application's last flush

    persistence = PTBPersistence(db, update_interval=update_interval)
    application = builder.persistence(persistence).post_shutdown(close_db).build()
    text = filters.TEXT & ~filters.COMMAND
    application.add_handler(ConversationHandler(
        entry_points=[CommandHandler("form", start_form)],
        states={
            NAME: [MessageHandler(text, got_name)],
            AGE: [MessageHandler(text, got_age)],
            CITY: [MessageHandler(text, got_city)],
        },
        fallbacks=[CommandHandler("cancel", cancel)],
        name="signup",
        persistent=True,  # its states are kept in the JASON
    ))
    application.add_handler(CommandHandler("count", count))
    return application


def main() -> None:
    token = os.environ.get("BOT_TOKEN") or sys.exit("Set BOT_TOKEN to the token @BotFather gave you.")
    build_application(ApplicationBuilder().token(token)).run_polling()


if __name__ == "__main__":
    main()
