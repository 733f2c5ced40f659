"""Summarise a py-spy raw profile (``py-spy record -f raw``): the top frames by own and
inclusive share of samples.

    .venv/bin/python bench/pyspy_summary.py bench/results/pyspy-....txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(args.file):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [re.sub(r" \((.*/)?([^/]+)\)", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    print(f"{total} samples")
    print("own time:")
    for k, v in own.most_common(args.top):
        print(f"  {v / total:6.1%}  {k}")
    print("inclusive:")
    for k, v in incl.most_common(args.top * 2):
        print(f"  {v / total:6.1%}  {k}")


if __name__ == "__main__":
    main()
