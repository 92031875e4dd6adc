"""docs/memory.md "Memory pressure on the H200 (smoke runs)": the commands, table and figures of the page are
recomputed from the two committed result files (bench/results/colocation_mem_h200_reserve*.json)."""

from __future__ import annotations

from bench.colocation_report import memory_rows, rows
from tests.support.markdown import result, section, tables

HEADING = "## Memory pressure on the H200 (smoke runs)"
RUNS = {"256 MiB": "colocation_mem_h200_reserve256m.json", "1 GiB": "colocation_mem_h200_reserve1g.json"}
COMMAND = ("`python3 bench/colocation.py --model llama-1b --variants {variants} --prompt-mean {prompt_mean:g} "
           "--arrival {arrival} --cv {cv:g} --requests {requests} --offline-warmup {offline_warmup:g}`")


def flat(text: str) -> str:
    return " ".join(text.split())


def ms(a, b) -> str:
    return "-" if a is None or a != a else f"{a:.2f} / {b:.2f}"


def test_commands_and_settings():
    text = flat(section("docs/memory.md", HEADING))
    small, large = (result(n) for n in RUNS.values())
    for doc in (small, large):
        s = doc["settings"]
        assert COMMAND.format(**{**s, "variants": ",".join(s["variants"])}) in text
        assert doc["env"]["gpu"] == "NVIDIA H200" and s["repeats"] == 1 and s["engine"] == "ours"
        assert f"driver {doc['env']['driver']}, torch {doc['env']['torch'].rsplit('.', 1)[0]}" in text
        assert f"one repeat of {s['requests']} requests" in text
        assert doc["memory_plan"]["decay_s"] == 5.0 and "decay 5 s" in text
    assert small["settings"]["mem_reserve_bytes"] is None and small["settings"]["mem_leave_bytes"] is None
    plan = small["memory_plan"]
    assert plan["reserve_bytes"] == plan["leave_bytes"] == 256 * 2**20
    assert "reserve floor 256 MiB, the offline pool filling all but 256 MiB" in text
    assert f"`--mem-reserve-bytes {plan['reserve_bytes']} --mem-leave-bytes {plan['leave_bytes']}`)" in text
    s = large["settings"]
    assert s["mem_reserve_bytes"] == s["mem_leave_bytes"] == large["memory_plan"]["reserve_bytes"] == 2**30
    assert (f"the same plus `--mem-reserve-bytes {s['mem_reserve_bytes']} --mem-leave-bytes {s['mem_leave_bytes']}`: "
            "floor 1 GiB") in text
    assert {k: v for k, v in small["settings"].items() if not k.startswith("mem_")} == \
        {k: v for k, v in s.items() if not k.startswith("mem_")}  # "the same"


def test_table():
    (table,) = tables(section("docs/memory.md", HEADING))
    expected = []
    for floor, name in RUNS.items():
        doc = result(name)
        v = doc["variants"]
        perf = {r["variant"]: r for r in rows(v)}
        for m in memory_rows(v):  # rebuilt from the variants, as the bench's table renders them now
            p, var = perf[m["variant"]], v[m["variant"]]
            n, oom = m["online_errors"], m["online_oom_errors"]
            failed = "0" if not n else f"{n} ({'' if m['online_oom_errors_exact'] else '>='}{oom} OOM)"
            ttft = "-" if not var["ttft_ms"] else f"x{p['ttft_p50_ratio']:.2f} / x{p['ttft_p99_ratio']:.2f}"
            expected.append([floor, m["variant"], str(len(var["ttft_ms"])), failed, f"{m['online_ooms']:g}",
                             f"{m['reclaims']:g}", f"{m['reclaimed_bytes'] / 2**20:.0f}",
                             ms(m["reclaim_p50_ms"], m["reclaim_p99_ms"]), str(m["asks"]),
                             ms(m["ask_wait_p50_ms"], m["ask_wait_p99_ms"]), ttft,
                             f"{p['offline_tokens_per_s']:,.0f} (x{p['offline_ratio']:.2f})"])
    assert table[1:] == expected


def test_figures_in_the_text():
    text = flat(section("docs/memory.md", HEADING))
    small, large = (result(n) for n in RUNS.values())
    sv = small["variants"]["valve-mem"]
    assert sv["errors"] == small["settings"]["requests"]
    assert not sv["ttft_ms"] and sv["mem_online_ooms"] == 0 and "oom_errors" not in sv
    oom = next(e for e in sv["error_samples"] if "out of memory" in e)
    tried, free = oom.split("Tried to allocate ")[1].split(". ")[0], oom.split(" of which ")[1].split(" is free")[0]
    assert f"`CUDA out of memory. Tried to allocate {tried}` with {free} free" in text
    assert "HTTP 500: Internal Server Error" in sv["error_samples"] and \
        "a bare `HTTP 500: Internal Server Error`" in text
    assert f"all {sv['errors']} failures follow from that one OOM" in text
    skipped = small["skipped"]["time-slicing-mem"]
    assert "offline runner exited" in skipped and "torch.OutOfMemoryError" in skipped
    assert f"({skipped.split('Tried to allocate ')[1].split('. ')[0]} asked)" in text
    lv, lt = large["variants"]["valve-mem"], large["variants"]["time-slicing-mem"]
    perf = {r["variant"]: r for r in rows(large["variants"])}
    (row,) = (r for r in memory_rows(large["variants"]) if r["variant"] == "valve-mem")
    assert row["online_oom_errors_exact"]
    assert (f"{lv['mem_reclaims']} reclaims, {row['online_ooms'] + row['online_oom_errors']} OOMs, all "
            f"{len(lv['ttft_ms'])} served") in text
    assert lv["errors"] == lt["errors"] == 0 and not small["skipped"].get("valve-mem") and not large["skipped"]
    p = perf["valve-mem"]
    assert f"valve-mem TPOT p50 / p99 x{p['tpot_p50_ratio']:.2f} / x{p['tpot_p99_ratio']:.2f}" in text
    assert f"harvest {p['harvest']:.0%}" in text
    assert lt["mem_reclaims"] == 0 and lt["mem_online_peak_bytes"] <= large["memory_plan"]["leave_bytes"]
    assert f"online's pool peaked at {lt['mem_online_peak_bytes'] / 2**20:.0f} MiB, inside the 1 GiB left free" in text
    runs_of_record = flat(section("docs/engine.md", "### Runs of record: at least 300 requests per variant, repeated"))
    assert "300" in runs_of_record and "below the runs of record's 300 requests and 3 repeats" in text
    assert all(v.get("mem_evicted", 0) == 0 for d in (small, large) for v in d["variants"].values())
    assert "mps-mem" not in small["settings"]["variants"] + large["settings"]["variants"]


def test_the_gpu_default_is_the_run_that_served_every_request():
    from bench.colocation import Settings, memory_plan
    from valve.api.runtime import RuntimeSpec

    plan = memory_plan(Settings(device="cuda"), 141 << 30)
    served = result(RUNS["1 GiB"])["memory_plan"]
    assert plan["reserve_bytes"] == plan["leave_bytes"] == RuntimeSpec().reserve.min_bytes
    assert (plan["reserve_bytes"], plan["leave_bytes"]) == (served["reserve_bytes"], served["leave_bytes"])


RUN_300 = "mem_h200_300/colocation_h200_ours_llama-1b.json"
HEADING_300 = "## Memory pressure on the H200, 300 requests"


def test_the_300_request_run():
    doc = result(RUN_300)
    s, v = doc["settings"], doc["variants"]
    text = section("docs/memory.md", HEADING_300)
    command = ("`python3 bench/colocation.py --model llama-1b --variants {variants} --prompt-mean {prompt_mean:g} "
               "--arrival {arrival} --cv {cv:g} --output-mean {output_mean:g} --requests {requests} "
               "--offline-warmup {offline_warmup:g}`")
    assert command.format(**{**s, "variants": ",".join(s["variants"])}) in flat(text)
    assert s["repeats"] == 1 and doc["env"]["gpu"] == "NVIDIA H200"
    assert doc["memory_plan"]["reserve_bytes"] == doc["memory_plan"]["leave_bytes"] == 2**30
    assert v["valve-mem"]["control"]["near_online_ns"] == 0  # "near_online was off"
    (table,) = tables(text)
    perf = {r["variant"]: r for r in rows(v)}
    expected = []
    for m in memory_rows(v):
        p, var = perf[m["variant"]], v[m["variant"]]
        assert m["online_oom_errors_exact"]
        expected.append([m["variant"], str(len(var["ttft_ms"])), str(m["online_errors"]), f"{m['online_ooms']:g}",
                         f"{m['reclaims']:g}", f"{m['reclaimed_bytes'] / 2**20:.0f}",
                         ms(m["reclaim_p50_ms"], m["reclaim_p99_ms"]), f"{m['evicted']:g}", str(m["asks"]),
                         ms(m["ask_wait_p50_ms"], m["ask_wait_p99_ms"]), f"{m['online_peak_bytes'] / 2**20:.0f}",
                         f"x{p['ttft_p50_ratio']:.2f} / x{p['ttft_p99_ratio']:.2f}",
                         f"{p['offline_tokens_per_s']:,.0f} (x{p['offline_ratio']:.2f})"])
    assert table[1:] == expected
    vm, m = perf["valve-mem"], memory_rows(v)[0]
    pool_gib = v["valve-mem"]["control"]["offline_pool_bytes"] / 2**30
    for figure in (f"({pool_gib:.0f} GiB at the end of the window)",
                   f"took {m['reclaimed_bytes'] / 2**20:.0f} MiB back from it in {m['reclaims']:g} reclaims",
                   f"Online was busy {vm['busy_fraction'] * 100:.0f}% of the window",
                   f"the harvest is {vm['harvest'] * 100:.0f}% of offline-alone",
                   f"TTFT p99 and TPOT p99 are x{vm['ttft_p99_ratio']:.2f} and x{vm['tpot_p99_ratio']:.2f} of alone"):
        assert figure in flat(text), figure
