"""`jason LOCATION copy TARGET --fast`, folder to folder: its time, and its peak memory as the folder grows.

    python benchmarks/copy.py [--users 10000 100000] [--runs 3] [--baseline OLD/jason.py] [--dir DIR]

Each copy is a child process, as a user runs it, into a new folder (deleting
a folder makes this machine's disk slow for seconds after). With --baseline,
another version's jason.py copies the same folder, run for run in turn, so
the two are compared in one run. Writes benchmarks/copy.md. On the machine this
was written on, the same copy took 2.5 s into one folder and 4.9 s into another of
the same ext4 disk (made just before), so --dir picks the place, and only ratios
measured in one run are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jason  # noqa: E402 (the checkout's, not an installed one)


async def fill(folder: str, users: int) -> None:
    async with jason.JASON(folder, durable=False) as db:
        for start in range(0, users, jason.RECORDS_PER_BATCH):
            await db.save_stored_many([(user, {"n": user, "name": f"user {user}", "tags": ["a", "b"], "bio": "x" * 600})
                                       for user in range(start, min(users, start + jason.RECORDS_PER_BATCH))])


def copy(jason_py: str, source: str, target: str) -> tuple[float, int]:
    """(seconds, peak RSS in KB) of one copy in a child process."""
    os.sync()  # the previous run's (or the fill's) dirty pages are written back first, not during this run
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, jason_py, source, "copy", target, "--fast"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"copy failed: {child.stderr.read().decode() if child.stderr else ''}")
    if child.stderr:
        child.stderr.close()
    return elapsed, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="another version's jason.py, compared run for run")
    parser.add_argument("--dir", help="where the folders are made (default: the system's temp folder)")
    args = parser.parse_args()
    versions = {"this": os.path.join(os.path.dirname(HERE), "jason.py")}
    if args.baseline:
        versions["baseline"] = args.baseline
    rows = []
    with tempfile.TemporaryDirectory(prefix="jason-copy-bench-", dir=args.dir) as tmp:
        for users in args.users:
            source = os.path.join(tmp, f"source-{users}")
            asyncio.run(fill(source, users))
            runs: dict[str, list[tuple[float, int]]] = {name: [] for name in versions}
            runs_here = args.runs if users <= 10_000 else 1
            for run in range(runs_here):
                for name, path in versions.items():
                    runs[name].append(copy(path, source, os.path.join(tmp, f"target-{users}-{name}-{run}")))
            for name in versions:
                seconds = statistics.median(elapsed for elapsed, _ in runs[name])
                peak = max(rss for _, rss in runs[name])
                rows.append((users, name, seconds, peak, runs_here))
                print(f"{users:,} users, {name}: median {seconds:.2f} s of {runs_here}, peak RSS {peak / 1024:.0f} MB",
                      flush=True)
            shutil.rmtree(source)
    lines = ["# `copy --fast`, folder to folder", "",
             f"`python benchmarks/copy.py {' '.join(sys.argv[1:])}`: each copy a child process, into a new folder.",
             "", "| users | version | median time | runs | peak RSS |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {users:,} | {name} | {seconds:.2f} s | {runs} | {peak / 1024:.0f} MB |"
              for users, name, seconds, peak, runs in rows]
    this = {users: (seconds, peak) for users, name, seconds, peak, _ in rows if name == "this"}
    if len(this) > 1:
        smallest, largest = min(this), max(this)
        lines += ["", f"Peak memory at {largest:,} users is {this[largest][1] / this[smallest][1]:.2f}x that at "
                      f"{smallest:,}."]
    if args.baseline:
        base = {users: seconds for users, name, seconds, _, _ in rows if name == "baseline"}
        lines += [f"At {users:,} users this version takes {this[users][0] / base[users]:.2f}x the baseline's time."
                  for users in sorted(base)]
    with open(os.path.join(HERE, "copy.md"), "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
