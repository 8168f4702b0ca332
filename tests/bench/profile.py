"""Profiling the tproxy subjects under load (``--profile DIR``): py-spy samples and a syscall count per load.

While a tproxy subject runs the keep-alive and new-connection loads, ``py-spy record --nonblocking`` samples its
Python stacks (collapsed "raw" format, one file per subject, load and round). :func:`summarize` turns such a file into
the functions that take the most time by themselves (self) and including their callees (inclusive), in percent of
the samples. py-spy is not a dependency of tproxy: ``.venv/bin/pip install py-spy``.

``python -m tests.bench.profile FILE...`` prints the summary of existing files.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def py_spy() -> str | None:
    exe = REPO / ".venv" / "bin" / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def start(pid: int, duration: float, out: Path, rate: int = 250) -> subprocess.Popen | None:
    exe = py_spy()
    if exe is None:
        return None
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))), "--rate", str(rate)]
    argv += ["--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(p: subprocess.Popen | None) -> None:
    if p is None:
        return
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


_OUTER = ("core.py:", "main.py:", "cli.py:", "__main__.py:", "<frozen runpy>:", "_run.py:run", "runner.py:run")


def _frame_name(frame: str, line: bool = False) -> str:
    # py-spy raw frames: "function (path/to/file.py:123)"; keep "file.py:function" (and ":123" with ``line``).
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    file, _, lineno = where.rstrip(")").partition(":")
    file = file.rsplit("/", 1)[-1]
    return f"{file}:{name}:{lineno}" if line else f"{file}:{name}"


def summarize(path: Path, top: int = 15) -> str:
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        raw = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not raw:
            continue
        total += n
        self_t[_frame_name(raw[-1], line=True)] += n
        for f in {_frame_name(f) for f in raw}:
            if not f.startswith(_OUTER):
                incl[f] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples", "  self (file:function:line; time in C calls counts as the caller's):"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
        print()
