"""What one journal append's fdatasync costs, by how the journal's blocks were made.

    python benchmarks/journal_sync.py [--appends 400] [--rounds 3] [--dir DIR]

A journal entry is a pwrite at the journal's end and an fdatasync. How much
the fdatasync costs depends on the blocks under it:
- fresh: a file preallocated with posix_fallocate and never written, as each
  checkpoint starts today: on ext4 the first write into such blocks also
  converts them from "unwritten", a journal commit of its own;
- reused: blocks written (and synced) before, as a journal reused in place
  would have them: only the data goes to the disk;
- growing: a file with no preallocation: each append also changes its size.
Rounds alternate the three, so they share the disk's moods; medians and p99
of the per-append times, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

ENTRY = 1024
SIZE = 16 << 20


def make(path: str, kind: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if kind == "fresh":
        os.posix_fallocate(fd, 0, SIZE)
    elif kind == "reused":
        block = bytes(1 << 20)
        for offset in range(0, SIZE, len(block)):
            os.pwrite(fd, block, offset)
    os.fsync(fd)
    return fd


def appends(fd: int, count: int) -> list[float]:
    entry = b"j" * ENTRY
    times = []
    for n in range(count):
        started = time.perf_counter()
        os.pwrite(fd, entry, n * ENTRY)
        os.fdatasync(fd)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"fresh": [], "reused": [], "growing": []}
    with tempfile.TemporaryDirectory(prefix="jason-journal-sync-", dir=args.dir) as tmp:
        for round_ in range(args.rounds):
            for kind in results:
                path = os.path.join(tmp, f"{kind}-{round_}")
                fd = make(path, kind)
                try:
                    results[kind] += appends(fd, args.appends)
                finally:
                    os.close(fd)
                    os.unlink(path)
    base = statistics.median(results["fresh"])
    for kind, times in results.items():
        times.sort()
        median = statistics.median(times)
        p99 = times[int(len(times) * 0.99) - 1]
        print(f"{kind:8} median {median:.3f} ms  p99 {p99:.3f} ms  ({median / base:.2f}x fresh)  "
              f"{len(times)} appends")


if __name__ == "__main__":
    main()
