"""Send one message to every user of the aiogram example bot, at most 30 a second, recording who got it.

    BOT_TOKEN=123456:ABC... python examples/aiogram_broadcast.py news-1 "A new challenge starts today!"

The users are those of aiogram_bot.py (data/users, or $JASON_FOLDER). Each
user's record gets "broadcasts": {"news-1": "sent"} (or "blocked" when the user
blocked the bot), so running the same broadcast again, after a crash or a
Ctrl-C, only messages the users it has not reached. A folder has one writer
process: run this while the bot is stopped, or call broadcast() from inside
the bot (an admin command); on PostgreSQL or Redis it may run beside the bot.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from aiogram import Bot
from aiogram.exceptions import TelegramForbiddenError, TelegramRetryAfter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JASON  # in your bot: vendored beside your code, or pip-installed

MESSAGES_PER_SECOND = 30  # Telegram's limit for one bot's messages to different users


class RateLimit:
    """Evenly spaced starts, never more than per_second in any one second.

    They are spaced 5% wider than 1/per_second: the delay between a start and
    the message reaching Telegram varies, and the margin keeps that jitter from
    putting one message too many into a second as Telegram counts them.
    """

    def __init__(self, per_second: float) -> None:
        self.interval = 1.05 / per_second
        self.next_start = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if self.next_start > now:
            await asyncio.sleep(self.next_start - now)
        self.next_start = max(now, self.next_start) + self.interval


async def broadcast(bot: Bot, db: JASON, broadcast_id: str, text: str,
                    per_second: float = MESSAGES_PER_SECOND) -> dict[str, int]:
    """Message every user not yet reached by broadcast_id; how many were sent, blocked and skipped."""
    limit = RateLimit(per_second)
    counts = {"sent": 0, "blocked": 0, "skipped": 0}
    async for user_id, data in db.users():  # every user once, without holding the bot's users up
        if broadcast_id in data.get("broadcasts", {}):
            counts["skipped"] += 1
            continue
        await limit.wait()
        try:
            await bot.send_message(int(user_id), text)
            outcome = "sent"
        except TelegramRetryAfter as exc:  # Telegram asks us to slow down: wait as told, then once more
            await asyncio.sleep(exc.retry_after)
            await bot.send_message(int(user_id), text)
            outcome = "sent"
        except TelegramForbiddenError:  # the user blocked the bot
            outcome = "blocked"
        # A crash between the send and this edit sends this user the message again on the next run.
        async with db.edit_user_data(user_id) as record:
            record.setdefault("broadcasts", {})[broadcast_id] = outcome
        counts[outcome] += 1
    return counts


async def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/aiogram_broadcast.py BROADCAST_ID TEXT")
    token = os.environ.get("BOT_TOKEN") or sys.exit("Set BOT_TOKEN to the token @BotFather gave you.")
    async with Bot(token) as bot, JASON(os.environ.get("JASON_FOLDER", "data/users")) as db:
        print(await broadcast(bot, db, sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    asyncio.run(main())
