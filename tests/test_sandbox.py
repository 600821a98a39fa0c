"""Hostile generated programs are contained, scored as failures, and leave the machine as it was.

Each attack is written as a HumanEval completion for HumanEval/0: the attack first, then the canonical
solution. If the sandbox let the attack through, the program would go on to pass; so every test asserts
a failure, and the machine's state (a sentinel file, no leftover process, the test process alive).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from palm.evaluation import humaneval
from palm.evaluation.isolation import processes_of_uid
from palm.evaluation.sandbox import isolation, run_program

TASK = "HumanEval/0"


@pytest.fixture(scope="module")
def problem(shared_data: Path) -> dict:
    return humaneval.load_problems(shared_data / "humaneval" / "HumanEval.jsonl.gz")[TASK]


@pytest.fixture(scope="module")
def contained() -> dict:
    """The isolation this machine gives. Attacks such as os.kill(-1, SIGKILL) run only when it is strong
    enough that they cannot reach the test process: a PID namespace or a switch to another uid."""
    iso = isolation()
    if not (iso["pid_ns"] or iso["uid_switch"]):
        pytest.fail(f"the sandbox has neither a PID namespace nor a uid switch here, so hostile programs "
                    f"are not run: {iso}")
    return iso


@pytest.fixture()
def sentinel(tmp_path: Path):
    """A file outside the sandbox that attacks try to delete; it must survive every test."""
    path = tmp_path / "precious" / "keep.txt"
    path.parent.mkdir()
    path.write_text("do not delete")
    yield path
    assert path.read_text() == "do not delete"
    assert sorted(p.name for p in path.parent.iterdir()) == ["keep.txt"]


def attack(problem: dict, code: str, **kwargs):
    """Run `code` inside HumanEval/0's function, before the canonical solution."""
    completion = textwrap.indent(textwrap.dedent(code).strip() + "\n", "    ") + problem["canonical_solution"]
    return humaneval.check_program(problem, completion, **kwargs)


def live_processes_with(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if token.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        found.append(int(name))
            except OSError:
                pass
    return found


def assert_no_leftovers(result, token: str | None = None) -> None:
    deadline = time.monotonic() + 2
    while True:
        left = (processes_of_uid(result.uid) if result.uid is not None else []) + \
            (live_processes_with(token) if token else [])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], f"processes left behind by the sandboxed program: {left}"


def test_the_isolation_promised_on_this_machine_is_in_effect(contained):
    assert contained["net_ns"] and contained["pid_ns"] and contained["mount_ns"], contained
    assert contained["readonly_root"] and contained["workdir_tmpfs_kib"], contained
    assert contained["uid_switch"] or contained["user_ns"], contained
    if os.geteuid() == 0:  # root: the program must run as another, unprivileged uid
        assert contained["uid_switch"], contained
    assert contained["rlimits"]["core"] == 0 and contained["rlimits"]["nproc"] >= 1


def test_a_good_program_passes_with_a_clean_environment(problem, contained, monkeypatch, sentinel):
    monkeypatch.setenv("PALM_TEST_SECRET", "hunter2")
    r = run_program("import os, sys\nprint(os.getcwd(), os.environ.get('HOME'), os.environ.get('TMPDIR'))\n"
                    "print(sorted(os.environ))\nprint(os.getuid(), os.getpid())\nopen('scratch', 'w').write('ok')\n")
    assert r.passed and r.status == "passed" and r.returncode == 0, r
    cwd, home, tmp = r.stdout.splitlines()[0].split()
    assert home == cwd == tmp and "palm-sandbox-" in cwd
    assert not os.path.exists(os.path.dirname(cwd)), "the throwaway directory is removed afterwards"
    assert "PALM_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    uid, pid = map(int, r.stdout.splitlines()[2].split())
    if contained["uid_switch"]:
        assert uid == r.uid and uid not in (0, os.getuid())
    if contained["pid_ns"]:
        assert pid == 2  # the program's own PID namespace: init is 1, the program 2
    assert run_program("raise SystemExit(3)").status == "failed"
    failed = run_program("1 / 0")
    assert not failed.passed and failed.returncode == 1 and "ZeroDivisionError" in failed.stderr


def test_deleting_files_outside_the_sandbox_fails(problem, contained, sentinel):
    r = attack(problem, f"""
        import os, shutil
        os.remove({str(sentinel)!r})
        shutil.rmtree({str(sentinel.parent)!r})
        open({str(sentinel.parent / 'planted.txt')!r}, 'w').write('x')
    """)
    assert not r.passed and r.status == "failed", r
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr, r.stderr


def test_writing_elsewhere_on_the_machine_fails(problem, contained, sentinel, tmp_path):
    for target in ("/tmp/palm-sandbox-escape", "/dev/shm/palm-sandbox-escape", str(tmp_path / "planted")):
        r = attack(problem, f"open({target!r}, 'w').write('x')")
        assert not r.passed and r.status == "failed", (target, r)
        assert not os.path.exists(target)


def test_a_fork_bomb_is_stopped_and_cleaned_up(problem, contained, sentinel):
    token = secrets.token_hex(8)
    r = attack(problem, f"""
        import os
        marker = {token!r}
        while True:
            os.fork()
    """, timeout_s=5)
    assert not r.passed and r.status in ("failed", "timeout"), r
    assert "BlockingIOError" in r.stderr or "Resource temporarily unavailable" in r.stderr or r.status == "timeout"
    assert_no_leftovers(r)
    assert subprocess.run(["true"]).returncode == 0  # the machine can still start processes


def test_a_fork_bomb_that_ignores_failures_is_killed_at_the_timeout(problem, contained, sentinel):
    r = attack(problem, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout_s=2)
    assert not r.passed and r.status == "timeout", r
    assert r.seconds < 4
    assert_no_leftovers(r)


def test_memory_bombs_hit_the_memory_limit(problem, contained, sentinel):
    r = attack(problem, "x = bytearray(64 * 2**30)")
    assert not r.passed and r.status == "failed" and "MemoryError" in r.stderr, r
    r = attack(problem, """
        hoard = []
        while True:
            hoard.append(bytearray(16 * 2**20))
    """, memory_mb=256)
    assert not r.passed and r.status == "failed" and "MemoryError" in r.stderr, r


def test_an_infinite_loop_times_out(problem, contained, sentinel):
    start = time.monotonic()
    r = attack(problem, "while True:\n    pass", timeout_s=2)
    assert not r.passed and r.status == "timeout", r
    assert 2 <= r.seconds < 4 and time.monotonic() - start < 5
    assert_no_leftovers(r)


def test_no_network_not_even_the_callers_localhost(problem, contained, sentinel):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        for target in (("127.0.0.1", port), ("1.1.1.1", 53), ("8.8.8.8", 443)):
            r = attack(problem, f"""
                import socket
                s = socket.create_connection({target!r}, timeout=3)
                s.sendall(b'escaped')
            """)
            assert not r.passed and r.status == "failed", (target, r)
            assert "OSError" in r.stderr or "PermissionError" in r.stderr or "timed out" in r.stderr, r.stderr
        with pytest.raises(socket.timeout):
            server.accept()


def test_killing_the_parent_or_anything_else_fails(problem, contained, sentinel):
    me = os.getpid()
    for target in ("os.getppid()", str(me), "1", "-1"):
        # As root without the sandbox, the last one would kill every process on the machine.
        r = attack(problem, f"import os, signal\nos.kill({target}, signal.SIGKILL)\nraise SystemExit('sent')")
        assert not r.passed and r.status == "failed", (target, r)
        assert_no_leftovers(r)
    assert os.getpid() == me and os.getppid() > 0  # this test process is still here to say so
    if contained["uid_switch"]:  # init runs as root: the program may not signal it at all
        r = run_program("import os\nos.kill(os.getppid(), 9)\n")
        assert not r.passed and "PermissionError" in r.stderr, r


def test_writing_a_huge_file_hits_the_file_size_limit(problem, contained, sentinel):
    r = attack(problem, "open('huge.bin', 'wb').write(b'x' * (200 * 2**20))")
    assert not r.passed and r.status == "failed" and "File too large" in r.stderr, r
    r = attack(problem, "import sys\nsys.stdout.write('x' * (200 * 2**20))")
    assert not r.passed and r.status == "failed", r
    assert len(r.stdout) <= 8192  # only a tail comes back


def test_a_background_daemon_does_not_outlive_the_program(problem, contained, sentinel, tmp_path):
    token = secrets.token_hex(8)
    late = tmp_path / "written-by-the-daemon"
    r = attack(problem, f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                code = "import time; print('daemon up', flush=True); time.sleep(3); open({str(late)!r}, 'w').write('x')"
                os.execv(sys.executable, [sys.executable, '-c', code, {token!r}])
            os._exit(0)
        import time
        time.sleep(0.5)
        raise SystemExit('the daemon is running')
    """)
    assert not r.passed and r.status == "failed" and "the daemon is running" in r.stderr, r
    assert "daemon up" in r.stdout  # it did start
    assert_no_leftovers(r, token)
    time.sleep(0.5)
    assert live_processes_with(token) == [] and not late.exists()


def test_a_batch_of_hostile_samples_scores_zero_and_the_harness_finishes(problem, contained, sentinel):
    attacks = [
        f"import os\nos.remove({str(sentinel)!r})",
        "import os\nwhile True:\n    os.fork()",
        "x = bytearray(64 * 2**30)",
        "while True:\n    pass",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
        "import os\nos.kill(os.getppid(), 9)\nraise SystemExit(1)",
        "import os\nos.kill(-1, 9)\nraise SystemExit(1)",
        "open('huge.bin', 'wb').write(b'x' * (200 * 2**20))",
        "import sys\nsys.exit(0)",  # leaving early with status 0 is not passing
        "import os\nos._exit(0)",
    ]
    samples = [{"task_id": TASK, "completion": textwrap.indent(a + "\n", "    ") + problem["canonical_solution"]}
               for a in attacks]
    start = time.monotonic()
    results = humaneval.evaluate_samples(samples, {TASK: problem}, timeout_s=3)
    assert time.monotonic() - start < 20
    assert [r.passed for r in results] == [False] * len(attacks), [(r.status, r.detail) for r in results]
    assert all(r.status in ("failed", "timeout") for r in results), [(r.status, r.detail) for r in results]
    metrics = humaneval.score_samples(samples[-2:], {TASK: problem}, k=(1, 2))
    assert metrics["pass@1"] == 0.0 and metrics["pass@2"] == 0.0
    for r in results:
        assert_no_leftovers(r)


def test_the_fallback_socket_block_refuses_sockets_from_python(tmp_path):
    # Not in effect where a network namespace can be made (see the isolation test); the wrapper is run here
    # on its own, in the mode the sandbox uses without one.
    from palm.evaluation.sandbox import _PROGRAM_WRAPPER

    program = tmp_path / "main.py"
    program.write_text("import socket, sys\nprint(__name__, sys.argv)\nsocket.socket()\n")
    secret_r, secret_w = os.pipe()
    os.write(secret_w, b"s" * 32)
    os.close(secret_w)
    verdict_r, verdict_w = os.pipe()
    out = subprocess.run([sys.executable, "-I", "-c", _PROGRAM_WRAPPER, str(secret_r), str(verdict_w), "1", "",
                          str(program)], capture_output=True, text=True, timeout=30, pass_fds=(secret_r, verdict_w))
    os.close(secret_r)
    os.close(verdict_w)
    with os.fdopen(verdict_r, "rb") as f:
        assert f.read() == b""  # it did not run to its end: no verdict
    assert out.returncode == 1 and "PermissionError" in out.stderr and "network access is disabled" in out.stderr
    assert out.stdout.startswith(f"__main__ [{str(program)!r}]")


# ------------------------------------------------------------------------------------- forged passes

FORGERIES = {
    # the old end-of-tests marker scheme: print something, leave with status 0 before the tests run
    "marker then os._exit(0) in the function": "print('passed', flush=True)\nimport os\nos._exit(0)",
    "sys.exit(0) in the function": "import sys\nsys.exit(0)",
    "raise SystemExit in the function": "raise SystemExit",
    # guess at the verdict channel: write to every descriptor, list them, then leave with status 0
    "write to every fd": """
        import os
        for fd in range(3, 1024):
            try:
                os.write(fd, b'0123456789abcdef' * 2 + b'passed\\n')
            except OSError:
                pass
        os._exit(0)
    """,
    "read /proc/self/fd and the run's files": """
        import os, glob
        for fd in os.listdir('/proc/self/fd'):
            try:
                print(fd, os.readlink('/proc/self/fd/' + fd), os.read(int(fd), 64))
            except OSError:
                pass
        for path in glob.glob(os.path.dirname(__file__) + '/*'):
            print(path)
        print(open('/proc/self/cmdline', 'rb').read(), open('/proc/self/environ', 'rb').read())
        os._exit(0)
    """,
    "read the interpreter's memory": "open('/proc/self/mem', 'rb')\nimport os\nos._exit(0)",
    "search the heap for the secret": "import gc\nprint(len(gc.get_objects()))\nimport os\nos._exit(0)",
    "ctypes": "import ctypes\nctypes.string_at(id(1), 8)\nimport os\nos._exit(0)",
    "skip the tests with a trace function": """
        import sys
        def skip(frame, event, arg):
            return skip
        sys.settrace(skip)
    """,
    "read the harness's code through the frame stack": """
        import sys, os
        frame = sys._getframe()
        while frame.f_back is not None:
            frame = frame.f_back
            print(frame.f_code.co_consts)
        os._exit(0)
    """,
    "the same through a signal handler's frame": """
        import os, signal
        def handler(signum, frame):
            while frame is not None:
                print(frame.f_code.co_consts)
                frame = frame.f_back
            os._exit(0)
        signal.signal(signal.SIGUSR1, handler)
        os.kill(os.getpid(), signal.SIGUSR1)
    """,
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_pass_fails(problem, contained, name):
    # Each one runs before a correct solution: if the verdict could be forged, it would pass.
    r = attack(problem, FORGERIES[name])
    assert not r.passed and r.status == "failed", (name, r)


def test_forgeries_at_import_time_and_a_thread_that_swaps_check_fail_too(problem, contained):
    solution = "    " + problem["canonical_solution"].strip() + "\n"
    for tail in ("import os\nos._exit(0)\n", "print('ok')\nimport sys\nsys.exit(0)\n",
                 "import os, builtins\nbuiltins.exec = lambda *a, **k: None\nos._exit(0)\n"):
        r = humaneval.check_program(problem, solution + tail)
        assert not r.passed and r.status == "failed" and r.returncode == 0, (tail, r)
    # check() is taken from the tests' compiled code, so a thread rebinding the name is not called
    swap = ("import threading\ndef swap():\n    g = globals()\n    while True:\n        g['check'] = lambda c: None\n"
            "threading.Thread(target=swap, daemon=True).start()\n")
    r = humaneval.check_program(problem, "    return False\n" + swap)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr, r
    # and a correct solution still passes, whatever it prints
    r = humaneval.check_program(problem, solution + "print('anything', flush=True)\n")
    assert r.passed and r.status == "passed" and r.returncode == 0, r


def test_run_program_needs_the_program_to_reach_its_end():
    assert run_program("x = 1\n").passed
    for code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit(None)\n"):
        r = run_program(code)
        assert not r.passed and r.status == "failed" and r.returncode == 0, (code, r)
        assert "before the program ran to its end" in r.detail
    r = run_program(["x = 2\n", "def check(v):\n    assert v == 2\n"], call=("check", "x"))
    assert r.passed, r
    r = run_program(["x = 3\n", "def check(v):\n    assert v == 2\n"], call=("check", "x"))
    assert not r.passed and "AssertionError" in r.stderr, r


# ----------------------------------------------------------------------------- the process tree's memory

@pytest.mark.slow
def test_the_memory_of_the_whole_process_tree_is_capped(contained):
    # Six children each touch 320 MB (RLIMIT_AS 400 MB allows each one); together they would need 1.9 GB.
    # The program exits 0 only if all six held their memory at the same time.
    code = textwrap.dedent("""
        import os, select, time
        r, w = os.pipe()
        for _ in range(6):
            if os.fork() == 0:
                block = bytearray(320 * 2**20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                os.write(w, b'x')
                time.sleep(30)
                os._exit(0)
        os.close(w)
        got, deadline = b'', time.monotonic() + 8
        while len(got) < 6 and select.select([r], [], [], max(0, deadline - time.monotonic()))[0]:
            chunk = os.read(r, 6)
            if not chunk:
                break
            got += chunk
        raise SystemExit(0 if len(got) == 6 else 1)
    """)
    r = run_program(code, timeout_s=20, memory_mb=400, tree_memory_mb=512)
    cap = r.isolation["memory_cap"]
    assert not r.passed and r.status == "failed", r
    assert cap["tree_mb"] <= 512, cap
    if cap["mechanism"].startswith("cgroup"):
        assert r.memory_peak_mb is not None and r.memory_peak_mb <= 512 + 1, r
        assert "memory cap" in r.detail, r
    else:  # no cgroup here: processes x RLIMIT_AS must fit the cap (here: one process of at most 400 MB)
        assert cap["mechanism"] == "rlimits" and cap["nproc"] * cap["per_process_mb"] <= cap["tree_mb"], cap
        assert r.isolation["rlimits"]["as"] <= cap["per_process_mb"] * 2**20, r.isolation
    # a program within the cap is unaffected
    r = run_program("b = bytearray(200 * 2**20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\n",
                    memory_mb=400, tree_memory_mb=512)
    assert r.passed, r


def test_the_run_reports_its_memory_cap_and_removes_its_cgroup(contained):
    r = run_program("pass\n", tree_memory_mb=256)
    cap = r.isolation["memory_cap"]
    assert cap["mechanism"] in ("cgroup-v2", "cgroup-v1", "rlimits") and cap["tree_mb"] <= 256, cap
    if os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory", os.W_OK):  # this project's VMs: cgroup v1
        assert cap["mechanism"].startswith("cgroup"), cap
    leftovers = []
    for base, _dirs, _files in os.walk("/sys/fs/cgroup"):
        if os.path.basename(base).startswith(f"palm-sandbox-{os.getpid()}-"):
            leftovers.append(base)
    assert leftovers == []


def test_without_a_cgroup_processes_times_rlimit_as_fit_the_cap(monkeypatch, contained):
    from palm.evaluation import cgroups

    monkeypatch.setattr(cgroups.TreeCgroup, "create", classmethod(lambda cls, *a: None))
    r = run_program("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n",
                    memory_mb=400, tree_memory_mb=512)
    cap = r.isolation["memory_cap"]
    assert cap["mechanism"] == "rlimits" and cap["nproc"] == 1 and cap["per_process_mb"] <= 400, cap
    assert r.isolation["rlimits"]["as"] == cap["per_process_mb"] * 2**20
    assert not r.passed and "BlockingIOError" in r.stderr, r  # a second process would break the cap
    r = run_program("pass\n", memory_mb=100, nproc=16, tree_memory_mb=512)
    cap = r.isolation["memory_cap"]
    assert r.passed and cap["nproc"] == 5 and cap["nproc"] * cap["per_process_mb"] <= 512, cap
