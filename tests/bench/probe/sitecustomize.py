"""Measurement probe loaded into a tproxy process by the benchmark (PYTHONPATH=tests/bench/probe), never by tproxy.

Active only when ``TPX_BENCH_PROBE_OUT`` is set: records every garbage-collector pause (count, total, max, pauses
over 1 ms, per generation; and when each pause over 2 ms ended) and writes them as JSON to that path when the process
exits. ``TPX_BENCH_GC`` changes the
collector for an experiment: ``threshold=N`` (gen0 threshold), ``freeze=S`` (``gc.freeze()`` S seconds after start,
moving everything allocated at startup out of the collector's sight), ``off`` (gc disabled).
With ``TPX_BENCH_CENSUS=1``, SIGUSR2 writes a census of live Python objects by type and the top allocation sites
(tracemalloc, started at startup) to ``TPX_BENCH_PROBE_OUT + ".census.json"``: divided by the connections held,
it says what a connection costs in Python objects.
"""

import os

if os.environ.get("TPX_BENCH_PROBE_OUT"):
    import atexit
    import gc
    import json
    import threading
    import time

    _out = os.environ["TPX_BENCH_PROBE_OUT"]
    _stats = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "over_1ms": 0, "over_5ms": 0} for g in (0, 1, 2)}
    _t0 = [0.0]
    _pauses: list = []  # (unix time at the end, generation, ms) of pauses over 2 ms, at most 5,000

    def _cb(phase: str, info: dict) -> None:
        if phase == "start":
            _t0[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _t0[0]) * 1000
        s = _stats[info["generation"]]
        s["count"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        s["over_1ms"] += ms > 1
        s["over_5ms"] += ms > 5
        if ms > 2 and len(_pauses) < 5000:
            _pauses.append((round(time.time(), 3), info["generation"], round(ms, 2)))

    gc.callbacks.append(_cb)
    for part in filter(None, os.environ.get("TPX_BENCH_GC", "").split(",")):
        key, _, value = part.partition("=")
        if key == "threshold":
            gc.set_threshold(int(value), *gc.get_threshold()[1:])
        elif key == "off":
            gc.disable()
        elif key == "freeze":
            threading.Timer(float(value), gc.freeze).start()

    if os.environ.get("TPX_BENCH_CENSUS"):
        import collections
        import signal
        import tracemalloc

        tracemalloc.start(1)

        def _census(signum, frame) -> None:
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            stats = tracemalloc.take_snapshot().statistics("lineno")
            doc = {
                "types": dict(counts.most_common(80)),
                "sites": {f"{st.traceback[0].filename}:{st.traceback[0].lineno}": st.size for st in stats[:80]},
                "traced_bytes": tracemalloc.get_traced_memory()[0],
            }
            tmp = _out + ".census.tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, _out + ".census.json")

        signal.signal(signal.SIGUSR2, _census)

    @atexit.register
    def _write() -> None:
        with open(_out, "w") as f:
            doc = {"gc": _stats, "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "pauses": _pauses}
            json.dump(doc, f)
