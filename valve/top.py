"""`valve top`: a live view of one node's GPUs, read from the control blocks under the runtime root.

Read-only and without a mapping: each refresh reads the control file's page with one ``pread`` (a truncated or
replaced file cannot SIGBUS us, and nothing is written). Rates (closed fraction, preemptions/s, offline
sub-layers/s) are differences between two reads. Every GPU folder gets a row; one whose block cannot be read,
is of another layout or has a stale arbiter heartbeat says so in its row.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from valve.api.contract import CONTROL_FILE, PAIR_FILE
from valve.runtime.control import FILE_SIZE, FLAG_ARBITER, GATE_OPEN, Layout, block_problem

DEFAULT_LEASE_NS = 1_000_000_000  # as the clients' default when the arbiter publishes none


@dataclass
class Read:
    """One read of a GPU's control block: the fields (None when unusable) and why not."""

    t_ns: int
    fields: Layout | None
    problem: str | None = None


@dataclass
class Row:
    gpu: str
    pair: str | None
    status: str  # ok | stale | no-arbiter | error
    problem: str | None = None
    gate: str | None = None  # open | closed
    closed_fraction: float | None = None  # of the time between the two reads
    online_inflight: int | None = None
    online_requests: int | None = None
    preemptions: int | None = None
    preemptions_per_s: float | None = None
    preemption_latency_ms: float | None = None  # last closure to offline parked at the gate, where known
    offline_progress: int | None = None
    offline_sublayers_per_s: float | None = None
    pool_bytes: int | None = None
    pool_limit_bytes: int | None = None
    reserve_bytes: int | None = None
    reclaim_requests: int | None = None
    reclaim_answered: int | None = None
    evicted_sequences: int | None = None
    heartbeat_age_ms: float | None = None
    forced_opens: int | None = None

    def unread(self) -> bool:
        """No fields to show: the block could not be used."""
        return self.gate is None


def read_block(path: Path, now_ns: int | None = None) -> Read:
    # the snapshot's time is taken after the read: one taken before could precede a heartbeat the arbiter wrote
    # meanwhile, and the heartbeat's age would come out negative
    now = time.monotonic_ns() if now_ns is None else now_ns
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Read(now, None, "no control file (is the arbiter running?)")
    except OSError as e:
        return Read(now, None, f"cannot open the control file: {e.strerror} (this process runs as uid {os.geteuid()})")
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, FILE_SIZE, 0)
    except OSError as e:
        return Read(now, None, f"cannot read the control file: {e.strerror}")
    finally:
        os.close(fd)
    now = time.monotonic_ns() if now_ns is None else now_ns
    if size != FILE_SIZE or len(data) < ctypes.sizeof(Layout):
        return Read(now, None, f"size {size} bytes, expected {FILE_SIZE}: not a Valve control file")
    f = Layout.from_buffer_copy(data[: ctypes.sizeof(Layout)])
    problem = block_problem(size, 0, 0, f.magic, f.version, f.size)
    if problem:
        return Read(now, None, problem + " (upgrade valve top with the arbiter)" if "version" in problem else problem)
    return Read(now, f)


def read_pair(gpu_dir: Path) -> str | None:
    try:
        text = (gpu_dir / PAIR_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def gpu_dirs(root: Path) -> list[Path]:
    """The GPU folders under the runtime root: those with a control file, or any folder that looks like a GPU's."""
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in entries if (p / CONTROL_FILE).exists() or p.name.startswith(("GPU-", "MIG-"))]


def row(gpu_dir: Path, cur: Read, prev: Read | None) -> Row:
    r = Row(gpu=gpu_dir.name, pair=read_pair(gpu_dir), status="error", problem=cur.problem)
    f = cur.fields
    if f is None:
        return r
    lease = int(f.lease_ns) or DEFAULT_LEASE_NS
    age = cur.t_ns - int(f.heartbeat_ns)
    r.heartbeat_age_ms = age / 1e6 if f.heartbeat_ns else None
    if not f.flags & FLAG_ARBITER or not f.heartbeat_ns:
        r.status, r.problem = "no-arbiter", "no arbiter keeps this block (stopped, or not started yet)"
    elif age > lease:
        r.status = "stale"
        r.problem = f"arbiter heartbeat {age / 1e9:.1f} s old (lease {lease / 1e9:g} s): offline opens the gate itself"
    else:
        r.status, r.problem = "ok", None
    r.gate = "open" if f.gate == GATE_OPEN else "closed"
    r.online_inflight = int(f.online_inflight)
    r.online_requests = int(f.online_requests)
    r.preemptions = int(f.preemptions)
    r.offline_progress = int(f.offline_progress)
    r.pool_bytes, r.pool_limit_bytes = int(f.offline_pool_bytes), int(f.offline_limit_bytes)
    r.reserve_bytes = int(f.reserve_target_bytes)
    r.reclaim_requests, r.reclaim_answered = int(f.reclaim_req_seq) // 2, int(f.reclaim_ack_seq) // 2
    r.evicted_sequences = int(f.evicted_sequences)
    r.forced_opens = int(f.forced_opens)
    if f.parked_ns and f.last_close_ns and f.parked_ns >= f.last_close_ns:
        r.preemption_latency_ms = (f.parked_ns - f.last_close_ns) / 1e6
    p = prev.fields if prev is not None else None
    dt = (cur.t_ns - prev.t_ns) / 1e9 if prev is not None else 0.0
    if p is not None and dt > 0 and f.preemptions >= p.preemptions:
        closed = max(0, int(f.gate_closed_ns) - int(p.gate_closed_ns))
        if f.gate != GATE_OPEN and f.last_close_ns:  # the current closure is not in the total until it ends
            closed += max(0, cur.t_ns - max(int(f.last_close_ns), prev.t_ns))
        r.closed_fraction = min(1.0, closed / (dt * 1e9))
        r.preemptions_per_s = (f.preemptions - p.preemptions) / dt
        if f.offline_progress >= p.offline_progress:
            r.offline_sublayers_per_s = (f.offline_progress - p.offline_progress) / dt
    return r


class Node:
    """The runtime root and the last read of each GPU's block (for rates)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.last: dict[str, Read] = {}

    def sample(self) -> list[Row]:
        rows = []
        for d in gpu_dirs(self.root):
            cur = read_block(d / CONTROL_FILE)
            rows.append(row(d, cur, self.last.get(d.name)))
            self.last[d.name] = cur
        return rows

    def empty_reason(self) -> str:
        if not self.root.exists():
            return f"{self.root} does not exist: no Valve runtime on this node (or give --runtime-dir)"
        if not os.access(self.root, os.R_OK | os.X_OK):
            return f"{self.root}: cannot list it (this process runs as uid {os.geteuid()})"
        return f"no control blocks under {self.root}: no GPU has an arbiter yet"


def snapshot(root: Path | str, interval_s: float) -> dict:
    """Two reads ``interval_s`` apart (for rates): what ``--once --json`` prints."""
    node = Node(root)
    node.sample()
    time.sleep(interval_s)
    rows = node.sample()
    return {"runtime_dir": str(node.root), "interval_s": interval_s, "gpus": [asdict(r) for r in rows],
            "problem": None if rows else node.empty_reason()}


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def short_gpu(uuid: str) -> str:
    return uuid if len(uuid) <= 14 else f"{uuid[:4]}…{uuid[-8:]}"


COLUMNS = ("GPU", "pair", "state", "gate", "online", "pre/s", "lat ms", "off/s", "pool/limit", "reserve",
           "recl", "hb ms")


def table(node: Node, rows: list[Row]):
    """The view: one table row per GPU, then one line per GPU with a problem (or why there is no GPU)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"valve top  {node.root}  {time.strftime('%H:%M:%S')}", box=None, padding=(0, 1))
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("GPU", "pair", "state", "gate") else "right", no_wrap=True)
    for r in rows:
        state = r.status if r.status == "ok" else f"[red]{r.status}[/]"
        if r.unread():
            t.add_row(short_gpu(r.gpu), r.pair or "-", state, *["-"] * (len(COLUMNS) - 3))
            continue
        closed = "" if r.closed_fraction is None else f" {100 * r.closed_fraction:.0f}%"
        gate = f"[red]closed{closed}[/]" if r.gate == "closed" else f"[green]open{closed}[/]"
        t.add_row(
            short_gpu(r.gpu), r.pair or "-", state, gate, str(r.online_inflight), _num(r.preemptions_per_s, ".1f"),
            _num(r.preemption_latency_ms, ".2f"), _num(r.offline_sublayers_per_s, ".0f"),
            f"{_bytes(r.pool_bytes)}/{_bytes(r.pool_limit_bytes)}", _bytes(r.reserve_bytes),
            f"{r.reclaim_answered}/{r.reclaim_requests}", _num(r.heartbeat_age_ms, ".0f"))
    if not rows:
        return Group(Text(t.title), Text(node.empty_reason(), style="yellow"))
    return Group(t, *(Text(f"{r.gpu}: {r.problem}", style="yellow") for r in rows if r.problem))


def console():
    """A terminal's width, or wide enough that a row is never cut in logs and pipes."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def once(root: Path | str, interval_s: float) -> None:
    node = Node(root)
    node.sample()
    time.sleep(interval_s)
    console().print(table(node, node.sample()))


def live(root: Path | str, interval_s: float, iterations: int | None = None) -> None:
    """Refresh in place every ``interval_s`` until interrupted (or ``iterations`` refreshes)."""
    from rich.live import Live

    node = Node(root)
    n = 0
    with Live(table(node, node.sample()), console=console(), auto_refresh=False, screen=False) as view:
        try:
            while iterations is None or n < iterations:
                time.sleep(interval_s)
                view.update(table(node, node.sample()), refresh=True)
                n += 1
        except KeyboardInterrupt:
            pass
