"""The `fm-ray` watcher (`_internal.watch`): a child that ends abruptly (no Python ran: Ray's _Exit(1)
on a dead raylet, a SIGKILL) still ends the command in one line with its resume line; a child that
ends by itself keeps its own code and line; signals reach the child once, through the watcher.
Children here are tiny Python programs playing the watched `python -m fm_ray.cli`."""

import signal
import subprocess
import sys
import time

import pytest

from fm_ray._internal.watch import abrupt_line


def watched(child_body: str, **kw) -> subprocess.Popen:
    """A watcher process (as the console command is) around a child running `child_body` inside
    `watch.child`, so the child says what fm_ray.cli says: its `next` line and, if Python runs to
    the end, that it ended."""
    child = f"from fm_ray._internal import watch\nimport os, signal, sys, time\ndef main():\n{child_body}\nwatch.child(main)"
    watcher = (
        f"import sys\nfrom fm_ray._internal.watch import watch\nsys.exit(watch([sys.executable, '-c', {child!r}]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", watcher], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def ended(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize(
    "body, returncode, why, how",
    [
        ("    watch.say('next', 'finished rounds are saved, continue with --resume')\n    os._exit(1)",
         1, "exit code 1", "finished rounds are saved, continue with --resume"),  # as Ray's _Exit(1)
        ("    os.kill(os.getpid(), signal.SIGKILL)", -9, "killed by SIGKILL", "run the command again"),  # nothing said
        ("    watch.say('next', 'run the same command again to continue the pack')\n    os.abort()",
         -6, "killed by SIGABRT", "run the same command again to continue the pack"),
    ],
)  # fmt: skip
def test_a_child_ending_abruptly_is_one_line_and_exit_1(body, returncode, why, how):
    code, err = ended(watched(body))
    last = err.strip().splitlines()[-1]
    assert code == 1 and last == abrupt_line(returncode, how), err
    assert last.startswith(f"fm-ray: error: the process doing the work ended abruptly ({why})") and last.endswith(how)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "body, code",
    [
        ("    print('fm-ray: error: bad flag', file=sys.stderr)\n    return 2", 2),
        ("    return 0", 0),
        ("    raise SystemExit(3)", 3),  # argparse's exits, FM_RAY_DEBUG's raw raise: Python ran to the end
    ],
)
def test_a_child_ending_by_itself_keeps_its_code_and_its_own_line(body, code):
    got, err = ended(watched(body))
    assert got == code and "ended abruptly" not in err


def test_sigterm_and_sigint_to_the_watcher_reach_the_child_once(tmp_path):
    """The child counts the signals it gets and exits 100 + count once it has had two kinds (a state,
    not a time); it runs in its own session, so only the watcher's forwarding can reach it."""
    ready = tmp_path / "ready"
    body = f"""    got = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda n, f: got.append(n))
    open({str(ready)!r}, 'w').close()
    while len(set(got)) < 2:
        time.sleep(0.05)
    time.sleep(0.5)
    return 100 + len(got)"""
    proc = watched(body, start_new_session=True)  # a group of its own: the test signals it alone
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    code, err = ended(proc)
    assert code == 102, err


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`fm-ray strategies | head -1`: the reader goes away; no Ray-cluster line, no traceback."""
    fm_ray = subprocess.Popen(
        [sys.executable, "-m", "fm_ray.cli", "strategies"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    fm_ray.stdout.close()  # the reader is gone before the first line
    _, err = fm_ray.communicate(timeout=120)
    assert err.decode().strip() == "" and fm_ray.returncode == 141


@pytest.mark.parametrize("preset, want", [(None, "1"), ("0", "0")])
def test_the_watched_child_starts_with_the_compute_environment_the_users_value_kept(preset, want):
    """torch reads THP_MEM_ALLOC_ENABLE at its first allocation: the run process (whose local-backend
    shards hold the pool-sized tensors) must start with it; a value the user set stands."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env |= {} if preset is None else {"THP_MEM_ALLOC_ENABLE": preset}
    body = f"    return 0 if os.environ.get('THP_MEM_ALLOC_ENABLE') == {want!r} else 3"
    got, err = ended(watched(body, env=env))
    assert got == 0, err
