"""How a palm process sets JAX up, before JAX is imported: `palm`'s commands (palm.cli) and the flows a
Prefect worker runs in a process of their own (flows/) alike. Standard library only; it never imports JAX.

- `use_cpu_unless_accelerated`: on a host without TPU chips that has libtpu installed (the `tpu` dependency
  group, for compiling ahead of time), JAX would start a TPU backend at first use and print libtpu's
  complaints about the missing chips; such a host uses its CPU, unless JAX_PLATFORMS says otherwise or a
  GPU plugin is installed.
- `keep_compilation_cache`: JAX keeps the programs it compiles on disk, so the next process that compiles
  the same one (the next `palm run`, a stage's subprocess, the evaluation of the next checkpoint) loads it
  instead: `$XDG_CACHE_HOME/palm/jax` (default ~/.cache/palm/jax). PALM_COMPILATION_CACHE names another
  directory, or `off`; JAX_COMPILATION_CACHE_DIR, when set, wins. A program that compiled in
  MIN_CACHED_COMPILE_SECONDS or more is kept (JAX's own default keeps only those of a second or more; the
  evaluation's scoring, prefill and decode programs compile in 0.3-0.6 s each on a CPU, so every
  evaluation process compiled them again); JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, wins.
  (Steps compiled for TPUs ahead of time are never written there: palm.analysis.aot; nor by the CPU
  processes of one multi-process job: palm.app.worker.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from palm.base.hardware import tpu_host

#: The shortest compile whose program a palm process keeps in JAX's persistent compilation cache.
MIN_CACHED_COMPILE_SECONDS = 0.2

GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")


def use_cpu_unless_accelerated() -> None:
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None or tpu_host():
        return
    if any(importlib.util.find_spec(p) for p in GPU_PLUGINS):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def keep_compilation_cache() -> None:
    choice = os.environ.get("PALM_COMPILATION_CACHE", "")
    if choice.lower() in ("off", "0", "false", "no"):
        return
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", choice or str(home / "palm" / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_CACHED_COMPILE_SECONDS))


def configure_jax() -> None:
    """Both, as every palm process does before it imports JAX (later, JAX has read its settings)."""
    use_cpu_unless_accelerated()
    keep_compilation_cache()
