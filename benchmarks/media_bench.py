#!/usr/bin/env python3
"""Media benchmark: images and audio on edgert (``serve --mmproj``) against llama-server (``--mmproj``).

Both servers run the same GGUF and projector with the same threads, context and slots; the same client
sends both the same requests (OpenAI chat completions, streamed, ``image_url`` / ``input_audio`` parts as
data URIs) and measures:

* **media TTFT**: one 896x896 JPEG + a short question, and a 10 s WAV clip + "Transcribe this audio.":
  request sent -> first streamed token. Each repetition uses a fresh picture / clip (a different seed),
  so nothing is cached;
* **the same request again**: sent right after, identical bytes; a server that caches media by content
  serves the prompt from its prefix cache (ratio second / first);
* **decode under media load**: 4 text streams alone, then the same 4 streams while an image request
  arrives every ``--image-every`` seconds: aggregate decode tok/s of the text streams (tokens / wall
  from the first token to the last) and the longest gap between two tokens of any stream. The gap is
  compared with one image's cost alone (its TTFT above: encode + writing its embeddings + a short
  prefill): a server that evaluates one medium at a time between decode steps stalls a stream for at
  most about one image;
* **peak RSS** (the server's process tree, sampled every 100 ms) with the projector, and in a second
  start without it (text load only).

With the random-weight, shape-exact models of ``make_e2b_shape.py`` and ``make_e2b_mmproj_shape.py``
the outputs are noise; what is measured is time and memory, which are the real models'.

Usage (2 threads, as on the 2-core dev box; keep it short there)::

    BIN=$(benchmarks/build_llama_tools.sh | tail -n1)
    .venv/bin/python benchmarks/media_bench.py --bin-dir "$BIN" -o /tmp/media.json
    .venv/bin/python benchmarks/media_bench.py --report /tmp/media.json   # markdown table

Every server this starts is stopped (its own process group) on exit. Over 400 lines because it is one
self-contained benchmark script, like serving_bench.py and tool_calls.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import re
import statistics
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench
from make_e2b_shape import default_cache_dir
from serving_bench import (
    STORY,
    CpuMonitor,
    EdgertTarget,
    LlamaServerTarget,
    PeakRss,
    Target,
    _git_describe,
    loadavg,
    machine_info,
    nonce,
    tree_rss,
    wait_quiet,
)
from tool_calls import bench_bin_dir

IMAGE_QUESTION = "What is in this picture? Answer in one sentence."
AUDIO_QUESTION = "Transcribe this audio."
#: before each measurement, wait up to this long for other jobs to leave the CPU (serving_bench.wait_quiet)
QUIET_WAIT_S = 120.0


# --------------------------------------------------------------------------- media
def photo_jpeg(seed: int, side: int = 896) -> bytes:
    """A photo-like JPEG (gradients and blobs, ~55 KB at 896 px): different bytes for every seed."""
    from PIL import Image, ImageDraw  # Pillow is an edgert dependency (edgert.media)

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    shift = rng.integers(0, 256, 3)
    rgb = np.stack([(x / 3.5 + shift[0]) % 256, (y / 3.5 + shift[1]) % 256, ((x + y) / 7 + shift[2]) % 256], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        a, b = (int(v) for v in rng.integers(0, side - 96, 2))
        w, h = (int(v) for v in rng.integers(20, 90, 2))
        draw.ellipse([a, b, a + w, b + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def clip_wav(seed: int, seconds: float = 10.0, rate: int = 16000) -> bytes:
    """A 16 kHz mono PCM WAV: a chirp plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 150 + 100 * rng.random()
    signal = 0.3 * np.sin(2 * np.pi * (f0 + 40 * t) * t) + 0.05 * rng.standard_normal(t.size)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def image_part(jpeg: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}}


def audio_part(wav: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


# --------------------------------------------------------------------------- one streamed chat request
@dataclass
class Chat:
    ttft_s: float | None = None
    total_s: float = 0.0
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    media_tokens: int | None = None
    error: str | None = None

    def max_gap(self) -> float:
        times = self.token_times
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _note_usage(res: Chat, usage: dict[str, Any]) -> None:
    res.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    res.cached_tokens = details.get("cached_tokens")
    media = (details.get("image_tokens") or 0) + (details.get("audio_tokens") or 0)
    res.media_tokens = media or None


async def chat(target: Target, content: Any, max_tokens: int) -> Chat:
    """Stream one chat completion; every content event is one token arrival."""
    assert target.client is not None
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(target.extra_body())
    res = Chat()
    started = time.perf_counter()
    pending = b""
    try:
        async with target.client.post("/v1/chat/completions", json=body) as response:
            if response.status != 200:
                res.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return res
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    data = line[5:].strip() if line.startswith(b"data:") else b""
                    if not data or data == b"[DONE]":
                        continue
                    obj = json.loads(data)
                    if obj.get("usage"):
                        _note_usage(res, obj["usage"])
                    timings = obj.get("timings")
                    if timings and "cache_n" in timings:
                        res.cached_tokens = int(timings["cache_n"])
                    for choice in obj.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content") is not None or delta.get("reasoning_content") is not None:
                            res.token_times.append(now)
    except Exception as exc:  # a failed request is recorded, the run goes on
        res.error = f"{type(exc).__name__}: {exc}"
    res.total_s = time.perf_counter() - started
    if res.token_times:
        res.ttft_s = res.token_times[0] - started
    return res


# --------------------------------------------------------------------------- targets
class EdgertMedia(EdgertTarget):
    name = "edgert"

    def connector(self) -> aiohttp.BaseConnector:
        # One connection per request on both servers: a pooled keep-alive connection that llama-server
        # has closed fails when a large (media) body is written to it.
        return aiohttp.UnixConnector(path=str(self.sock), limit=64, force_close=True)

    def __init__(self, *args: Any, mmproj: Path | None, **kwargs: Any) -> None:
        self.mmproj = mmproj
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        super().build()
        self.command += ["--mmproj", str(self.mmproj)] if self.mmproj else ["--no-mmproj"]


class LlamaServerMedia(LlamaServerTarget):
    name = "llama-server"

    def connector(self) -> aiohttp.BaseConnector:
        return aiohttp.TCPConnector(limit=64, force_close=True)

    def __init__(self, *args: Any, mmproj: Path | None, **kwargs: Any) -> None:
        self.mmproj = mmproj
        super().__init__(*args, **kwargs)

    def build(self) -> None:
        super().build()
        if self.mmproj:
            self.command += ["--mmproj", str(self.mmproj)]


# --------------------------------------------------------------------------- measurements
def story() -> list[dict[str, Any]]:
    return [{"type": "text", "text": f"Chapter {nonce()}.\n\n{STORY}"}]


async def media_pair(target: Target, part: dict[str, Any], question: str, max_tokens: int) -> dict[str, Any]:
    """The request once (nothing cached) and again (the same bytes)."""
    content = [part, {"type": "text", "text": question}]
    waited = await wait_quiet(QUIET_WAIT_S)
    with CpuMonitor() as mon:
        first = await chat(target, content, max_tokens)
        second = await chat(target, content, max_tokens)
    return {
        "waited_for_quiet_s": round(waited, 1),
        "foreign_cores": round(mon.foreign_cores, 2),
        "first_ttft_s": first.ttft_s,
        "second_ttft_s": second.ttft_s,
        "prompt_tokens": first.prompt_tokens,
        "media_tokens": first.media_tokens,
        "second_cached_tokens": second.cached_tokens,
        "errors": [r.error for r in (first, second) if r.error],
    }


async def streams_under_images(
    target: Target, streams: int, max_tokens: int, image_every_s: float | None, seed: int, side: int = 896
) -> dict[str, Any]:
    """``streams`` text streams; with ``image_every_s``, an image request every that many seconds meanwhile."""
    waited = await wait_quiet(QUIET_WAIT_S)
    tasks = [asyncio.create_task(chat(target, story(), max_tokens)) for _ in range(streams)]
    images: list[Chat] = []

    async def send_images() -> None:
        n = 0
        while not all(t.done() for t in tasks):
            await asyncio.sleep(image_every_s or 0)
            if all(t.done() for t in tasks):
                return
            n += 1
            content = [image_part(photo_jpeg(seed + n, side)), {"type": "text", "text": IMAGE_QUESTION}]
            images.append(await chat(target, content, 1))

    sender = asyncio.create_task(send_images()) if image_every_s else None
    with CpuMonitor() as mon:
        results = await asyncio.gather(*tasks)
    if sender is not None:
        await sender
    firsts = [r.token_times[0] for r in results if r.token_times]
    lasts = [r.token_times[-1] for r in results if r.token_times]
    tokens = sum(len(r.token_times) for r in results)
    wall = max(lasts) - min(firsts) if firsts else 0.0
    return {
        "tokens": tokens,
        "decode_tok_s": tokens / wall if wall > 0 else None,
        "max_gap_s": max(r.max_gap() for r in results),
        "images_sent": len(images),
        "image_ttft_s": [i.ttft_s for i in images],
        "foreign_cores": round(mon.foreign_cores, 2),
        "waited_for_quiet_s": round(waited, 1),
        "errors": [r.error for r in [*results, *images] if r.error],
    }


async def measure_with_projector(target: Target, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    await target.open_client()
    try:
        warm = await chat(target, story(), 4)  # first graph allocations, out of the timings
        out: dict[str, Any] = {"warmup_error": warm.error, "image": [], "audio": []}
        for rep in range(args.reps):
            jpeg = photo_jpeg(seed + 1000 * rep, args.image_side)
            wav = clip_wav(seed + 1000 * rep, args.audio_seconds)
            out["image"].append(await media_pair(target, image_part(jpeg), IMAGE_QUESTION, args.media_tokens))
            out["audio"].append(await media_pair(target, audio_part(wav), AUDIO_QUESTION, args.media_tokens))
        out["text_only"] = await streams_under_images(target, args.streams, args.stream_tokens, None, seed)
        out["with_images"] = await streams_under_images(
            target, args.streams, args.stream_tokens, args.image_every, seed + 500, args.image_side
        )
        return out
    finally:
        await target.close_client()


async def measure_text_only(target: Target, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    await target.open_client()
    try:
        await chat(target, story(), 4)
        return {"text_only": await streams_under_images(target, args.streams, args.stream_tokens, None, seed)}
    finally:
        await target.close_client()


_ENCODED = re.compile(r"^(image|audio) slice encoded in (\d+) ms", re.M)
_DECODED = re.compile(r"^(image|audio) decoded \(batch \d+/\d+\) in (\d+) ms", re.M)


def mtmd_times(log: str) -> dict[str, list[int]]:
    """libmtmd's own timings from a server log, in order: encode ms and embedding-decode ms per medium.

    edgert leaves mtmd's stderr lines in its log; llama-server does not print them at its default
    verbosity (empty lists). The first image is edgert's startup probe.
    """
    out: dict[str, list[int]] = {"image_encode": [], "image_decode": [], "audio_encode": [], "audio_decode": []}
    for kind, ms in _ENCODED.findall(log):
        out[f"{kind}_encode"].append(int(ms))
    for kind, ms in _DECODED.findall(log):
        out[f"{kind}_decode"].append(int(ms))
    return out


def make_target(name: str, args: argparse.Namespace, mmproj: Path | None, workdir: Path) -> Target:
    common = {"model": args.model, "ctx": args.ctx, "threads": args.threads, "parallel": args.parallel}
    if name == "edgert":
        return EdgertMedia(**common, workdir=workdir, mmproj=mmproj)
    return LlamaServerMedia(**common, workdir=workdir, mmproj=mmproj, bin_dir=args.bin_dir)


async def run_system(name: str, args: argparse.Namespace, workdir: Path, seed: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for label, mmproj in (("projector", args.mmproj), ("no_projector", None)):
        target = make_target(name, args, mmproj, workdir)
        CpuMonitor.pids = []
        try:
            try:
                ready_s = target.start()
            except RuntimeError as exc:  # recorded; the other system still runs
                result[label] = {"error": str(exc)}
                continue
            CpuMonitor.pids = [target.pid()]
            command = " ".join(target.command)
            with PeakRss(target.pid(), interval_s=0.1) as rss:
                idle_rss = tree_rss(target.pid())
                if mmproj:
                    data = await measure_with_projector(target, args, seed)
                else:
                    data = await measure_text_only(target, args, seed)
            result[label] = {"command": command, "ready_s": ready_s, "idle_rss": idle_rss, "peak_rss": rss.peak, **data}
        finally:
            target.stop()
            if label in result and target.log_path.exists():
                result[label]["mtmd_ms"] = mtmd_times(target.log_path.read_text(errors="replace"))
            if args.keep_logs and target.log_path.exists():
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                (args.keep_logs / f"{name}-{label}.log").write_bytes(target.log_path.read_bytes())
                target.log_path.unlink()
        print(f"{name} {label}: {json.dumps(result[label])[:400]}", file=sys.stderr, flush=True)
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgert-media-bench-") as tmp:
        workdir = Path(tmp)
        systems: dict[str, Any] = {}
        for name in args.systems:
            systems[name] = await run_system(name, args, workdir, seed=args.seed)
            partial = args.out.with_suffix(".partial.json") if args.out else None
            if partial is not None:
                partial.write_text(json.dumps(systems, indent=1))
    return {
        "machine": machine_info(),
        "edgert": _git_describe(),
        "loadavg_end": loadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "systems": systems,
    }


# --------------------------------------------------------------------------- report
def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.3f}x" if a / b < 0.1 else f"{a / b:.2f}x"


def summary(runs: list[dict[str, Any]], probe_image: bool) -> dict[str, float | None]:
    """One system's figures pooled over runs (result files): media pairs pooled, other phases median of runs.

    ``probe_image``: the first image in the server's log is its startup probe (edgert), not a request.
    """
    ps = [r["projector"] for r in runs]
    ns = [r["no_projector"] for r in runs if "peak_rss" in r["no_projector"]]
    out: dict[str, float | None] = {"runs": len(runs)}
    for kind in ("image", "audio"):
        pairs = [pair for p in ps for pair in p[kind]]
        out[f"{kind}_first"] = _med([r["first_ttft_s"] for r in pairs])
        out[f"{kind}_second"] = _med([r["second_ttft_s"] for r in pairs])
        out[f"{kind}_prompt_tokens"] = _med([r["prompt_tokens"] for r in pairs])
        out[f"{kind}_media_tokens"] = _med([r["media_tokens"] for r in pairs])
        out[f"{kind}_reps"] = len(pairs)
        for step in ("encode", "decode"):
            times = [
                ms
                for p in ps
                for ms in p.get("mtmd_ms", {}).get(f"{kind}_{step}", [])[probe_image and kind == "image" :]
            ]
            out[f"{kind}_{step}_s"] = _med([ms / 1000 for ms in times])
    for key, phase, field_ in (
        ("tok_s_text", "text_only", "decode_tok_s"),
        ("tok_s_images", "with_images", "decode_tok_s"),
        ("gap_text", "text_only", "max_gap_s"),
        ("gap_images", "with_images", "max_gap_s"),
    ):
        out[key] = _med([p[phase][field_] for p in ps])
    out["gap_images_worst"] = max(p["with_images"]["max_gap_s"] for p in ps)
    out["images_sent"] = sum(p["with_images"]["images_sent"] for p in ps)
    out["image_ttft_loaded"] = _med([t for p in ps for t in p["with_images"]["image_ttft_s"]])
    phases = [ph for p in ps for ph in (*p["image"], *p["audio"], p["text_only"], p["with_images"])]
    phases += [n["text_only"] for n in ns]
    out["foreign_cores_max"] = max(ph.get("foreign_cores", 0.0) for ph in phases)
    out["peak_rss_mib"] = max(p["peak_rss"] for p in ps) / 2**20
    out["peak_rss_noproj_mib"] = max((n["peak_rss"] for n in ns), default=0) / 2**20 or None
    out["ready_s"] = _med([p["ready_s"] for p in ps])
    return out


def report(paths: list[Path]) -> str:
    files = [json.loads(path.read_text()) for path in paths]
    runs: dict[str, list[dict[str, Any]]] = {}
    failed = []
    for data in files:
        for name, res in data["systems"].items():
            failed += [f"{name} {label}: {res[label]['error']}" for label in res if "error" in res[label]]
            if "error" not in res["projector"]:
                runs.setdefault(name, []).append(res)
    s = {name: summary(rs, probe_image=name == "edgert") for name, rs in runs.items()}
    e, ls = s.get("edgert", {}), s.get("llama-server", {})
    rows = [
        ("image (896x896 JPEG) TTFT, s", "image_first", 2),
        ("same image request again, TTFT, s", "image_second", 2),
        ("audio (10 s WAV) TTFT, s", "audio_first", 2),
        ("same audio request again, TTFT, s", "audio_second", 2),
        ("4 text streams, aggregate decode tok/s", "tok_s_text", 2),
        ("4 text streams + images, aggregate decode tok/s", "tok_s_images", 2),
        ("longest token gap, text only, s", "gap_text", 2),
        ("longest token gap, with images, s", "gap_images", 2),
        ("longest token gap, with images, worst run, s", "gap_images_worst", 2),
        ("image encode (libmtmd's log), s", "image_encode_s", 2),
        ("image embeddings into the model (libmtmd's log), s", "image_decode_s", 2),
        ("audio encode (libmtmd's log), s", "audio_encode_s", 2),
        ("audio embeddings into the model (libmtmd's log), s", "audio_decode_s", 2),
        ("peak RSS with projector, MiB", "peak_rss_mib", 0),
        ("peak RSS without projector, MiB", "peak_rss_noproj_mib", 0),
        ("start -> ready with projector, s", "ready_s", 1),
    ]
    lines = ["| | edgert | llama-server | edgert / llama-server |", "|---|---|---|---|"]
    for label, key, digits in rows:
        lines.append(f"| {label} | {_f(e.get(key), digits)} | {_f(ls.get(key), digits)} | "
                     f"{_ratio(e.get(key), ls.get(key))} |")  # fmt: skip
    lines.append("")
    lines += [f"- failed to start: {f}" for f in failed]
    for name, v in s.items():
        lines.append(
            f"- {name}: second/first image {_ratio(v['image_second'], v['image_first'])}, audio "
            f"{_ratio(v['audio_second'], v['audio_first'])}; decode dip with images "
            f"{_ratio(v['tok_s_images'], v['tok_s_text'])} of text-only; longest gap / one image's TTFT "
            f"{_ratio(v['gap_images'], v['image_first'])} (/ an image's TTFT during the streams, "
            f"{_f(v['image_ttft_loaded'])} s: {_ratio(v['gap_images'], v['image_ttft_loaded'])}); projector adds "
            f"{_f((v['peak_rss_mib'] or 0) - (v['peak_rss_noproj_mib'] or 0), 0)} MiB peak; "
            f"prompt tokens: image request {_f(v['image_prompt_tokens'], 0)} (image {_f(v['image_media_tokens'], 0)}), "
            f"audio request {_f(v['audio_prompt_tokens'], 0)} (audio {_f(v['audio_media_tokens'], 0)}); "
            f"images sent during the streams: {_f(v['images_sent'], 0)}; other jobs' CPU, worst phase: "
            f"{_f(v['foreign_cores_max'])} cores"
        )
    return "\n".join(lines)


def main() -> None:
    cache = default_cache_dir()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=cache / "gemma-4-E2B-shape-Q4_K_M.gguf")
    parser.add_argument("--mmproj", type=Path, default=cache / "gemma-4-E2B-shape-mmproj-BF16.gguf")
    parser.add_argument("--bin-dir", default=None, help="llama.cpp tools (default: build_llama_tools.sh)")
    parser.add_argument("--systems", nargs="+", default=["llama-server", "edgert"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=8192, help="total KV shared by the slots (both servers)")
    parser.add_argument("--parallel", type=int, default=6, help="slots: 4 streams + the image requests")
    parser.add_argument("--reps", type=int, default=2, help="fresh image / clip pairs per system")
    parser.add_argument("--media-tokens", type=int, default=4, help="max_tokens of the media requests")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--image-every", type=float, default=4.0, help="seconds between images during streams")
    parser.add_argument("--image-side", type=int, default=896, help="the square JPEG's side in pixels")
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--edgert-src", default="", help="serve edgert from this tree (`git archive HEAD edgert`)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the server logs into this dir")
    parser.add_argument("-o", "--out", type=Path, default=None)
    parser.add_argument("--report", type=Path, nargs="+", default=None, help="markdown table of result files (pooled)")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    serving_bench.EDGERT_SRC = args.edgert_src
    args.model, args.mmproj = args.model.resolve(), args.mmproj.resolve()  # the servers run in a temp dir
    args.bin_dir = bench_bin_dir(args.bin_dir) if "llama-server" in args.systems else None
    result = asyncio.run(main_async(args))
    out = args.out or Path(tempfile.gettempdir()) / f"media-bench-{int(time.time())}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    with contextlib.suppress(KeyError):
        print(report([out]))


if __name__ == "__main__":
    main()
