"""Give the heap pages freed while loading back to the operating system.

Loading quantized weights allocates and frees many medium-sized temporaries (float copies,
unpacked nibbles); glibc keeps the freed heap pages mapped, so the resident size after loading
could exceed the weights by a large margin. malloc_trim(0) returns them. Elsewhere (no glibc)
this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_free_heap() -> None:
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
