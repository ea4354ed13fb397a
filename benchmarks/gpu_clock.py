"""The GPU's SM clock and power draw while a benchmark runs, per system.

On a power-capped GPU the time of a kernel depends on what the whole run draws: the H200 runs a
LLaMA-3-8B prefill at its 700 W cap, and a variant that draws more power lowers the clock for every
kernel of the forward (benchmarks/results/h200_fused_expand: median 1695 vs 1755 MHz), which a
benchmark of short bursts does not show. ``ClockLog`` runs ``nvidia-smi`` in the background,
sampling every ``period_ms``, and attributes each sample to the labelled time window (e.g. one
graph replay of one system) it falls in:

    with ClockLog() as clocks:
        ...
        with clocks.window("meteora"):
            graph.replay(); torch.cuda.synchronize()
    clocks.summary()   # {"meteora": {"clock_mhz": ..., "power_w": ..., "samples": ...}, ...}

Without nvidia-smi (or on a CPU machine) it records nothing and ``summary()`` is empty.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import statistics
import subprocess
import threading
import time


def parse_sample(line: str) -> tuple[float, float, float] | None:
    """One ``timestamp, clocks.sm, power.draw`` CSV line (noheader, nounits) -> (epoch seconds,
    MHz, W); None for anything else (a header, "[N/A]", a driver message)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1]), float(parts[2])
    except ValueError:
        return None


def attribute(samples, windows) -> dict[str, dict]:
    """Median SM clock and power of the samples inside each label's windows.

    samples: (epoch s, MHz, W); windows: (label, start, end) in epoch seconds."""
    by_label: dict[str, list[tuple[float, float]]] = {}
    ordered = sorted(windows, key=lambda w: w[1])
    for t, mhz, watts in samples:
        for label, start, end in ordered:
            if start <= t <= end:
                by_label.setdefault(label, []).append((mhz, watts))
                break
    return {label: dict(clock_mhz=statistics.median(m for m, _ in values),
                        power_w=statistics.median(w for _, w in values), samples=len(values))
            for label, values in by_label.items()}


class ClockLog:
    """``command`` replaces the nvidia-smi command line (tests); it must print parse_sample's lines."""

    def __init__(self, period_ms: int = 50, device: str | int | None = None, command: list[str] | None = None):
        self.period_ms = period_ms
        self.device = device
        self.command = command
        self.samples: list[tuple[float, float, float]] = []
        self.windows: list[tuple[str, float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def _command(self) -> list[str] | None:
        if self.command is not None:
            return self.command
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        cmd = [exe, "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
               "-lms", str(self.period_ms)]
        return cmd + (["-i", str(self.device)] if self.device is not None else [])

    def __enter__(self) -> "ClockLog":
        cmd = self._command()
        if cmd is None:
            return self
        # A pseudo-terminal as its stdout: written to a pipe, nvidia-smi's lines would wait in a 4 KB
        # buffer (seconds of samples) and the last ones be lost when it is stopped.
        try:
            import pty

            master, slave = pty.openpty()
        except (ImportError, OSError):
            master, slave = None, subprocess.PIPE
        try:
            self._proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError:
            if master is not None:
                os.close(master)
                os.close(slave)
            return self
        if master is not None:
            os.close(slave)
            stream = os.fdopen(master, "rb", buffering=0)
        else:
            stream = self._proc.stdout
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()
        return self

    def _read(self, stream) -> None:
        with stream:
            try:
                for line in stream:
                    sample = parse_sample(line.decode(errors="replace"))
                    if sample is not None:
                        self.samples.append(sample)
            except OSError:  # the pseudo-terminal's other end closed
                pass

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            time.sleep(2 * self.period_ms / 1000)  # the samples of the last window
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            if self._reader is not None:
                self._reader.join(timeout=5)
            self._proc = None

    @contextlib.contextmanager
    def window(self, label: str):
        start = time.time()
        try:
            yield
        finally:
            self.windows.append((label, start, time.time()))

    def summary(self) -> dict[str, dict]:
        return attribute(self.samples, self.windows)
