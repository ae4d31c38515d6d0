"""Offline tests of the example bots: real framework dispatch, recorded replies, records on disk.

python -m unittest -v examples/test_examples.py (skipped when a framework is not installed).
Each test feeds real Update objects through the framework's own dispatch path;
the bot's HTTP layer is a fake that records what the bot tried to send, so no
network traffic happens at all.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jason  # noqa: E402
from jason import JASON, JasonError  # noqa: E402

USERS = 1000
CONCURRENT = 100


def installed(module: str) -> bool:
    try:  # importing, not just finding: aiogram needs aiofiles, which `make test-stdlib` blocks
        importlib.import_module(module)
        return True
    except ImportError:
        return False


HAVE_AIOGRAM = installed("aiogram")
HAVE_PTB = installed("telegram")
HAVE_TELEBOT = installed("telebot")
NEEDS_AIOGRAM = unittest.skipUnless(HAVE_AIOGRAM, "aiogram is not importable: pip install -r examples/requirements.txt")
NEEDS_PTB = unittest.skipUnless(HAVE_PTB, "python-telegram-bot missing: pip install -r examples/requirements.txt")
BOT_TOKEN = "123456:TEST-TOKEN-OFFLINE"
BOT_ID = 123456


def aiogram_recording_bot(blocked: frozenset[int] = frozenset()) -> tuple[Any, list[tuple[int, str]]]:
    """An aiogram Bot whose HTTP session records each message it sends (chat, text) and answers like Telegram.

    A message to a chat in blocked fails as Telegram fails it for a user who blocked the bot. The session's
    sent_at holds when each message was sent.
    """
    from aiogram import Bot
    from aiogram.client.session.base import BaseSession
    from aiogram.exceptions import TelegramForbiddenError
    from aiogram.methods import SendMessage
    from aiogram.types import Chat, Message

    class RecordingSession(BaseSession):
        def __init__(self) -> None:
            super().__init__()
            self.sent: list[tuple[int, str]] = []
            self.sent_at: list[float] = []

        async def make_request(self, bot: Any, method: Any, timeout: int | None = None) -> Any:
            if not isinstance(method, SendMessage):
                raise AssertionError(f"the bot called {type(method).__name__}, which the test does not expect")
            self.sent_at.append(time.monotonic())
            if int(method.chat_id) in blocked:
                raise TelegramForbiddenError(method=method, message="Forbidden: bot was blocked by the user")
            self.sent.append((int(method.chat_id), method.text))
            chat = Chat(id=int(method.chat_id), type="private")
            return Message(message_id=len(self.sent), date=datetime.now(timezone.utc), chat=chat, text=method.text)

        async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("no downloads expected")
            yield b""  # pragma: no cover

        async def close(self) -> None:
            pass

    session = RecordingSession()
    return Bot(BOT_TOKEN, session=session), session.sent


def aiogram_update(update_id: int, user: int, text: str) -> Any:
    """A private message from user, as Telegram would deliver it."""
    from aiogram.types import Chat, Message, Update, User

    return Update(update_id=update_id, message=Message(
        message_id=update_id, date=datetime.now(timezone.utc), chat=Chat(id=user, type="private"),
        from_user=User(id=user, is_bot=False, first_name=f"User{user}"), text=text,
    ))


def ptb_recording_builder() -> tuple[Any, list[tuple[int, str]]]:
    """An ApplicationBuilder whose request layer records each message sent (chat, text) and answers like Telegram."""
    from telegram.ext import ApplicationBuilder
    from telegram.request import BaseRequest

    class RecordingRequest(BaseRequest):
        def __init__(self) -> None:
            self.sent: list[tuple[int, str]] = []

        @property
        def read_timeout(self) -> float | None:
            return None

        async def initialize(self) -> None:
            pass

        async def shutdown(self) -> None:
            pass

        async def do_request(self, url: str, method: str, request_data: Any = None, *args: Any,
                             **kwargs: Any) -> tuple[int, bytes]:
            endpoint = url.rsplit("/", 1)[-1]
            parameters = request_data.parameters if request_data else {}
            if endpoint == "getMe":
                result: dict[str, Any] = {"id": BOT_ID, "is_bot": True, "first_name": "T", "username": "test_bot"}
            elif endpoint == "sendMessage":
                self.sent.append((int(parameters["chat_id"]), parameters["text"]))
                result = {"message_id": len(self.sent), "date": 0, "text": parameters["text"],
                          "chat": {"id": int(parameters["chat_id"]), "type": "private"}}
            else:
                raise AssertionError(f"the bot called {endpoint}, which the test does not expect")
            return 200, json.dumps({"ok": True, "result": result}).encode()

    request = RecordingRequest()
    builder = ApplicationBuilder().token(BOT_TOKEN).request(request).get_updates_request(RecordingRequest())
    return builder, request.sent


def ptb_update(application: Any, update_id: int, user: int, text: str) -> Any:
    """A private message from user (a command when it starts with /), as Telegram would deliver it."""
    from telegram import Update

    message: dict[str, Any] = {
        "message_id": update_id, "date": 0, "chat": {"id": user, "type": "private"}, "text": text,
        "from": {"id": user, "is_bot": False, "first_name": f"User{user}"},
    }
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return Update.de_json({"update_id": update_id, "message": message}, application.bot)


class ChallengeScenario:
    """The same conversation for either framework: 1,000 users, 100 updates in flight at a time."""

    async def asyncSetUp(self) -> None:
        asyncio.get_running_loop().set_debug(False)  # debug mode's per-step checks make 4,500 updates crawl

    async def deliver(self, updates: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    def replies(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    async def run_scenario(self, folder: str) -> None:
        done_counts = {user: 1 + user % 4 for user in range(1, USERS + 1)}
        await self.deliver_all([(user, "/start") for user in done_counts])
        await self.deliver_all([(user, "/join run 5k") for user in done_counts])
        # Each user's /done updates sit side by side, so one batch holds several for the same user.
        await self.deliver_all([(user, "/done") for user, count in done_counts.items() for _ in range(count)])
        await self.deliver_all([(7, "/me"), (8, "/join"), (9, "/unknown")])

        async with JASON(folder, readonly=True) as db:
            self.assertEqual(len(await db.user_ids()), USERS)  # type: ignore[attr-defined]
            for user, count in done_counts.items():
                record = await db.load_user_data(user)
                self.assertEqual(record, {  # type: ignore[attr-defined]
                    "name": f"User{user}", "challenges": {"run 5k": count},
                    "active_challenge": "run 5k", "challenge_balance": count,
                })

        by_chat: dict[int, list[str]] = {}
        for chat, text in self.replies():
            by_chat.setdefault(chat, []).append(text)
        for user, count in done_counts.items():
            texts = by_chat[user]
            self.assertTrue(texts[0].startswith("Welcome"))  # type: ignore[attr-defined]
            self.assertEqual(texts[1], "You joined run 5k.")  # type: ignore[attr-defined]
            balances = sorted(int(re.findall(r"balance (\d+)", text)[0]) for text in texts[2:2 + count])
            self.assertEqual(balances, list(range(1, count + 1)))  # type: ignore[attr-defined]  # no /done lost
        self.assertEqual(json.loads(by_chat[7][-1])["challenge_balance"], done_counts[7])  # type: ignore[attr-defined]
        self.assertEqual(by_chat[8][-1], "Usage: /join NAME")  # type: ignore[attr-defined]
        expected_replies = 2 * USERS + sum(done_counts.values()) + 2  # start, join, each done, /me, bare /join
        self.assertEqual(sum(len(texts) for texts in by_chat.values()), expected_replies)  # type: ignore[attr-defined]

    async def deliver_all(self, updates: list[tuple[int, str]]) -> None:
        for start in range(0, len(updates), CONCURRENT):
            await self.deliver(updates[start:start + CONCURRENT])


@NEEDS_AIOGRAM
class AiogramBotTest(ChallengeScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_through_the_real_dispatcher(self) -> None:
        import aiogram_bot

        bot, self.sent = aiogram_recording_bot()
        dispatcher = aiogram_bot.build_dispatcher()
        ids = itertools.count(1)

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(dispatcher.feed_update(bot, aiogram_update(next(ids), user, text))
                                   for user, text in updates))

        self.deliver = deliver  # type: ignore[method-assign]
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"JASON_FOLDER": folder}):
            await dispatcher.emit_startup(dispatcher=dispatcher, bot=bot, bots=[bot])
            try:
                await self.run_scenario(folder)
            finally:
                await dispatcher.emit_shutdown(dispatcher=dispatcher, bot=bot, bots=[bot])
            with self.assertRaisesRegex(JasonError, "is closed"):  # the shutdown hook closed it
                await dispatcher["db"].user_ids()

    def replies(self) -> list[tuple[int, str]]:
        return self.sent


@NEEDS_PTB
class PTBBotTest(ChallengeScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_through_the_real_application(self) -> None:
        import ptb_bot

        builder, self.sent = ptb_recording_builder()
        application = ptb_bot.build_application(builder)
        ids = itertools.count(1)

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(application.process_update(ptb_update(application, next(ids), user, text))
                                   for user, text in updates))

        self.deliver = deliver  # type: ignore[method-assign]
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"JASON_FOLDER": folder}):
            await application.initialize()
            await application.post_init(application)  # what run_polling does at start-up
            try:
                await self.run_scenario(folder)
            finally:
                await application.post_shutdown(application)  # and at shutdown
                await application.shutdown()
            with self.assertRaisesRegex(JasonError, "is closed"):  # the shutdown hook closed it
                await application.bot_data["db"].user_ids()

    def replies(self) -> list[tuple[int, str]]:
        return self.sent


# ---------------------------------------------------------------- the framework's own state in JASON
#
# The sign-up form of aiogram_form_bot.py and ptb_conversation_bot.py: /form, a name,
# an age (one user in seven first sends a word instead), a city. The bot stops after
# the age and a new one starts on the same folder, so every user finishes a form that
# only the restored state can finish.

def form_steps(user: int) -> list[list[str]]:
    """What the user sends at each step; a list of several messages is sent one after another."""
    age = ["old", str(age_of(user))] if user % 7 == 0 else [str(age_of(user))]
    return [["/form"], [f"User{user}"], age, [f"City{user}"]]


def age_of(user: int) -> int:
    return 18 + user % 60


def thanks(user: int) -> str:
    return f"Thanks, User{user} ({age_of(user)}) from City{user}!"


STEPS_BEFORE_RESTART = 3


class FormScenario:
    """1,000 users through the form, 100 updates in flight, a restart of the bot after the age."""

    sent: list[tuple[int, str]]

    async def asyncSetUp(self) -> None:
        asyncio.get_running_loop().set_debug(False)

    async def deliver(self, updates: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    async def deliver_steps(self, steps: range) -> None:
        for step in steps:
            messages = [(user, text) for user in range(1, USERS + 1) for text in form_steps(user)[step]]
            by_user: dict[int, list[str]] = {}
            for user, text in messages:
                by_user.setdefault(user, []).append(text)
            # One user's messages follow each other, as a person's do: the second waits for the first's reply.
            rounds = max(len(texts) for texts in by_user.values())
            for position in range(rounds):
                batch = [(user, texts[position]) for user, texts in by_user.items() if position < len(texts)]
                for start in range(0, len(batch), CONCURRENT):
                    await self.deliver(batch[start:start + CONCURRENT])

    def check_replies(self) -> None:
        by_chat: dict[int, list[str]] = {}
        for chat, text in self.sent:
            by_chat.setdefault(chat, []).append(text)
        for user in range(1, USERS + 1):
            expected = ["What is your name?", "How old are you?"]
            if user % 7 == 0:
                expected.append("Please send your age as a number.")
            expected += ["Which city do you live in?", thanks(user)]
            self.assertEqual(by_chat[user], expected)  # type: ignore[attr-defined]


@NEEDS_AIOGRAM
class AiogramFormTest(FormScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_finish_the_form_across_a_restart(self) -> None:
        import aiogram_form_bot

        bot, self.sent = aiogram_recording_bot()
        ids = itertools.count(1)
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"JASON_FSM_FOLDER": folder}):
            for steps in (range(STEPS_BEFORE_RESTART), range(STEPS_BEFORE_RESTART, 4)):
                importlib.reload(aiogram_form_bot)  # a restart: a new router, storage and JASON
                dispatcher = aiogram_form_bot.build_dispatcher()

                async def deliver(updates: list[tuple[int, str]], dispatcher: Any = dispatcher) -> None:
                    await asyncio.gather(*(dispatcher.feed_update(bot, aiogram_update(next(ids), user, text))
                                           for user, text in updates))

                self.deliver = deliver  # type: ignore[method-assign]
                await dispatcher.emit_startup(dispatcher=dispatcher, bot=bot, bots=[bot])
                try:
                    await self.deliver_steps(steps)
                finally:
                    await dispatcher.emit_shutdown(dispatcher=dispatcher, bot=bot, bots=[bot])
                with self.assertRaisesRegex(JasonError, "is closed"):  # the dispatcher closed the storage's JASON
                    await dispatcher.storage.db.user_ids()
                if steps.start == 0:  # stopped in the middle of the form: each user's place is on disk
                    async with JASON(folder, readonly=True) as db:
                        for user in (1, 7, USERS):
                            self.assertEqual(await db.load_user_data(user), {f"bot {BOT_ID} chat {user}": {
                                "state": "Form:city", "data": {"name": f"User{user}", "age": age_of(user)}}})
            self.check_replies()
            async with JASON(folder, readonly=True) as db:  # a finished form leaves no state behind
                self.assertEqual(len(await db.user_ids()), USERS)
                for user in range(1, USERS + 1):
                    self.assertEqual(await db.load_user_data(user), {})


@NEEDS_AIOGRAM
class AiogramGracefulStopTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_stop_with_200_updates_in_flight_lets_every_handler_finish(self) -> None:
        import aiogram_form_bot

        bot, sent = aiogram_recording_bot()
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"JASON_FSM_FOLDER": folder}):
            importlib.reload(aiogram_form_bot)
            dispatcher = aiogram_form_bot.build_dispatcher()
            await dispatcher.emit_startup(dispatcher=dispatcher, bot=bot, bots=[bot])
            # As polling hands updates over (handle_as_tasks): each its own task, none awaited by the poller.
            handlers = [asyncio.ensure_future(dispatcher.feed_update(bot, aiogram_update(user, user, "/form")))
                        for user in range(1, 201)]
            await asyncio.sleep(0)  # under way
            await dispatcher.emit_shutdown(dispatcher=dispatcher, bot=bot, bots=[bot])  # what a SIGINT runs
            results = await asyncio.gather(*handlers, return_exceptions=True)
            self.assertEqual([result for result in results if isinstance(result, BaseException)], [])
            self.assertEqual(sorted(chat for chat, _ in sent), list(range(1, 201)))  # every update answered
            async with JASON(folder, readonly=True) as db:
                for user in (1, 200):
                    self.assertEqual(await db.load_user_data(user),
                                     {f"bot {BOT_ID} chat {user}": {"state": "Form:name", "data": {}}})


@NEEDS_PTB
class PTBCrashWindowTest(unittest.IsolatedAsyncioTestCase):
    async def test_a_change_is_durable_within_the_interval_and_two_save_passes(self) -> None:
        """The README's bound: a change made just after a pass took its copy waits for that pass, the
        interval, and the next pass. Saves are slowed to 50 ms so that the passes' share shows."""
        from telegram.ext import MessageHandler, filters

        interval = 0.2
        builder, _ = ptb_recording_builder()
        with tempfile.TemporaryDirectory() as folder:
            persistence = jason.PTBPersistence(JASON(folder), update_interval=interval)
            application = builder.persistence(persistence).build()

            async def remember(update: Any, context: Any) -> None:
                context.user_data["n"] = int(update.message.text)

            application.add_handler(MessageHandler(filters.TEXT, remember))
            real_save, real_update = persistence.db.save_user_data, application.update_persistence
            passes: list[float] = []

            async def slow_save(record_id: str, data: Any) -> None:
                await asyncio.sleep(0.05)
                await real_save(record_id, data)

            async def timed_pass() -> None:
                started = time.monotonic()
                await real_update()
                passes.append(time.monotonic() - started)

            delays = []
            with mock.patch.object(persistence.db, "save_user_data", slow_save), \
                    mock.patch.object(application, "update_persistence", timed_pass):
                await application.initialize()
                await application.start()
                try:
                    async with JASON(folder, readonly=True) as reader:
                        for n in range(1, 9):
                            await asyncio.sleep(random.Random(n).random() * interval)
                            await application.process_update(ptb_update(application, n, 5, str(n)))
                            changed = time.monotonic()
                            while (await reader.load_user_data("user_5")).get("n") != n:  # noqa: ASYNC110
                                await asyncio.sleep(0.005)  # another process's view: nothing to wait on but time
                            delays.append(time.monotonic() - changed)
                finally:
                    await application.stop()
                    await application.shutdown()
                    await persistence.db.close()
        bound = interval + 2 * max(passes) + 0.1  # 0.1 s: the event loop's own delays on a busy machine
        self.assertLessEqual(max(delays), bound, (delays, passes))
        if os.environ.get("JASON_SHOW_CRASH_WINDOW"):
            print(f"\ninterval {interval} s, passes up to {max(passes):.3f} s, changes durable after "
                  f"{min(delays):.3f} to {max(delays):.3f} s")


@NEEDS_PTB
class PTBConversationTest(FormScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_finish_the_conversation_across_a_restart(self) -> None:
        import ptb_conversation_bot

        ids = itertools.count(1)
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"JASON_PTB_FOLDER": folder}):
            self.sent = []
            for steps in (range(STEPS_BEFORE_RESTART), range(STEPS_BEFORE_RESTART, 4)):
                builder, sent = ptb_recording_builder()
                application = ptb_conversation_bot.build_application(builder)

                async def deliver(updates: list[tuple[int, str]], application: Any = application) -> None:
                    await asyncio.gather(*(application.process_update(ptb_update(application, next(ids), user, text))
                                           for user, text in updates))

                self.deliver = deliver  # type: ignore[method-assign]
                await application.initialize()
                await application.start()  # starts the persistence's update loop, as run_polling does
                try:
                    await self.deliver_steps(steps)
                    await deliver([(user, "/count") for user in range(1, 101)])
                finally:
                    await application.stop()  # hands everything to the persistence and flushes it
                    await application.shutdown()
                    await application.post_shutdown(application)  # as run_polling does: closes the JASON
                self.sent += [(chat, text) for chat, text in sent if not text.startswith("You: ")]
                if steps.start == 0:
                    async with JASON(folder, readonly=True) as db:
                        conversations = await db.load_user_data("conversations_signup")
                        self.assertEqual(conversations, {f"[{user}, {user}]": ptb_conversation_bot.CITY
                                                         for user in range(1, USERS + 1)})
                        self.assertEqual(await db.load_user_data("user_7"), {"name": "User7", "age": age_of(7),
                                                                             "messages": 1})
            self.check_replies()
            async with JASON(folder, readonly=True) as db:
                self.assertEqual(await db.load_user_data("conversations_signup"), {})  # every conversation ended
                self.assertEqual(await db.load_user_data("bot_data"), {"signed_up": USERS, "messages": 200})
                self.assertEqual(await db.load_user_data("chat_5"), {"messages": 2})
                self.assertEqual(await db.load_user_data("user_5"), {
                    "name": "User5", "age": age_of(5), "city": "City5", "messages": 2})
                self.assertEqual(await db.load_user_data(f"user_{USERS}"), {
                    "name": f"User{USERS}", "age": age_of(USERS), "city": f"City{USERS}"})

    async def test_a_value_json_cannot_hold_reaches_the_error_handler_and_stops_the_flush(self) -> None:
        from telegram.ext import CommandHandler

        errors: list[BaseException] = []

        async def remember_when(update: Any, context: Any) -> None:
            context.user_data["when"] = datetime.now(timezone.utc)  # not JSON

        async def error_handler(update: Any, context: Any) -> None:
            errors.append(context.error)

        with tempfile.TemporaryDirectory() as folder:
            builder, _ = ptb_recording_builder()
            persistence = jason.PTBPersistence(JASON(folder))
            application = builder.persistence(persistence).build()
            application.add_handler(CommandHandler("when", remember_when))
            application.add_error_handler(error_handler)
            await application.initialize()
            await application.start()
            await application.process_update(ptb_update(application, 1, 5, "/when"))
            await application.stop()
            with self.assertRaisesRegex(JasonError, r"could not save 1 record.*user_5: TypeError: cannot store "
                                                    r"user_data\[5\]\['when'\]: datetime is not JSON"):
                await application.shutdown()  # its last update_persistence() and flush()
            self.assertEqual([str(error) for error in errors],
                             ["cannot store user_data[5]['when']: datetime is not JSON; use dict, list, str, int, "
                              "float, bool or None"])
            self.assertFalse(await persistence.db.user_exists("user_5"))
            await persistence.db.close()


@NEEDS_AIOGRAM
class BroadcastTest(unittest.IsolatedAsyncioTestCase):
    async def test_every_user_once_at_most_30_a_second_and_a_rerun_sends_nothing(self) -> None:
        import aiogram_broadcast

        users = range(1, 81)
        blocked = frozenset(user for user in users if user % 9 == 0)
        reached_before = {user for user in users if user % 10 == 3}  # a run that stopped part way
        bot, sent = aiogram_recording_bot(blocked)
        with tempfile.TemporaryDirectory() as folder:
            async with JASON(folder) as db:
                for user in users:
                    record: dict[str, Any] = {"name": f"User{user}"}
                    if user in reached_before:
                        record["broadcasts"] = {"news-1": "sent"}
                    await db.save_user_data(user, record)

                counts = await aiogram_broadcast.broadcast(bot, db, "news-1", "Hello!")
                expected = [user for user in sorted(users, key=str) if user not in reached_before]
                self.assertEqual([chat for chat, _ in sent], [user for user in expected if user not in blocked])
                self.assertEqual(counts, {"sent": len(expected) - len(blocked - reached_before),
                                          "blocked": len(blocked - reached_before), "skipped": len(reached_before)})
                times = bot.session.sent_at
                self.assertEqual(len(times), len(expected))  # blocked users were tried once, like the rest
                busiest = max(sum(1 for other in times if start <= other < start + 1) for start in times)
                self.assertLessEqual(busiest, aiogram_broadcast.MESSAGES_PER_SECOND)
                for user in users:
                    outcome = "blocked" if user in blocked and user not in reached_before else "sent"
                    self.assertEqual((await db.load_user_data(user))["broadcasts"], {"news-1": outcome})

                again = await aiogram_broadcast.broadcast(bot, db, "news-1", "Hello!")
                self.assertEqual(again, {"sent": 0, "blocked": 0, "skipped": len(users)})
                self.assertEqual(len(times), len(expected))


# ---------------------------------------------------------------- SIGKILL in the middle of the form

KILL_USERS = 500
KILL_BATCH = 50
FORM_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import test_examples
test_examples.run_form_until_killed(*sys.argv[2:])
"""


def run_form_until_killed(framework: str, folder: str, progress_path: str) -> None:
    """The kill tests' child: every user through the form, a batch at a time; progress_path gets "step first_user"
    after each batch, then the child waits to be killed."""
    with open(progress_path, "a", buffering=1, encoding="utf-8") as progress:
        asyncio.run(drive_form(framework, folder, progress))


async def drive_form(framework: str, folder: str, progress: Any) -> None:
    ids = itertools.count(1)
    if framework == "aiogram":
        os.environ["JASON_FSM_FOLDER"] = folder
        import aiogram_form_bot

        bot, _ = aiogram_recording_bot()
        dispatcher = aiogram_form_bot.build_dispatcher()
        await dispatcher.emit_startup(dispatcher=dispatcher, bot=bot, bots=[bot])

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(dispatcher.feed_update(bot, aiogram_update(next(ids), user, text))
                                   for user, text in updates))
    else:
        os.environ["JASON_PTB_FOLDER"] = folder
        import ptb_conversation_bot

        builder, _ = ptb_recording_builder()
        application = ptb_conversation_bot.build_application(builder, update_interval=0.05)
        await application.initialize()
        await application.start()

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(application.process_update(ptb_update(application, next(ids), user, text))
                                   for user, text in updates))

    for step in range(4):
        for first in range(1, KILL_USERS + 1, KILL_BATCH):
            users = range(first, first + KILL_BATCH)
            for position in range(2):  # the age step sends a word first for one user in seven
                await deliver([(user, form_steps(user)[step][position])
                               for user in users if position < len(form_steps(user)[step])])
            progress.write(f"{step} {first}\n")
    await asyncio.Event().wait()


def reachable(user: int, progress: list[tuple[int, int]], after_step: dict[int, int]) -> range:
    """The ranks a user's state may have after a kill: from what the finished batches reached to what the
    batch in flight could reach. after_step maps the last finished step (-1: none) to its rank."""
    finished = max((step for step, first in progress if first <= user < first + KILL_BATCH), default=-1)
    last_step, last_first = progress[-1]
    next_step, next_first = (last_step, last_first + KILL_BATCH) if last_first + KILL_BATCH <= KILL_USERS \
        else (last_step + 1, 1)
    in_flight = next_first <= user < next_first + KILL_BATCH and next_step <= 3
    return range(after_step[finished], after_step[finished + 1 if in_flight else finished] + 1)


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as file:
        return file.read().splitlines()


class FormKillMixin:
    """SIGKILL a bot in the middle of the form, at a different batch each round."""

    framework: str

    def kill_in_the_middle(self, folder: str, ready: Callable[[], bool] = lambda: True) -> list[tuple[int, int]]:
        """Run the child until a random batch has finished, kill it, and return the batches it finished."""
        progress_path = os.path.join(os.path.dirname(folder), "progress")
        stop_after = random.randrange(2, 4 * KILL_USERS // KILL_BATCH - 2)
        child = subprocess.Popen([sys.executable, "-c", FORM_CHILD, HERE, self.framework, folder, progress_path])
        try:
            deadline = time.monotonic() + 120
            while True:
                lines = read_lines(progress_path) if os.path.exists(progress_path) else []
                if len(lines) >= stop_after and ready():
                    break
                if child.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the child stopped or stalled after {len(lines)} batches")
                time.sleep(0.002)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        lines = read_lines(progress_path)  # the batches finished before the kill
        os.remove(progress_path)
        return [(int(step), int(first)) for step, first in (line.split() for line in lines)]


@NEEDS_AIOGRAM
class AiogramKillTest(FormKillMixin, unittest.TestCase):
    framework = "aiogram"
    # The records a user passes through, in order; each step writes some of them.
    RANKS = ("not started", ("Form:name", ()), ("Form:name", ("name",)), ("Form:age", ("name",)),
             ("Form:age", ("name", "age")), ("Form:city", ("name", "age")), ("Form:city", ("name", "age", "city")),
             (None, ("name", "age", "city")), "finished")
    AFTER_STEP: ClassVar[dict[int, int]] = {-1: 0, 0: 1, 1: 3, 2: 5, 3: 8}

    def test_every_record_is_whole_and_every_user_at_a_state_they_reached(self) -> None:
        for round_number in range(3):
            with tempfile.TemporaryDirectory() as work, self.subTest(round=round_number):
                folder = os.path.join(work, "fsm")
                progress = self.kill_in_the_middle(folder)
                records = asyncio.run(self.read_records(folder))
                for user in range(1, KILL_USERS + 1):
                    record = records.get(str(user), {})
                    self.assertTrue(self.ranks(user, record) & set(reachable(user, progress, self.AFTER_STEP)),
                                    f"user {user}, killed after batch {progress[-1]}: {record}")

    @staticmethod
    async def read_records(folder: str) -> dict[str, dict[str, Any]]:
        async with JASON(folder, readonly=True) as db:  # a torn record would raise CorruptDataError here
            return {user: await db.load_user_data(user) for user in await db.user_ids()}

    def ranks(self, user: int, record: dict[str, Any]) -> set[int]:
        """The record's place in RANKS ("not started" and "finished" look alike: an empty record)."""
        if not record:
            return {0, len(self.RANKS) - 1}
        self.assertEqual(list(record), [f"bot {BOT_ID} chat {user}"])
        entry = record[f"bot {BOT_ID} chat {user}"]
        values = {"name": f"User{user}", "age": age_of(user), "city": f"City{user}"}
        for rank, expected in enumerate(self.RANKS):
            if isinstance(expected, tuple) and entry == {"state": expected[0],
                                                        "data": {field: values[field] for field in expected[1]}}:
                return {rank}
        raise AssertionError(f"user {user} has a record no step writes: {record}")


@NEEDS_PTB
class PTBKillTest(FormKillMixin, unittest.TestCase):
    framework = "ptb"
    AFTER_STEP: ClassVar[dict[int, int]] = {-1: 0, 0: 1, 1: 2, 2: 3, 3: 4}  # ranks: not started, NAME, AGE, CITY, ended

    def test_every_record_is_whole_and_every_user_at_a_state_they_reached(self) -> None:
        import ptb_conversation_bot as bot

        rank_of_state: dict[object, int] = {bot.NAME: 1, bot.AGE: 2, bot.CITY: 3}
        for round_number in range(3):
            with tempfile.TemporaryDirectory() as work, self.subTest(round=round_number):
                folder = os.path.join(work, "ptb")
                # Killed once the persistence has saved conversations at least once (every 0.05 s here).
                def saved_once(folder: str = folder) -> bool:  # its file, or the journal holding it till a checkpoint
                    return (os.path.exists(os.path.join(folder, "conversations_signup.json"))
                            or "conversations_signup" in jason._JournalReader(folder).newer_all())
                progress = self.kill_in_the_middle(folder, ready=saved_once)
                conversations, user_data = asyncio.run(self.restore(folder))
                self.assertTrue(conversations)
                for user in range(1, KILL_USERS + 1):
                    # The persistence saves what changed every update_interval, so a user may be behind
                    # the last batch, but never ahead of what was sent, and never at a state not reached.
                    latest = reachable(user, progress, self.AFTER_STEP).stop - 1
                    state = conversations.get((user, user))
                    ranks = {0, 4} if state is None else {rank_of_state[state]}
                    self.assertTrue(min(ranks) <= latest, f"user {user} at {state}, beyond batch {progress[-1]}")
                    values = {"name": f"User{user}", "age": age_of(user), "city": f"City{user}"}
                    data = user_data.get(user, {})
                    self.assertEqual(data, {field: values[field] for field in data})

    @staticmethod
    async def restore(folder: str) -> tuple[dict[tuple[Any, ...], object], dict[int, Any]]:
        """What a restarted bot gets: every record readable, through the persistence itself."""
        persistence = jason.PTBPersistence(JASON(folder))
        try:
            return await persistence.get_conversations("signup"), await persistence.get_user_data()
        finally:
            await persistence.db.close()


def telebot_message(update_id: int, user: int, text: str) -> Any:
    from telebot import types

    message: dict[str, Any] = {"message_id": update_id, "date": 0, "chat": {"id": user, "type": "private"},
                               "from": {"id": user, "is_bot": False, "first_name": f"U{user}"}, "text": text}
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return types.Update.de_json({"update_id": update_id, "message": message})


@unittest.skipUnless(HAVE_TELEBOT, "pyTelegramBotAPI missing: pip install -r examples/requirements.txt")
class TelebotFormTest(unittest.TestCase):
    """examples/telebot_form_bot.py through TeleBot's own worker threads, stopped and started in the middle."""

    USERS = 200

    def test_every_user_finishes_the_form_across_a_restart_and_the_admin_report_reads_them(self) -> None:
        import admin_report
        import telebot_form_bot

        replies: list[tuple[int, str]] = []
        ids = itertools.count(1)
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {
                "JASON_FOLDER": os.path.join(folder, "users"), "JASON_STATES_FOLDER": os.path.join(folder, "states")}):
            for steps in ([("/start",), ("Ann",)], [("not a number", "30")]):
                bot, users, states = telebot_form_bot.build_bot(BOT_TOKEN)
                bot.reply_to = lambda message, text, **_: replies.append((message.from_user.id, text))  # offline
                try:
                    for texts in steps:
                        for text in texts:
                            expected = len(replies) + self.USERS
                            bot.process_new_updates([telebot_message(next(ids), user, text)
                                                     for user in range(1, self.USERS + 1)])
                            deadline = time.monotonic() + 60
                            while len(replies) < expected:  # the worker threads answer in their own time
                                self.assertLess(time.monotonic(), deadline, "the bot stopped answering")
                                time.sleep(0.01)
                    if steps[0] == ("/start",):  # stopped halfway: the report already reads the users
                        self.assertEqual(admin_report.report(os.environ["JASON_FOLDER"]), "0 users gave their age")
                finally:
                    bot.worker_pool.close()
                    users.close()
                    states.close()
            self.assertEqual(admin_report.report(os.environ["JASON_FOLDER"]),
                             f"{self.USERS} users gave their age, 30.0 on average")
        for user in range(1, self.USERS + 1):
            self.assertEqual([text for to, text in replies if to == user],
                             ["What is your name?", "How old are you?", "Please send your age as a number.",
                              "Thanks, Ann!"])


class ReadmeSnippetsTest(unittest.TestCase):
    def test_the_readme_snippets_are_the_examples_code(self) -> None:
        """docs/frameworks.md's snippets, and the README's open and close hooks, are the examples' code."""
        with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as file:
            front = re.findall(r"```python\n(.*?)```", file.read(), re.DOTALL)[1]  # after the first example
        with open(os.path.join(HERE, "aiogram_bot.py"), encoding="utf-8") as file:
            self.assertIn(front.strip("\n"), file.read())
        with open(os.path.join(HERE, "..", "docs", "frameworks.md"), encoding="utf-8") as file:
            readme = file.read() + "\n## "  # the last section ends too
        for heading, examples in [
            ("## Use with your bot framework", ("aiogram_bot.py", "ptb_bot.py")),
            ("## Your framework's own state", ("aiogram_form_bot.py", "ptb_conversation_bot.py",
                                               "telebot_form_bot.py")),
        ]:
            section = readme[readme.index(heading):]
            section = section[:section.index("\n## ", 1)]
            snippets = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
            self.assertEqual(len(snippets), len(examples))
            for snippet, example in zip(snippets, examples):
                with open(os.path.join(HERE, example), encoding="utf-8") as file:
                    code = file.read()
                for block in snippet.split("\n\n\n"):
                    self.assertIn(block.strip("\n"), code, f"the README's {example} snippet drifted from the example")


def load_tests(loader: unittest.TestLoader, tests: unittest.TestSuite, pattern: str | None) -> unittest.TestSuite:
    """Shared between `make test`'s two processes, as test_jason's classes are."""
    import test_jason

    return test_jason.claimed(tests)


if __name__ == "__main__":
    unittest.main()
