"""A two-step form on pyTelegramBotAPI's blocking TeleBot, its states and answers kept by JASON.

Run it with a token from @BotFather:

    BOT_TOKEN=123456:ABC... python examples/telebot_form_bot.py

/start asks for a name, then an age; a user halfway through when the bot
restarts carries on where they were. The users' profiles go to data/users (or
$JASON_FOLDER), the form's states to data/states (or $JASON_STATES_FOLDER):
each in a SyncJASON of its own, the blocking API TeleBot's worker threads call.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from telebot import TeleBot, custom_filters
from telebot.states import State, StatesGroup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import SyncJASON, TelebotStateStorage  # in your bot: vendored beside your code, or pip-installed


class Form(StatesGroup):
    name = State()
    age = State()


def build_bot(token: str) -> tuple[TeleBot, SyncJASON, SyncJASON]:
    users = SyncJASON(os.environ.get("JASON_FOLDER", "data/users"), {"name": None, "age": None})
    states = SyncJASON(os.environ.get("JASON_STATES_FOLDER", "data/states"))
    bot = TeleBot(token, state_storage=TelebotStateStorage(states))
    bot.add_custom_filter(custom_filters.StateFilter(bot))

    @bot.message_handler(commands=["start"])
    def start(message: Any) -> None:
        bot.set_state(message.from_user.id, Form.name, message.chat.id)
        bot.reply_to(message, "What is your name?")

    @bot.message_handler(state=Form.name)
    def name(message: Any) -> None:
        bot.add_data(message.from_user.id, message.chat.id, name=message.text)
        bot.set_state(message.from_user.id, Form.age, message.chat.id)
        bot.reply_to(message, "How old are you?")

    @bot.message_handler(state=Form.age)
    def age(message: Any) -> None:
        if not message.text.isdigit():
            bot.reply_to(message, "Please send your age as a number.")
            return
        with bot.retrieve_data(message.from_user.id, message.chat.id) as answers:
            given_name = answers["name"]
        with users.edit_user_data(message.from_user.id) as profile:
            profile["name"], profile["age"] = given_name, int(message.text)
        bot.delete_state(message.from_user.id, message.chat.id)
        bot.reply_to(message, f"Thanks, {given_name}!")

    return bot, users, states


if __name__ == "__main__":
    bot, users, states = build_bot(os.environ["BOT_TOKEN"])
    try:
        bot.infinity_polling()
    finally:
        users.close()
        states.close()
