"""An admin script beside a running bot, in blocking code: who signed up, and how old they are on average.

    python examples/admin_report.py [LOCATION]

LOCATION is the bot's users' location (default data/users, or $JASON_FOLDER).
On a folder the bot has open, a second writer is refused, so the script opens
it readonly=True: it reads what the bot has saved, and writes nothing. On a
PostgreSQL or Redis location many processes may write, so the same script
could also change records there (drop readonly).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # jason.py from this clone
from jason import JasonError, SyncJASON  # in your code: vendored beside it, or pip-installed


def report(location: str) -> str:
    skipped: list[tuple[str, JasonError]] = []
    with SyncJASON(location, {"name": None, "age": None}, readonly=True) as users:
        ages = [data["age"] for _, data in users.users(skipped=skipped) if isinstance(data.get("age"), int)]
    lines = [f"{len(ages)} users gave their age" + (f", {sum(ages) / len(ages):.1f} on average" if ages else "")]
    lines += [f"unreadable: user {user_id}: {error}" for user_id, error in skipped]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("JASON_FOLDER", "data/users")))
