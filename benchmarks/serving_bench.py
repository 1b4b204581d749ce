#!/usr/bin/env python3
"""Serving benchmark: one load generator against edgert, llama-server and llama-cpp-python's server.

All servers run the same GGUF with the same threads and context, side by side in one run,
and are measured *alternately* (the order rotates every round), so a CPU shared with other
jobs hurts all of them alike. Medians over rounds are reported, with ratios.

Systems (pick with ``--systems``):

* ``edgert``              ``edgert serve`` on a Unix socket (n_parallel slots, n_ctx = total KV shared)
* ``llama-server``        ``llama-server -np P -c CTX --kv-unified``: one KV pool of CTX cells shared by P
                          slots, every slot may use up to CTX (edgert's layout exactly), loopback TCP
* ``llama-server-split``  ``llama-server -np P -c CTX*P --no-kv-unified``: P private slots of CTX each
                          (``-np`` splits ``-c``), loopback TCP
* ``lcp-server``          ``python -m llama_cpp.server`` (its defaults, interrupt_requests=True)
* ``lcp-server-noint``    same with ``--interrupt_requests False``
* ``raw``                 raw in-process ``llama_cpp.Llama`` in a worker subprocess (no HTTP): the
                          single-stream baseline (decode tok/s, TTFT)
* ``ceilings``            ``llama-batched-bench -npl 1,<max concurrency>`` with private and unified (``-kvu``)
                          KV, measured in the rotation like a server: the engine's batch ceiling under the
                          same conditions as the servers' aggregate (generated tokens / wall, prefill included)

Measured by the same client (aiohttp, streaming SSE, ``/v1/completions``; its C HTTP parser costs
the shared CPU ~150 us per token where httpx's pure-Python stack cost ~400 us, and the load generator
shares the cores with the server it measures -- ``client_cpu_us_per_token`` in the JSON says how much):

* single stream: TTFT (request sent -> first content token arrives) and decode tok/s from token
  arrival times, ``(tokens - 1) / (t_last - t_first)``;
* aggregate tok/s at each concurrency (sum of completion tokens / wall time from the first request
  sent to the last stream finished), mean/max TTFT, per-stream decode tok/s;
* TTFT with a ~500-token system prompt: uncached (a unique line in front of it, so no prefix can be
  reused) vs cached (the same system prompt, a new question each time, after one warming request);
* truncated streams: a stream that errors, ends without ``[DONE]``, or delivers fewer than
  max_tokens without having stopped on end-of-generation;
* RSS of the daemon (psutil, process tree) after load and after the load test, minus the model file;
* cold start: spawn -> ready (edgert ``/ready``, llama-server ``/health``, llama_cpp.server
  ``/v1/models``; raw: spawn -> model loaded in the worker).

Generation length: llama-server and llama-cpp-python get ``ignore_eos``-style requests where they
take them (llama-server: ``ignore_eos``); edgert takes no ignore_eos over HTTP, so the prompts are
greedy story continuations the model runs to length on; every stream's finish reason and token count
is recorded, and throughput is compared as tok/s, never as totals.

Usage::

    .venv/bin/python benchmarks/serving_bench.py --model ~/.cache/edgert-bench/gemma-3-270m-Q4_K_M.gguf \
        -o /tmp/serving-270m.json
    .venv/bin/python benchmarks/serving_bench.py --report /tmp/serving-270m.json   # markdown tables

Every server this starts is stopped (by its pid / its own process group) on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable
EDGERT = str(REPO / ".venv" / "bin" / "edgert")
#: run edgert from this source tree (e.g. a `git archive HEAD edgert` snapshot) instead of the working tree
EDGERT_SRC = ""
#: source tree of the ``edgert-alt`` system (an A/B variant of edgert, e.g. a patched snapshot)
EDGERT_ALT_SRC = ""
#: extra environment of the ``edgert-alt`` system (an A/B of settings, e.g. EDGERT_ENGINE__KV_UNIFIED=false)
EDGERT_ALT_ENV: dict[str, str] = {}

STORY = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his three "
    "daughters. Every morning he"
)

SYSTEM_BASE = (
    "You are the assistant of a self-service kiosk in the Green Leaf Café, a small vegetarian-friendly "
    "restaurant in the train station. Always greet the customer politely, answer in two or three short "
    "sentences, never invent prices, and suggest the daily special when it fits. If the customer asks "
    "about allergens, list them from the menu below and recommend asking the staff for anything not "
    "listed. Do not discuss topics unrelated to food, opening hours, payment or the loyalty card. "
    "Payment is by card, phone or cash at the counter; the loyalty card gives every tenth coffee free. "
    "Opening hours are six in the morning to nine in the evening, every day except public holidays.\n\n"
    "Menu:\n"
)
MENU_ITEMS = [
    ("Tomato and mozzarella sandwich", "gluten, milk", "vegetarian"),
    ("Hummus wrap with roasted peppers", "gluten, sesame", "vegan"),
    ("Chicken caesar salad", "egg, milk, fish", "contains meat"),
    ("Lentil soup of the day", "celery", "vegan, gluten-free"),
    ("Quinoa bowl with avocado and beans", "none listed", "vegan, gluten-free"),
    ("Smoked salmon bagel", "gluten, fish, milk", "pescatarian"),
    ("Mushroom risotto", "milk, celery", "vegetarian, gluten-free"),
    ("Falafel plate with tahini", "sesame, gluten", "vegan"),
    ("Cheese and ham croissant", "gluten, milk, egg", "contains meat"),
    ("Fruit salad with mint", "none listed", "vegan, gluten-free"),
    ("Carrot cake", "gluten, egg, milk, nuts", "vegetarian"),
    ("Dark chocolate brownie", "egg, milk, soy", "vegetarian, gluten-free"),
    ("Oat milk latte", "oats (gluten traces)", "vegan"),
    ("Espresso", "none listed", "vegan"),
    ("Fresh orange juice", "none listed", "vegan"),
    ("Green tea", "none listed", "vegan"),
]
QUESTIONS = [
    "Which of your sandwiches are vegetarian?",
    "Do you have anything without gluten?",
    "Can I pay with my phone?",
    "What is in the carrot cake?",
    "Is the lentil soup vegan?",
    "When do you close today?",
    "Does the oat milk latte contain gluten?",
    "What would you recommend for a light lunch?",
    "Do you have any dessert without nuts?",
    "How does the loyalty card work?",
    "Is there fish in the caesar salad?",
    "What drinks do you have?",
]


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (bytes)."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total
    except psutil.Error:
        return 0


class PeakRss:
    """Polls a process tree's RSS in a thread every ``interval_s``; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.peak, self.interval_s = pid, 0, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


class CpuMonitor:
    """CPU used by processes that are not ours (other jobs on the box) while a measurement runs.

    ``foreign cores`` = (system-wide busy CPU time - CPU time of this process and of every server
    we started, with their children) / wall time. 0 means the box was ours alone.
    """

    pids: list[int] = []

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        t = me.cpu_times()
        # this process and its reaped children (ceiling tools); the servers are counted below, once
        total = t.user + t.system + t.children_user + t.children_system
        for pid in CpuMonitor.pids:
            try:
                proc = psutil.Process(pid)
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for pr in procs:
                with contextlib.suppress(psutil.Error):
                    t = pr.cpu_times()
                    total += t.user + t.system
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def __enter__(self) -> CpuMonitor:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()
        self.client0 = time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self.t0
        busy, ours = self._busy() - self.busy0, self._ours() - self.ours0
        self.foreign_cores = max(0.0, busy - ours) / wall if wall > 0 else 0.0
        self.ours_cores = ours / wall if wall > 0 else 0.0
        #: CPU seconds of the load generator itself (this process, all threads) during the measurement
        self.client_cpu_s = time.process_time() - self.client0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def nonce() -> str:
    return f"{random.randrange(10**7, 10**8)}"


def story_prompt() -> str:
    """A unique (uncacheable) short prompt: ~30 tokens, greedy continuation runs to length."""
    return f"Chapter {nonce()}.\n\n{STORY}"


# --------------------------------------------------------------------------- stream result
@dataclass
class StreamResult:
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    tokens: int = 0
    events: int = 0
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    started: float = 0.0
    ended: float = 0.0
    #: arrival times of the first and the last token event
    first_at: float | None = None
    last_at: float = 0.0

    def truncated(self, max_tokens: int) -> bool:
        if self.error is not None or not self.done:
            return True
        return self.tokens < max_tokens and self.finish_reason != "stop"


# --------------------------------------------------------------------------- targets
class Target:
    name = ""
    kind = "http"

    def __init__(self, model: Path, ctx: int, threads: int, parallel: int, workdir: Path) -> None:
        self.model = model
        self.ctx = ctx
        self.threads = threads
        self.parallel = parallel
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.command: list[str] = []
        self.env_extra: dict[str, str] = {}
        self.client: aiohttp.ClientSession | None = None

    # subclasses fill these
    def build(self) -> None:
        raise NotImplementedError

    def ready_url(self) -> str:
        raise NotImplementedError

    def base_url(self) -> str:
        raise NotImplementedError

    def transport(self) -> httpx.HTTPTransport | None:
        """The readiness poll's transport (plain httpx; the load itself goes through aiohttp)."""
        return None

    def extra_body(self) -> dict[str, Any]:
        return {}

    def start(self) -> float:
        """Spawn; return seconds to ready."""
        self.build()
        return self._spawn(f"start {time.strftime('%H:%M:%S')}: {' '.join(self.command)}")

    def _spawn(self, banner: str) -> float:
        env = dict(os.environ)
        env.update(self.env_extra)
        log = open(self.log_path, "ab")  # noqa: SIM115
        log.write(f"\n=== {banner}\n".encode())
        log.flush()
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.workdir,
            start_new_session=True,  # its own process group: we stop exactly what we started
        )
        log.close()
        self.wait_ready(started)
        return time.perf_counter() - started

    def wait_ready(self, started: float, timeout: float = 600.0) -> None:
        transport = self.transport()
        with httpx.Client(transport=transport, timeout=5.0) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.ready_url()).status_code == 200:
                        return
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"{self.name} not ready after {timeout}s")
                time.sleep(0.01)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return tree_rss(self.pid()) if self.proc is not None else 0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def connector(self) -> aiohttp.BaseConnector:
        return aiohttp.TCPConnector(limit=64)

    async def open_client(self) -> None:
        self.client = aiohttp.ClientSession(
            base_url=self.base_url(),
            connector=self.connector(),
            timeout=aiohttp.ClientTimeout(total=600.0, sock_connect=30.0),
        )

    async def close_client(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def stream(self, prompt: str, max_tokens: int) -> StreamResult:
        assert self.client is not None
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(self.extra_body())
        res = StreamResult()
        res.started = time.perf_counter()
        pending = b""
        try:
            async with self.client.post("/v1/completions", json=body) as response:
                if response.status != 200:
                    res.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return res
                async for chunk in response.content.iter_any():
                    now = time.perf_counter()  # every event of a chunk gets the chunk's arrival time
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.startswith(b"data:") and not res.done:
                            _record_event(res, line[5:].strip(), now)
                    if res.done:
                        break
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            res.ended = time.perf_counter()
            if res.tokens == 0:
                res.tokens = res.events
            if res.first_at is not None:
                res.ttft_s = res.first_at - res.started
                if res.last_at > res.first_at and res.tokens > 1:
                    res.decode_tok_s = (res.tokens - 1) / (res.last_at - res.first_at)
        return res


def _record_event(res: StreamResult, data: bytes, now: float) -> None:
    """One SSE ``data:`` payload of an OpenAI-style completion stream into ``res``."""
    if data == b"[DONE]":
        res.done = True
        return
    obj = json.loads(data)
    usage = obj.get("usage")
    if usage:
        res.tokens = int(usage.get("completion_tokens") or 0) or res.tokens
        res.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            res.cached_tokens = int(details["cached_tokens"])
    timings = obj.get("timings")
    if timings and "cache_n" in timings:
        res.cached_tokens = int(timings["cache_n"])
    for choice in obj.get("choices") or []:
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
        elif "text" in choice:
            # a token event (text may be empty while a UTF-8 character is incomplete)
            res.events += 1
            if res.first_at is None:
                res.first_at = now
            res.last_at = now


class EdgertTarget(Target):
    name = "edgert"
    alt = False

    def build(self) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=self.workdir))
        self.sock = self.workdir / "edgert.sock"
        self.command = [EDGERT, "serve", "--socket", str(self.sock), "--model", str(self.model)]
        self.env_extra = {
            "EDGERT_STATE_DIR": str(self.state_dir),
            "EDGERT_ENGINE__N_THREADS": str(self.threads),
            "EDGERT_ENGINE__N_CTX": str(self.ctx),
            "EDGERT_ENGINE__N_PARALLEL": str(self.parallel),
        }
        src = EDGERT_ALT_SRC if self.alt else EDGERT_SRC
        if src:
            self.env_extra["PYTHONPATH"] = src

    def restart_keep_state(self) -> float:
        """Stop and start again on the same state dir (persisted prefix cache); seconds to ready."""
        self.stop()
        return self._spawn(f"restart (same state dir) {time.strftime('%H:%M:%S')}")

    def ready_url(self) -> str:
        return "http://edgert/ready"

    def base_url(self) -> str:
        return "http://edgert"

    def transport(self) -> httpx.HTTPTransport | None:
        return httpx.HTTPTransport(uds=str(self.sock))

    def connector(self) -> aiohttp.BaseConnector:
        return aiohttp.UnixConnector(path=str(self.sock), limit=64)


class EdgertAltTarget(EdgertTarget):
    """edgert from ``--edgert-alt-src``: a variant measured in the same run (A/B)."""

    name = "edgert-alt"
    alt = True

    def build(self) -> None:
        super().build()
        self.sock = self.workdir / "edgert-alt.sock"
        self.command[self.command.index("--socket") + 1] = str(self.sock)
        self.env_extra.update(EDGERT_ALT_ENV)


class LlamaServerTarget(Target):
    name = "llama-server"
    unified = True

    def __init__(self, *args: Any, bin_dir: Path, **kwargs: Any) -> None:
        self.bin_dir = bin_dir
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        self.port = free_port()
        ctx = self.ctx if self.unified else self.ctx * self.parallel
        self.command = [
            str(self.bin_dir / "llama-server"), "-m", str(self.model),
            "-np", str(self.parallel), "-c", str(ctx), "--kv-unified" if self.unified else "--no-kv-unified",
            "--threads", str(self.threads), "-cb", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def extra_body(self) -> dict[str, Any]:
        return {"ignore_eos": True, "cache_prompt": True}


class LlamaServerSplitTarget(LlamaServerTarget):
    name = "llama-server-split"
    unified = False


class LlamaServerSwaFullTarget(LlamaServerTarget):
    """llama-server with a full-size sliding-window cache: what its prompt cache needs to reuse a
    prefix that ends more than a window (512) before the end of the cached sequence."""

    name = "llama-server-swafull"

    def build(self) -> None:
        super().build()
        self.command.append("--swa-full")


class LcpServerTarget(Target):
    name = "lcp-server"
    interrupt = True

    def build(self) -> None:
        self.port = free_port()
        self.command = [
            PYTHON, "-m", "llama_cpp.server", "--model", str(self.model),
            "--n_ctx", str(self.ctx), "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
            "--flash_attn", "True", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        if not self.interrupt:
            self.command += ["--interrupt_requests", "False"]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/models"

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LcpServerNoIntTarget(LcpServerTarget):
    name = "lcp-server-noint"
    interrupt = False


class RawTarget(Target):
    """Raw in-process llama-cpp-python in a worker subprocess, driven over stdin/stdout (no HTTP)."""

    name = "raw"
    kind = "raw"

    def build(self) -> None:
        self.command = [
            PYTHON, str(Path(__file__).resolve()), "raw-worker", "--model", str(self.model),
            "--ctx", str(self.ctx), "--threads", str(self.threads),
        ]  # fmt: skip

    def start(self) -> float:
        self.build()
        log = open(self.log_path, "ab")  # noqa: SIM115
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"ready"):
            raise RuntimeError(f"raw worker failed; see {self.log_path}")
        return time.perf_counter() - started

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        super().stop()

    async def open_client(self) -> None:
        return None

    async def close_client(self) -> None:
        return None

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    async def stream(self, prompt: str, max_tokens: int, *, keep_cache: bool = False) -> StreamResult:
        out = await asyncio.to_thread(
            self._call, {"prompt": prompt, "max_tokens": max_tokens, "keep_cache": keep_cache}
        )
        return StreamResult(
            ttft_s=out["ttft_s"], decode_tok_s=out["decode_tok_s"], tokens=out["tokens"], events=out["tokens"],
            finish_reason="length", done=True, cached_tokens=out["cached_tokens"], prompt_tokens=out["prompt_tokens"],
        )  # fmt: skip


class CeilingTarget(Target):
    """llama-batched-bench (same build, same model, same threads) run inside the rotation.

    Not a server: each round runs ``llama-batched-bench -npl 1,<max concurrency>`` once with private
    and once with unified (``-kvu``) KV and records, at the largest batch, generated tokens divided by
    the wall time of prefill + generation -- the quantity the servers' aggregate measures -- and
    S_TG (generation only). Measured between the servers, under the same conditions.
    """

    name = "ceilings"
    kind = "ceiling"

    def __init__(self, *args: Any, bin_dir: Path, **kwargs: Any) -> None:
        self.bin_dir = bin_dir
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        self.command = [str(self.bin_dir / "llama-batched-bench"), "-m", str(self.model)]

    def start(self) -> float:
        self.build()
        return 0.0

    def stop(self) -> None:
        return None

    async def open_client(self) -> None:
        return None

    async def close_client(self) -> None:
        return None

    def rss(self) -> int:
        return 0

    def command_line(self, batch: int, tokens: int, unified: bool) -> list[str]:
        return [
            *self.command, "-c", str(self.ctx), "-b", "512", "-ub", "512", "-npp", "32", "-ntg", str(tokens),
            "-npl", f"1,{batch}", "-t", str(self.threads), "-fa", "on", *(["-kvu"] if unified else []),
        ]  # fmt: skip

    async def measure(self, batch: int, tokens: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for layout, unified in (("private", False), ("unified", True)):
            cmd = self.command_line(batch, tokens, unified)
            proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, check=False)
            rows = parse_batched_bench(proc.stdout + proc.stderr)
            if proc.returncode != 0 or batch not in rows or 1 not in rows:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-500:]}")
            big, one = rows[batch], rows[1]
            out[layout] = {
                "generated_per_wall": batch * tokens / (big["T_PP s"] + big["T_TG s"]),
                "s_tg": big["S_TG t/s"],
                "single_s_tg": one["S_TG t/s"],
            }
        return out


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """llama-batched-bench's markdown table -> {batch size: {column: value}}."""
    header: list[str] | None = None
    rows: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None and "B" in cells:
            header = cells
        elif header is not None and len(cells) == len(header):
            row = {k: float(v) for k, v in zip(header, cells, strict=True)}
            rows[int(row["B"])] = row
    return rows


TARGETS: dict[str, type[Target]] = {
    t.name: t
    for t in (
        EdgertTarget,
        EdgertAltTarget,
        LlamaServerTarget,
        LlamaServerSplitTarget,
        LlamaServerSwaFullTarget,
        LcpServerTarget,
        LcpServerNoIntTarget,
        RawTarget,
        CeilingTarget,
    )
}


# --------------------------------------------------------------------------- raw worker
_LOG_CALLBACK: Any = None


def _quiet_llama(llama_cpp: Any) -> None:
    """Silence llama.cpp's log; the ctypes callback must stay referenced or the process crashes."""
    global _LOG_CALLBACK
    _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda *_: None)
    llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def raw_worker(args: argparse.Namespace) -> None:
    """Same settings as edgert's reference path (edgert.engine.llama.reference_generate)."""
    import llama_cpp

    _quiet_llama(llama_cpp)
    llm = llama_cpp.Llama(
        model_path=args.model, n_ctx=args.ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
        n_threads_batch=args.threads, flash_attn=True, swa_full=False, verbose=False,
    )  # fmt: skip
    # warm-up: page in, build graphs
    for _ in llm.generate(llm.tokenize(b"Hello"), temp=0.0, top_k=1, reset=True):
        break
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        tokens = llm.tokenize(cmd["prompt"].encode(), add_bos=True, special=True)
        if not cmd.get("keep_cache"):
            llm.reset()  # n_tokens = 0: eval() then clears the KV from position 0
        cached = 0
        if llm.n_tokens:
            for a, b in zip(llm._input_ids[: llm.n_tokens], tokens[:-1], strict=False):
                if a != b:
                    break
                cached += 1
        first = last = t0
        n = 0
        for _token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n += 1
            if n >= cmd["max_tokens"]:
                break  # end-of-generation ignored: fixed length
        out = {
            "ttft_s": first - t0,
            "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else None,
            "tokens": n,
            "prompt_tokens": len(tokens),
            "cached_tokens": cached,
        }
        print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------- measurement suites
def system_prompt(n_tokens_target: int, count_tokens: Any) -> str:
    text = SYSTEM_BASE
    i = 0
    while count_tokens(text) < n_tokens_target:
        name, allergens, diet = MENU_ITEMS[i % len(MENU_ITEMS)]
        text += f"- {name} (item {i + 1}): allergens {allergens}; {diet}.\n"
        i += 1
    return text


def qa_prompt(system: str, question: str) -> str:
    return f"{system}\nCustomer: {question}\nAssistant:"


async def run_single(target: Target, max_tokens: int) -> StreamResult:
    return await target.stream(story_prompt(), max_tokens)


async def run_aggregate(target: Target, streams: int, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    results = await asyncio.gather(*(target.stream(story_prompt(), max_tokens) for _ in range(streams)))
    wall = max(r.ended for r in results) - started
    tokens = sum(r.tokens for r in results if r.error is None)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    decodes = [r.decode_tok_s for r in results if r.decode_tok_s is not None]
    return {
        "streams": streams,
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "wall_s": wall,
        "tokens": tokens,
        "mean_ttft_s": statistics.mean(ttfts) if ttfts else None,
        "max_ttft_s": max(ttfts) if ttfts else None,
        "median_stream_decode_tok_s": median(decodes),
        "min_stream_tokens": min(r.tokens for r in results),
        "truncated": sum(r.truncated(max_tokens) for r in results),
        "early_stop": sum(1 for r in results if r.finish_reason == "stop" and r.tokens < max_tokens),
        "finish_reasons": sorted({str(r.finish_reason) for r in results}),
        "errors": [r.error for r in results if r.error][:3],
    }


async def run_prefix(target: Target, system: str, reps: int, max_tokens: int) -> dict[str, Any]:
    uncached: list[StreamResult] = []
    cached: list[StreamResult] = []
    questions = random.sample(QUESTIONS, len(QUESTIONS))
    for i in range(reps):
        prompt = qa_prompt(f"Kiosk session {nonce()}.\n{system}", questions[i % len(questions)])
        uncached.append(await target.stream(prompt, max_tokens))
    # one warming request (not counted), then the same system prompt with new questions
    kw: dict[str, Any] = {"keep_cache": True} if isinstance(target, RawTarget) else {}
    await target.stream(qa_prompt(system, questions[-1]), max_tokens, **kw)
    for i in range(reps):
        cached.append(await target.stream(qa_prompt(system, questions[i % len(questions)]), max_tokens, **kw))
    return {
        "uncached_ttft_s": median([r.ttft_s for r in uncached]),
        "cached_ttft_s": median([r.ttft_s for r in cached]),
        "uncached_all": [r.ttft_s for r in uncached],
        "cached_all": [r.ttft_s for r in cached],
        "prompt_tokens": median([r.prompt_tokens for r in cached if r.prompt_tokens]),
        "cached_tokens_reported": [r.cached_tokens for r in cached],
        "truncated": sum(r.truncated(max_tokens) for r in uncached + cached),
    }


# --------------------------------------------------------------------------- main run
async def _measured(args: argparse.Namespace, work: Any) -> list[tuple[Any, float, float]]:
    """Run ``work()`` after waiting for a quiet CPU; retry (keeping every attempt) while other jobs
    used more than QUIET_CORES during it, up to ``args.retries`` times. Each attempt: (value, other
    jobs' cores, the load generator's own CPU seconds)."""
    attempts: list[tuple[Any, float, float]] = []
    for _ in range(args.retries + 1):
        await wait_quiet(args.quiet_wait)
        with CpuMonitor() as mon:
            value = await work()
        attempts.append((value, round(mon.foreign_cores, 3), mon.client_cpu_s))
        if mon.foreign_cores <= QUIET_CORES:
            break
    return attempts


def _client_us_per_token(client_cpu_s: float, tokens: int) -> float | None:
    return round(client_cpu_s * 1e6 / tokens, 1) if tokens else None


async def measure_round(target: Target, args: argparse.Namespace, levels: list[int], system: str) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg_before": loadavg()}
    t0 = time.perf_counter()
    if isinstance(target, CeilingTarget):
        out["ceiling"] = [
            {**value, "foreign_cores": foreign}
            for value, foreign, _client in await _measured(args, lambda: target.measure(max(levels), args.tokens))
        ]
        out["seconds"] = time.perf_counter() - t0
        out["loadavg_after"] = loadavg()
        return out
    out["single"] = []
    for _ in range(0 if args.only_prefix else args.single_repeats):
        for single, foreign, client in await _measured(args, lambda: run_single(target, args.tokens)):
            out["single"].append(
                {
                    **asdict(single),
                    "foreign_cores": foreign,
                    "client_cpu_us_per_token": _client_us_per_token(client, single.tokens),
                }
            )
    if target.kind != "raw" and not args.only_prefix:
        out["aggregate"] = []
        for level in levels:
            for agg, foreign, client in await _measured(args, lambda lv=level: run_aggregate(target, lv, args.tokens)):
                out["aggregate"].append(
                    {
                        **agg,
                        "foreign_cores": foreign,
                        "client_cpu_us_per_token": _client_us_per_token(client, agg["tokens"]),
                    }
                )
    out["prefix"] = []
    for prefix, foreign, _client in await _measured(
        args, lambda: run_prefix(target, system, args.prefix_repeats, args.prefix_tokens)
    ):
        out["prefix"].append({**prefix, "foreign_cores": foreign})
    out["seconds"] = time.perf_counter() - t0
    out["loadavg_after"] = loadavg()
    return out


#: a measurement counts as quiet when other jobs used at most this many cores meanwhile
QUIET_CORES = 0.25


def _quiet(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The rows measured while the box was quiet; all rows (flagged) when there are none."""
    quiet = [r for r in rows if r.get("foreign_cores", 0.0) <= QUIET_CORES]
    return (quiet, True) if quiet else (rows, False)


def summarize(name: str, rounds: list[dict[str, Any]], levels: list[int], max_tokens: int) -> dict[str, Any]:
    """Medians over the quiet measurements (other jobs <= QUIET_CORES); ``*_all`` over every one."""
    singles = [s for r in rounds for s in r["single"]]
    q_singles, single_quiet = _quiet(singles)
    prefixes = [p for r in rounds for p in (r["prefix"] if isinstance(r["prefix"], list) else [r["prefix"]])]
    q_prefix, prefix_quiet = _quiet(prefixes)
    summary: dict[str, Any] = {
        "single_decode_tok_s": median([s["decode_tok_s"] for s in q_singles]),
        "single_ttft_s": median([s["ttft_s"] for s in q_singles]),
        "single_decode_tok_s_all": median([s["decode_tok_s"] for s in singles]),
        "single_ttft_s_all": median([s["ttft_s"] for s in singles]),
        "single_n_quiet": f"{len(q_singles) if single_quiet else 0}/{len(singles)}",
        "single_client_cpu_us_per_token": median([s.get("client_cpu_us_per_token") for s in q_singles]),
        "single_tokens": [s["tokens"] for s in singles],
        "single_truncated": sum(
            1
            for s in singles
            if s["error"] or not s["done"] or (s["tokens"] < max_tokens and s["finish_reason"] != "stop")
        ),
        "prefix_uncached_ttft_s": median([p["uncached_ttft_s"] for p in q_prefix]),
        "prefix_cached_ttft_s": median([p["cached_ttft_s"] for p in q_prefix]),
        "prefix_uncached_ttft_s_all": median([p["uncached_ttft_s"] for p in prefixes]),
        "prefix_cached_ttft_s_all": median([p["cached_ttft_s"] for p in prefixes]),
        "prefix_n_quiet": f"{len(q_prefix) if prefix_quiet else 0}/{len(prefixes)}",
        "prefix_prompt_tokens": median([p["prompt_tokens"] for p in prefixes]),
        "prefix_cached_tokens_reported": [p["cached_tokens_reported"] for p in prefixes],
        "prefix_truncated": sum(p["truncated"] for p in prefixes),
        "foreign_cores_median": median(
            [s["foreign_cores"] for s in singles] + [a["foreign_cores"] for r in rounds for a in r.get("aggregate", [])]
        ),
    }
    if rounds and "aggregate" in rounds[0]:
        agg = {}
        for level in levels:
            rows = [a for r in rounds for a in r["aggregate"] if a["streams"] == level]
            q_rows, quiet = _quiet(rows)
            agg[str(level)] = {
                "aggregate_tok_s": median([x["aggregate_tok_s"] for x in q_rows]),
                "mean_ttft_s": median([x["mean_ttft_s"] for x in q_rows]),
                "max_ttft_s": median([x["max_ttft_s"] for x in q_rows]),
                "median_stream_decode_tok_s": median([x["median_stream_decode_tok_s"] for x in q_rows]),
                "client_cpu_us_per_token": median([x.get("client_cpu_us_per_token") for x in q_rows]),
                "aggregate_tok_s_all": median([x["aggregate_tok_s"] for x in rows]),
                "mean_ttft_s_all": median([x["mean_ttft_s"] for x in rows]),
                "n_quiet": f"{len(q_rows) if quiet else 0}/{len(rows)}",
                "truncated": sum(x["truncated"] for x in rows),
                "early_stop": sum(x["early_stop"] for x in rows),
                "streams_total": level * len(rows),
                "attempts": len(rows),
                "all_aggregate_tok_s": [round(x["aggregate_tok_s"] or 0, 1) for x in rows],
                "all_foreign_cores": [x["foreign_cores"] for x in rows],
            }
        summary["aggregate"] = agg
    return summary


def summarize_ceilings(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the interleaved llama-batched-bench runs (quiet ones when there are any)."""
    rows, quiet = _quiet([c for r in rounds for c in r["ceiling"]])
    out: dict[str, Any] = {"n_quiet": f"{len(rows) if quiet else 0}/{sum(len(r['ceiling']) for r in rounds)}"}
    for layout in ("private", "unified"):
        out[layout] = {
            key: median([row[layout][key] for row in rows]) for key in ("generated_per_wall", "s_tg", "single_s_tg")
        }
        out[layout]["all_generated_per_wall"] = [round(row[layout]["generated_per_wall"], 1) for row in rows]
    return out


async def wait_quiet(max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until other jobs leave the CPU: two 0.5 s windows below QUIET_CORES."""
    started = time.perf_counter()
    calm = 0
    while time.perf_counter() - started < max_wait_s:
        with CpuMonitor() as mon:
            await asyncio.sleep(0.5)
        calm = calm + 1 if mon.foreign_cores <= QUIET_CORES else 0
        if calm >= 2:
            break
    return time.perf_counter() - started


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model).expanduser().resolve()
    levels = sorted({int(x) for x in args.concurrency.split(",") if x})
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    for n in names:
        if n not in TARGETS:
            raise SystemExit(f"unknown system {n!r}; choose from {sorted(TARGETS)}")
    bin_dir = (
        Path(args.bin_dir)
        if args.bin_dir
        else Path(
            subprocess.run(
                [str(REPO / "benchmarks" / "build_llama_tools.sh")], check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    )
    workdir = Path(tempfile.mkdtemp(prefix="edgert-serving-bench-"))
    targets: list[Target] = []
    for n in names:
        cls = TARGETS[n]
        kwargs: dict[str, Any] = {"bin_dir": bin_dir} if issubclass(cls, LlamaServerTarget | CeilingTarget) else {}
        targets.append(cls(model, args.ctx, args.threads, args.parallel, workdir, **kwargs))

    import llama_cpp

    _quiet_llama(llama_cpp)
    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=True, special=True))

    system = system_prompt(args.system_tokens, count)
    story_tokens = count(story_prompt())
    system_tokens = count(system)
    vocab.close()

    file_size = model.stat().st_size
    servers = [t for t in targets if not isinstance(t, CeilingTarget)]
    result: dict[str, Any] = {
        "model": str(model),
        "model_bytes": file_size,
        "settings": {
            "ctx": args.ctx,
            "threads": args.threads,
            "parallel": args.parallel,
            "tokens": args.tokens,
            "concurrency": levels,
            "rounds": args.rounds,
            "single_repeats": args.single_repeats,
            "prefix_repeats": args.prefix_repeats,
            "prefix_tokens": args.prefix_tokens,
            "system_prompt_tokens": system_tokens,
            "story_prompt_tokens": story_tokens,
        },  # fmt: skip
        "machine": machine_info(),
        "commands": {},
        "edgert_src": EDGERT_SRC or str(REPO),
        "edgert_alt_src": EDGERT_ALT_SRC,
        "edgert_alt_env": EDGERT_ALT_ENV,
        "repo_git_head": _git_describe(),
        "cold_start_s": {t.name: [] for t in servers},
        "rss_after_load": {},
        "rss_after_test": {},
        "rounds": {t.name: [] for t in targets},
        "loadavg_start": loadavg(),
    }
    for t in targets:
        if isinstance(t, CeilingTarget):
            t.start()
            result["commands"][t.name] = " ".join(t.command_line(max(levels), args.tokens, unified=True))
    try:
        # ---- cold start (alternating); the last start of each stays up for the load test
        for c in range(args.cold_repeats):
            for t in servers:
                secs = t.start()
                result["cold_start_s"][t.name].append(round(secs, 3))
                result["commands"][t.name] = " ".join(t.command)
                print(f"[cold {c + 1}/{args.cold_repeats}] {t.name}: ready in {secs:.2f}s", flush=True)
                if c < args.cold_repeats - 1:
                    t.stop()
        CpuMonitor.pids = [t.pid() for t in servers]
        for t in servers:
            await t.open_client()
            # warm-up request (graphs, first-touch of buffers): not counted
            await t.stream(story_prompt(), 8)
            result["rss_after_load"][t.name] = t.rss()
        # ---- rounds, rotating the order
        for r in range(args.rounds):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                out = await measure_round(t, args, levels, system)
                result["rounds"][t.name].append(out)
                if isinstance(t, CeilingTarget):
                    c = out["ceiling"][-1]
                    print(
                        f"[round {r + 1}/{args.rounds}] {t.name}: B={max(levels)} generated/wall private "
                        f"{c['private']['generated_per_wall']:.1f}, unified {c['unified']['generated_per_wall']:.1f} tok/s, "
                        f"foreign cores {c['foreign_cores']:.2f}",
                        flush=True,
                    )
                    continue
                single = median([s["decode_tok_s"] for s in out["single"]])
                agg = {a["streams"]: round(a["aggregate_tok_s"] or 0, 1) for a in out.get("aggregate", [])}
                last_prefix = out["prefix"][-1]
                foreign = [s["foreign_cores"] for s in out["single"]] + [
                    a["foreign_cores"] for a in out.get("aggregate", [])
                ]
                print(
                    f"[round {r + 1}/{args.rounds}] {t.name}: single {single and round(single, 1)} tok/s, "
                    f"agg {agg}, prefix {last_prefix['uncached_ttft_s']:.3f}/{last_prefix['cached_ttft_s']:.3f}s, "
                    f"{out['seconds']:.0f}s, load {out['loadavg_after']}, foreign cores max {max(foreign, default=last_prefix['foreign_cores']):.2f}",
                    flush=True,
                )
        for t in servers:
            result["rss_after_test"][t.name] = t.rss()
        # ---- edgert: restart on the same state dir, first request with the system prompt
        for t in targets:
            if isinstance(t, EdgertTarget) and not t.alt and args.restart_check:
                await t.close_client()
                try:
                    secs = t.restart_keep_state()
                except RuntimeError as exc:
                    result["edgert_restart"] = {"error": str(exc)}
                    print(f"[restart] edgert failed: {exc}", flush=True)
                    continue
                await t.open_client()
                first = await t.stream(qa_prompt(system, "Is the lentil soup vegan?"), args.prefix_tokens)
                result["edgert_restart"] = {
                    "ready_s": secs, "first_ttft_s": first.ttft_s, "cached_tokens": first.cached_tokens,
                }  # fmt: skip
                print(f"[restart] edgert ready {secs:.2f}s, first TTFT {first.ttft_s}", flush=True)
    finally:
        for t in targets:
            with contextlib.suppress(Exception):
                await t.close_client()
            t.stop()
        result["loadavg_end"] = loadavg()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            result["workdir"] = str(workdir)
    ceiling_rounds = result["rounds"].pop(CeilingTarget.name, [])
    if ceiling_rounds:
        result["ceilings"] = summarize_ceilings(ceiling_rounds)
        result["ceiling_rounds"] = ceiling_rounds
    result["summary"] = {
        n: summarize(n, result["rounds"][n], levels, args.tokens) for n in result["rounds"] if result["rounds"][n]
    }
    for n, summary in result["summary"].items():
        summary["cold_start_s"] = median(result["cold_start_s"][n])
        summary["rss_after_load_mib"] = result["rss_after_load"].get(n, 0) / 2**20
        summary["rss_after_test_mib"] = result["rss_after_test"].get(n, 0) / 2**20
        summary["rss_after_test_minus_model_mib"] = (result["rss_after_test"].get(n, 0) - file_size) / 2**20
        summary["rss_after_load_minus_model_mib"] = (result["rss_after_load"].get(n, 0) - file_size) / 2**20
    return result


def _git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "edgert"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + (" (edgert/ modified in the working tree)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512vnni") if f" {f}" in text)
    return {
        "cpu": cpu,
        "flags": flags,
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- report
def fmt(x: Any, digits: int = 1, scale: float = 1.0) -> str:
    return "—" if x is None else f"{x * scale:.{digits}f}"


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    s = data["summary"]
    levels = data["settings"]["concurrency"]
    lines = []
    m = data["machine"]
    lines.append(
        f"Model `{Path(data['model']).name}` ({data['model_bytes'] / 2**20:.0f} MiB), ctx {data['settings']['ctx']}, "
        f"{data['settings']['threads']} threads, {data['settings']['parallel']} slots, {data['settings']['tokens']} tokens/stream, "
        f"{data['settings']['rounds']} rounds; {m['cpu']} ({m['cores_logical']} vCPU, {m['ram_gib']} GiB); "
        f"loadavg start {data['loadavg_start']}, end {data.get('loadavg_end')}"
    )
    lines.append("")
    raw = s.get("raw", {})
    head = (
        "| system | single decode tok/s | vs raw | single TTFT ms | "
        + " | ".join(f"agg tok/s @{lv}" for lv in levels)
        + f" | TTFT ms @{levels[-1]} (mean/max) | truncated streams | other jobs (cores, median) | quiet samples single/@{levels[-1]} |"
    )
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    for name, v in s.items():
        agg = v.get("aggregate", {})
        ratio = (
            f"{v['single_decode_tok_s'] / raw['single_decode_tok_s']:.3f}"
            if raw.get("single_decode_tok_s") and v.get("single_decode_tok_s")
            else "—"
        )
        top = agg.get(str(levels[-1]), {})
        trunc = sum(a["truncated"] for a in agg.values()) + v["single_truncated"]
        total = sum(a["streams_total"] for a in agg.values()) + len(v["single_tokens"])
        lines.append(
            f"| {name} | {fmt(v['single_decode_tok_s'])} | {ratio} | {fmt(v['single_ttft_s'], 1, 1000)} | "
            + " | ".join(fmt(agg.get(str(lv), {}).get("aggregate_tok_s")) for lv in levels)
            + f" | {fmt(top.get('mean_ttft_s'), 0, 1000)} / {fmt(top.get('max_ttft_s'), 0, 1000)} | {trunc}/{total} "
            f"| {fmt(v.get('foreign_cores_median'), 2)} | {v.get('single_n_quiet')} / {top.get('n_quiet', '—')} |"
        )
    ceilings = data.get("ceilings")
    if ceilings:
        top = levels[-1]
        lines.append("")
        lines.append(
            f"Engine ceiling in the same rotation (`llama-batched-bench -npl 1,{top}`, {ceilings['n_quiet']} quiet): "
            + "; ".join(
                f"{layout} KV B={top} generated/wall {fmt(ceilings[layout]['generated_per_wall'])} tok/s "
                f"(S_TG {fmt(ceilings[layout]['s_tg'])}, B=1 S_TG {fmt(ceilings[layout]['single_s_tg'])}; "
                f"all {ceilings[layout]['all_generated_per_wall']})"
                for layout in ("private", "unified")
            )
        )
        lines.append("")
        lines.append(
            f"| system | agg @{top} | vs unified ceiling | vs private ceiling | vs llama-server | load generator CPU µs/token single / @{top} |"
        )
        lines.append("|---|---|---|---|---|---|")
        reference = s.get("llama-server", {}).get("aggregate", {}).get(str(top), {}).get("aggregate_tok_s")
        for name, v in s.items():
            agg = v.get("aggregate", {}).get(str(top), {})
            value = agg.get("aggregate_tok_s")
            lines.append(
                f"| {name} | {fmt(value)} | "
                f"{fmt(value / ceilings['unified']['generated_per_wall'] if value else None, 3)} | "
                f"{fmt(value / ceilings['private']['generated_per_wall'] if value else None, 3)} | "
                f"{fmt(value / reference if value and reference else None, 3)} | "
                f"{fmt(v.get('single_client_cpu_us_per_token'), 0)} / {fmt(agg.get('client_cpu_us_per_token'), 0)} |"
            )
    lines.append("")
    lines.append(
        "| system | system-prompt tokens | TTFT uncached ms | TTFT cached ms | cached/uncached | cached tokens reported "
        "| quiet rounds | cold start s | RSS after load MiB | RSS after test MiB | RSS − model MiB |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, v in s.items():
        unc, cac = v["prefix_uncached_ttft_s"], v["prefix_cached_ttft_s"]
        reported = sorted({x for r in v["prefix_cached_tokens_reported"] for x in r if x is not None})
        lines.append(
            f"| {name} | {fmt(v['prefix_prompt_tokens'], 0)} | {fmt(unc, 0, 1000)} | {fmt(cac, 0, 1000)} | "
            f"{fmt(cac / unc if unc and cac else None, 3)} | {reported or '—'} | {v.get('prefix_n_quiet')} | "
            f"{fmt(v['cold_start_s'], 2)} | "
            f"{fmt(v['rss_after_load_mib'], 0)} | {fmt(v['rss_after_test_mib'], 0)} | {fmt(v['rss_after_test_minus_model_mib'], 0)} |"
        )
    if "ready_s" in data.get("edgert_restart", {}):
        r = data["edgert_restart"]
        lines.append("")
        lines.append(
            f"edgert restart on the same state dir: ready in {r['ready_s']:.2f} s, first request with the "
            f"system prompt TTFT {fmt(r['first_ttft_s'], 0, 1000)} ms, cached_tokens {r['cached_tokens']}"
        )
    lines.append("")
    lines.append("Per-round aggregate tok/s (all rounds):")
    for name, v in s.items():
        if "aggregate" in v:
            lines.append(
                f"- {name}: " + "; ".join(f"@{lv}: {v['aggregate'][str(lv)]['all_aggregate_tok_s']}" for lv in levels)
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "raw-worker":
        p = argparse.ArgumentParser()
        p.add_argument("raw-worker")
        p.add_argument("--model", required=True)
        p.add_argument("--ctx", type=int, default=4096)
        p.add_argument("--threads", type=int, default=2)
        raw_worker(p.parse_args())
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF path")
    p.add_argument("--systems", default="edgert,llama-server,llama-server-split,lcp-server,lcp-server-noint,raw")
    p.add_argument("--ctx", type=int, default=4096, help="edgert n_ctx (total); llama-server gets the same per slot")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="max_tokens per stream")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--single-repeats", type=int, default=2)
    p.add_argument("--prefix-repeats", type=int, default=3)
    p.add_argument("--prefix-tokens", type=int, default=4, help="max_tokens of the system-prompt TTFT requests")
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--no-restart-check", dest="restart_check", action="store_false")
    p.add_argument("--bin-dir", help="llama.cpp tools (default: benchmarks/build_llama_tools.sh)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each measurement wait up to this long for other jobs to leave the CPU",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a measurement (keeping every attempt) when other jobs used > 0.25 cores during it",
    )
    p.add_argument("--edgert-alt-src", help="edgert/ source tree served as system 'edgert-alt' (A/B)")
    p.add_argument(
        "--edgert-alt-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of system 'edgert-alt' on top of edgert's (A/B of settings); repeatable",
    )
    p.add_argument("--only-prefix", action="store_true", help="measure only the system-prompt TTFT")
    p.add_argument(
        "--edgert-src",
        help="directory holding an edgert/ package to serve (PYTHONPATH), e.g. a snapshot of a commit; "
        "default: the installed (editable) working tree",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("-o", "--output", type=Path)
    p.add_argument("--report", type=Path, help="print markdown tables from a JSON result and exit")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
        return
    if not args.model:
        p.error("--model is required")
    random.seed(args.seed)
    global EDGERT_SRC, EDGERT_ALT_SRC
    EDGERT_ALT_ENV.update(item.split("=", 1) for item in args.edgert_alt_env)
    if args.edgert_src:
        EDGERT_SRC = str(Path(args.edgert_src).resolve())
    if args.edgert_alt_src:
        EDGERT_ALT_SRC = str(Path(args.edgert_alt_src).resolve())

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
        print(report(args.output))
    else:
        print(text)


if __name__ == "__main__":
    main()
