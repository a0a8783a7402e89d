"""Concurrency through the real server: latency of 1, 4 and 10 simultaneous infer clients, and how
fast `/info/` and `/datastore/` answer while they run.

    python -m benchmarks.concurrency [--clients 1 4 10] [--conf model_workers 0]

Writes a phantom study (lib.sample: 128 x 128 x 24 volumes, one annotated slice), starts
`monailabel start_server --app apps/sdfsmis` on it (the app's default model and settings, one torch
thread), warms up, then for each client count starts that many `POST /infer/sdfsmis` at once while a
poller asks `GET /info/` and `GET /datastore/` every 0.2 s. Prints per-client latency percentiles,
whether requests finished in arrival order, the poll latencies, and a JSON line per client count.
`--conf model_workers 0` serves infers inside the request's coroutine, as MONAI Label 0.8.5 does on
its own (the "before").
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, emit_json, load_average, running_server

POLL_TIMEOUT_S = 120.0   # a poll unanswered this long counts as this long (the loop was blocked)


def _call(url: str, method: str = "GET", timeout: float = 600) -> float:
    """-> seconds until the whole answer was read (HTTP errors raise)."""
    start = time.perf_counter()
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
    return time.perf_counter() - start


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def round_of(base: str, image: str, clients: int) -> dict:
    """`clients` infers started together (0.05 s apart, in order) + a poller of /info/ and /datastore/."""
    done: list[tuple[int, float, float]] = []   # (client, latency, finish time)
    polls: dict[str, list[float]] = {"info": [], "datastore": []}
    stop = threading.Event()

    def client(i: int) -> None:
        latency = _call(f"{base}/infer/sdfsmis?image={image}&output=json", "POST")
        done.append((i, latency, time.perf_counter()))

    def poll(key: str, url: str) -> None:
        try:
            polls[key].append(_call(url, timeout=POLL_TIMEOUT_S))
        except OSError:                  # no answer within the timeout: recorded as the timeout
            polls[key].append(POLL_TIMEOUT_S)

    def poller() -> None:
        while not stop.is_set():
            poll("info", f"{base}/info/")
            poll("datastore", f"{base}/datastore/")
            time.sleep(0.2)

    watch = threading.Thread(target=poller)
    watch.start()
    threads = []
    for i in range(clients):
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    lat = [d[1] for d in done]
    order = [d[0] for d in sorted(done, key=lambda d: d[2])]
    return {"clients": clients, "p50_s": _pct(lat, 50), "p90_s": _pct(lat, 90), "max_s": max(lat),
            "min_s": min(lat), "in_arrival_order": order == sorted(order),
            "info_p50_s": _pct(polls["info"], 50), "info_max_s": max(polls["info"], default=float("nan")),
            "datastore_max_s": max(polls["datastore"], default=float("nan")), "polls": len(polls["info"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 10])
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="extra --conf for the server, e.g. --conf model_workers 0")
    args = ap.parse_args(argv)
    from lib.sample import write_sample

    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    write_sample(work / "studies", n=2)
    with running_server(work / "studies", work / "server.log", conf=args.conf, env={"OMP_NUM_THREADS": "1"}) as (base, _):
        _call(f"{base}/infer/sdfsmis?image=phantom_1&output=json", "POST")   # warm-up
        print(f"# device: {device_name(torch.device('cpu'))} | load {load_average()} | server conf {dict(args.conf) or 'default'}")
        print("| clients | p50 s | p90 s | max s | arrival order | /info/ p50 s | /info/ max s | /datastore/ max s |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for n in args.clients:
            r = round_of(base, "phantom_1", n)
            rows.append(r)
            print(f"| {n} | {r['p50_s']:.2f} | {r['p90_s']:.2f} | {r['max_s']:.2f} | {r['in_arrival_order']} | "
                  f"{r['info_p50_s']:.3f} | {r['info_max_s']:.3f} | {r['datastore_max_s']:.3f} |")
        for r in rows:
            emit_json({"benchmark": "concurrency", "conf": dict(args.conf), **r})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
