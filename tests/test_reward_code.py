"""Code reward: test/case scoring, label errors, and hostile programs that must stay contained.

The hostile programs are written so that they pass their test only when the attack succeeds: a
reward of 0 means the sandbox held, and each test also checks the host afterwards.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_fns import _sandbox, code
from reward_fns._sandbox import isolation_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST_TMP = tempfile.gettempdir()  # host directories the hostile programs aim at (the host fixture moves
# the sandbox's own files elsewhere)
SANDBOX_UID_MIN = 10_000_000  # reward_fns._sandbox draws each run's uid as this + secrets.randbelow(...)


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\n"


def reward(program: str, label, **options) -> tuple[float, dict[str, float]]:
    rewards, metrics = code.batch_reward([fenced(program)], [label], **options)
    return rewards.item(), {key: value.item() for key, value in metrics.items()}


def sandbox_processes(uids: set[int]) -> list[int]:
    pids = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as file:
                uid_line = next(line for line in file if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) in uids:
            pids.append(int(status.split("/")[2]))
    return pids


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Afterwards no process of this test's sandbox runs is alive and no sandbox directory is left. The
    runs' files go to a directory of this test's and their uids are recorded, so that another suite's
    sandboxes on the same machine are not taken for this test's leftovers."""
    sandbox_tmp = tmp_path / "sandbox-tmp"
    sandbox_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_tmp))
    drawn, draw = [], _sandbox.secrets.randbelow
    monkeypatch.setattr(_sandbox.secrets, "randbelow", lambda n: drawn.append(draw(n)) or drawn[-1])
    yield
    uids = {SANDBOX_UID_MIN + d for d in drawn}
    deadline = time.monotonic() + 60  # killed processes go at once on a quiet machine; a busy one may lag
    while sandbox_processes(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(uids) == []
    assert list(sandbox_tmp.glob("aapa-sandbox-*")) == []


ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nx = 5\nassert add(x, x) == 10\n"


def test_tests_label_fraction_and_strict(host):
    assert reward(ADD, {"tests": ADD_TESTS})[0] == 1.0
    assert reward(ADD, ADD_TESTS)[0] == 1.0  # a plain string is tests
    half_wrong = "def add(a, b):\n    return a + b if a >= 0 else 7\n"
    value, metrics = reward(half_wrong, {"tests": ADD_TESTS})
    assert value == pytest.approx(2 / 3)
    assert metrics["code_all_passed"] == 0.0 and metrics["code_isolated"] == float(isolation_available())
    assert reward(half_wrong, {"tests": ADD_TESTS}, strict=True)[0] == 0.0
    assert reward("def add(a, b):\n    return 3\n", ADD_TESTS)[0] == pytest.approx(1 / 3)


def test_program_that_crashes_or_exits_fails_all_tests(host):
    assert reward("raise SystemExit(0)\n" + ADD, ADD_TESTS)[0] == 0.0
    assert reward("import os\nos._exit(0)\n" + ADD, ADD_TESTS)[0] == 0.0
    assert reward("def add(a, b:\n", ADD_TESTS)[0] == 0.0
    # Printing lines that look like results does not count: the harness signs results with a token.
    forged = ADD.replace("a + b", "99") + "for i in range(4):\n    print('pass', i)\n"
    assert reward(forged, ADD_TESTS)[0] == 0.0


def test_block_without_asserts_is_one_test(host):
    checker = "def check(f):\n    if f(2, 2) != 4:\n        raise ValueError('wrong')\ncheck(add)\n"
    assert reward(ADD, checker)[0] == 1.0
    assert reward("def add(a, b):\n    return 5\n", checker)[0] == 0.0


def test_cases_label(host):
    echo_sum = "a, b = map(int, input().split())\nprint(a + b)\n"
    cases = [
        {"stdin": "1 2\n", "stdout": "3\n"},
        {"stdin": "5 5", "stdout": "10"},
        {"stdin": "1 1", "stdout": "3"},
    ]
    value, metrics = reward(echo_sum, {"cases": cases})
    assert value == pytest.approx(2 / 3) and metrics["code_pass_rate"] == pytest.approx(2 / 3)
    assert reward(echo_sum, cases[:2])[0] == 1.0  # a plain list is cases
    assert reward(echo_sum, {"cases": cases}, strict=True)[0] == 0.0
    assert reward("import sys\nprint(3)\nsys.exit(1)\n", cases[:1])[0] == 0.0  # right output, failed exit


def test_cases_compare_lines_up_to_trailing_whitespace_and_blank_ends(host):
    same = ["1 2\n3", "\n  \n1 2  \r\n3\t\n\n", "1 2\r\n3\r\n"]
    assert {code._normalise_output(text) for text in same} == {"1 2\n3"}
    different = ["  1 2\n3", "1 2\x0c3", "1 2\u20283", "1  2\n3", "1 2\n\n3"]
    assert all(code._normalise_output(text) != "1 2\n3" for text in different)
    expected = [{"stdin": "", "stdout": "   1 2\n"}]
    assert reward("print('1 2')", expected)[0] == 0.0  # leading whitespace counts, on the first line too
    assert reward("print('   1 2  ', end='\\r\\n\\n')", expected)[0] == 1.0


def test_program_extraction_and_think():
    text = "```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\n```py\nprint(3)\n```\n```bash\nls\n```"
    assert code.extract_program(text) == "print(3)\n"
    assert code.extract_program("```\nprint(2)\n```") == "print(2)\n"
    assert code.extract_program("no code, or ```python\nunclosed") is None
    responses = ["<think>```python\ndef add(a, b): return 0\n```</think>" + fenced(ADD), "no program here"]
    rewards, metrics = code.batch_reward(responses, [ADD_TESTS, ADD_TESTS])
    assert rewards.tolist() == [1.0, 0.0] and metrics["code_no_program"].tolist() == [0.0, 1.0]


def test_label_errors_name_the_field():
    with pytest.raises(ValueError, match=r"labels\[1\]: missing field 'tests' or 'cases'"):
        code.batch_reward(["a", "b"], [ADD_TESTS, {"answer": "3"}])
    with pytest.raises(ValueError, match=r"labels\[0\]: cases\[1\]: missing field 'stdout'"):
        code.batch_reward(["a"], [{"cases": [{"stdin": "", "stdout": ""}, {"stdin": "1"}]}])
    with pytest.raises(ValueError, match=r"labels\[0\]: field 'tests' is not valid Python"):
        code.batch_reward(["a"], ['{"tests": "assert (("}'])
    out = code.reward_func(["q" + fenced(ADD)], ["q"], [{"answer": 1}])
    assert out["rewards"].tolist() == [0.0] and out["extra_logs"]["code_error"].tolist() == [1.0]
    assert set(out["extra_logs"]) == set(code.METRICS)


def test_reward_func_strips_prompt_and_end_marker(host):
    prompt = "<|im_start|>user\nWrite add.<|im_end|>\n<|im_start|>assistant\n"
    out = code.reward_func([prompt + fenced(ADD) + "<|im_end|>"], [prompt], [{"tests": ADD_TESTS}])
    assert out["rewards"].tolist() == [1.0] and out["scores"].tolist() == [1.0]
    assert {k: v.shape for k, v in out["extra_logs"].items()} == {k: (1,) for k in code.METRICS}


def test_require_isolation_switch():
    if isolation_available():
        assert reward(ADD, ADD_TESTS, require_isolation=True)[0] == 1.0
    else:
        with pytest.raises(RuntimeError, match="require_isolation"):
            reward(ADD, ADD_TESTS, require_isolation=True)


def test_running_unisolated_is_said_once(monkeypatch, capsys):
    """Without root no namespaces are tried and model-written code runs with the user's rights: the first
    check says so on stderr (the per-sample `code_isolated` metric alone is easy to miss), later ones not."""
    monkeypatch.setattr(_sandbox, "_probe", [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert isolation_available() is False
    warning = capsys.readouterr().err
    assert "model-written code runs WITHOUT isolation" in warning and "euid 1000" in warning
    assert isolation_available() is False and capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------- hostile


def test_namespaces_are_active_here():
    # The hostile tests below rely on them (root on Linux); without them the sandbox holds less.
    assert isolation_available(), "run as root on Linux with unshare permitted"


def test_infinite_loop_is_killed_at_the_cpu_limit(host):
    value, metrics = reward("while True:\n    pass\n", "assert True", timeout=1.5)
    assert value == 0.0 and metrics["code_timeout"] == 1.0 and metrics["code_wall_timeout"] == 0.0
    # A program that sleeps is stopped by the wall limit, and says so.
    value, metrics = reward("import time\ntime.sleep(600)\n", "assert True", timeout=1.5, wall_timeout=1)
    assert value == 0.0 and metrics["code_wall_timeout"] == 1.0 and metrics["code_timeout"] == 0.0


def test_fork_bomb_is_contained(host):
    bomb = """
import os, time
born = 0
for _ in range(500):
    try:
        if os.fork() == 0:
            os.setsid()  # leave the process group: only the pid namespace / uid sweep catches these
            time.sleep(60)
            os._exit(0)
        born += 1
    except OSError:
        break
ATTACK_OK = born >= 500
"""
    value, metrics = reward(bomb, "assert ATTACK_OK", timeout=3)
    assert value == 0.0
    # The run ends with the program: its sleeping children hold neither a limit nor the call.
    assert metrics["code_timeout"] == metrics["code_wall_timeout"] == metrics["code_error"] == 0.0


def test_memory_hog_is_contained(host):
    hog = """
chunks = []
try:
    for _ in range(64):
        chunks.append(bytearray(64 << 20))  # 4 GiB in all
except MemoryError:
    pass
ATTACK_OK = len(chunks) == 64
"""
    assert reward(hog, "assert ATTACK_OK", memory_mb=256)[0] == 0.0


def test_huge_stdout_is_capped(host):
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    value, metrics = reward(flood, "assert True", timeout=60)
    assert value == 0.0 and metrics["code_timeout"] == metrics["code_wall_timeout"] == 0.0  # the cap


def test_writes_outside_the_workdir_are_refused(host, tmp_path):
    open_dir = tempfile.mkdtemp(prefix="aapa-test-open-", dir=HOST_TMP)
    os.chmod(open_dir, 0o777)  # writable for any uid: only the read-only mounts stop the program
    targets = [
        os.path.join(open_dir, "escaped.txt"),
        os.path.join(HOST_TMP, "aapa-escaped.txt"),
        "/dev/shm/aapa-escaped.txt",
        str(tmp_path / "escaped.txt"),
    ]
    attack = f"""
written = 0
for path in {targets!r}:
    try:
        with open(path, "w") as file:
            file.write("escaped")
        written += 1
    except OSError:
        pass
open("inside.txt", "w").write("fine")  # the working directory itself is writable
ATTACK_OK = written > 0 and open("inside.txt").read() == "fine"
"""
    try:
        assert reward(attack, "assert ATTACK_OK")[0] == 0.0
        assert not any(os.path.exists(path) for path in targets)
        assert reward(attack.replace("written > 0 and ", ""), "assert ATTACK_OK")[0] == 1.0
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(open_dir)


def test_network_and_host_sockets_are_unreachable(host):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # A Unix socket any uid may use, like Ray's or Docker's: a read-only mount alone would not stop it.
    socket_dir = tempfile.mkdtemp(prefix="aapa-test-sock-", dir=HOST_TMP)
    os.chmod(socket_dir, 0o777)
    unix_path = os.path.join(socket_dir, "control.sock")
    unix_listener = socket.socket(socket.AF_UNIX)
    unix_listener.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix_listener.listen()
    unix_listener.setblocking(False)
    attack = f"""
import socket
ATTACK_OK = False
for family, address in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET, ("1.1.1.1", 53)),
                        (socket.AF_UNIX, {unix_path!r})]:
    try:
        connection = socket.socket(family)
        connection.settimeout(1)
        connection.connect(address)
        ATTACK_OK = True
    except OSError:
        pass
"""
    try:
        assert reward(attack, "assert ATTACK_OK")[0] == 0.0
        for server in (listener, unix_listener):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        listener.close()
        unix_listener.close()
        os.remove(unix_path)
        os.rmdir(socket_dir)


def test_parent_environment_is_unreadable(host):
    secret = "aapa-secret-" + os.urandom(8).hex()
    os.environ["AAPA_TEST_SECRET"] = secret  # the caller's own environment
    holder = subprocess.Popen(["sleep", "30"], env={"AAPA_TEST_SECRET": secret})  # and a host process's
    attack = f"""
import glob, os
seen = " ".join(os.environ.values())
for path in glob.glob("/proc/*/environ") + ["/proc/{os.getpid()}/environ", "/proc/{holder.pid}/environ"]:
    try:
        seen += open(path, "rb").read().decode(errors="replace")
    except OSError:
        pass
ATTACK_OK = {secret!r} in seen
"""
    try:
        assert reward(attack, "assert ATTACK_OK")[0] == 0.0
        assert reward(attack.replace(f"{secret!r} in seen", "True"), "assert ATTACK_OK")[0] == 1.0
    finally:
        del os.environ["AAPA_TEST_SECRET"]
        holder.kill()
        holder.wait()


def test_killing_the_parent_fails(host):
    assert isolation_available()  # kill(-1) from an unisolated root program would hit the whole machine
    attack = f"""
import os, signal
hits = 0
for pid in (os.getppid(), {os.getpid()}, {os.getppid()}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
        hits += 1
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)  # everything this uid may signal
except OSError:
    pass
ATTACK_OK = hits > 0
"""
    value, metrics = reward(attack, "assert ATTACK_OK")
    assert value == 0.0 and metrics["code_wall_timeout"] == metrics["code_error"] == 0.0
    assert os.getppid() > 1  # the test process and its parent are alive


def test_segfault_via_ctypes(host):
    value, metrics = reward("import ctypes\nctypes.string_at(0)\n", "assert True")
    assert value == 0.0 and metrics["code_error"] == 0.0


def test_threads_match_serial(host):
    programs = [
        ADD,
        "def add(a, b):\n    return 3\n",
        "while True: pass",
        "import ctypes\nctypes.string_at(0)",
    ]
    labels = [ADD_TESTS, ADD_TESTS, "assert True", "assert True"]
    serial = [reward(p, label, timeout=1)[0] for p, label in zip(programs, labels, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda k: reward(programs[k % 4], labels[k % 4], timeout=1)[0], range(8)))
    assert threaded == serial + serial
    assert serial == [1.0, pytest.approx(1 / 3), 0.0, 0.0]


def test_time_off_the_cpu_counts_against_no_limit(host):
    """Waiting for a core is time off the CPU, as sleeping is: neither costs a correct program its reward."""
    sleepy_add = "import time\ntime.sleep(2)\n" + ADD
    value, metrics = reward(sleepy_add, ADD_TESTS, timeout=1, wall_timeout=60)
    assert value == 1.0 and metrics["code_timeout"] == metrics["code_wall_timeout"] == 0.0


def test_queued_runs_count_against_no_limit(host, monkeypatch):
    """With one slot, six 1 s programs queue: the last starts after 5 s, yet its 5 s wall limit holds (4 s to
    spare for a loaded machine)."""
    active, most = [], []
    run = _sandbox._run

    def counted(*args, **kwargs):
        active.append(1)
        most.append(len(active))
        try:
            return run(*args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(_sandbox, "_slots", threading.BoundedSemaphore(1))
    monkeypatch.setattr(_sandbox, "_run", counted)
    sleepy_add = fenced("import time\ntime.sleep(1)\n" + ADD)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(
            pool.map(lambda _: code.batch_reward([sleepy_add], [ADD_TESTS], wall_timeout=5), range(6))
        )
    assert max(most) == 1
    assert [rewards.item() for rewards, _ in outcomes] == [1.0] * 6
    assert all(metrics["code_wall_timeout"].item() == 0.0 for _, metrics in outcomes)


@pytest.mark.parametrize(
    "setting, expected",
    [("3", "3"), ("", str(len(os.sched_getaffinity(0)))), ("many", "must be a positive integer, got 'many'")],
)
def test_concurrency_setting(setting, expected):
    env = {**os.environ, "AAPA_CODE_CONCURRENCY": setting}
    probe = "from reward_fns import code; print(code.CONCURRENCY)"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO)
    assert expected in (run.stdout if run.returncode == 0 else run.stderr)


def test_sandbox_killed_mid_run_costs_that_sample(host, monkeypatch):
    """A jail killed from outside (the OOM killer, say) gives reward 0 and code_error; the next run works."""
    started = []
    popen = _sandbox.subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(_sandbox.subprocess, "Popen", recorded)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(reward, "import time\ntime.sleep(600)\n" + ADD, ADD_TESTS, wall_timeout=600)
        while not started:
            time.sleep(0.05)
        time.sleep(0.5)
        started[0].kill()
        value, metrics = pending.result()
    assert value == 0.0 and metrics["code_error"] == 1.0 and metrics["code_wall_timeout"] == 0.0
    assert reward(ADD, ADD_TESTS)[0] == 1.0


def test_unwritable_or_full_temporary_directory_costs_the_sample_only(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_dir / "tmp"))
    value, metrics = reward(ADD, ADD_TESTS)
    assert value == 0.0 and metrics["code_error"] == 1.0
    monkeypatch.undo()
    assert reward(ADD, ADD_TESTS)[0] == 1.0


DISK_FULL = r"""
import glob, json, os, subprocess, sys, tempfile
full = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", full], check=True)
try:
    with open(os.path.join(full, "filler"), "wb") as filler:
        filler.write(b"x" * (1 << 20))
except OSError:
    pass  # the disk is full now
tempfile.tempdir = full
from reward_fns import code
program = "```python\ndef add(a, b):\n    return a + b\n```"
rewards, metrics = code.batch_reward([program], ["assert add(1, 2) == 3"])
left = glob.glob(os.path.join(full, "aapa-sandbox-*"))
os.remove(os.path.join(full, "filler"))
again = code.batch_reward([program], ["assert add(1, 2) == 3"])[0]
print(json.dumps([rewards.item(), metrics["code_error"].item(), left, again.item()]))
"""


def test_disk_full_costs_the_sample_only(tmp_path):
    """A real full filesystem (a 256 KiB tmpfs in a private mount namespace) under the sandbox's files."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)"
    full = tmp_path / "full"
    full.mkdir()
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DISK_FULL, str(full)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "No space left on device" in run.stderr
    reward_full, error, left, reward_after = json.loads(run.stdout)
    assert (reward_full, error, left, reward_after) == (0.0, 1.0, [], 1.0)


def test_sandbox_failure_costs_one_sample(monkeypatch):
    def no_processes_left(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(code, "run_python", no_processes_left)
    rewards, metrics = code.batch_reward([fenced(ADD), "no code"], [ADD_TESTS, ADD_TESTS])
    assert rewards.tolist() == [0.0, 0.0] and metrics["code_error"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------- harness integrity

WRONG_ADD = "def add(a, b):\n    return 99\n"
# Signs fake results for 50 indices with any token-like string found in the values given, on every fd.
FORGE = """
import os, re

def forge(values):
    for value in list(values):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        for token in re.findall("[0-9a-f]{32}", text):
            for fd in range(1, 64):
                for i in range(50):
                    try:
                        os.write(fd, ("\\n%s pass %d\\n" % (token, i)).encode())
                    except OSError:
                        pass

def walk(frame):
    while frame is not None:
        yield from frame.f_locals.values()
        frame = frame.f_back
"""


def test_replacing_builtins_does_not_skip_the_tests(host):
    patch = "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
    assert reward(WRONG_ADD + patch, ADD_TESTS)[0] == 0.0
    assert reward(WRONG_ADD + patch, ADD_TESTS, strict=True)[0] == 0.0
    assert reward(ADD + patch, ADD_TESTS)[0] == 1.0  # the harness runs the tests with its own exec


# Each reads the token where the harness might expose it; all are refused or find nothing.
TOKEN_ATTACKS = {
    "calling_frame": "import sys, os\nfr = sys._getframe(1)\nt = fr.f_locals['token']\n"
    "for i in range(50): os.write(fr.f_locals['report'], ('\\n%s pass %d\\n' % (t, i)).encode())\n",
    "frame_stack": "import sys\nforge(walk(sys._getframe()))\n",
    "traceback": "try:\n    1 / 0\nexcept Exception as e:\n    forge(walk(e.__traceback__.tb_frame))\n",
    "other_threads": "import sys\nfor frame in sys._current_frames().values():\n    forge(walk(frame))\n",
    "object_graph": "import gc\nforge(v for o in gc.get_objects() if type(o) is dict for v in o.values())\n",
    "tracing": "import sys\nsys.settrace(lambda frame, *a: forge(walk(frame)))\nadd(1, 1)\n",
    "signal_handler": "import signal, time\nsignal.signal(signal.SIGALRM, lambda s, f: forge(walk(f)))\n"
    "signal.setitimer(signal.ITIMER_REAL, 0.01)\ntime.sleep(0.2)\n",
    "task_file": "forge([open('stdin').read()])\n",  # there without a mount namespace
}


@pytest.mark.parametrize("attack", TOKEN_ATTACKS.values(), ids=TOKEN_ATTACKS.keys())
def test_harness_token_is_out_of_the_programs_reach(host, attack):
    value, metrics = reward(WRONG_ADD + FORGE + attack, ADD_TESTS)
    assert value == 0.0 and metrics["code_pass_rate"] == 0.0


def test_interpreter_memory_is_out_of_the_programs_reach(host):
    attack = """
ATTACK_OK = False
try:
    open("/proc/self/mem", "rb")
    ATTACK_OK = True
except OSError:
    pass
try:
    import ctypes
    ATTACK_OK = True
except Exception:
    pass
"""
    assert reward(attack, "assert ATTACK_OK")[0] == 0.0


def test_redefining_print_and_stdout_changes_nothing(host):
    redefine = "import builtins, os, sys\nbuiltins.print = len\nsys.stdout = open(os.devnull, 'w')\n"
    fake = "for i in range(50):\n    os.write(1, b'\\npass %d\\n' % i)\n"
    assert reward(WRONG_ADD + redefine + fake, ADD_TESTS)[0] == 0.0
    assert reward(ADD + redefine + fake, ADD_TESTS)[0] == 1.0


def test_ordinary_programs_still_pass(host):
    program = """
import collections, dataclasses, enum, functools, logging
from typing import NamedTuple

Pair = collections.namedtuple("Pair", "a b")
Colour = enum.Enum("Colour", "red green")

class Point(NamedTuple):
    x: int

@dataclasses.dataclass
class Box:
    value: int

@functools.lru_cache(None)
def add(a: int, b: int) -> int:
    logging.warning("adding %d and %d", a, b)
    return Box(Pair(a, b).a).value + Point(b).x
"""
    assert reward(program, ADD_TESTS)[0] == 1.0
    assert reward(program, ADD_TESTS, strict=True)[0] == 1.0


def test_only_test_indices_count_once(monkeypatch):
    """The parent counts the tokens of real tests only, each once, so a reward never leaves [0, 1]; a
    refused value anywhere shows in code_untrusted_compare."""
    from itertools import count

    from reward_fns._sandbox import RunResult

    # ADD_TESTS has 4 statements: tests at indices 0, 1 and 3, setup at 2. Pass tokens are drawn first.
    for seen, expected, untrusted in [
        (["t0", "t1", "t2", "t3"] * 5, 1.0, 0.0),
        (["t0", "t0", "t2"], 1 / 3, 0.0),
        (["t2", "t4", "x1"], 0.0, 1.0),
        (["t1", "t6"], 1 / 3, 1.0),
    ]:
        tokens = (f"t{k}" for k in count())
        monkeypatch.setattr(code.secrets, "token_hex", lambda n, tokens=tokens: next(tokens))
        stdout = b"".join(b"\n%s\n" % token.encode() for token in seen) + b"junk t1 t3\n"
        result = RunResult("exited", 0, stdout, b"")
        monkeypatch.setattr(code, "run_python", lambda *a, result=result, **k: result)
        value, metrics = reward(ADD, ADD_TESTS)
        assert value == pytest.approx(expected) and metrics["code_pass_rate"] == pytest.approx(expected)
        assert metrics["code_untrusted_compare"] == untrusted
