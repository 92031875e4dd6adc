"""Results of a fleet simulation as a rich table, a JSON file and a PNG figure."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from valve.simulate.calibration import Calibration


def calibration_table(cal: Calibration) -> Table:
    table = Table(title=f"Calibration used (GPU: {cal.gpu})", title_justify="left")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("source")
    for name, value, source in cal.rows():
        table.add_row(name, value, source)
    return table


def fmt_h(h) -> str:
    return "not done" if h is None else f"{h:.1f} h"


def results_table(res: dict) -> Table:
    f = res["fleet"]
    st = res["strategies"]
    names = list(st)
    title = (f"Fleet: {f['gpus']:,} GPUs ({f['nodes']:,} nodes x {f['gpus_per_node']}), {f['hours']:g} h in "
             f"{f['bin_minutes']:g}-min bins, {f['services']} online services on {f['online_gpus_today']:,} GPUs "
             f"today, offline backlog {f['offline_backlog_gpu_hours']:,.0f} GPU-h; SLO: online p99 <= "
             f"{res['config']['slo']:g} x unloaded")
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    for n in names:
        table.add_column(st[n]["label"], justify="right")

    def row(label: str, fn) -> None:
        table.add_row(label, *[fn(st[n]) for n in names])

    row("GPUs needed (same SLO + offline work)", lambda s: f"{s['right_sized']['gpus_needed']:,}")
    row("  GPUs saved vs dedicated", lambda s: f"{s['right_sized']['gpus_saved']:,} "
        f"({s['right_sized']['gpus_saved_pct']:.1f}%)")
    row("  utilisation of that fleet", lambda s: f"{s['right_sized']['utilisation_pct']:.1f}% "
        f"({s['right_sized']['utilisation_gain_pct']:+.1f}%)")
    row("  services sharing GPUs", lambda s: f"{s['right_sized']['services_shared']} / {f['services']}")
    table.add_section()
    row("today's fleet: utilisation", lambda s: f"{s['today']['utilisation_pct']:.1f}%")
    row("  online requests over SLO", lambda s: f"{s['today']['online_slo_violation_pct']:.2f}%")
    row("  offline GPU-equivalents", lambda s: f"{s['today']['offline_gpu_equivalents']:,.0f}")
    row("  offline backlog done after", lambda s: fmt_h(s["today"]["offline_backlog_done_h"]))
    row("  offline mean job done after", lambda s: fmt_h(s["today"]["offline_mean_job_done_h"]))
    return table


def sweep_table(res: dict) -> Table:
    names = ("time_slicing", "mps", "valve")
    table = Table(title="GPUs saved (%), one assumption at its low / high end", title_justify="left")
    table.add_column("assumption [low, high]")
    for n in names:
        table.add_column(n, justify="right")
    b = res["baseline"]
    table.add_row("baseline", *[f"{b[n]['gpus_saved_pct']:.1f}" for n in names])
    for r in res["tornado"]:
        table.add_row(f"{r['name']} [{r['low']:g}, {r['high']:g}]", *[
            f"{r['at_low'][n]['gpus_saved_pct']:.1f} / {r['at_high'][n]['gpus_saved_pct']:.1f}" for n in names])
    rng = res["savings_range_pct"]
    table.add_row("range", *[f"{rng[n][0]:.1f} to {rng[n][1]:.1f}" for n in names])
    return table


def write_json(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


COLOURS = {"dedicated": "tab:gray", "time_slicing": "tab:red", "mps": "tab:orange", "valve": "tab:blue"}


def plot(res: dict, path: Path) -> None:
    """Four panels: utilisation over time, online SLO violations over time, offline backlog left, GPUs needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = res["strategies"]
    hours = res["series"]["hours"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for name, s in st.items():
        ser = res["series"][name]
        c = COLOURS.get(name)
        ax[0, 0].plot(hours, [100 * v for v in ser["utilisation"]], label=s["label"], color=c)
        ax[0, 1].plot(hours, [100 * v for v in ser["slo_violation"]], label=s["label"], color=c)
        ax[1, 0].plot(hours, [100 * v for v in ser["backlog_left"]], label=s["label"], color=c)
    ax[0, 0].set(title="Today's fleet: GPU utilisation", xlabel="hour", ylabel="% of GPU time doing work", ylim=(0, 105))
    ax[0, 1].set(title="Today's fleet: online requests over SLO", xlabel="hour", ylabel="%")
    ax[1, 0].set(title="Today's fleet: offline backlog left", xlabel="hour", ylabel="% of backlog", ylim=(0, 105))
    for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    labels = [s["label"] for s in st.values()]
    need = [s["right_sized"]["gpus_needed"] for s in st.values()]
    bars = ax[1, 1].bar(labels, need, color=[COLOURS.get(n) for n in st])
    for b, s in zip(bars, st.values(), strict=True):
        r = s["right_sized"]
        ax[1, 1].annotate(f"{r['gpus_needed']:,}\n({0.0 - r['gpus_saved_pct']:+.1f}%)", (b.get_x() + b.get_width() / 2,
                          b.get_height()), ha="center", va="bottom", fontsize=9)
    ax[1, 1].set(title="GPUs needed for the same online SLO and offline work", ylabel="GPUs",
                 ylim=(0, max(need) * 1.2))
    ax[1, 1].tick_params(axis="x", labelsize=8)
    f = res["fleet"]
    fig.suptitle(f"valve simulate cluster: {f['gpus']:,} GPUs, {f['hours']:g} h, {f['services']} online services "
                 f"(calibration GPU: {res['calibration']['gpu']})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
