"""Hostile clients against a real server (tiny preset, CPU): no 5xx, nothing touched outside the studies.

One server, started like tests/conftest.py but on an "arena": a folder holding the studies and the
sibling files and folders the attacks aim at (path ids, traversal tags, detached NRRD data, ...).
Its temp folder (TMPDIR) is private, so upload temp files left behind are seen. A lock file naming a
live stand-in "trainer" is left before the start: the server must stop that orphan.
The test sends >= 300 generated requests (tests/fuzz_cases.py), then asserts:
- no answer is 5xx; a path that exists and one that does not get the same answer;
- the arena outside studies/ hashes the same, and the server's temp folder is empty;
- the server's peak RSS (sampled every 20 ms) stays within MEMORY_BUDGET of its start;
- the server still answers /info and a valid infer; it prints counts by category and status.
"""
from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import ROOT, _kill_tree, launch_server
from tests.fuzz_cases import build_cases, write_arena

MEMORY_BUDGET = 600 << 20        # bytes above the idle server's RSS (an unguarded 1000^3 header: +5.7 GB)
MAX_VOXELS = 2_000_000


def _tree_hash(folder: Path, skip: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


class PeakRSS(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)


@pytest.fixture(scope="module")
def arena_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    arena, train_dir, tmp = work / "arena", work / "train", work / "tmp"
    tmp.mkdir()
    train_dir.mkdir()
    files = write_arena(arena)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    threading.Thread(target=orphan.wait, daemon=True).start()          # reap it when the server stops it
    p = psutil.Process(orphan.pid)
    (train_dir / "trainer.lock").write_text(json.dumps({"pid": p.pid, "started": p.create_time()}))
    proc, url, log = launch_server(
        work, arena / "studies",
        {"TMPDIR": str(tmp), "SDFSMIS_PSEUDOLABEL_CACHE": str(work / "pl"), "MONAI_LABEL_SESSION_PATH": str(work / "sessions")},
        "--conf", "preset", "tiny", "--conf", "train_dir", str(train_dir), "--conf", "max_voxels", str(MAX_VOXELS),
        "--conf", "chain", "false")
    try:
        yield {"url": url, "arena": arena, "files": files, "tmp": tmp, "proc": proc, "log": log,
               "orphan": orphan, "train_dir": train_dir}
    finally:
        _kill_tree(proc)
        if orphan.poll() is None:
            orphan.kill()


def _send(url: str, case: dict) -> requests.Response:
    files = {k: (name, data) for k, (name, data) in (case.get("files") or {}).items()}
    if case.get("multi_files"):
        files = [("files", (name, data)) for name, data in case["multi_files"]]
    data, headers = case.get("data"), case.get("headers")
    if case.get("json") is not None:   # written out here: 1e999 becomes Infinity, which requests refuses
        data, headers = json.dumps(case["json"]), {"Content-Type": "application/json"}
    return requests.request(case["method"], url + case["path"], params=case.get("query"), data=data,
                            files=files or None, headers=headers, timeout=120)


def test_hostile_requests(arena_server):
    url, arena, studies = arena_server["url"], arena_server["arena"], arena_server["arena"] / "studies"
    assert arena_server["orphan"].poll() is not None or \
        psutil.Process(arena_server["orphan"].pid).status() == psutil.STATUS_ZOMBIE, \
        "the orphan trainer named in the lock file was not stopped at start-up"
    assert not (arena_server["train_dir"] / "trainer.lock").exists()
    before = _tree_hash(arena, studies)
    tmp_before = set(arena_server["tmp"].iterdir())
    cases = build_cases(arena, arena_server["files"])
    assert len(cases) >= 300

    server = psutil.Process(arena_server["proc"].pid)
    baseline = server.memory_info().rss
    sampler = PeakRSS(server.pid)
    sampler.start()
    counts, failures, probe, bomb_peak = collections.Counter(), [], {}, 0
    for case in cases:
        if case["category"] == "memory bomb":
            sampler.peak = 0
        r = _send(url, case)
        if case["category"] == "memory bomb":
            time.sleep(0.05)
            bomb_peak = max(bomb_peak, sampler.peak)
        counts[(case["category"], r.status_code)] += 1
        if r.status_code >= 500 or (case.get("expect") and r.status_code not in case["expect"]):
            failures.append(f"{case['category']}: {case['method']} {case['path']} {case.get('query')} "
                            f"{case.get('data') or case.get('json')} -> {r.status_code} {r.text[:300]}")
        if case.get("probe"):
            probe.setdefault(case["probe"][0], {})[case["probe"][1]] = (r.status_code, r.text)
        for root in (str(arena), str(arena_server["tmp"]), str(ROOT)):
            if root in r.text[:200000] and "application/json" in r.headers.get("content-type", ""):
                failures.append(f"{case['category']}: answer shows a server path: {r.text[:300]}")
    sampler.stop.set()
    sampler.join()

    print(f"\n{len(cases)} hostile requests; server RSS {baseline / 2**20:.0f} MiB at start, peak "
          f"{sampler.peak / 2**20:.0f} MiB; during the 1000^3-voxel headers {bomb_peak / 2**20:.0f} MiB")
    for category in sorted({c for c, _ in counts}):
        by_status = {s: n for (c, s), n in sorted(counts.items()) if c == category}
        print(f"  {category:<24} {sum(by_status.values()):>4}  {by_status}")

    assert not failures, "\n".join(failures[:30])
    for name, answers in probe.items():   # an existing and a missing path answer alike
        assert len({s for s, _ in answers.values()}) == 1, f"{name}: {answers}"
    assert sampler.peak - baseline < MEMORY_BUDGET, f"peak RSS {sampler.peak / 2**20:.0f} MiB"
    after = _tree_hash(arena, studies)
    assert after == before, f"files outside the studies changed: {set(after.items()) ^ set(before.items())}"
    deadline = time.monotonic() + 10
    while set(arena_server["tmp"].iterdir()) - tmp_before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = set(arena_server["tmp"].iterdir()) - tmp_before
    assert not left, f"temp files left: {sorted(p.name for p in left)}"

    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    ok = requests.post(f"{url}/infer/sdfsmis", params={"image": "phantom_1", "output": "json"},
                       data={"params": "{}"}, timeout=120)
    assert ok.status_code == 200, ok.text
