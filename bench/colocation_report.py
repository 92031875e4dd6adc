"""The colocation benchmark's report: rows with ratios to the solo runs, the rich table, the PNG (latency CDFs +
throughput)."""

from __future__ import annotations

from bench.harness.output import pyplot
from valve.stats import percentile

ORDER = ("online-alone", "offline-alone", "time-slicing", "mps", "valve", "time-slicing-mem", "mps-mem", "valve-mem")


def ratio(a, b) -> float:
    if a is None or b is None or not (a == a and b == b) or b <= 0:
        return float("nan")
    return a / b


def rows(variants: dict[str, dict]) -> list[dict]:
    """One row per variant: TTFT/TPOT p50/p99 (ms and ratio to online-alone), offline tok/s (and ratio to
    offline-alone), GPU utilisation, online busy fraction."""
    base, off = variants.get("online-alone"), variants.get("offline-alone")
    out = []
    for name in sorted(variants, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        v = variants[name]
        row = {"variant": name}
        for metric in ("ttft", "tpot"):
            xs = v.get(f"{metric}_ms") or []
            for q in (50, 99):
                val = percentile(xs, q)
                ref = percentile(base.get(f"{metric}_ms") or [], q) if base else float("nan")
                row[f"{metric}_p{q}_ms"] = val
                row[f"{metric}_p{q}_ratio"] = ratio(val, ref) if xs else float("nan")
        tps = v.get("offline_tokens_per_s")
        row["offline_tokens_per_s"] = tps
        row["offline_ratio"] = ratio(tps, off.get("offline_tokens_per_s") if off else None) if tps else float("nan")
        # against the ideal: what offline alone would make in the time online leaves idle
        idle = 1 - base["busy_fraction"] if base and base.get("busy_fraction") is not None else None
        row["harvest"] = row["offline_ratio"] / idle if idle and row["offline_ratio"] == row["offline_ratio"] \
            and name != "offline-alone" else float("nan")
        row["gpu_util"] = v.get("gpu_util")
        row["busy_fraction"] = v.get("busy_fraction")
        row["requests"] = len(v.get("ttft_ms") or [])
        row["errors"] = v.get("errors", 0)
        out.append(row)
    return out


SUMMARY_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ratio", "ttft_p99_ratio",
                "tpot_p50_ratio", "tpot_p99_ratio", "offline_tokens_per_s", "offline_ratio", "harvest", "gpu_util",
                "busy_fraction")


def _median(xs: list[float | None]) -> float:
    """The median of the figures a repeat measured (None and NaN left out); nan when none did."""
    return percentile([x for x in xs if x is not None and x == x], 50)


def summarize(repeat_rows: list[list[dict]]) -> list[dict]:
    """One row per variant over the repeats: the median of each figure, its spread (min, max) and the number
    of repeats; ``requests`` is the total over the repeats. Ratios are taken within a repeat first (against that
    repeat's solo runs), then summarised."""
    by: dict[str, list[dict]] = {}
    for rows_ in repeat_rows:
        for row in rows_:
            by.setdefault(row["variant"], []).append(row)
    out = []
    for name, rs in by.items():
        row = {"variant": name, "repeats": len(rs), "requests": sum(r["requests"] for r in rs),
               "errors": sum(r["errors"] for r in rs), "spread": {}}
        for k in SUMMARY_KEYS:
            xs = [r.get(k) for r in rs]
            row[k] = _median(xs)
            ok = [x for x in xs if x is not None and x == x]
            row["spread"][k] = [min(ok), max(ok)] if ok else None
        out.append(row)
    return out


def pool(reps: list[dict[str, dict]]) -> dict[str, dict]:
    """The repeats' samples side by side (latency CDFs, tenants): lists joined, scalars their median."""
    out: dict[str, dict] = {}
    for variants in reps:
        for name, v in variants.items():
            d = out.setdefault(name, {})
            for k, val in v.items():
                if isinstance(val, list):
                    d.setdefault(k, []).extend(val)
                elif isinstance(val, (int, float)) and not isinstance(val, bool):
                    d.setdefault("_" + k, []).append(val)
    for d in out.values():
        for k in [k for k in d if k.startswith("_")]:
            d[k[1:]] = _median(d.pop(k))
    return out


def mean_breakdown(bds: list[dict[str, dict]]) -> dict[str, dict]:
    """The repeats' breakdowns (each paired within its repeat) averaged, weighted by their request counts."""
    out: dict[str, dict] = {}
    for name in {n for bd in bds for n in bd}:
        parts = [bd[name] for bd in bds if name in bd]
        n = sum(p["n"] for p in parts)
        d: dict = {"n": n, "repeats": len(parts)}
        for key in ("mean_ms", "extra_vs_alone_ms"):  # a mean of medians would not be a median: left out
            d[key] = {}
            for part in parts[0][key]:
                xs = [(p[key][part], p["n"]) for p in parts if p[key].get(part) is not None]
                w = sum(c for _, c in xs)
                d[key][part] = sum(x * c for x, c in xs) / w if w else None
        for key in ("sm_mhz_arrival", "sm_mhz_mean", "power_w_arrival", "power_w_mean"):
            xs = [(p[key], p["n"]) for p in parts if p.get(key) is not None]
            w = sum(c for _, c in xs)
            d[key] = sum(x * c for x, c in xs) / w if w else None
        out[name] = d
    return out


def num(row: dict, key: str) -> float | None:
    """A figure of a row, None when missing or NaN (NaN is written to JSON as null)."""
    v = row.get(key)
    return None if v is None or v != v else v


def render_table(table_rows: list[dict], title: str):
    """Figures with their ratio; over repeats, the median with the spread of the ratio (min-max)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("variant", "req", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "offline tok/s",
                "harvest", "GPU util", "online busy"):
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")

    def spread(row, key, fmt):
        s = (row.get("spread") or {}).get(key)
        return f" [{fmt.format(s[0])}-{fmt.format(s[1])}]" if s and s[0] != s[1] and row.get("repeats", 1) > 1 else ""

    def lat(row, key):
        v, r = num(row, f"{key}_ms"), num(row, f"{key}_ratio")
        if v is None:
            return "-"
        return f"{v:.2f} (x{r:.3f}{spread(row, key + '_ratio', '{:.2f}')})" if r is not None else f"{v:.2f}"

    for row in table_rows:
        tps, ratio, harvest = num(row, "offline_tokens_per_s"), num(row, "offline_ratio"), num(row, "harvest")
        util, busy = num(row, "gpu_util"), num(row, "busy_fraction")
        t.add_row(
            row["variant"], str(row["requests"]) + (f" ({row['errors']} err)" if row["errors"] else ""),
            lat(row, "ttft_p50"), lat(row, "ttft_p99"), lat(row, "tpot_p50"), lat(row, "tpot_p99"),
            "-" if not tps else f"{tps:,.0f}" + (
                f" (x{ratio:.2f}{spread(row, 'offline_ratio', '{:.2f}')})" if ratio is not None else ""),
            "-" if harvest is None else f"{harvest:.0%}" + spread(row, "harvest", "{:.0%}"),
            "-" if util is None else f"{util:.0f}%",
            "-" if busy is None else f"{busy:.0%}",
        )
    return t


def is_oom(error: str) -> bool:
    """A request's error text names an out-of-memory failure (torch's CUDA OOM, ``DeviceOutOfMemory``, ...)."""
    e = error.lower()
    return "out of memory" in e or "outofmemory" in e


def oom_errors(errors) -> int:
    """How many of these request errors (None: no error) are out-of-memory failures."""
    return sum(1 for e in errors if e and is_oom(e))


def online_oom_errors(v: dict) -> tuple[int, bool]:
    """A variant's failed requests that said out of memory, and whether that count is exact. Results written
    before the bench counted them keep only a few distinct error texts (``error_samples``): the number of those
    that say OOM is then a lower bound."""
    if "oom_errors" in v:
        return v["oom_errors"], True
    return oom_errors(v.get("error_samples") or []), not v.get("errors")


def memory_rows(variants: dict[str, dict]) -> list[dict]:
    """One row per memory-pressure variant (those with ``mem_*`` figures): offline reclaims (count, MiB, host
    time p50/p99 of one reclaim), sequences evicted and tokens to recompute, online KV mappings the device refused
    (``online_ooms``), failed online requests and those of them that failed of out-of-memory (any allocation of
    the engine, not only its KV pool), its waits for memory it asked for (p50/p99), and its peak pool."""
    out = []
    for name in sorted(variants, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        v = variants[name]
        if "mem_reclaims" not in v:
            continue
        ms, waits = v.get("mem_reclaim_ms") or [], v.get("mem_ask_wait_ms") or []
        oom, exact = online_oom_errors(v)
        out.append({"variant": name, "reclaims": v["mem_reclaims"], "reclaimed_bytes": v["mem_reclaimed_bytes"],
                    "reclaim_p50_ms": percentile(ms, 50), "reclaim_p99_ms": percentile(ms, 99),
                    "evicted": v["mem_evicted"], "recomputed_tokens": v["mem_recomputed_tokens"],
                    "online_ooms": v["mem_online_ooms"], "online_errors": v.get("errors", 0),
                    "online_oom_errors": oom, "online_oom_errors_exact": exact,
                    "ask_wait_p50_ms": percentile(waits, 50), "ask_wait_p99_ms": percentile(waits, 99),
                    "asks": len(waits), "online_peak_bytes": v.get("mem_online_peak_bytes")})
    return out


def render_memory_table(mem_rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("variant", "reclaims", "reclaimed MiB", "reclaim p50 ms", "reclaim p99 ms", "evicted seqs",
                "recompute tok", "KV map OOMs", "failed reqs", "online asks", "ask wait p50 ms",
                "ask wait p99 ms", "online peak MiB"):
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")

    def f(x, fmt="{:.2f}"):
        return "-" if x is None or x != x else fmt.format(x)

    def failed(r):  # "60 (60 OOM)"; ">=" where the result kept only samples of its errors, "?" none said OOM
        n, oom = r.get("online_errors") or 0, r.get("online_oom_errors")
        if not n:
            return "0"
        if r.get("online_oom_errors_exact", oom is not None):
            return f"{n:.0f}" + (f" ({oom:.0f} OOM)" if oom else "")
        return f"{n:.0f} ({f'>={oom:.0f}' if oom else '?'} OOM)"

    for r in mem_rows:
        t.add_row(r["variant"], f(r["reclaims"], "{:.0f}"), f(r["reclaimed_bytes"] / 2**20, "{:.2f}"),
                  f(r["reclaim_p50_ms"]), f(r["reclaim_p99_ms"]), f(r["evicted"], "{:.0f}"),
                  f(r["recomputed_tokens"], "{:.0f}"), f(r["online_ooms"], "{:.0f}"), failed(r),
                  f(r["asks"], "{:.0f}"),
                  f(r["ask_wait_p50_ms"]), f(r["ask_wait_p99_ms"]),
                  f((r["online_peak_bytes"] or 0) / 2**20, "{:.2f}"))
    return t


def plot(variants: dict[str, dict], path: str, title: str) -> None:
    plt = pyplot()
    names = sorted(variants, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, label in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        for name in names:
            xs = sorted(variants[name].get(key) or [])
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{name} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"online {label.split()[0]} CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    bars = [(n, variants[n].get("offline_tokens_per_s") or 0.0) for n in names if n != "online-alone"]
    ax = axes[2]
    if bars:
        xs = [b[0] for b in bars]
        ys = [b[1] for b in bars]
        ax.bar(xs, ys, color="tab:gray")
        ref = variants.get("offline-alone", {}).get("offline_tokens_per_s")
        for i, y in enumerate(ys):
            if ref:
                ax.text(i, y, f"x{y / ref:.2f}", ha="center", va="bottom", fontsize=9)
        ax.tick_params(axis="x", rotation=20)
    ax.set_ylabel("offline tokens/s")
    ax.set_title("offline throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_points(table_rows: list[dict]) -> list[dict]:
    """The trade-off curve's points: every colocated variant (no memory pressure) with its offline harvest and
    online ratios to alone, Valve's settings variants among them."""
    keys = ("harvest", "ttft_p50_ratio", "ttft_p99_ratio", "tpot_p50_ratio", "tpot_p99_ratio")
    return [{"variant": r["variant"], **{k: r.get(k) for k in keys}} for r in table_rows
            if r["variant"] not in ("online-alone", "offline-alone") and "-mem" not in r["variant"]]


def plot_tradeoff(table_rows: list[dict], path: str, title: str, bound: float = 1.05) -> None:
    """Online ratio to alone (TTFT p50/p99, TPOT p99) against offline harvest, one point per variant: where an
    operator picks a setting. The dashed line is the latency bound."""
    plt = pyplot()
    pts = tradeoff_points(table_rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key, marker in (("ttft_p50_ratio", "o"), ("ttft_p99_ratio", "^"), ("tpot_p99_ratio", "s")):
        xs = [p["harvest"] for p in pts]
        ax.scatter(xs, [p[key] for p in pts], marker=marker, label=key.replace("_ratio", "").replace("_", " "))
    for p in pts:
        ax.annotate(p["variant"].replace("valve@", "").replace("+", "\n"), (p["harvest"], p["ttft_p99_ratio"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(bound, ls="--", color="gray", lw=1)
    ax.set_xlabel("offline harvest (share of offline-alone x online idle time)")
    ax.set_ylabel("online latency / alone (median of repeats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# where the time to first token goes: the server's --timeline parts, then HTTP and the client (``client``)
SERVER_PARTS = ("signal", "queue", "host_prep", "more_steps", "gpu_wait", "gpu", "sync", "deliver")
PARTS = SERVER_PARTS + ("client",)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def breakdown(variants: dict[str, dict]) -> dict[str, dict]:
    """Per variant with a timeline: mean and median of each part (ms; the means add up to the mean TTFT), the
    mean extra over the same request in online-alone (paired by request id), and the SM clock and power."""
    base = {r["rid"]: r for r in variants.get("online-alone", {}).get("timeline", [])}
    out = {}
    for name, v in variants.items():
        rows = v.get("timeline")
        if not rows:
            continue
        d = {"n": len(rows), "mean_ms": {}, "median_ms": {}, "extra_vs_alone_ms": {}}
        for part in PARTS + ("ttft",):
            xs = [r[part] for r in rows if r.get(part) is not None]
            d["mean_ms"][part] = _mean(xs)
            d["median_ms"][part] = percentile(xs, 50) if xs else None
            pairs = [r[part] - base[r["rid"]][part] for r in rows
                     if r["rid"] in base and r.get(part) is not None and base[r["rid"]].get(part) is not None]
            d["extra_vs_alone_ms"][part] = _mean(pairs)
        for key in ("sm_mhz_arrival", "sm_mhz_mean", "power_w_arrival", "power_w_mean"):
            d[key] = _mean([r[key] for r in rows if r.get(key) is not None])
        out[name] = d
    return out


def plot_breakdown(bd: dict[str, dict], path: str, title: str) -> None:
    """Stacked bars: the mean of each part of the time to first token, per variant."""
    plt = pyplot()
    names = sorted(bd, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    fig, ax = plt.subplots(figsize=(9, 4.6))
    bottom = [0.0] * len(names)
    for part in PARTS:
        vals = [bd[n]["mean_ms"].get(part) or 0.0 for n in names]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("mean time to first token (ms)")
    ax.set_title(f"Where TTFT goes: {title}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
