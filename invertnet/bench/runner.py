"""Run benchmark jobs one after another, each in a fresh process.

:class:`Runner` starts ``python -m invertnet.bench._worker --serve`` once; that
server forks a new child for every job (see :mod:`invertnet.bench._worker`).
Where ``os.fork`` does not exist, a new interpreter is started per job.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import invertnet
from invertnet.bench.measure import Config, Result

__all__ = ["Runner"]

_WORKER = [sys.executable, "-m", "invertnet.bench._worker"]


def _worker_env() -> dict[str, str]:
    # The worker must import this very invertnet, wherever the caller found it.
    root = str(Path(invertnet.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


class Runner:
    """Measure configurations in fresh processes.

    Parameters
    ----------
    timeout_s : float
        A configuration that takes longer is stopped and reported as failed.
    """

    def __init__(self, timeout_s: float = 900.0) -> None:
        self.timeout_s = timeout_s
        self._server: subprocess.Popen[str] | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server process, if one is running."""
        server, self._server = self._server, None
        if server is None:
            return
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            self._kill(server)

    @staticmethod
    def _kill(process: subprocess.Popen[str]) -> None:
        # The server runs in its own session: this ends it and the child it forked.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _start_server(self) -> subprocess.Popen[str]:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [*_WORKER, "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
                env=_worker_env(),
            )
        return self._server

    def _read_line(self, process: subprocess.Popen[str]) -> Any:
        """The job's results as decoded JSON, or the reason there are none, a str."""
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(self.timeout_s)
        if not ready:
            self._kill(process)
            if process is self._server:
                self._server = None
            return f"timed out after {self.timeout_s:.0f} s"
        line = process.stdout.readline()
        if not line:
            process.wait()
            if process is self._server:
                self._server = None
            return f"the benchmark worker exited with status {process.returncode}"
        return json.loads(line)

    def _run_job(self, job: Any) -> Any:
        line = json.dumps(job)
        if hasattr(os, "fork"):
            server = self._start_server()
            assert server.stdin is not None
            server.stdin.write(line + "\n")
            server.stdin.flush()
            return self._read_line(server)
        process = subprocess.Popen(
            [*_WORKER, "--one", line],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_worker_env(),
        )
        try:
            return self._read_line(process)
        finally:
            if process.poll() is None:
                process.wait()

    def run(self, config: Config) -> Result:
        """Measure ``config`` in a fresh process and return what it measured."""
        answer = self._run_job(asdict(config))
        if isinstance(answer, str):
            return Result(config=config, error=answer)
        return Result.from_dict(answer)

    def run_interleaved(self, configs: list[Config]) -> list[Result]:
        """Time ``configs`` (one workload and depth) against each other in a fresh process.

        See :func:`invertnet.bench.measure.time_interleaved`.
        """
        answer = self._run_job([asdict(c) for c in configs])
        if isinstance(answer, str):
            return [Result(config=c, error=answer) for c in configs]
        return [Result.from_dict(data) for data in answer]
