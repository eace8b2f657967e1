"""Measurement machinery shared by the benchmarks.

* Fresh processes: :func:`forkserver_context` + :func:`run_isolated` run one job per child,
  forked from a server that imported the heavy libraries but never allocated a tensor, so
  every configuration starts from the same clean state without paying the imports again.
* Peak memory (:class:`PeakMemory`): CUDA ``max_memory_allocated``; on CPU the kernel's
  peak-RSS counter (``/proc/self/clear_refs`` <- ``5``, then ``VmHWM``), with a psutil
  sampling thread where that is unavailable. :func:`make_allocator_transparent` makes RSS
  follow live tensors (glibc mmap threshold 64 KiB, ``malloc_trim``).
* Provenance: :func:`machine_info`, :func:`git_state`, :func:`markdown_header`, :func:`write_results`.
* The registered methods as benchmark rows (:func:`method_rows`: name, title and default config
  from :mod:`neuroada_plugin.registry`), and the reference implementations they are compared
  against: :class:`DenseComposition` (the official NeuroAda code's dense forward) and
  :func:`supertuning_sparsity`.

Scripts import this module by name: ``benchmarks/`` is ``sys.path[0]`` when one of them runs,
and forkserver children inherit that path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...); None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return proc_status_kib("VmHWM") is not None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only: musl has no mallopt)
        return libc
    except (OSError, AttributeError):
        return None


def make_allocator_transparent() -> bool:
    """Make RSS follow live tensors: every block > 64 KiB gets its own mmap, freed pages go back.

    glibc's default raises the mmap threshold up to 32 MiB after large frees and keeps freed
    heap memory, so RSS would depend on allocation history rather than on the step's tensors.
    Call it before the first tensor is allocated: a block glibc once placed in its heap stays
    in its free lists and, when reused, keeps its pages resident after the next free.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1 and libc.mallopt(m_trim_threshold, 128 * 1024) == 1
    libc.malloc_trim(0)
    return ok


def glibc_trim() -> None:
    """Return glibc's cached free pages to the kernel (no-op off glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class RssSampler(threading.Thread):
    """Fallback peak-RSS probe: polls psutil every 0.5 ms (torch ops release the GIL)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.0005)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self._process.memory_info().rss)


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    kib = proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the work between :meth:`start` and :meth:`stop`, in absolute bytes.

    CUDA: ``torch.cuda`` allocator counters (tensors only). CPU: resident set size; ``start``
    first returns glibc's cached pages, then resets the kernel's peak counter (or starts a
    sampling thread where that is impossible). ``method`` names what was used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.before = 0
        self._sampler: RssSampler | None = None

    def current(self) -> int:
        """Memory in use now: allocated CUDA memory, or the RSS."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return current_rss()

    def start(self) -> int:
        """Begin a measurement; returns the memory in use at its start (also ``self.before``)."""
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self.before
        glibc_trim()
        self.before = current_rss()
        if reset_peak_rss():
            self.method = "VmHWM after clear_refs"
        else:
            self._sampler = RssSampler()
            self._sampler.start()
            self.method = "psutil RSS sampling (0.5 ms)"
        return self.before

    def stop(self) -> int:
        """End the measurement; returns the peak (absolute bytes) since :meth:`start`."""
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self._sampler is not None:
            peak, self._sampler = self._sampler.stop(), None
            return peak
        return (proc_status_kib("VmHWM") or 0) * 1024


# --------------------------------------------------------------------------------------------
# Fresh processes
# --------------------------------------------------------------------------------------------


def forkserver_context(preload: Iterable[str]) -> Any:
    """A ``forkserver`` context whose server imports ``preload`` (and nothing else) once."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def _worker_entry(func: Callable[[dict[str, Any]], Any], job: dict[str, Any], connection: Any) -> None:
    """Child entry point: send back ``func(job)`` or the error text."""
    try:
        connection.send({"ok": True, "result": func(job)})
    except BaseException as error:  # e.g. a shape error; an OOM kill is caught by the parent
        connection.send({"ok": False, "error": f"{type(error).__name__}: {error}"})
    finally:
        connection.close()


def run_isolated(
    context: Any, func: Callable[[dict[str, Any]], Any], job: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Run ``func(job)`` in a fresh child; returns ``{"ok": ..., "result" | "error": ...}``.

    ``func`` must be a module-level function (it is pickled by reference).
    """
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_entry, args=(func, job, sender))
    process.start()
    sender.close()
    message = None
    if receiver.poll(timeout_s):
        try:
            message = receiver.recv()
        except EOFError:
            message = None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if message is None:
        message = {"ok": False, "error": f"child exited with code {process.exitcode} (killed/OOM or timeout)"}
    return message


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit ``cuda`` must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return device


# --------------------------------------------------------------------------------------------
# Provenance and reporting
# --------------------------------------------------------------------------------------------


def loadavg() -> list[float] | None:
    """1/5/15-minute load average (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(distribution: str) -> str | None:
    """Installed version, read from metadata: importing peft here would cost the parent ~6 s."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """Commit of the checkout and the tracked package files that differ from it.

    Read-only git calls (no index refresh), so a results file says which code it measured.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("diff", "--name-only", "HEAD", "--", "neuroada_plugin")
    return {"commit": git("rev-parse", "HEAD"), "package_files_changed": changed.split() if changed else []}


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU (if any) and library versions, for the results file."""
    import psutil

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "neuroada_plugin": version("neuroada-plugin"),
    }


def mib(value: float | None, digits: int = 2) -> str:
    """Bytes as MiB for a table cell (``-`` for None)."""
    return "-" if value is None else f"{value / MIB:,.{digits}f}"


def ratio(value: float | None) -> str:
    """A ratio for a table cell (``-`` for None)."""
    return "-" if value is None else f"{value:.2f}x"


def markdown_header(payload: dict[str, Any], title: str) -> list[str]:
    """Title and provenance lines (command, time, machine, versions, git, load, method, wall time).

    ``payload`` needs ``command``, ``timestamp``, ``machine``, ``git``, ``loadavg_start``,
    ``loadavg_end``, ``memory_methods`` and ``wall_s``.
    """
    m = payload["machine"]
    versions = f"python {m['python']}, torch {m['torch']}"
    if m.get("transformers"):
        versions += f", transformers {m['transformers']}"
    versions += f", peft {m['peft']}, neuroada_plugin {m['neuroada_plugin']}"
    return [
        f"# {title}",
        "",
        f"- command: `{payload['command']}`",
        f"- timestamp (UTC): {payload['timestamp']}",
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
        f"{m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}",
        f"- versions: {versions}",
        f"- git commit: {payload['git']['commit']}; changed package files: {payload['git']['package_files_changed'] or 'none'}",
        f"- load average (1/5/15 min) at start: {payload['loadavg_start']}, at end: {payload['loadavg_end']}",
        f"- memory method: {', '.join(payload['memory_methods'])}",
        f"- wall time: {payload['wall_s']:.0f} s",
    ]


def write_results(payload: dict[str, Any], output_dir: Path, stem: str, markdown: list[str]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (the payload) and ``<stem>.md`` (the given lines); returns both paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    write_text_atomically(json_path, json.dumps(payload, indent=2) + "\n")
    write_text_atomically(md_path, "\n".join(markdown))
    return json_path, md_path


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step: an interrupted write leaves the previous results, not half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# The registered methods as rows, and the reference implementations compared against
# --------------------------------------------------------------------------------------------

SIZE_FIELDS = (("top_k", "k"), ("r", "r"), ("neuron_share", "share"))
"""Config fields that size a method, and the letter a row's name gives them (``neuroada_k1``, ``neat_r8``)."""


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One registered method in a benchmark: its default config with ``overrides``, named after its spec."""

    key: str  # e.g. "neuroada_k1": the method's name and its size setting
    label: str  # e.g. "NeuroAda k=1": the spec's display name and its size setting
    method: str  # the registry name
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, **settings: Any) -> Any:
        """The method's config: its data-free defaults, ``settings`` (targets, task type), then the row's overrides."""
        from neuroada_plugin.registry import get_method

        return get_method(self.method).data_free_config(**{**settings, **dict(self.overrides)})


def method_rows(
    variants: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, where: Callable[[Any], bool] | None = None
) -> list[MethodRow]:
    """A row per registered method (``where(spec)`` true), with its default config, in registration order.

    ``variants[name]``: more rows of that method, each its defaults with these overrides
    (``{"neuroada": [{"top_k": 20}]}`` adds ``neuroada_k20``). A new method gets its row with
    no change to the benchmarks. Imports PEFT (the config classes).
    """
    from neuroada_plugin.registry import methods

    rows = []
    for spec in methods().values():
        if where is not None and not where(spec):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(spec.config_class())}
        defaults.update(spec.data_free_settings)
        for overrides in ({}, *(variants or {}).get(spec.name, ())):
            values = {**defaults, **overrides}
            key, label = spec.name, spec.display_name
            for field, letter in SIZE_FIELDS:
                if field in values:
                    key, label = f"{key}_{letter}{values[field]}", f"{label} {letter}={values[field]}"
                    break
            rows.append(MethodRow(key, label, spec.name, tuple(overrides.items())))
    return rows


class DenseComposition(nn.Module):
    """The dense-composition reference: ``F.linear(x, W + scatter(idx, theta))``.

    This is how the official NeuroAda code (and PEFT's Super-Tuning/SHiRA) apply a sparse
    update: a weight-sized copy is built on every forward and autograd keeps it for backward,
    and backward computes the full ``[out, in]`` weight gradient only to gather ``out * k``
    entries from it. Same selection as our layer (``select_connections``, magnitude).
    """

    def __init__(self, proj: nn.Linear, k: int) -> None:
        super().__init__()
        from neuroada_plugin import select_connections

        self.proj = proj
        self.proj.requires_grad_(False)
        self.register_buffer("indices", select_connections(proj.weight, k))
        self.theta = nn.Parameter(torch.zeros(proj.out_features, k, dtype=torch.float32, device=proj.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        delta = torch.zeros_like(weight).scatter(1, self.indices, self.theta.to(weight.dtype))
        return nn.functional.linear(x, weight + delta, self.proj.bias)


def supertuning_sparsity(out_features: int, in_features: int) -> float:
    """Sparsity for which Super-Tuning trains exactly ``out_features`` entries (NeuroAda k=1's budget).

    PEFT computes ``int(numel * (1 - sparsity))``; aiming half an entry above ``out`` makes the
    floor land on ``out`` despite float rounding.
    """
    return 1.0 - (out_features + 0.5) / (out_features * in_features)
