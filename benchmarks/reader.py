"""A `readonly=True` reader in another process beside a busy journaling writer: what each gets done.

    python benchmarks/reader.py [--seconds 4] [--runs 3] [--baseline OLD/jason.py] [--dir DIR]

The writer is this checkout's JASON: 1,000 users of ~1 KB, 20 clients
editing random users as fast as they can. The reader loads random users one
after another, as an admin script would. With --baseline, another version's
jason.py reads in turn with this one, round for round, so the two are
compared in one run (the writer is always this checkout's). Writes
benchmarks/reader.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
THIS_JASON = os.path.join(os.path.dirname(HERE), "jason.py")

# Each child imports the jason.py it is given, not an installed one.
IMPORT = """
import asyncio, importlib.util, random, sys, time
spec = importlib.util.spec_from_file_location("jason", sys.argv[1])
jason = importlib.util.module_from_spec(spec)
sys.modules["jason"] = jason
spec.loader.exec_module(jason)
"""

WRITER = IMPORT + """
async def main():
    async with jason.JASON(sys.argv[2], {"n": 0}) as db:
        for user in range(1000):
            await db.save_user_data(user, {"n": 0, "pad": "x" * 800})
        print("ready", flush=True)
        edits, end = 0, time.perf_counter() + float(sys.argv[3])
        async def client(seed):
            nonlocal edits
            rng = random.Random(seed)
            while time.perf_counter() < end:
                async with db.edit_user_data(rng.randrange(1000)) as data:
                    data["n"] += 1
                edits += 1
        await asyncio.gather(*(client(seed) for seed in range(20)))
        print(edits / float(sys.argv[3]), flush=True)
asyncio.run(main())
"""

READER = IMPORT + """
async def main():
    db = jason.JASON(sys.argv[2], {"n": 0}, readonly=True)
    rng, took = random.Random(1), []
    end = time.perf_counter() + float(sys.argv[3])
    while time.perf_counter() < end:
        start = time.perf_counter()
        await db.load_user_data(rng.randrange(1000))
        took.append(time.perf_counter() - start)
    took.sort()
    print(len(took) / float(sys.argv[3]), took[len(took) // 2] * 1e6, took[int(len(took) * 0.99)] * 1e6)
asyncio.run(main())
"""


def one_round(reader_jason: str, folder: str, seconds: float) -> tuple[float, float, float, float]:
    """(reader loads/s, median µs, p99 µs, writer edits/s) with the reader overlapping the whole edit phase."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, THIS_JASON, folder, str(seconds + 1)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        if writer.stdout.readline().strip() != "ready":
            raise SystemExit("the writer did not start")
        reader = subprocess.run([sys.executable, "-c", READER, reader_jason, folder, str(seconds)],
                                capture_output=True, text=True, check=True)
        edits = float(writer.stdout.readline())
        writer.wait(60)  # its close: the last checkpoint
    finally:
        if writer.poll() is None:  # stopped by an error
            writer.kill()
            writer.wait()
    loads, median, p99 = (float(field) for field in reader.stdout.split())
    return loads, median, p99, edits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="another version's jason.py, read with in turn")
    parser.add_argument("--dir", help="where the folders are made (default: the system's temp folder)")
    args = parser.parse_args()
    versions = {"this checkout": THIS_JASON, **({"baseline": os.path.abspath(args.baseline)} if args.baseline else {})}
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in versions}
    for run in range(args.runs):
        for name, path in versions.items():
            with tempfile.TemporaryDirectory(dir=args.dir) as folder:
                results[name].append(one_round(path, os.path.join(folder, "users"), args.seconds))
                print(f"run {run + 1}, {name}: {results[name][-1]}", file=sys.stderr)
    rows = ["| reader | loads/s | median µs | p99 µs | writer edits/s |", "| --- | --- | --- | --- | --- |"]
    medians = {name: [statistics.median(column) for column in zip(*runs)] for name, runs in results.items()}
    for name, (loads, median, p99, edits) in medians.items():
        rows.append(f"| {name} | {loads:.0f} | {median:.0f} | {p99:.0f} | {edits:.0f} |")
    if args.baseline:
        ours, theirs = medians["this checkout"], medians["baseline"]
        rows.append(f"| ratio | {ours[0] / theirs[0]:.2f}x | {ours[1] / theirs[1]:.2f}x | {ours[2] / theirs[2]:.2f}x "
                    f"| {ours[3] / theirs[3]:.2f}x |")
    text = (f"# A readonly reader beside a busy journaling writer\n\n`python benchmarks/reader.py "
            f"{' '.join(sys.argv[1:])}`: medians of {args.runs} runs of {args.seconds:g} s "
            "(1,000 users of ~1 KB, 20 writer clients).\n\n" + "\n".join(rows) + "\n")
    with open(os.path.join(HERE, "reader.md"), "w", encoding="utf-8") as file:
        file.write(text)
    print(text)


if __name__ == "__main__":
    main()
