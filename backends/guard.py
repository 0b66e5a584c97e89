"""The watchdog between the router and one managed server: the server dies with the router, however the
router ends (`kill -9` included), and takes its worker processes with it.

    python guard.py --parent PID --grace S -- COMMAND ...

The launcher starts this in a new session, so the guard leads a process group that holds the server and
every process the server starts (vLLM's engine core). The guard asks Linux for a signal when its parent
dies (`prctl(PR_SET_PDEATHSIG)`) and also polls its parent's pid (for other systems, and for the moment
before the prctl). On that signal, on SIGTERM, SIGINT or SIGHUP, when the parent is gone, or when the
server exits by itself, it stops the whole group: SIGTERM, `--grace` seconds, then SIGKILL. Its exit
status is the server's (or 128 + the signal that stopped it).

Standalone on purpose (stdlib only): it must not import the router, and it is small enough to trust.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def die_with_parent(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when the thread that forked it ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def group_members(pgid: int) -> list[int]:
    """Pids of the process group (from /proc), this process left out."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def signal_group(pgid: int, sig: int) -> None:
    members = group_members(pgid)
    if not members and not os.path.isdir("/proc"):
        os.killpg(pgid, sig)  # no /proc: the whole group, this process included
        return
    for pid in members:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_group(child: subprocess.Popen[bytes], grace_s: float) -> None:
    pgid = os.getpgid(0)
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.poll()
        if not group_members(pgid):
            return
        time.sleep(POLL_S)
    signal_group(pgid, signal.SIGKILL)
    child.poll()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True, help="the router's pid: when it is gone, stop")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")

    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != args.parent:  # the router died before the prctl
        return 128 + signal.SIGTERM

    # The server too gets SIGTERM if this guard dies (so even a SIGKILL of the guard stops the server).
    child = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    code: int | None = None
    while code is None and not stopping and os.getppid() == args.parent:
        code = child.poll()
        if code is None:
            time.sleep(POLL_S)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # stopping now: the group's SIGTERM is for the others
    stop_group(child, min(2.0, args.grace) if code is not None else args.grace)
    if code is None:
        code = child.poll()
    if stopping or os.getppid() != args.parent:
        return 128 + (stopping[0] if stopping else signal.SIGTERM)
    return code if code is not None and code >= 0 else 128 + (-(code or 0))


if __name__ == "__main__":
    sys.exit(main())
