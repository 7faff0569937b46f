"""Running the search's jobs: in this process, in local processes, or on a Ray cluster.

``run_jobs(make_worker, jobs)`` answers ``worker.run(job)`` for every job. A worker is built once
where it runs (its set-up is the dear part: TVM, the model, the compiled step), then answers many
jobs. Nothing is distributed by hand:

1. one job at a time in this process when ``n_jobs == 1`` and no Ray address;
2. else ``n_jobs`` local processes, a ``concurrent.futures.ProcessPoolExecutor`` (spawn: TVM and
   fork do not mix);
3. or, with a Ray address, one Ray actor per worker, fed by ``ray.util.ActorPool``.

Where a job runs, its exception (or its worker's set-up's) is caught and sent home with the
worker's traceback (as itself if pickle can carry it, else as its class, ``args`` and
attributes); the caller gets that class back with its own message (a one-line
:class:`~tvm_tinytrain.errors.TinyTrainError` stays one line), after every worker has been
stopped. Ctrl-C stops the workers at once; what ``on_result`` was given stays given.
Not guaranteed: a worker that dies outright (a crash in TVM, out of memory) comes back as a
``RuntimeError`` saying so, not as an exception of its own.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ..errors import InputError

CLIENT_PORT = 10001  # Ray Client's default port (ray://HOST)
CONNECT_TIMEOUT = 5.0  # seconds, for each of: resolving the host, opening the port, its first answer
ACCEPTED = 'HOST:PORT (a Ray head\'s address), ray://HOST[:PORT] (Ray Client, port 10001) or "local"'
PIP_HINT = 'pip install "tvm-tinytrain[cluster]"'


def run_jobs(make_worker: Callable, jobs: Sequence, *, n_jobs: int | None = None,
             ray_address: str | None = None, on_result: Callable | None = None) -> list:
    """Run ``worker.run(job)`` for every job; returns the results in the order of ``jobs``.

    make_worker: a picklable zero-argument callable (a dataclass with ``__call__``, a
      ``functools.partial`` of a module-level class) that builds an object with a ``run(job)``
      method; called once per process or Ray actor, or once in this process when ``n_jobs`` is 1
      and there is no ``ray_address``. It is pickled and may be unpickled on another machine of a
      Ray cluster: it must carry everything it needs by value (file contents as bytes, not paths),
      and its classes must be importable there (tvm-tinytrain installed on every node).
    jobs: picklable job descriptions. Results must be picklable too.
    n_jobs: local processes; with Ray, actors (default: the cluster's CPUs). Never more than
      there are jobs, nor, on Ray, than the cluster has CPUs (each actor takes one).
    ray_address: None (local), ``"local"`` (a Ray runtime started on this machine with
      ``n_jobs`` CPUs and shut down after), ``"HOST:PORT"`` (a running cluster's head, GCS port
      6379 by default) or ``"ray://HOST[:PORT]"`` (Ray Client, port 10001 by default). A cluster
      this call connected to is left running (disconnected, its actors killed). If this process
      already has a Ray connection (``ray.init`` was called), it is used as it is and kept.
    on_result: ``on_result(index, job, result)``, called in this process as each job finishes.
    """
    jobs = list(jobs)
    if n_jobs is not None and n_jobs < 1:
        raise InputError(f"n_jobs must be at least 1, not {n_jobs}")
    where = parse_address(ray_address) if ray_address is not None else None
    results: list = [None] * len(jobs)

    def deliver(index: int, value):
        results[index] = value
        if on_result is not None:
            on_result(index, jobs[index], value)

    if not jobs:
        return results
    if where is not None:
        _run_on_ray(make_worker, jobs, n_jobs, ray_address, where, deliver)
    elif (n_jobs or 1) == 1:
        worker = make_worker()
        for index, job in enumerate(jobs):
            deliver(index, worker.run(job))
    else:
        _run_in_processes(make_worker, jobs, min(n_jobs, len(jobs)), deliver)
    return results


# -- where a job runs ---------------------------------------------------------------------------


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (the ``__cause__`` of the one raised here)."""

    def __str__(self):
        return "\n" + self.args[0]


@dataclass
class _Failure:
    """An exception raised in a worker, in a form that always pickles: the exception itself when
    pickle can rebuild it, else its class, args (its message) and attributes."""

    exception: BaseException | None
    kind: type
    args: tuple
    state: dict
    trace: str

    @classmethod
    def of(cls, error: Exception) -> _Failure:
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        for failure in (cls(error, type(error), (), {}, trace),
                        cls(None, type(error), error.args, dict(vars(error)), trace)):
            try:
                pickle.loads(pickle.dumps(failure))
                return failure
            except Exception:
                pass
        return cls(None, RuntimeError, (f"{type(error).__name__}: {error}",), {}, trace)

    def error(self) -> BaseException:
        """The exception again, its worker's traceback as its cause."""
        error = self.exception
        if error is None:  # __new__, not __init__, which may not take the message
            error = self.kind.__new__(self.kind, *self.args)
            error.args = self.args
            error.__dict__.update(self.state)
        error.__cause__ = RemoteTraceback(self.trace)
        return error


class _Host:
    """Holds one worker in a process or actor: built on its first job, so that a failing set-up
    comes home like a failing job."""

    def __init__(self, factory: bytes):
        self.factory, self.worker = factory, None

    def run(self, index: int, job) -> tuple[int, bool, object]:
        try:
            if self.worker is None:
                self.worker = pickle.loads(self.factory)()
            return index, True, self.worker.run(job)
        except Exception as error:
            return index, False, _Failure.of(error)


def _raise_failures(outcomes: list, deliver: Callable) -> None:
    """Deliver each ``(index, ok, value)``; then raise the first failure among them, if any."""
    for index, ok, value in outcomes:
        if ok:
            deliver(index, value)
    for _, ok, value in outcomes:
        if not ok:
            raise value.error()


# -- local processes ----------------------------------------------------------------------------

_host: _Host | None = None  # in a pool's process


def _process_start(factory: bytes) -> None:
    global _host
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    _host = _Host(factory)


def _process_run(index: int, job):
    return _host.run(index, job)


def _dumps(make_worker: Callable, dumps=pickle.dumps) -> bytes:
    try:
        return dumps(make_worker)
    except Exception as error:
        raise TypeError(f"make_worker must be picklable to run in other processes: {error}") from error


def _run_in_processes(make_worker: Callable, jobs: list, n: int, deliver: Callable) -> None:
    pool = futures.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_process_start, initargs=(_dumps(make_worker),))
    finished = False
    try:
        pending = {pool.submit(_process_run, index, job) for index, job in enumerate(jobs)}
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            try:
                outcomes = [future.result() for future in done]
            except BrokenProcessPool as error:
                raise RuntimeError(f"a worker process died ({error})") from None
            _raise_failures(outcomes, deliver)
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _terminate(pool)


def _terminate(pool: futures.ProcessPoolExecutor) -> None:
    """Stop the pool now: queued jobs dropped, running ones killed, every process reaped."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


# -- Ray ----------------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, str | None, int | None]:
    """``("local", None, None)``, ``("gcs", host, port)`` or ``("client", host, port)``."""
    text = str(address).strip()
    if text == "local":
        return "local", None, None
    kind, rest = ("client", text[len("ray://"):]) if text.startswith("ray://") else ("gcs", text)
    host, sep, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    host = host.strip("[]")  # [::1]:6379
    if kind == "client" and not sep:
        host, port = rest, str(CLIENT_PORT)
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"Ray address {address!r} is not one of {ACCEPTED}")
    return kind, host, int(port)


def _import_ray():
    try:
        import ray
        from ray.util import ActorPool  # noqa: F401
    except ImportError:
        raise InputError(f"running jobs on Ray needs Ray, which is not installed: {PIP_HINT}") from None
    return ray


def _run_on_ray(make_worker: Callable, jobs: list, n_jobs: int | None, address: str, where: tuple,
                deliver: Callable) -> None:
    ray = _import_ray()
    from ray.util import ActorPool

    factory = _dumps(make_worker, ray.cloudpickle.dumps)  # by value what lives in __main__
    connected_here = not ray.is_initialized()
    actors = []
    try:
        if connected_here:
            _connect(ray, address, where, n_jobs)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            raise InputError(f"the Ray cluster at {address} has no CPU to run a worker on")
        n = min(n_jobs or cpus, cpus, len(jobs))
        host = ray.remote(num_cpus=1, max_restarts=0)(_Host)
        factory_ref = ray.put(factory)
        actors = [host.remote(factory_ref) for _ in range(n)]
        pool = ActorPool(actors)
        for item in enumerate(jobs):
            pool.submit(lambda actor, item: actor.run.remote(*item), item)
        while pool.has_next():
            try:
                outcome = pool.get_next_unordered()
            except ray.exceptions.RayTaskError as error:
                raise _unwrap(error) from None
            except ray.exceptions.RayActorError as error:
                raise RuntimeError(f"a Ray worker died (Ray at {address}): {_summary(error)}") from None
            _raise_failures([outcome], deliver)
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        if connected_here:
            ray.shutdown()  # stops a runtime started here; from a cluster, only disconnects


def _connect(ray, address: str, where: tuple, n_jobs: int | None) -> None:
    """``ray.init`` for ``where``, quiet; an address that does not answer fails in seconds."""
    kind, host, port = where
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
    if kind == "local":
        ray.init(address="local", num_cpus=n_jobs or os.cpu_count(), **quiet)
        return
    if kind == "client":
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise InputError(f"Ray Client ({address}) needs Ray's client part, not installed: {PIP_HINT}")
    _check_answers(address, host, port)
    # the pre-check passed, so one or two tries are enough (Ray's default: 20 tries of ~35 s each)
    saved = os.environ.get("RAY_gcs_server_port_wait_time_s")
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "3")
    ray_log = logging.getLogger("ray.client_builder")
    level = ray_log.level
    try:
        if kind == "client":  # its options go to the cluster's ray.init; its notes to a logger
            ray_log.setLevel(logging.WARNING)
            ray.init(address=f"ray://{_bracketed(host)}:{port}", log_to_driver=False)
        else:
            ray.init(address=f"{_bracketed(host)}:{port}", **quiet)
    except Exception as error:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token)")
        raise InputError(f"cannot connect to the Ray cluster at {address}: {_summary(error)}{hint}") from None
    finally:
        ray_log.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_answers(address: str, host: str, port: int) -> None:
    """Raise InputError unless ``host:port`` resolves, accepts a connection and speaks HTTP/2 (gRPC:
    a Ray head's GCS port and its Ray Client port both do), each within CONNECT_TIMEOUT."""
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            found.append(error)

    resolver = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    resolver.start()
    resolver.join(CONNECT_TIMEOUT)
    if not found or isinstance(found[0], OSError):
        why = found[0] if found else f"no answer in {CONNECT_TIMEOUT:.0f} s"
        raise InputError(f"Ray address {address}: cannot find host {host} ({why})")
    family, kind, proto, _, sockaddr = found[0][0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(sockaddr)
        except OSError as error:
            raise InputError(f"Ray address {address}: nothing answers at {host}:{port} ({error}); is the "
                             f"cluster up (`ray start --head`) and the port open?") from None
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("0", "false", ""):
            return  # TLS first: no plain HTTP/2 to look for
        try:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            frame = sock.recv(9)
        except OSError:
            frame = b""
        if len(frame) < 4 or frame[3] != 4:  # an HTTP/2 server opens with a SETTINGS frame
            raise InputError(
                f"Ray address {address}: {host}:{port} takes connections but is not a Ray cluster; give "
                f"its head's GCS port (6379 unless `ray start --port` said otherwise), or "
                f"ray://HOST:{CLIENT_PORT} for Ray Client")


def _unwrap(error) -> BaseException:
    """The exception a Ray task raised, out of Ray's RayTaskError."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception) and not type(cause).__module__.startswith("ray."):
        return cause
    return RuntimeError(f"a Ray worker failed: {_summary(error)}")


def _summary(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
