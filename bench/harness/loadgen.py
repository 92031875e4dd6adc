"""Open-loop load generator for ``/v1/completions`` with ``stream: true``; records TTFT and TPOT per request.

Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gaps with a given coefficient of variation: CV > 1 is
burstier than Poisson) and ``onoff`` (Poisson bursts during exponentially long on-periods, silence between; the
mean rate over time is still ``rate``). Requests are sent at their scheduled times whatever the server does
(open loop), so a slow server sees a queue build up, as in production.

Lengths: log-normal with a mean and CV, clipped to [min, max] (defaults resemble chat traffic: prompts of a few
hundred tokens, outputs of one to a few hundred).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

from valve.stats import percentile


@dataclass(frozen=True)
class LengthDist:
    mean: float
    cv: float = 0.0
    min: int = 1
    max: int = 1 << 20

    def sample(self, rng: random.Random) -> int:
        if self.cv <= 0:
            return int(min(max(round(self.mean), self.min), self.max))
        sigma2 = math.log(1 + self.cv**2)
        x = rng.lognormvariate(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))
        return int(min(max(round(x), self.min), self.max))


CHAT_PROMPT = LengthDist(mean=400, cv=0.6, min=16, max=2048)
CHAT_OUTPUT = LengthDist(mean=128, cv=0.7, min=8, max=512)


@dataclass(frozen=True)
class Arrivals:
    kind: str = "poisson"  # poisson | gamma | onoff
    rate: float = 1.0  # mean requests per second
    cv: float = 1.0  # gamma: coefficient of variation of the gaps
    on_s: float = 2.0  # onoff: mean on-period
    off_s: float = 2.0  # onoff: mean off-period

    def times(self, duration: float, rng: random.Random) -> list[float]:
        if self.rate <= 0 or duration <= 0:
            return []
        out: list[float] = []
        if self.kind == "poisson":
            t = rng.expovariate(self.rate)
            while t < duration:
                out.append(t)
                t += rng.expovariate(self.rate)
        elif self.kind == "gamma":
            if self.cv <= 0:
                raise ValueError("gamma arrivals need cv > 0")
            k = 1.0 / self.cv**2
            scale = 1.0 / (self.rate * k)
            t = rng.gammavariate(k, scale)
            while t < duration:
                out.append(t)
                t += rng.gammavariate(k, scale)
        elif self.kind == "onoff":
            if self.on_s <= 0 or self.off_s < 0:
                raise ValueError("onoff arrivals need on_s > 0 and off_s >= 0")
            burst_rate = self.rate * (self.on_s + self.off_s) / self.on_s
            t = 0.0
            while t < duration:
                end = min(duration, t + rng.expovariate(1.0 / self.on_s))
                a = t + rng.expovariate(burst_rate)
                while a < end:
                    out.append(a)
                    a += rng.expovariate(burst_rate)
                t = end + (rng.expovariate(1.0 / self.off_s) if self.off_s > 0 else 0.0)
        else:
            raise ValueError(f"unknown arrival process {self.kind!r}; expected poisson, gamma or onoff")
        return out


@dataclass
class TraceRequest:
    t: float  # seconds after the start
    prompt: list[int]
    max_tokens: int


def make_trace(arrivals: Arrivals, duration: float, prompt: LengthDist = CHAT_PROMPT,
               output: LengthDist = CHAT_OUTPUT, vocab: int = 128256, seed: int = 0) -> list[TraceRequest]:
    rng = random.Random(seed)
    trace = []
    for t in arrivals.times(duration, rng):
        n = prompt.sample(rng)
        trace.append(TraceRequest(t, [rng.randrange(vocab) for _ in range(n)], output.sample(rng)))
    return trace


@dataclass
class RequestResult:
    t_sched: float
    prompt_tokens: int
    max_tokens: int
    t_send: float = 0.0  # seconds after the start of the run
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds per output token after the first
    e2e: float | None = None
    tokens: int = 0
    error: str | None = None
    rid: str = ""  # the request's index in the trace (sent as X-Request-Id: the server's timeline names it)
    token_times: list[float] = field(default_factory=list, repr=False)


def parse_sse_line(line: bytes) -> dict | str | None:
    """One line of an SSE stream -> the JSON of a data event, "[DONE]", or None for anything else."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return "[DONE]"
    return json.loads(data)


async def send_one(session, url: str, model: str, req: TraceRequest, start: float, rid: str = "") -> RequestResult:
    res = RequestResult(req.t, len(req.prompt), req.max_tokens, rid=rid)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True}
    t0 = time.perf_counter()
    res.t_send = t0 - start
    try:
        async with session.post(url, json=body, headers={"X-Request-Id": rid} if rid else None) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for line in resp.content:
                ev = parse_sse_line(line)
                if ev is None or ev == "[DONE]":
                    continue
                if "error" in ev:
                    res.error = str(ev["error"])
                    break
                if ev["choices"][0].get("finish_reason") is None:
                    res.token_times.append(time.perf_counter() - t0)
    except Exception as e:  # a failed request is a result, not a crash of the run
        res.error = f"{type(e).__name__}: {e}"
    res.tokens = len(res.token_times)
    if res.token_times:
        res.ttft = res.token_times[0]
        res.e2e = res.token_times[-1]
        if res.tokens > 1:
            res.tpot = (res.token_times[-1] - res.token_times[0]) / (res.tokens - 1)
    return res


async def run_trace(base_url: str, trace: list[TraceRequest], model: str = "model",
                    on_done=None) -> list[RequestResult]:
    """Send every request at its scheduled time (open loop) and wait for all of them."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()

        async def fire(i: int, req: TraceRequest) -> RequestResult:
            delay = req.t - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            r = await send_one(session, url, model, req, start, str(i))
            if on_done:
                on_done(r)
            return r

        return list(await asyncio.gather(*(fire(i, r) for i, r in enumerate(trace))))


def summarize(results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.error is None and r.ttft is not None]
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    out = {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
           "output_tokens": sum(r.tokens for r in ok)}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(xs, q)
        out[f"{name}_mean"] = sum(xs) / len(xs) if xs else float("nan")
    return out


def result_rows(results: list[RequestResult]) -> list[dict]:
    rows = []
    for r in results:
        d = asdict(r)
        d.pop("token_times")
        rows.append(d)
    return rows


def main(
    url: str = "http://127.0.0.1:8000",
    model: str = "model",
    duration: float = 30.0,
    rate: float = 2.0,
    arrival: str = "poisson",
    cv: float = 1.0,
    on_s: float = 2.0,
    off_s: float = 2.0,
    prompt_mean: float = CHAT_PROMPT.mean,
    prompt_cv: float = CHAT_PROMPT.cv,
    output_mean: float = CHAT_OUTPUT.mean,
    output_cv: float = CHAT_OUTPUT.cv,
    vocab: int = 128256,
    seed: int = 0,
    json_out: str | None = None,
) -> None:
    """Send open-loop streaming completions to URL and print TTFT/TPOT percentiles."""
    arr = Arrivals(arrival, rate, cv, on_s, off_s)
    trace = make_trace(arr, duration, LengthDist(prompt_mean, prompt_cv, 1, 1 << 16),
                       LengthDist(output_mean, output_cv, 1, 1 << 16), vocab, seed)
    results = asyncio.run(run_trace(url, trace, model))
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"summary": summary, "requests": result_rows(results)}, f)


if __name__ == "__main__":
    import typer

    typer.run(main)
