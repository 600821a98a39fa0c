"""Sizes as people read them, one way everywhere."""

from __future__ import annotations


def gib(n: float) -> str:
    """Bytes in GiB with two decimals (memory per chip in plans and compile tables)."""
    return f"{n / 2**30:.2f} GiB"


def gib_or_mib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB, with one decimal (what a process holds)."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
