#!/usr/bin/env python3
"""The real stages, timed: wall time of convert, calibrate and image for one observation of
the test data, and the pipeline's own time around them, from the ledger's events.

    target/ci-venv/bin/python tools/bench_stages.py [--runs 3] [--bin target/release/contimg]

Each run writes three observations with tools/stages/make_test_data.py (seed 110), serves
a fresh ledger with tools/stages/dsa110.toml (the stages' python3 is this interpreter),
delivers the 48 files at once and waits until the mosaic over them is published. From the
events' commit times:

- stage: StageCompleted.duration_s of each stage (the command's own wall time);
- ingest: the first SubbandFileAccepted of an observation to its GroupFormed (the files'
  settle time, ingest.stable_s = 0.5 s here, is configuration, not work, and not counted);
- scheduling: the worker's idle time before each stage: from the later of the last
  StageCompleted (of any group: one worker runs one stage at a time) and the group's
  GroupFormed, to its StageStarted (waiting behind another group's stage is not counted);
- safeguards: the last member's image StageCompleted to MosaicGroupCreated;
- mosaic: the mosaicker's StageCompleted.duration_s (Rust, in process);
- registration and publish: StageCompleted (image, mosaic) to ProductRegistered, and
  ProductRegistered to PublishSucceeded.

The pipeline's overhead is everything but the three external stages, as a fraction of the
whole (the three stages plus it). Medians over the runs are printed as a table.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = os.path.join(ROOT, "tools", "stages")


def t(e):
    return datetime.fromisoformat(e["created"].replace("Z", "+00:00")).timestamp()


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def one_run(binary, workdir):
    gen = os.path.join(workdir, "gen")
    subprocess.run(
        [sys.executable, os.path.join(STAGES, "make_test_data.py"), gen, "--observations", "3", "--seed", "110"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    data = os.path.join(workdir, "var")
    config = os.path.join(workdir, "contimg.toml")
    with open(os.path.join(STAGES, "dsa110.toml")) as f:
        stages = f.read()
    with open(config, "w") as f:
        f.write("[ingest]\npoll_interval_s = 0.2\nstable_s = 0.5\n[mosaic]\ntiles = 3\noverlap = 0\n\n" + stages)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["CONTIMG_STAGES"] = STAGES
    env["CONTIMG_SKY_MODEL"] = os.path.join(gen, "skymodel.csv")
    env["CONTIMG_LOG"] = "warn"
    server = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--config", config],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = server.stdout.readline().strip()
        base = line.removeprefix("contimg: listening on ")
        incoming = os.path.join(data, "incoming")
        os.makedirs(incoming, exist_ok=True)
        names = sorted(n for n in os.listdir(gen) if n.endswith(".hdf5"))
        for n in names:
            shutil.copy(os.path.join(gen, n), os.path.join(incoming, "." + n))
        for n in names:
            os.rename(os.path.join(incoming, "." + n), os.path.join(incoming, n))
        deadline = time.time() + 600
        while True:
            events = get(base, "/api/events?from=0&limit=10000")["events"]
            if any(e["eventType"] == "PublishSucceeded" and e["streamId"].startswith("product-mosaic-") for e in events):
                break
            if time.time() > deadline:
                raise SystemExit("no mosaic published within 600 s")
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return figures(events)


def figures(events):
    by_stream = {}
    for e in events:
        by_stream.setdefault(e["streamId"], []).append(e)
    out = {"convert": [], "calibrate": [], "image": [], "mosaic": [], "ingest": [], "scheduling": [],
           "safeguards": [], "registration": [], "publish": []}
    first_accept = {}
    for e in events:
        if e["eventType"] == "SubbandFileAccepted":
            key = e["data"]["group_obs_time"]
            first_accept.setdefault(key, t(e))
    image_done = {}
    formed_at = {}
    for stream, es in by_stream.items():
        if not stream.startswith("group-"):
            continue
        formed = next(e for e in es if e["eventType"] == "GroupFormed")
        formed_at[stream] = t(formed)
        out["ingest"].append(t(formed) - first_accept[formed["data"]["obs_time"]])
        for e in es:
            if e["eventType"] == "StageCompleted":
                out[e["data"]["stage"]].append(e["data"]["duration_s"])
                if e["data"]["stage"] == "image":
                    image_done[stream.removeprefix("group-")] = t(e)
    # The worker's idle time before each stage it starts (events are in log order).
    last_done = 0.0
    for e in events:
        if e["eventType"] == "StageCompleted":
            last_done = t(e)
        elif e["eventType"] == "StageStarted":
            ready = max(last_done, formed_at.get(e["streamId"], 0.0))
            out["scheduling"].append(t(e) - ready)
    for stream, es in by_stream.items():
        if stream.startswith("mosaic-"):
            created = next(e for e in es if e["eventType"] == "MosaicGroupCreated")
            members = created["data"]["members"]
            out["safeguards"].append(t(created) - max(image_done[m] for m in members))
            for e in es:
                if e["eventType"] == "StageCompleted":
                    out["mosaic"].append(e["data"]["duration_s"])
                    image_done[stream] = t(e)
    for stream, es in by_stream.items():
        if not stream.startswith("product-"):
            continue
        reg = next((e for e in es if e["eventType"] == "ProductRegistered"), None)
        ok = next((e for e in es if e["eventType"] == "PublishSucceeded"), None)
        if reg is None or ok is None:
            continue
        source = reg["data"]["metadata"].get("group_id") or "mosaic-" + reg["data"]["metadata"].get("mosaic_id", "")
        if source in image_done:
            out["registration"].append(t(reg) - image_done[source])
        out["publish"].append(t(ok) - t(reg))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "contimg"))
    a = p.parse_args()
    runs = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="contimg-stages-") as d:
            start = time.time()
            runs.append(one_run(a.bin, d))
            print(f"run {i + 1}: {time.time() - start:.1f} s, writing the test data and starting the server included", flush=True)
    med = {k: statistics.median([statistics.mean(r[k]) for r in runs if r[k]]) for k in runs[0]}
    stages = med["convert"] + med["calibrate"] + med["image"]
    # Per observation: ingest, 3 stage starts, registration and publish of its image; the
    # mosaic's share (safeguards, build, its registration and publish) split over its 3.
    overhead = med["ingest"] + 3 * med["scheduling"] + med["registration"] + med["publish"] \
        + (med["safeguards"] + med["mosaic"] + med["scheduling"]) / 3
    print(f"\nmedian over {a.runs} runs, seconds per observation (mean over its 3 observations in a run):\n")
    print("| part | s |\n|---|---|")
    for k in ("convert", "calibrate", "image"):
        print(f"| {k} (external) | {med[k]:.2f} |")
    for k in ("ingest", "scheduling", "safeguards", "mosaic", "registration", "publish"):
        print(f"| {k} | {med[k]:.3f} |")
    print(f"| **pipeline overhead per observation** | {overhead:.3f} ({100 * overhead / (overhead + stages):.1f}% of {overhead + stages:.2f} s) |")


if __name__ == "__main__":
    main()
