#!/usr/bin/env python3
"""Expand a Slurm hostlist (`gpu[01-02,05]`, `a[1-2]-ib[3-4],login1`) into one host per line.

Inside a job the launchers use `scontrol show hostnames`; outside Slurm (dry runs, tests) there is
no scontrol, so they call this file instead. Standard library only, so that it runs on any login
or compute node's python3, not only in the training environment.

    python3 launch/hostlist.py 'gpu[01-02]'        # gpu01 and gpu02, one per line
    python3 launch/hostlist.py --first 'gpu[01-02]'

Rules (Slurm's): items are separated by commas outside brackets; a bracket holds comma-separated
numbers or ranges `a-b`; a range keeps the zero padding of its first bound (`[08-10]` -> 08 09 10);
several bracket groups in one item expand as a product, left to right.
"""

from __future__ import annotations

import sys
from typing import List


class HostlistError(ValueError):
    """A hostlist that does not follow Slurm's syntax; the message names it."""


def _split_top_level(text: str) -> List[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested brackets in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced '[' in hostlist {text!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range(body: str, whole: str) -> List[str]:
    out = []
    for part in body.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostlistError(f"bad range {part!r} in hostlist {whole!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)
        a, b = int(lo), int(hi)
        if b < a:
            raise HostlistError(f"descending range {part!r} in hostlist {whole!r}")
        out.extend(str(n).zfill(width) for n in range(a, b + 1))
    return out


def _expand_item(item: str, whole: str) -> List[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_item(rest, whole)
    return [prefix + n + tail for n in _expand_range(body, whole) for tail in tails]


def expand_hostlist(text: str) -> List[str]:
    """Every host of Slurm hostlist `text`, in Slurm's order."""
    hosts: List[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_item(item, text))
    if not hosts:
        raise HostlistError(f"empty hostlist {text!r}")
    return hosts


def main(argv: List[str]) -> int:
    first = argv[:1] == ["--first"]
    if first:
        argv = argv[1:]
    if len(argv) != 1:
        print("usage: hostlist.py [--first] HOSTLIST", file=sys.stderr)
        return 2
    try:
        hosts = expand_hostlist(argv[0])
    except HostlistError as e:
        print(f"hostlist.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(hosts[:1] if first else hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
