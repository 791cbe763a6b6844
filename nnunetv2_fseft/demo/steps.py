"""Running the demo's steps: one progress line each, output in logs/<step>.log, a record in steps/<step>.json
(a re-run skips finished steps), errors as one line naming the log; lanes to run steps side by side."""
import contextlib
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

from ..errors import FSEFTError
from ..files import read_json, write_json
from .workdir import Workdir


class Progress:
    """One line per step: elapsed time since the start, step, what it did."""

    def __init__(self, stream=None):
        self.t0 = time.monotonic()
        self.own_stream = None
        if stream is None:
            try:  # a copy of stdout's file descriptor: steps that redirect fd 1 to their log do not swallow it
                stream = self.own_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
            except (AttributeError, OSError, ValueError):  # stdout without a file descriptor (captured)
                stream = sys.stdout
        self.stream = stream
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.own_stream is not None:
            self.own_stream.close()

    def line(self, step: str, text: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        with self.lock:
            print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {step:<28} {text}", file=self.stream, flush=True)


@contextlib.contextmanager
def output_to(log: Path):
    """Send this process's stdout/stderr (file descriptors, so worker processes too) to a log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_in_process(wd: Workdir, step: str, function, *args, capture: bool = True, **kwargs):
    """Call a Python step with its output in logs/<step>.log; errors become one line naming step and log.

    capture=False leaves the output alone (redirecting file descriptors is not thread-safe)."""
    log = wd.log(step)
    log.write_text(f"# {step}: {function.__module__}.{function.__name__}\n")
    try:
        with output_to(log) if capture else contextlib.nullcontext():
            return function(*args, **kwargs)
    except FSEFTError as e:
        raise FSEFTError(f"step '{step}' failed: {e} (log: {log})") from None
    except Exception as e:
        with open(log, "a") as f:
            traceback.print_exc(file=f)
        raise FSEFTError(f"step '{step}' failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         f"see {log}") from None


def run_command(wd: Workdir, step: str, command: List[str], env: dict) -> float:
    """Run a console script with output in logs/<step>.log; returns its wall time. Failure: one line + log."""
    log = wd.log(step)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("# " + " ".join(command) + "\n# env: " + " ".join(f"{k}={v}" for k, v in env.items()) + "\n")
        f.flush()
        rc = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **env}, cwd=str(wd.root))
    if rc != 0:
        raise FSEFTError(f"step '{step}' failed ({Path(command[0]).name} exit code {rc}){_last_error(log)}; "
                         f"see {log}")
    return time.monotonic() - t0


def _last_error(log: Path) -> str:
    """The log's last line that looks like an error, to say what went wrong without a traceback."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines[-40:]):
        if "Error" in ln or "error:" in ln:
            return f": {ln[:200]}"
    return ""


def done(wd: Workdir, step: str) -> Optional[dict]:
    """A finished step's record; None when the step has not run (or its record is unreadable: it runs again)."""
    try:
        return read_json(wd.record(step))
    except FSEFTError:
        return None


def save_record(wd: Workdir, step: str, record: dict) -> dict:
    write_json(wd.record(step), record)
    return record


class Lanes:
    """Runs steps `jobs` at a time in threads; the first failure stops new work and is raised by wait()."""

    def __init__(self, jobs: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.failures: List[BaseException] = []

    def submit(self, function, *args):
        def guarded():
            if self.failures:
                return None
            try:
                return function(*args)
            except BaseException as e:  # FSEFTError, or a bug: re-raised in the main thread
                self.failures.append(e)
                return None
        return self.pool.submit(guarded)

    def wait(self, futures) -> list:
        results = [f.result() for f in futures]
        if self.failures:
            raise self.failures[0]
        return results

    def close(self):
        self.pool.shutdown(wait=True)


class Finished:
    """A done future, for the one-lane path."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value
