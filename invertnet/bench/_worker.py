"""The measuring side of the benchmark: ``python -m invertnet.bench._worker``.

Two modes, both reading jobs as JSON lines and writing one JSON line of results
per job to stdout. A job is a configuration (see
:class:`~invertnet.bench.measure.Config`), measured by
:func:`~invertnet.bench.measure.measure_here`, or a list of configurations of one
workload and depth, timed against each other by
:func:`~invertnet.bench.measure.time_interleaved`; the results are a result, or a
list of them, as dictionaries (:meth:`~invertnet.bench.measure.Result.to_dict`).

``--serve``
    Import torch once, then for every job line read from stdin fork a
    fresh child that measures it and exits. The server itself never runs a tensor
    operation, so every child starts from the same clean state (no allocator
    caches, no thread pools), without paying the seconds of ``import torch`` each.
``--one JOB``
    Run one job in this (new) interpreter; used where ``os.fork`` does not exist.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from invertnet.bench.measure import Config, Result, measure_here, time_interleaved

__all__ = ["failed_job", "main", "measure_config_line"]


def measure_config_line(line: str) -> dict[str, Any] | list[dict[str, Any]]:
    """Run the job encoded in ``line``; failures become an ``error`` in its results."""
    job = json.loads(line)
    configs = [Config(**c) for c in job] if isinstance(job, list) else Config(**job)
    try:
        if isinstance(configs, list):
            return [r.to_dict() for r in time_interleaved(configs)]
        return measure_here(configs).to_dict()
    except Exception as exc:  # report any failure of the measured code to the parent
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return failed_job(line, detail)


def failed_job(line: str, error: str) -> dict[str, Any] | list[dict[str, Any]]:
    """The results of the job encoded in ``line`` when it failed with ``error``."""
    job = json.loads(line)
    if isinstance(job, list):
        return [Result(config=Config(**c), error=error).to_dict() for c in job]
    return Result(config=Config(**job), error=error).to_dict()


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _serve_one(line: str) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fresh child: measure, hand the result over, leave at once
        os.close(read_end)
        os.dup2(2, 1)  # stray prints of the measured code must not mix with results
        status = 0
        try:
            payload = json.dumps(measure_config_line(line)).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    payload = _read_all(read_end)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if payload:
        return payload.decode()
    code = os.waitstatus_to_exitcode(status)
    reason = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return json.dumps(failed_job(line, f"the measuring process {reason} (out of memory?)"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser(prog="python -m invertnet.bench._worker")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--serve", action="store_true", help="fork a child per stdin line")
    mode.add_argument("--one", metavar="JOB", help="run one JSON job here")
    args = parser.parse_args(argv)
    if args.one is not None:
        sys.stdout.write(json.dumps(measure_config_line(args.one)) + "\n")
        return 0
    # torch.utils.checkpoint imports torch._dynamo on its first call (seconds);
    # import it once here rather than in every child.
    importlib.import_module("torch._dynamo")
    if threading.active_count() != 1:  # forking a threaded process is unsafe
        raise RuntimeError("the benchmark server must not start threads before forking")
    if torch.cuda.is_initialized():  # a forked child cannot use CUDA then
        raise RuntimeError(
            "the benchmark server initialised CUDA before forking; its children could not "
            "use the GPU (something imported at start-up touched CUDA)"
        )
    try:
        for line in sys.stdin:
            if line.strip():
                sys.stdout.write(_serve_one(line) + "\n")
                sys.stdout.flush()
    except BrokenPipeError:  # the benchmark command was stopped: nobody to report to
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
