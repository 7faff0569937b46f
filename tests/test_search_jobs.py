"""tvm_tinytrain.search.jobs: the search's jobs in this process, in local processes and on Ray.

Toy workers stand in for the search's: each job's value is job² + 1 (the reference, computed
here), and each result also says which process answered and how many set-ups that process ran.
"""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvm_tinytrain.errors import InputError, TinyTrainError
from tvm_tinytrain.search.jobs import parse_address, run_jobs

JOBS = list(range(8))


def expected(job):
    return job * job + 1


class ToyError(TinyTrainError):
    """A TinyTrainError whose __init__ does not take its message (pickle alone cannot rebuild it)."""

    def __init__(self, what: str, job):
        self.what, self.job = what, job
        super().__init__(f"toy {what} failed at job {job}; give it another job")


_setups = 0  # set-ups run in this process


@dataclass
class Toy:
    fail_at: int | None = None  # the job that raises ToyError
    fail_setup: bool = False
    slow: float = 0.0  # seconds every job but job 0 takes
    pid_dir: str | None = None  # each worker's process leaves a file named by its pid here

    def __call__(self):
        return ToyWorker(self)


class ToyWorker:
    def __init__(self, spec: Toy):
        global _setups
        _setups += 1
        if spec.pid_dir:
            Path(spec.pid_dir, str(os.getpid())).touch()
        if spec.fail_setup:
            raise ToyError("set-up", None)
        self.spec = spec

    def run(self, job):
        if job == self.spec.fail_at:
            raise ToyError("job", job)
        if job:
            time.sleep(self.spec.slow)
        return {"value": expected(job), "pid": os.getpid(), "setups": _setups}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(pid_dir) -> list[int]:
    return [int(p.name) for p in Path(pid_dir).iterdir()]


def wait_gone(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def run_recorded(spec, **options):
    seen = []
    results = run_jobs(spec, JOBS, on_result=lambda i, job, r: seen.append((i, job, r["value"])), **options)
    return results, seen


def check_results(results, seen, processes: int):
    assert [r["value"] for r in results] == [expected(j) for j in JOBS]
    assert sorted(seen) == [(i, j, expected(j)) for i, j in enumerate(JOBS)]  # each job once
    per_process = {}
    for r in results:
        per_process.setdefault(r["pid"], set()).add(r["setups"])
    assert all(setups == {1} for setups in per_process.values()), per_process  # one set-up each
    assert 1 <= len(per_process) <= processes
    return set(per_process)


def test_in_process_and_two_processes_agree():
    global _setups
    _setups = 0
    one, seen = run_recorded(Toy(), n_jobs=1)
    assert check_results(one, seen, 1) == {os.getpid()}  # no subprocess at all
    two, seen = run_recorded(Toy(), n_jobs=2)
    assert os.getpid() not in check_results(two, seen, 2)
    assert [r["value"] for r in two] == [r["value"] for r in one]


def test_worker_error_comes_back_as_itself_and_stops_the_pool(tmp_path):
    seen = []
    with pytest.raises(ToyError) as caught:
        run_jobs(Toy(fail_at=3, slow=1.0, pid_dir=str(tmp_path)), JOBS, n_jobs=2,
                 on_result=lambda i, job, r: seen.append(i))
    assert type(caught.value) is ToyError
    assert str(caught.value) == "toy job failed at job 3; give it another job"
    assert (caught.value.what, caught.value.job) == ("job", 3)
    assert "raise ToyError" in str(caught.value.__cause__)  # the worker's own traceback
    assert len(seen) <= 4  # stopped at the failure: jobs 4-7 would take 2 s more
    pids = worker_pids(tmp_path)
    assert pids and os.getpid() not in pids
    assert not wait_gone(pids, 0), "worker processes outlived run_jobs"


def test_ctrl_c_stops_the_processes_at_once_and_keeps_what_finished(tmp_path):
    seen, interrupted = [], []

    def on_result(index, job, result):
        seen.append(index)
        interrupted.append(time.monotonic())
        raise KeyboardInterrupt  # as if Ctrl-C came while the parent handled job 0

    spec = Toy(slow=60.0, pid_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_jobs(spec, JOBS, n_jobs=2, on_result=on_result)
    assert time.monotonic() - interrupted[0] < 10  # not the minute the running jobs take
    assert seen == [0]  # job 0 is fast, every other job takes a minute
    pids = worker_pids(tmp_path)
    assert pids and not wait_gone(pids, 0)


@pytest.mark.parametrize("address, parsed", [
    ("local", ("local", None, None)),
    ("10.0.0.5:6379", ("gcs", "10.0.0.5", 6379)),
    ("head.example:6380", ("gcs", "head.example", 6380)),
    ("ray://head.example", ("client", "head.example", 10001)),
    ("ray://head.example:10002", ("client", "head.example", 10002)),
    ("[::1]:6379", ("gcs", "::1", 6379)),
])
def test_address_forms(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["", "head", "head:", "head:port", "head:70000", "http://head:8265",
                                     "ray://", "ray://head:x", "auto"])
def test_bad_address_names_the_accepted_forms(address):
    with pytest.raises(InputError, match=r"is not one of HOST:PORT .* ray://HOST\[:PORT\] .* \"local\"") as e:
        run_jobs(Toy(), JOBS, ray_address=address)
    assert "\n" not in str(e.value)


def test_without_ray_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(InputError, match=r'pip install "tvm-tinytrain\[cluster\]"'):
        run_jobs(Toy(), JOBS, ray_address="local")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need_ray():
    """Ray, or a skip; under CI a missing Ray is a failure."""
    if os.environ.get("CI"):
        import ray

        return ray
    return pytest.importorskip("ray")


def test_unreachable_address_fails_fast_and_names_it():
    need_ray()
    with socket.socket() as silent:  # a port that accepts and never answers: not a Ray head
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        quiet = f"127.0.0.1:{silent.getsockname()[1]}"
        for address, why in [(f"127.0.0.1:{free_port()}", "nothing answers"),
                             ("no-such-host.invalid:6379", "cannot find host no-such-host.invalid"),
                             (quiet, "is not a Ray cluster"),
                             (f"ray://127.0.0.1:{free_port()}", "nothing answers")]:
            start = time.monotonic()
            with pytest.raises(InputError, match=why) as e:
                run_jobs(Toy(), JOBS, ray_address=address)
            assert time.monotonic() - start < 15, address
            assert address in str(e.value) and "\n" not in str(e.value)


def test_local_ray_runtime_gives_the_local_results(tmp_path, monkeypatch):
    ray = need_ray()
    # Ray's workers import this file's toy classes: they inherit the environment of ray.init
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    spec = Toy(pid_dir=str(tmp_path / "ok"))
    Path(spec.pid_dir).mkdir()
    results, seen = run_recorded(spec, n_jobs=2, ray_address="local")
    pids = check_results(results, seen, 2)
    assert pids.isdisjoint({os.getpid()})
    assert [r["value"] for r in results] == [r["value"] for r in run_jobs(Toy(), JOBS, n_jobs=1)]
    assert not ray.is_initialized()  # the runtime started for the call was shut down
    assert not wait_gone(worker_pids(spec.pid_dir)), "Ray workers outlived run_jobs"


class Unpicklable(Exception):
    pass


def test_a_failing_set_up_and_an_exception_pickle_cannot_carry_come_back_with_their_message():
    from tvm_tinytrain.search.jobs import _Host

    # what a pool's process or a Ray actor sends home, without starting one
    set_up = _Host(pickle.dumps(Toy(fail_setup=True)))
    index, ok, failure = pickle.loads(pickle.dumps(set_up.run(0, 0)))
    error = failure.error()
    assert (index, ok, type(error), error.what) == (0, False, ToyError, "set-up")
    assert str(error) == "toy set-up failed at job None; give it another job"

    host = _Host(pickle.dumps(Toy(fail_at=3)))
    index, ok, failure = pickle.loads(pickle.dumps(host.run(5, 3)))
    assert (index, ok) == (5, False)
    error = failure.error()
    assert type(error) is ToyError and error.job == 3 and str(error).startswith("toy job failed at job 3")

    def raise_unpicklable(job):
        error = Unpicklable("carries a lambda")
        error.callback = lambda: None
        raise error

    host.worker.run = raise_unpicklable
    error = pickle.loads(pickle.dumps(host.run(6, 0)))[2].error()
    assert type(error) is RuntimeError and str(error) == "Unpicklable: carries a lambda"
    assert "raise error" in str(error.__cause__)


def session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


DRIVER = """
import json, sys
import ray
from test_search_jobs import JOBS, Toy, ToyError
from tvm_tinytrain.search.jobs import run_jobs
try:
    run_jobs(Toy(fail_at=3), JOBS, n_jobs=2, ray_address=sys.argv[1])
except ToyError as error:  # its own class, through Ray
    failed = [type(error).__name__, str(error), error.job]
seen = []
results = run_jobs(Toy(), JOBS, n_jobs=2, ray_address=sys.argv[1],
                   on_result=lambda i, job, r: seen.append((i, job, r["value"])))
print(json.dumps({"results": results, "seen": seen, "connected": ray.is_initialized(), "failed": failed}))
"""


@pytest.mark.slow
def test_a_running_cluster_is_used_and_left_running_and_errors_come_through():
    need_ray()
    gcs = free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    # token authentication on both sides; the driver is a fresh process, as Ray's auth mode is per process
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    ray_command = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_command, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    log = Path(temp, "start.log")
    with log.open("w") as out:  # in its own session, so that stopping it stops only what it started
        head = subprocess.Popen(
            [ray_command, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    try:
        assert head.wait(timeout=120) == 0, log.read_text()
        driver = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{gcs}"], env=env, text=True,
                                capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
        assert driver.returncode == 0, driver.stderr
        answer = json.loads(driver.stdout.splitlines()[-1])
        check_results(answer["results"], [tuple(s) for s in answer["seen"]], 2)
        assert not answer["connected"]  # disconnected
        assert answer["failed"] == ["ToyError", "toy job failed at job 3; give it another job", 3]
        with socket.create_connection(("127.0.0.1", gcs), timeout=5):
            pass  # the cluster still runs
    finally:
        for pid in session_pids(head.pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
