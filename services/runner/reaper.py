"""The runner's reaper: a tiny process that SIGKILLs the job process groups of a runner
that died. Run as a file (`python -I -S reaper.py`), not imported by it: stdlib only.

The runner writes `+PGID` (a job's process group started) and `-PGID` (it ended) lines
to our stdin, a pipe only the runner holds the write end of, read every INTERVAL_S (see
main). End of file means the runner is gone - SIGKILLed included, since the kernel closes
a dead process's descriptors - so every group still held is SIGKILLed, the job's
grandchildren with it, and we exit. A runner that stops cleanly has said `-` for each of
its jobs first: nothing is killed.

SIGINT, SIGTERM and SIGHUP are ignored: a Ctrl-C in a terminal or a service manager's
SIGTERM to every process must not take us away before the runner, whose end we watch.
"""

from __future__ import annotations

import os
import signal
import time

READY = b"ready\n"
# How often the pipe is read; 64 KiB of pipe buffer hold thousands of 8-byte lines.
INTERVAL_S = 0.05


def serve(fd: int, interval_s: float = 0.0) -> set[int]:
    """Read commands from `fd` until end of file; return the groups still held. With an
    `interval_s`, `fd` is read without blocking, every `interval_s` seconds."""
    held: set[int] = set()
    pending = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(interval_s)
            continue
        if not data:
            return held
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            # Never a "group" that means more than one job: 0 is our own, 1 and below
            # would be init or every process we may signal.
            if pgid <= 1:
                continue
            if line[:1] == b"+":
                held.add(pgid)
            elif line[:1] == b"-":
                held.discard(pgid)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # The runner waits for this before it starts any job: we are up, and deaf to those.
    os.write(1, READY)
    os.close(1)
    # Polled rather than blocking in read: a write to a pipe whose reader sleeps in read()
    # wakes it, and on busy cores the runner then often loses its CPU to us right in the
    # middle of starting a job (seen in its profile). Polled, the runner's writes wake
    # nobody; the price is a kill up to INTERVAL_S after the runner died.
    os.set_blocking(0, False)
    for pgid in serve(0, INTERVAL_S):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:  # already gone
            pass


if __name__ == "__main__":
    main()
