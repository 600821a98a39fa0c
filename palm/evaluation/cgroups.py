"""A per-run child cgroup that caps the memory (and process count) of an isolated run's whole process tree.

RLIMIT_AS alone is per process, so six forks could each take their share. Where it can, the caller of
palm.evaluation.isolation makes a child cgroup of its own cgroup for each run (`TreeCgroup.create`), which
the runner joins before it forks (so init, the program and all their children are in it), and removes it
afterwards (`TreeCgroup.remove`, which kills what is still in it): cgroup v2 (memory.max, memory.swap.max=0,
pids.max) where the caller's cgroup can delegate the memory controller, else the cgroup v1 memory hierarchy
(memory.limit_in_bytes and memsw) and, if mounted, v1 pids (pids.max). At the cap the kernel's OOM killer
ends processes of the run only; `TreeCgroup.usage` gives the tree's peak memory and how many processes the
OOM killer ended. Where no usable cgroup can be made, `create` returns None and palm.evaluation.isolation
bounds processes x RLIMIT_AS instead.
"""

from __future__ import annotations

import os
import secrets
import signal
import time

from palm.evaluation.isolation_runner import unescape


def cgroup_mounts() -> tuple[str | None, dict[str, str]]:
    """The cgroup2 mount point, and the cgroup v1 mount point of each controller."""
    unified, v1 = None, {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, extra = left.split(), right.split()
                if len(fields) < 5 or len(extra) < 3:
                    continue
                if extra[0] == "cgroup2" and unified is None:
                    unified = unescape(fields[4])
                elif extra[0] == "cgroup":
                    for option in extra[2].split(","):
                        v1.setdefault(option, unescape(fields[4]))
    except OSError:
        pass
    return unified, v1


def own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its cgroup2 path (/proc/self/cgroup)."""
    paths = {}
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    paths[c] = path
    except (OSError, ValueError):
        pass
    return paths


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


class TreeCgroup:
    """A per-run child cgroup that caps the memory (and process count) of the run's whole process tree:
    cgroup v2 (memory.max, pids.max) where this process's cgroup can delegate the memory controller,
    else the v1 memory (and pids) hierarchies where they are mounted writable. Removed after the run."""

    def __init__(self, kind: str, dirs: list[str], pids_max: int | None):
        self.kind, self.dirs, self.pids_max = kind, dirs, pids_max
        self.procs = [os.path.join(d, "cgroup.procs") for d in dirs]

    @classmethod
    def create(cls, memory_bytes: int, pids: int) -> TreeCgroup | None:
        name = f"palm-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
        unified, v1 = cgroup_mounts()
        own = own_cgroups()
        if unified is not None and "" in own:
            made = cls._try_v2(os.path.join(unified, own[""].lstrip("/")), name, memory_bytes, pids)
            if made is not None:
                return made
        if "memory" in v1 and "memory" in own:
            return cls._try_v1(v1, own, name, memory_bytes, pids)
        return None

    @classmethod
    def _try_v2(cls, parent: str, name: str, memory_bytes: int, pids: int) -> TreeCgroup | None:
        try:
            with open(os.path.join(parent, "cgroup.controllers"), encoding="ascii") as f:
                if "memory" not in f.read().split():
                    return None
            with open(os.path.join(parent, "cgroup.subtree_control"), encoding="ascii") as f:
                enabled = f.read().split()
            if "memory" not in enabled:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        except OSError:
            return None
        path = os.path.join(parent, name)
        try:
            os.mkdir(path, 0o755)
        except OSError:
            return None
        made = cls("cgroup-v2", [path], None)
        try:
            _write(os.path.join(path, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
            if os.path.exists(os.path.join(path, "pids.max")):
                _write(os.path.join(path, "pids.max"), str(pids))
                made.pids_max = pids
        except OSError:
            made.remove()
            return None
        return made

    @classmethod
    def _try_v1(cls, mounts: dict[str, str], own: dict[str, str], name: str, memory_bytes: int,
                pids: int) -> TreeCgroup | None:
        memory = os.path.join(mounts["memory"], own["memory"].lstrip("/"), name)
        try:
            os.mkdir(memory, 0o755)
        except OSError:
            return None
        made = cls("cgroup-v1", [memory], None)
        try:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):  # no swapping past the cap
                try:
                    _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                except OSError:
                    pass
            with open(os.path.join(memory, "memory.limit_in_bytes"), encoding="ascii") as f:
                if int(f.read()) > memory_bytes:
                    raise OSError("the memory limit did not take")
        except (OSError, ValueError):
            made.remove()
            return None
        if "pids" in mounts and "pids" in own:  # optional: RLIMIT_NPROC already bounds the uid's processes
            path = os.path.join(mounts["pids"], own["pids"].lstrip("/"), name)
            try:
                os.mkdir(path, 0o755)
                made.dirs.append(path)
                made.procs.append(os.path.join(path, "cgroup.procs"))
                _write(os.path.join(path, "pids.max"), str(pids))
                made.pids_max = pids
            except OSError:
                pass
        return made

    def usage(self) -> tuple[float | None, int | None]:
        """(peak memory in MB, processes the kernel's OOM killer ended in the cgroup), None where unknown."""
        memory = self.dirs[0]
        peak = kills = None
        try:
            name = "memory.peak" if self.kind == "cgroup-v2" else "memory.max_usage_in_bytes"
            with open(os.path.join(memory, name), encoding="ascii") as f:
                peak = int(f.read()) / 2**20
        except (OSError, ValueError):
            pass
        try:
            name = "memory.events" if self.kind == "cgroup-v2" else "memory.oom_control"
            with open(os.path.join(memory, name), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        kills = int(value)
        except (OSError, ValueError):
            pass
        return peak, kills

    def remove(self) -> None:
        """Remove the cgroups (retrying while the kernel finishes with the run's last processes)."""
        deadline = time.monotonic() + 5
        for path in self.dirs:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    _kill_procs_in(path)
                    time.sleep(0.01)


def _kill_procs_in(cgroup: str) -> None:
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), encoding="ascii") as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
