"""The launch monitor: runs the torchrun agents, streams their output, and names the rank that failed.

It reads torchrun's failure report as it streams past and finishes with one line that names the
rank, its host, its pid and how it died; when no worker ever started, it says that the rendezvous
(the master, or the other nodes) was not reached within ``--rdzv-timeout``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tunelab.launch.hostfile import is_local


@dataclass
class Failure:
    """The first rank that failed, as torchrun reported it (or as the monitor saw it vanish)."""

    rank: int
    local_rank: int | None = None
    host: str | None = None
    pid: int | None = None
    exitcode: int | None = None

    def describe(self) -> str:
        where = ", ".join(x for x in (f"local rank {self.local_rank}" if self.local_rank is not None else "",
                                      f"host {self.host}" if self.host else "",
                                      f"pid {self.pid}" if self.pid else "") if x)
        how = "exited"
        if self.exitcode is not None and self.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-self.exitcode}"
        elif self.exitcode is not None:
            how = f"exited with code {self.exitcode}"
        return f"rank {self.rank}" + (f" ({where})" if where else "") + f" {how}"


_ROOT = re.compile(r"Root Cause \(first observed failure\):(?P<body>.*)", re.S)
_RANK = re.compile(r"rank\s*:\s*(-?\d+)\s*\(local_rank:\s*(-?\d+)\)")
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")
_HOST = re.compile(r"host\s*:\s*(\S+)")
_HANG = re.compile(r"hang: rank\(s\) (?P<ranks>[\d, ]+) did not arrive.*?Python stacks of every rank: (?P<stacks>\S+)")


def parse_torchrun_failure(text: str) -> Failure | None:
    """The root-cause rank from torchrun's ``ChildFailedError`` report, if the text holds one."""
    m = _ROOT.search(text)
    if not m:
        return None
    body = m["body"]
    rank = _RANK.search(body)
    if not rank:
        return None
    exit_ = _EXIT.search(body)
    host = _HOST.search(body)
    return Failure(rank=int(rank[1]), local_rank=int(rank[2]), host=host[1] if host else None,
                   pid=int(exit_[2]) if exit_ else None, exitcode=int(exit_[1]) if exit_ else None)


@dataclass
class _Watch:
    """What the monitor learns about one torchrun process while it runs."""

    tail: bytearray = field(default_factory=bytearray)
    ranks: dict[int, int] = field(default_factory=dict)  # pid -> global rank, of workers seen alive
    world_size: int | None = None
    first_gone: Failure | None = None


def _pump(stream, sink, watch: _Watch) -> None:  # noqa: ANN001
    """Copy torchrun's stderr through unchanged (progress bars too) and keep the last 64 KiB to parse."""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        sink.write(chunk)
        sink.flush()
        watch.tail += chunk
        del watch.tail[:-65536]


def _poll_workers(proc: subprocess.Popen, watch: _Watch, stop: threading.Event) -> None:
    """Map worker pids to ranks (from their RANK env) and note the first one that disappears."""
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; without it only torchrun's report is used
        return
    try:
        agent = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while not stop.wait(0.5):
        try:
            children = agent.children()
        except psutil.Error:
            return
        alive = set()
        for child in children:
            alive.add(child.pid)
            if child.pid not in watch.ranks:
                try:
                    env = child.environ()
                except psutil.Error:
                    continue
                if "RANK" in env:
                    watch.ranks[child.pid] = int(env["RANK"])
                    watch.world_size = int(env.get("WORLD_SIZE", "0")) or None
        if watch.first_gone is None:
            for pid, rank in watch.ranks.items():
                if pid not in alive:
                    watch.first_gone = Failure(rank=rank, host=socket.gethostname(), pid=pid)
                    break


def monitor(commands: list[tuple[str, list[str]]], env: dict[str, str] | None = None, rendezvous: str = "",
            say=print) -> int:  # noqa: ANN001
    """Run one torchrun (or ssh) command per host; when one fails, stop the rest and name the failed rank.

    Returns the exit code to leave with: 0, or the first failure's (never 0 after a failure).
    """
    full_env = {**os.environ, **(env or {})}
    procs: list[tuple[str, subprocess.Popen, _Watch, threading.Event]] = []
    threads = []
    for host, cmd in commands:
        proc = subprocess.Popen(cmd, env=full_env, stderr=subprocess.PIPE)
        watch, stop = _Watch(), threading.Event()
        threads.append(threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer, watch), daemon=True))
        threads.append(threading.Thread(target=_poll_workers, args=(proc, watch, stop), daemon=True))
        procs.append((host, proc, watch, stop))
    for t in threads:
        t.start()
    start = time.monotonic()
    failed: tuple[str, subprocess.Popen, _Watch] | None = None
    try:
        while True:
            running = [p for _, p, _, _ in procs if p.poll() is None]
            bad = [(h, p, w) for h, p, w, _ in procs if p.returncode not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if not running:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, p, _, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, p, _, _ in procs:
            p.wait()
        raise
    finally:
        if failed is not None:  # the other hosts' agents would wait for their peers until a timeout
            for _, p, _, _ in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 30
            for _, p, _, _ in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        for _, p, _, stop in procs:
            p.wait()
            stop.set()
        for t in threads:
            t.join(timeout=5)
    if failed is None:
        for host, _, watch, _ in procs:
            ranks = ", ".join(map(str, sorted(watch.ranks.values())))
            if ranks:
                say(f"launch: {host}: rank(s) {ranks} of a {watch.world_size}-process job finished "
                    f"in {time.monotonic() - start:.0f} s")
        return 0
    host, proc, watch = failed
    elapsed = time.monotonic() - start
    text = watch.tail.decode("utf-8", "replace")
    failure = parse_torchrun_failure(text) or watch.first_gone
    hang = _HANG.search(text)
    if hang:  # a rank alive but stuck: the ranks that timed out waiting for it are not the news
        who = hang["ranks"].replace(" ", "")
        say(f"error: rank {who} did not arrive at a collective (alive but stuck); the others waited in it until the "
            f"collective timeout{', then ' + failure.describe() if failure else ''}. Python stacks of every rank: "
            f"{hang['stacks']} (exit code {proc.returncode} after {elapsed:.0f} s)")
    elif failure is not None:
        if failure.host is None and host and not is_local(host):
            failure.host = host
        say(f"error: {failure.describe()}; torchrun stopped the other ranks (exit code {proc.returncode} "
            f"after {elapsed:.0f} s)")
    elif not watch.ranks and "trying to connect to" in text:
        say(f"error: node {host}: could not reach the master {rendezvous or ''} (nothing listens there, or a "
            f"firewall is in the way; exit code {proc.returncode} after {elapsed:.0f} s)")
    elif not watch.ranks and any(s in text for s in ("Rendezvous", "DistNetworkError", "TimeoutError")):
        say(f"error: node {host}: the rendezvous{' at ' + rendezvous if rendezvous else ''} did not complete: the "
            f"master was not reachable, or not every node joined in time (exit code {proc.returncode} after "
            f"{elapsed:.0f} s)")
    else:
        say(f"error: node {host}: torchrun exited with code {proc.returncode} after {elapsed:.0f} s")
    return proc.returncode or 1


# ---------------------------------------------------------------------------------------------- entry
