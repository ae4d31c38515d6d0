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
import re
import sys
import tempfile
import unittest
from datetime import datetime, timezone
from typing import Any
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from jason import JASON, JasonError  # noqa: E402

USERS = 1000
CONCURRENT = 100


def installed(module: str) -> bool:
    try:  # importing, not just finding: aiogram needs aiofiles, which `make test-stdlib` blocks
        importlib.import_module(module)
        return True
    except ImportError:
        return False


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


@unittest.skipUnless(installed("aiogram"), "aiogram is not importable: pip install -r examples/requirements.txt")
class AiogramBotTest(ChallengeScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_through_the_real_dispatcher(self) -> None:
        import aiogram_bot
        from aiogram import Bot
        from aiogram.client.session.base import BaseSession
        from aiogram.methods import SendMessage
        from aiogram.types import Chat, Message, Update, User

        class RecordingSession(BaseSession):
            """The bot's HTTP session: records each request and answers it like Telegram would."""

            def __init__(self) -> None:
                super().__init__()
                self.sent: list[tuple[int, str]] = []

            async def make_request(self, bot: Any, method: Any, timeout: int | None = None) -> Any:
                if not isinstance(method, SendMessage):
                    raise AssertionError(f"the bot called {type(method).__name__}, which the test does not expect")
                self.sent.append((int(method.chat_id), method.text))
                chat = Chat(id=int(method.chat_id), type="private")
                return Message(message_id=len(self.sent), date=datetime.now(timezone.utc), chat=chat, text=method.text)

            async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("no downloads expected")
                yield b""  # pragma: no cover

            async def close(self) -> None:
                pass

        self.session = RecordingSession()
        bot = Bot("123456:TEST-TOKEN-OFFLINE", session=self.session)
        dispatcher = aiogram_bot.build_dispatcher()
        ids = itertools.count(1)

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(dispatcher.feed_update(bot, Update(update_id=(n := next(ids)), message=Message(
                message_id=n, date=datetime.now(timezone.utc), chat=Chat(id=user, type="private"),
                from_user=User(id=user, is_bot=False, first_name=f"User{user}"), text=text,
            ))) for user, text in updates))

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
        return self.session.sent


@unittest.skipUnless(installed("telegram"), "python-telegram-bot missing: pip install -r examples/requirements.txt")
class PTBBotTest(ChallengeScenario, unittest.IsolatedAsyncioTestCase):
    async def test_1000_users_through_the_real_application(self) -> None:
        import ptb_bot
        from telegram import Update
        from telegram.ext import ApplicationBuilder
        from telegram.request import BaseRequest

        class RecordingRequest(BaseRequest):
            """The bot's request layer: records each call and answers it like Telegram would."""

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
                    result: dict[str, Any] = {"id": 123456, "is_bot": True, "first_name": "T", "username": "test_bot"}
                elif endpoint == "sendMessage":
                    self.sent.append((int(parameters["chat_id"]), parameters["text"]))
                    result = {"message_id": len(self.sent), "date": 0, "text": parameters["text"],
                              "chat": {"id": int(parameters["chat_id"]), "type": "private"}}
                else:
                    raise AssertionError(f"the bot called {endpoint}, which the test does not expect")
                return 200, json.dumps({"ok": True, "result": result}).encode()

        self.request = RecordingRequest()
        application = ptb_bot.build_application(
            ApplicationBuilder().token("123456:TEST-TOKEN-OFFLINE").request(self.request)
            .get_updates_request(RecordingRequest())
        )
        ids = itertools.count(1)

        def update(user: int, text: str) -> Update:
            command = text.split()[0]
            return Update.de_json({"update_id": (n := next(ids)), "message": {
                "message_id": n, "date": 0, "chat": {"id": user, "type": "private"}, "text": text,
                "from": {"id": user, "is_bot": False, "first_name": f"User{user}"},
                "entities": [{"type": "bot_command", "offset": 0, "length": len(command)}],
            }}, application.bot)

        async def deliver(updates: list[tuple[int, str]]) -> None:
            await asyncio.gather(*(application.process_update(update(user, text)) for user, text in updates))

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
        return self.request.sent


class ReadmeSnippetsTest(unittest.TestCase):
    def test_the_readme_snippets_are_the_examples_code(self) -> None:
        with open(os.path.join(HERE, "..", "README.md"), encoding="utf-8") as file:
            readme = file.read()
        section = readme[readme.index("## Use with your bot framework"):]
        section = section[:section.index("\n## ", 1)]
        snippets = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
        self.assertEqual(len(snippets), 2)
        for snippet, example in zip(snippets, ("aiogram_bot.py", "ptb_bot.py")):
            with open(os.path.join(HERE, example), encoding="utf-8") as file:
                code = file.read()
            for block in snippet.split("\n\n\n"):
                self.assertIn(block.strip("\n"), code, f"the README's {example} snippet drifted from the example")


if __name__ == "__main__":
    unittest.main()
