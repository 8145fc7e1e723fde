"""Processes that end with the one that started them (Linux PR_SET_PDEATHSIG).

The engine core and a worker's extra consumers are children of its first consumer; if that one is
killed (even with -9), the kernel signals them, so no orphan keeps a model or a queue.
"""

from __future__ import annotations

import ctypes

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when the thread that started it exits.
    False where the call is unavailable (not Linux/glibc)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        return False
    return True
