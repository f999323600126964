"""Soak test: a real server under mixed traffic for minutes, then checks that can fail (issue 13, item 6).

Traffic, all at once for ``--duration-s`` (httpx async clients against ``python -m service serve``, or
``python -m tests.api.fault_server --leak-kib N`` for the negative control):

* ``--workers`` loops on one API key, each picking its next request at random: ``/generate`` as png, json or
  npy over every sampler and spacing of ``GET /v1/model`` (1..``--steps`` steps), ``/generate/stream`` read to
  the end, a stream abandoned after its first progress event, a ``/generate`` dropped before its answer (both
  ``--long-steps`` long, so they are still running when dropped), ``/noise``, ``/denoise-step`` and a request
  without a valid key;
* every ``--burst-every-s`` a burst of ``--burst-size`` 4-image requests on a second key, past that client's
  share (``DDPM_MAX_ROWS_PER_CLIENT`` in :data:`SERVER_ENV`), so most of each burst gets 429. The main key's
  rows (workers × 3 + a dropped request's rows until the engine evicts them) stay under the share.

Checks, each pass/fail with its numbers:

* ``fates``: every request ended as its kind says — 200 with a valid body (images decode, right shape, finite,
  in [-1, 1]; a stream's progress runs 1..steps and ends with a result), a burst request 200 or 429 with
  ``Retry-After``, a dropped one unanswered (or answered before the drop), no key → 401 ``WWW-Authenticate``.
* ``no_5xx``: none seen by the client, none in ``ddpm_http_requests_total``.
* ``engine_accounting``: ``ddpm_requests_total`` against the client: ok = answered 200 + *late* (dropped
  requests the engine finished before it saw the drop), cancelled + late = dropped but for at most 2 % (one at
  least) *unseen*, dropped before the server submitted them (a loaded server may not have read the request yet),
  rejected = 429s (all ``client_quota``), no timeout or error; ``ddpm_rows_evicted_total{reason="cancelled"}``
  = the rows of the cancelled ones (between the sums of the fewest and the most rows that many drops can have).
* ``coverage``: every sampler and format completed, every kind ran, bursts got 429s.
* ``drained``: ``ddpm_queue_depth_rows``, ``ddpm_queue_depth_requests`` and ``ddpm_active_rows`` back to 0
  within 15 s of the end.
* ``rss_growth``: median VmRSS of the last ``window`` seconds of traffic minus that of the first ``window``
  seconds after warm-up (``warmup``, default 20 % of the run; ``window`` 20 %) ≤ ``--rss-growth-mib``.
  Comparing two windows after warm-up keeps allocator and first-use growth out, and medians ignore the
  transient peak of a burst in flight.
* ``open_fds``: /proc/PID/fd after the traffic's connections closed minus before traffic ≤ ``--fd-growth``.

Bounds, from measurement (2-core machine with a training run beside it, load 3–5, ``--workers 4``):

* the real server's RSS moved -0.1 … +1.2 MiB between the windows in 30–300 s runs on the tiny test model
  (RSS steps of ~1.4 MiB now and then) and +0.5 MiB in 300 s on ``model_store/mnist``, whose samples swing
  ±10 MiB around the median while bursts run; its fds came back to the count before traffic (±1);
* the bounds, **16 MiB** and **4 fds**, leave that noise a wide margin, and the negative control is far
  past both: at 256 KiB per HTTP request and 10–30 requests/s it grew 2.5–7.5 MiB per second (50–160 MiB
  between the windows of 20–30 s runs) and kept one fd per request (250–900);
* a leak smaller than 16 MiB over the 60 % of the run between the windows' centres is below what this can
  see: run longer to catch a slower one. More than ~6 workers would put the main key over its own share.

    .venv/bin/python bench/soak.py --model model_store/mnist --duration-s 300 --out soak.json
    .venv/bin/python bench/soak.py --model model_store/mnist --duration-s 60 --leak-kib 256   # must fail
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]

MAIN_KEY, BURST_KEY = "soak-main-key", "soak-burst-key"
SERVER_ENV = {  # what the soak expects of the server: two keys, and a share per client the bursts overflow
    "DDPM_API_KEYS": f"{MAIN_KEY},{BURST_KEY}",
    "DDPM_MAX_BATCH_ROWS": "16",
    "DDPM_MAX_QUEUE_ROWS": "64",
    "DDPM_MAX_ROWS_PER_CLIENT": "24",
    "DDPM_MAX_IMAGES_PER_REQUEST": "4",
}
RSS_GROWTH_MIB = 16.0
FD_GROWTH = 4
FORMATS = ("png", "json", "npy")


@dataclass
class SoakConfig:
    duration_s: float = 300.0  # seconds of traffic
    warmup_s: float | None = None  # RSS before this is not judged; None = 20 % of the run
    window_s: float | None = None  # length of the early and the late RSS window; None = 20 % of the run
    workers: int = 4  # concurrent loops on the main key
    burst_every_s: float = 5.0  # pause between bursts
    burst_size: int = 10  # 4-image requests per burst (40 rows against a share of 24)
    steps: int = 6  # completed generations take 1..steps steps
    long_steps: int = 200  # steps of the requests that are dropped (still running when dropped)
    seed: int = 0
    rss_growth_mib: float = RSS_GROWTH_MIB
    fd_growth: int = FD_GROWTH

    def windows(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(early, late) RSS windows in seconds since traffic started."""
        warm = self.warmup_s if self.warmup_s is not None else 0.2 * self.duration_s
        win = self.window_s if self.window_s is not None else 0.2 * self.duration_s
        if warm + 2 * win > self.duration_s:
            raise ValueError(f"warm-up {warm} s + 2 windows of {win} s do not fit in {self.duration_s} s")
        return (warm, warm + win), (self.duration_s - win, self.duration_s)


@dataclass
class Record:
    """One request and how it ended."""

    kind: str  # generate | stream | abandon | drop | burst | noise | denoise | unauthorized
    status: int | None  # HTTP status (or an SSE error event's); None: we dropped it before an answer
    problem: str = ""  # why the answer is not what its kind expects ("" = fine)
    rows: int = 0  # images asked of the engine
    sampler: str = ""
    fmt: str = ""


@dataclass
class Traffic:
    main: httpx.AsyncClient
    burst: httpx.AsyncClient
    anon: httpx.AsyncClient
    info: dict  # GET /v1/model
    config: SoakConfig
    records: list[Record] = field(default_factory=list)

    @property
    def shape(self) -> list[int]:
        return list(self.info["image_shape"])


# ---------------------------------------------------------------------------------------------- validation
def image_problem(r: httpx.Response, fmt: str, n: int, shape: list[int]) -> str:
    """What is wrong with a /generate answer ("" when it is a 200 with ``n`` valid images)."""
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    try:
        if fmt == "npy":
            x = np.load(io.BytesIO(r.content))
            if x.shape != (n, *shape) or x.dtype != np.float32:
                return f"npy {x.shape} {x.dtype}"
            return "" if np.isfinite(x).all() and np.abs(x).max() <= 1.0 else "npy values not finite in [-1, 1]"
        if fmt == "json":
            return payload_problem(r.json(), n, shape)
        Image.open(io.BytesIO(r.content)).load()
        return "" if r.headers.get("content-type") == "image/png" else f"content-type {r.headers.get('content-type')}"
    except Exception as exc:
        return f"undecodable {fmt}: {exc!r}"


def payload_problem(payload: dict, n: int, shape: list[int]) -> str:
    """What is wrong with a JSON result (``/generate`` format=json, or a stream's result event)."""
    if payload.get("shape") != [n, *shape] or len(payload.get("images", ())) != n:
        return f"json shape {payload.get('shape')}, {len(payload.get('images', ()))} images"
    for b64 in payload["images"]:
        Image.open(io.BytesIO(base64.b64decode(b64))).load()
    return ""


def npy_b64(x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    return base64.b64encode(buf.getvalue()).decode()


async def sse_events(r: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events answer."""
    event, data = "", ""
    async for line in r.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and event:
            yield event, json.loads(data)
            event, data = "", ""


# ------------------------------------------------------------------------------------------------ traffic
def gen_body(t: Traffic, rng: random.Random, steps: int, images: tuple[int, int] = (1, 3)) -> dict:
    """A random generation: any sampler and spacing the model lists, 1..steps steps (capped by its limit)."""
    info = t.info
    sampler = rng.choice(info["samplers"])
    body = {
        "num_images": rng.randint(*images),
        "seed": rng.randrange(2**32),
        "sampler": sampler,
        "steps": rng.randint(1, min(steps, info["max_steps"][sampler])),
        "timestep_spacing": rng.choice(info["timestep_spacings"][sampler]),
    }
    if sampler == "ddim":
        body["eta"] = rng.choice((0.0, 0.5, 1.0))
    return body


async def generate(t: Traffic, rng: random.Random) -> Record:
    body = {**gen_body(t, rng, t.config.steps), "format": rng.choice(FORMATS)}
    r = await t.main.post("/generate", json=body)
    return Record("generate", r.status_code, image_problem(r, body["format"], body["num_images"], t.shape),
                  body["num_images"], body["sampler"], body["format"])


async def stream(t: Traffic, rng: random.Random) -> Record:
    """A stream read to its end: progress 1..steps, then one result."""
    body = gen_body(t, rng, t.config.steps)
    n, rec = body["num_images"], Record("stream", None, rows=body["num_images"], sampler=body["sampler"], fmt="sse")
    async with t.main.stream("POST", "/generate/stream", json=body) as r:
        rec.status = r.status_code
        if r.status_code != 200:
            rec.problem = f"status {r.status_code}: {(await r.aread())[:200]!r}"
            return rec
        steps, result = [], None
        async with contextlib.aclosing(sse_events(r)) as events:
            async for event, data in events:
                if event == "progress":
                    steps.append(data["step"])
                elif event == "result":
                    result = data
                else:
                    rec.status, rec.problem = data.get("status"), f"{event} event: {data}"
                    return rec
    if steps != list(range(1, body["steps"] + 1)):
        rec.problem = f"progress steps {steps[:5]}… for {body['steps']} steps"
    elif result is None:
        rec.problem = "no result event"
    else:
        rec.problem = payload_problem(result, n, t.shape)
    return rec


async def abandon(t: Traffic, rng: random.Random) -> Record:
    """A long stream closed after its first progress event: the server must cancel it."""
    body = gen_body(t, rng, t.config.long_steps, images=(1, 2))
    body["steps"] = min(t.config.long_steps, t.info["max_steps"][body["sampler"]])
    rec = Record("abandon", None, rows=body["num_images"], sampler=body["sampler"], fmt="sse")
    async with t.main.stream("POST", "/generate/stream", json=body) as r:
        if r.status_code != 200:
            rec.status, rec.problem = r.status_code, f"status {r.status_code}"
            return rec
        async with contextlib.aclosing(sse_events(r)) as events:
            async for event, data in events:
                if event == "progress":
                    return rec  # leaving the block closes the connection
                rec.status = 200 if event == "result" else data.get("status")
                rec.problem = "" if event == "result" else f"{event} event: {data}"
                return rec
    rec.status, rec.problem = 200, "stream ended without events"
    return rec


async def drop(t: Traffic, rng: random.Random) -> Record:
    """A long /generate whose client goes away 0.1–0.5 s in, before the answer: the server must cancel it."""
    body = {**gen_body(t, rng, t.config.long_steps, images=(1, 2)), "format": "npy"}
    body["steps"] = min(t.config.long_steps, t.info["max_steps"][body["sampler"]])
    task = asyncio.ensure_future(t.main.post("/generate", json=body))
    done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.1, 0.5))
    rec = Record("drop", None, rows=body["num_images"], sampler=body["sampler"], fmt="npy")
    if not done:
        task.cancel()  # httpx closes the connection: the server sees the disconnect
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return rec
    r = task.result()  # answered before the drop: then it has to be a good answer
    rec.status, rec.problem = r.status_code, image_problem(r, "npy", body["num_images"], t.shape)
    return rec


async def noise(t: Traffic, rng: random.Random) -> Record:
    big_t, fmt = t.info["num_train_timesteps"], rng.choice(FORMATS)
    ts = sorted(rng.sample(range(big_t), rng.randint(1, 4)))
    params = {"ts": ",".join(map(str, ts)), "image": rng.choice(t.info["examples"]), "seed": rng.randrange(1000),
              "format": fmt}
    r = await t.main.get("/noise", params=params)
    return Record("noise", r.status_code, noise_problem(r, fmt, len(ts), t.shape), fmt=fmt)


def noise_problem(r: httpx.Response, fmt: str, k: int, shape: list[int]) -> str:
    """What is wrong with a /noise answer for ``k`` timesteps ("" when nothing)."""
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    try:
        if fmt == "npy":
            x = np.load(io.BytesIO(r.content))
            return "" if x.shape == (k, *shape) else f"npy {x.shape}"
        if fmt == "json":
            return "" if len(r.json()["x_t_png"]) == k else "json x_t_png count"
        Image.open(io.BytesIO(r.content)).load()
        return ""
    except Exception as exc:
        return f"undecodable {fmt}: {exc!r}"


async def denoise(t: Traffic, rng: random.Random) -> Record:
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal(t.shape)
    body = {"x_t": npy_b64(x), "t": rng.randrange(t.info["num_train_timesteps"]), "seed": rng.randrange(1000)}
    r = await t.main.post("/denoise-step", json=body)
    problem = "" if r.status_code == 200 else f"status {r.status_code}: {r.text[:200]}"
    if not problem:
        x_prev = np.load(io.BytesIO(base64.b64decode(r.json()["x_prev"])))
        problem = "" if x_prev.shape == tuple(t.shape) and np.isfinite(x_prev).all() else f"x_prev {x_prev.shape}"
    return Record("denoise", r.status_code, problem)


async def unauthorized(t: Traffic, rng: random.Random) -> Record:
    headers = {"Authorization": "Bearer wrong-key"} if rng.random() < 0.5 else {}
    r = await t.anon.post("/generate", json={"steps": 1, "sampler": "ddim"}, headers=headers)
    ok = r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    return Record("unauthorized", r.status_code, "" if ok else f"status {r.status_code} {dict(r.headers)}")


async def burst_one(t: Traffic, rng: random.Random) -> Record:
    body = {**gen_body(t, rng, t.config.steps, images=(4, 4)), "format": "npy"}
    r = await t.burst.post("/generate", json=body)
    rec = Record("burst", r.status_code, rows=4, sampler=body["sampler"], fmt="npy")
    if r.status_code == 429:
        retry = r.headers.get("retry-after", "")
        rec.problem = "" if retry.isdigit() and int(retry) >= 1 else f"429 without a valid Retry-After ({retry!r})"
    else:
        rec.problem = image_problem(r, "npy", 4, t.shape)
    return rec


KINDS: dict[str, tuple[float, Callable[[Traffic, random.Random], Awaitable[Record]]]] = {
    "generate": (0.45, generate),
    "stream": (0.15, stream),
    "abandon": (0.1, abandon),
    "drop": (0.1, drop),
    "noise": (0.1, noise),
    "denoise": (0.06, denoise),
    "unauthorized": (0.04, unauthorized),
}


async def guarded(kind: str, call: Awaitable[Record]) -> Record:
    """The record of one request, or one saying it failed below HTTP (a transport error)."""
    try:
        return await call
    except httpx.HTTPError as exc:
        return Record(kind, None, f"transport error: {exc!r}")


async def worker(t: Traffic, rng: random.Random, stop_at: float) -> None:
    names = list(KINDS)
    weights = [KINDS[k][0] for k in names]
    while time.monotonic() < stop_at:
        kind = rng.choices(names, weights)[0]
        t.records.append(await guarded(kind, KINDS[kind][1](t, rng)))


async def bursts(t: Traffic, rng: random.Random, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        calls = [guarded("burst", burst_one(t, rng)) for _ in range(t.config.burst_size)]
        t.records.extend(await asyncio.gather(*calls))
        await asyncio.sleep(min(t.config.burst_every_s, max(0.0, stop_at - time.monotonic())))


# ----------------------------------------------------------------------------------------- observation
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample_process(pid: int, t0: float, samples: list[tuple[float, float, int]], every: float = 0.25) -> None:
    """Append (seconds since t0, RSS MiB, open fds) every ``every`` seconds until cancelled."""
    while True:
        samples.append((time.monotonic() - t0, rss_mib(pid), open_fds(pid)))
        await asyncio.sleep(every)


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics as {'name{label="v",...}': value} (labels sorted), summed over the ``model`` label (every model)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "model")
            key = f"{s.name}{{{labels}}}" if labels else s.name
            out[key] = out.get(key, 0.0) + s.value
    return out


async def wait_drained(client: httpx.AsyncClient, timeout: float = 15.0) -> dict[str, float]:
    """The queue and running-batch gauges once they are all 0, or as they are after ``timeout``."""
    names = ("ddpm_queue_depth_rows", "ddpm_queue_depth_requests", "ddpm_active_rows")
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(client)
        gauges = {n: m.get(n, float("nan")) for n in names}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------- checks
def check(name: str, passed: bool, **numbers: object) -> dict:
    return {"name": name, "passed": bool(passed), **numbers}


def fate_checks(records: list[Record], info: dict) -> list[dict]:
    """fates, no_5xx (client side) and coverage."""
    expected = {"burst": {200, 429}, "drop": {None, 200}, "abandon": {None, 200}, "unauthorized": {401}}
    wrong = [r for r in records if r.problem or r.status not in expected.get(r.kind, {200})]
    by_kind = {k: dict(Counter(str(r.status) for r in records if r.kind == k)) for k in (*KINDS, "burst")}
    done = [r for r in records if r.status == 200 and r.rows]
    missing = (
        [k for k, v in by_kind.items() if not v]
        + [s for s in info["samplers"] if not any(r.sampler == s for r in done)]
        + [f for f in (*FORMATS, "sse") if not any(r.fmt == f for r in done)]
    )
    rejected = sum(r.status == 429 for r in records)
    return [
        check("fates", not wrong, requests=len(records), by_kind=by_kind, wrong=len(wrong),
              examples=[asdict(r) for r in wrong[:10]]),
        check("coverage", not missing and rejected > 0, missing=missing, burst_429s=rejected),
    ]


def engine_checks(records: list[Record], m0: dict[str, float], m1: dict[str, float]) -> list[dict]:
    """no_5xx (server side added) and engine_accounting from /metrics deltas."""

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    def outcome(o: str) -> int:
        return round(delta(f'ddpm_requests_total{{outcome="{o}"}}'))

    answered = sum(r.status == 200 for r in records if r.rows)
    dropped = [r.rows for r in records if r.rows and r.status is None and not r.problem]
    rejected = sum(r.status == 429 for r in records)
    ok, cancelled = outcome("ok"), outcome("cancelled")
    late = ok - answered  # dropped requests the engine finished before it saw the drop
    unseen = len(dropped) - cancelled - late  # dropped before the server handed them to the engine
    evicted = round(delta('ddpm_rows_evicted_total{reason="cancelled"}'))
    rows = sorted(dropped)
    lo, hi = (sum(rows[:cancelled]), sum(rows[len(rows) - cancelled:])) if 0 < cancelled <= len(rows) else (0, 0)
    quota = round(delta('ddpm_rejected_requests_total{reason="client_quota"}'))
    accounting_ok = (
        0 <= late <= len(dropped) and 0 <= unseen <= max(1, len(dropped) // 50) and lo <= evicted <= hi
        and outcome("rejected") == rejected == quota and outcome("timeout") == outcome("error") == 0
    )
    server_5xx = {k: v for k in m1 if k.startswith("ddpm_http_requests_total{") and 'status="5' in k
                  if (v := delta(k)) > 0}
    client_5xx = sum(r.status is not None and r.status >= 500 for r in records)
    return [
        check("no_5xx", not client_5xx and not server_5xx, client=client_5xx, server=server_5xx),
        check("engine_accounting", accounting_ok, server_ok=ok, client_200=answered, late=late,
              server_cancelled=cancelled, client_dropped=len(dropped), unseen=unseen, rows_evicted_cancelled=evicted,
              expected_rows_evicted=[lo, hi], server_rejected=outcome("rejected"), client_quota=quota,
              client_429=rejected, server_timeout=outcome("timeout"), server_error=outcome("error")),
    ]


def process_checks(config: SoakConfig, samples: list[tuple[float, float, int]], fds_before: int,
                   fds_after: int) -> list[dict]:
    """rss_growth (late window vs early window, medians) and open_fds (after vs before traffic)."""
    (e0, e1), (l0, l1) = config.windows()
    early = [rss for s, rss, _ in samples if e0 <= s < e1]
    late = [rss for s, rss, _ in samples if l0 <= s <= l1]
    growth = statistics.median(late) - statistics.median(early) if early and late else float("inf")
    return [
        check("rss_growth", growth <= config.rss_growth_mib, growth_mib=round(growth, 2),
              bound_mib=config.rss_growth_mib, early_window_s=[round(e0, 1), round(e1, 1)],
              late_window_s=[round(l0, 1), round(l1, 1)],
              early_median_mib=round(statistics.median(early), 1) if early else None,
              late_median_mib=round(statistics.median(late), 1) if late else None,
              start_mib=round(samples[0][1], 1), max_mib=round(max(s[1] for s in samples), 1)),
        check("open_fds", fds_after - fds_before <= config.fd_growth, before=fds_before, after=fds_after,
              growth=fds_after - fds_before, bound=config.fd_growth, peak=max(s[2] for s in samples)),
    ]


# ------------------------------------------------------------------------------------------------- run
async def soak(url: str, pid: int, config: SoakConfig) -> dict:
    """Drive the server at ``url`` (process ``pid``) for ``config.duration_s``; return the report."""
    config.windows()  # fail early on windows that do not fit
    rng = random.Random(config.seed)
    auth = {"Authorization": f"Bearer {MAIN_KEY}"}
    # idle connections are dropped before the server's keep-alive (DDPM_KEEP_ALIVE_S, 5 s) closes them: no reuse race
    limits = httpx.Limits(max_connections=config.workers + config.burst_size + 4, keepalive_expiry=2.0)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30, headers=auth, limits=limits) as probe,
        httpx.AsyncClient(base_url=url, timeout=120, headers=auth, limits=limits) as main,
        httpx.AsyncClient(base_url=url, timeout=120, headers={"Authorization": f"Bearer {BURST_KEY}"},
                          limits=limits) as burst,
        httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as anon,
    ):
        info = (await probe.get("/v1/model")).raise_for_status().json()
        m0 = await metrics(probe)
        fds_before = open_fds(pid)
        t = Traffic(main, burst, anon, info, config)
        samples: list[tuple[float, float, int]] = []
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample_process(pid, t0, samples))
        stop_at = t0 + config.duration_s
        loops = [worker(t, random.Random(rng.random()), stop_at) for _ in range(config.workers)]
        await asyncio.gather(*loops, bursts(t, random.Random(rng.random()), stop_at))
        traffic_s = time.monotonic() - t0
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for client in (main, burst, anon):
            await client.aclose()  # the server closes its side: fds come back
        gauges = await wait_drained(probe)
        deadline = time.monotonic() + 5
        while (fds_after := open_fds(pid)) - fds_before > config.fd_growth and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        m1 = await metrics(probe)
    checks = [
        *fate_checks(t.records, info),
        *engine_checks(t.records, m0, m1),
        check("drained", all(v == 0 for v in gauges.values()), **gauges),
        *process_checks(config, samples, fds_before, fds_after),
    ]
    return {
        "config": asdict(config), "url": url, "pid": pid, "model": info["name"], "traffic_s": round(traffic_s, 1),
        "requests": len(t.records), "requests_per_s": round(len(t.records) / traffic_s, 1),
        "passed": all(c["passed"] for c in checks), "checks": checks,
        "samples": [[round(s, 2), round(rss, 2), fds] for s, rss, fds in samples],
    }


def summary(report: dict) -> str:
    """One line per check: PASS/FAIL, its name and numbers."""
    lines = [f"soak: {report['requests']} requests in {report['traffic_s']} s ({report['requests_per_s']}/s) "
             f"against {report['model']} (pid {report['pid']})"]
    for c in report["checks"]:
        numbers = {k: v for k, v in c.items() if k not in ("name", "passed", "examples")}
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {json.dumps(numbers)}")
        lines.extend(f"      {json.dumps(e)}" for e in c.get("examples", ()))
    lines.append("soak passed" if report["passed"] else "soak FAILED")
    return "\n".join(lines)


def start_server(model: str, leak_kib: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m service serve`` (or the leaking fault server) with :data:`SERVER_ENV` on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **SERVER_ENV, "DDPM_MODEL": model, "DDPM_HOST": "127.0.0.1", "DDPM_PORT": str(port),
           "DDPM_THREADS": str(threads), "DDPM_LOG_LEVEL": "warning"}
    argv = ["-m", "tests.api.fault_server", "--leak-kib", str(leak_kib)] if leak_kib else ["-m", "service", "serve"]
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log: {log}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready after 120 s; log: {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--warmup-s", type=float, default=None, help="default: 20%% of the duration")
    p.add_argument("--window-s", type=float, default=None, help="default: 20%% of the duration")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--burst-every-s", type=float, default=d.burst_every_s)
    p.add_argument("--burst-size", type=int, default=d.burst_size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--long-steps", type=int, default=d.long_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rss-growth-mib", type=float, default=d.rss_growth_mib)
    p.add_argument("--fd-growth", type=int, default=d.fd_growth)
    p.add_argument("--leak-kib", type=int, default=0, help="serve tests.api.fault_server leaking this much per request")
    p.add_argument("--threads", type=int, default=1, help="DDPM_THREADS of the server")
    p.add_argument("--out", type=Path, default=Path("soak.json"))
    args = p.parse_args()
    config = SoakConfig(**{k: v for k, v in vars(args).items() if k in SoakConfig.__dataclass_fields__})
    log = args.out.with_suffix(".server.log")
    proc, url = start_server(args.model, args.leak_kib, args.threads, log)
    try:
        report = asyncio.run(soak(url, proc.pid, config))
    finally:
        proc.terminate()
        proc.wait(60)
    report["leak_kib"] = args.leak_kib
    args.out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"report: {args.out}, server log: {log}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
