"""Generate charts/valve/dashboards/valve.json, the Grafana dashboard the chart ships in a ConfigMap.

    python scripts/dashboard.py          # rewrite the file
    python scripts/dashboard.py --check  # exit 1 when the file differs from what this script makes

Metric names are those of docs/metrics.md; tests/test_chart_dashboard.py checks that the code exports each one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "charts" / "valve" / "dashboards" / "valve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99), sel: str = "") -> list[tuple[str, str]]:
    """histogram_quantile targets for each q, over the metric's buckets (those ``sel`` selects) summed by `le`
    (+ `by`)."""
    keys = "le" + (f", {by}" if by else "")
    suffix = "".join(f" {{{{{k.strip()}}}}}" for k in by.split(",")) if by else ""
    sel = f"{{{sel}}}" if sel else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{sel}[{RATE}])))",
            f"p{round(q * 100):d}{suffix}",
        )
        for q in qs
    ]


# the dashboard's variables: label selectors of the per-pair and per-GPU panels
PAIR_SEL = 'namespace=~"$namespace", pair=~"$pair"'
GPU_SEL = 'namespace=~"$namespace", pair=~"$pair", node=~"$node", gpu=~"$gpu"'
# the operator's per-ColocationPolicy series carry the policy's own namespace (the ServiceMonitor honours it)
POLICY_SEL = 'namespace=~"$namespace"'
NODE_SEL = 'node=~"$node", gpu=~"$gpu"'  # the device plugin's series: a node's GPUs, no pair
VARIABLES = (  # name, label, the query its values come from (each narrowed by the ones before it)
    ("namespace", "Namespace", "label_values(valve_online_inflight, namespace)"),
    ("pair", "Pair", 'label_values(valve_online_inflight{namespace=~"$namespace"}, pair)'),
    ("node", "Node", 'label_values(valve_online_inflight{namespace=~"$namespace", pair=~"$pair"}, node)'),
    ("gpu", "GPU", f"label_values(valve_online_inflight{{{GPU_SEL.rsplit(', gpu', 1)[0]}}}, gpu)"),
)


def pair_p99(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile(0.99, sum by (le, namespace, pair) (rate({metric}_bucket{{{PAIR_SEL}}}[{RATE}])))",
             "p99 {{namespace}}/{{pair}}")]


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "query": query, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0, "sort": 1}


def panel(title: str, desc: str, targets: list[tuple[str, str]], unit: str, kind: str = "timeseries") -> dict:
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
        for t in p["targets"]:
            t["instant"] = True
    return p


ROWS: list[tuple[str, list[dict]]] = [
    (
        "Fleet (over the dashboard's time range)",
        [
            panel("Harvested GPU-hours", "GPU time the offline tenants had: the gate-open fraction of every GPU whose "
                  "offline job made progress, over the time range.",
                  [(f"sum((1 - rate(valve_gate_closed_seconds_total{{{GPU_SEL}}}[$__range])) and on (namespace, pair, "
                    f"node, gpu) (rate(valve_offline_progress_total{{{GPU_SEL}}}[$__range]) > 0)) * $__range_s / 3600",
                    "GPU-hours")], "h", kind="stat"),
            panel("Online SLO attainment", "Share of online requests whose first token came within 0.5 s (a TTFT "
                  "bucket boundary of the proxy's histogram), over the time range.",
                  [(f'sum(rate(valve_online_ttft_seconds_bucket{{{PAIR_SEL}, le="0.5"}}[$__range])) / '
                    f"sum(rate(valve_online_ttft_seconds_count{{{PAIR_SEL}}}[$__range]))", "TTFT <= 0.5 s")],
                  "percentunit", kind="stat"),
            panel("Offline work done", "Offline sub-layers passed over the time range (the batch jobs' progress).",
                  [(f"sum(increase(valve_offline_progress_total{{{GPU_SEL}}}[$__range]))", "sub-layers")], "short",
                  kind="stat"),
        ],
    ),
    (
        "Per pair and GPU ($namespace / $pair / $node / $gpu)",
        [
            panel("Online TTFT p99 per pair", "p99 time to first token of each pair (proxy), against its SLO alert "
                  "(ValveOnlineTTFTHigh).", pair_p99("valve_online_ttft_seconds"), "s"),
            panel("Online TPOT p99 per pair", "p99 time per output token of each pair (proxy), against its SLO alert "
                  "(ValveOnlineTPOTHigh).", pair_p99("valve_online_tpot_seconds"), "s"),
            panel("Gate forced opens", "Offline clients that opened the gate on a stale arbiter heartbeat: the arbiter "
                  "was lost (ValveGateForcedOpen).",
                  [(f"sum by (node, gpu) (increase(valve_gate_forced_opens_total{{{GPU_SEL}}}[{RATE}]))",
                    "{{node}} gpu {{gpu}}")], "short"),
            panel("Capped preemptions", "Online bursts that ran with the gate open because the preemption rate cap was "
                  "reached (ValvePreemptionsCapped).",
                  [(f"sum by (node, gpu) (rate(valve_preemptions_capped_total{{{GPU_SEL}}}[{RATE}]))",
                    "{{node}} gpu {{gpu}}")], "ops"),
            panel("Reserve shortfall", "Online memory reserve the offline pool cannot cover (ValveReserveShortfall).",
                  [(f"max by (node, gpu) (valve_memory_reserve_shortfall_bytes{{{GPU_SEL}}})", "{{node}} gpu {{gpu}}")],
                  "bytes"),
        ],
    ),
    (
        "Online latency",
        [
            panel(
                "Online TTFT",
                "Time to first token of online requests, measured by the Valve proxy.",
                quantiles("valve_online_ttft_seconds", sel=PAIR_SEL),
                "s",
            ),
            panel(
                "Online TPOT",
                "Time per output token after the first, measured by the Valve proxy.",
                quantiles("valve_online_tpot_seconds", sel=PAIR_SEL),
                "s",
            ),
            panel(
                "Online requests and in-flight",
                "Online request rate (proxy) and requests in flight per GPU (arbiter).",
                [
                    (f"sum(rate(valve_online_requests_total{{{PAIR_SEL}}}[{RATE}]))", "requests/s"),
                    (f"sum by (node, gpu) (valve_online_inflight{{{GPU_SEL}}})", "in flight {{{{node}}}} gpu {{{{gpu}}}}"),
                ],
                "short",
            ),
        ],
    ),
    (
        "Gate and preemption",
        [
            panel(
                "Preemptions",
                "Gate closures per second: offline work stopped at a sub-layer boundary for online arrivals.",
                [(f"sum by (node, gpu) (rate(valve_preemptions_total{{{GPU_SEL}}}[{RATE}]))", "{{node}} gpu {{gpu}}")],
                "ops",
            ),
            panel(
                "Gate-closed time",
                "Fraction of time the offline gate was closed (seconds closed per second).",
                [
                    (
                        f"sum by (node, gpu) (rate(valve_gate_closed_seconds_total{{{GPU_SEL}}}[{RATE}]))",
                        "{{node}} gpu {{gpu}}",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Preemption latency",
                "From an online arrival to the offline stream being idle.",
                quantiles("valve_preemption_latency_seconds", qs=(0.5, 0.99), sel=GPU_SEL),
                "s",
            ),
            panel(
                "Offline progress",
                "Offline sub-layers passed per second (throughput of the batch job).",
                [
                    (
                        f"sum by (node, gpu) (rate(valve_offline_progress_total{{{GPU_SEL}}}[{RATE}]))",
                        "{{node}} gpu {{gpu}}",
                    )
                ],
                "ops",
            ),
        ],
    ),
    (
        "Memory reclaim",
        [
            panel(
                "Reclaimed bytes",
                "GPU memory taken back from the offline job for online bursts, per second.",
                [(f"sum by (node, gpu) (rate(valve_reclaimed_bytes_total{{{GPU_SEL}}}[{RATE}]))", "{{node}} gpu {{gpu}}")],
                "Bps",
            ),
            panel(
                "Reclaim latency",
                "From a reclaim request to the memory being free.",
                quantiles("valve_reclaim_latency_seconds", qs=(0.5, 0.99), sel=GPU_SEL),
                "s",
            ),
            panel(
                "Reserve and GPU memory used",
                "Memory the arbiter keeps free for online bursts, and memory used on each GPU (NVML).",
                [
                    (f"sum by (node, gpu) (valve_memory_reserve_bytes{{{GPU_SEL}}})", "reserve {{{{node}}}} gpu {{{{gpu}}}}"),
                    (f"sum by (node, gpu) (valve_gpu_memory_used_bytes{{{GPU_SEL}}})", "used {{{{node}}}} gpu {{{{gpu}}}}"),
                ],
                "bytes",
            ),
            panel(
                "Evictions and recompute",
                "Offline sequences evicted to free KV cache, and tokens recomputed after eviction, per second.",
                [
                    (f"sum(rate(valve_evicted_sequences_total{{{GPU_SEL}}}[{RATE}]))", "evicted sequences/s"),
                    (f"sum(rate(valve_recomputed_tokens_total{{{GPU_SEL}}}[{RATE}]))", "recomputed tokens/s"),
                ],
                "short",
            ),
        ],
    ),
    (
        "GPUs and pairs",
        [
            panel(
                "GPU utilisation",
                "Per-GPU utilisation read through NVML by the device plugin.",
                [(f"max by (node, gpu) (valve_gpu_utilization_ratio{{{NODE_SEL}}})", "{{{{node}}}} gpu {{{{gpu}}}}")],
                "percentunit",
            ),
            panel(
                "ColocationPairs by phase",
                "Pairs the operator manages, by status phase.",
                [('sum by (phase) (valve_pairs{namespace=~"$namespace"})', "{{phase}}")],
                "short",
                kind="stat",
            ),
            panel(
                "Devices",
                "Advertised and healthy Valve devices by resource, and allocations per second.",
                [
                    ('sum by (resource) (valve_devices{node=~"$node"})', "advertised {{resource}}"),
                    ('sum by (resource) (valve_device_healthy{node=~"$node"})', "healthy {{resource}}"),
                    (
                        f'sum by (resource) (rate(valve_allocations_total{{node=~"$node"}}[{RATE}]))',
                        "allocations/s {{resource}}",
                    ),
                ],
                "short",
            ),
            panel(
                "Placement",
                "Operator placement latency and reconcile errors per second.",
                [
                    *quantiles("valve_placement_latency_seconds", qs=(0.99,)),
                    (f"sum(rate(valve_reconcile_errors_total[{RATE}]))", "reconcile errors/s"),
                ],
                "s",
            ),
        ],
    ),
    (
        "Policies ($namespace)",
        [
            panel("Policy online pods and harvested GPUs", "Per ColocationPolicy: online pods its selector matches, and "
                  "the GPUs of those that get an offline pod (its status.onlinePods and status.harvestedGPUs).",
                  [(f"sum by (namespace, policy) (valve_policy_online_pods{{{POLICY_SEL}}})",
                    "online pods {{namespace}}/{{policy}}"),
                   (f"sum by (namespace, policy) (valve_policy_harvested_gpus{{{POLICY_SEL}}})",
                    "harvested GPUs {{namespace}}/{{policy}}")], "short"),
            panel("Policy offline pods by phase", "Per ColocationPolicy: its offline pods by pod phase (Pending ones wait "
                  "for their node's admission or image; Failed ones are recreated).",
                  [(f"sum by (namespace, policy, phase) (valve_policy_offline_pods{{{POLICY_SEL}}})",
                    "{{namespace}}/{{policy}} {{phase}}")], "short"),
        ],
    ),
]


def layout(rows: list[tuple[str, list[dict]]]) -> list[dict]:
    """Rows of 24 columns; panels two to a line, 8 high. Ids in order."""
    out: list[dict] = []
    y = 0
    for title, panels in rows:
        out.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        y += 1
        for i, p in enumerate(panels):
            out.append({**p, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}})
        y += 8 * ((len(panels) + 1) // 2)
    for i, p in enumerate(out, start=1):
        p["id"] = i
    return out


def dashboard() -> dict:
    return {
        "title": "Valve",
        "uid": "valve-colocation",
        "description": "Online latency, offline preemption, memory reclaim, GPUs, pairs and policies of Valve.",
        "tags": ["valve", "gpu", "llm-inference"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                *(variable(*v) for v in VARIABLES),
            ]
        },
        "panels": layout(ROWS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = OUT.exists() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if same else 'differs; run python scripts/dashboard.py'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
