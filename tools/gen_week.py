#!/usr/bin/env python3
"""Writes one week of DSA-110-like load as a contimg export (JSON Lines) on stdout.

2016 observation groups (one every 5 minutes): 16 subband files accepted each, the group
formed, convert/calibrate/image stages started and completed; an image product per group
and a mosaic every 8 groups, each registered and published; one in 33 publishes fails
once with a full disk and is published by the retry a minute later.

    tools/gen_week.py [START] > week.jsonl     (START default 2026-11-16T00:00:00Z)
"""
import datetime
import json
import sys
import uuid

start = datetime.datetime.fromisoformat((sys.argv[1] if len(sys.argv) > 1 else "2026-11-16T00:00:00Z").replace("Z", "+00:00"))
events = []


def push(stream, kind, data, at):
    events.append((at, len(events), stream, kind, data))


for i in range(2016):
    t0 = start + datetime.timedelta(minutes=5 * i)
    ts = t0.strftime("%Y-%m-%dT%H:%M:%S")
    ingest = "ingest-" + t0.strftime("%Y-%m-%d")
    for sb in range(16):
        push(ingest, "SubbandFileAccepted",
             {"path": "/data/incoming/%s_sb%02d.hdf5" % (ts, sb), "obs_time": ts, "subband": sb, "size_bytes": 1_200_000_000},
             t0 + datetime.timedelta(seconds=sb))
    group = "group-" + ts
    t = t0 + datetime.timedelta(seconds=20)
    push(group, "GroupFormed", {"group_id": ts, "obs_time": ts, "files": []}, t)
    for k, stage in enumerate(["convert", "calibrate", "image"]):
        push(group, "StageStarted", {"stage": stage, "attempt": 1}, t)
        duration = 60.0 + 30 * k + (i % 13)
        t = t + datetime.timedelta(seconds=duration)
        push(group, "StageCompleted", {"stage": stage, "attempt": 1, "duration_s": duration}, t)
    for kind, delay in [("image", 0)] + ([("mosaic", 30)] if i % 8 == 7 else []):
        pid = ("img_" if kind == "image" else "mos_") + ts
        stream = "product-" + pid
        tr = t + datetime.timedelta(seconds=delay)
        push(stream, "ProductRegistered",
             {"data_id": pid, "data_type": kind, "stage_path": "/data/stage/%s.fits" % pid,
              "qa_status": "passed", "validation_status": "validated"}, tr)
        tp = tr + datetime.timedelta(seconds=2)
        push(stream, "PublishStarted", {"attempt": 1, "destination": "/data/products/x", "trigger": "auto"}, tp)
        if i % 33 == 0:
            push(stream, "PublishFailed", {"attempt": 1, "error": "copying into the products root: No space left on device (os error 28)", "retryable": True}, tp)
            tp = tp + datetime.timedelta(seconds=60)
            push(stream, "PublishStarted", {"attempt": 2, "destination": "/data/products/x", "trigger": "auto"}, tp)
        push(stream, "PublishSucceeded", {"published_path": "/data/products/x"}, tp)

# Commit order is time order (stable for equal times); revisions count per stream.
events.sort(key=lambda e: (e[0], e[1]))
revisions = {}
for position, (at, _, stream, kind, data) in enumerate(events):
    revision = revisions.get(stream, 0)
    revisions[stream] = revision + 1
    print(json.dumps({"eventId": str(uuid.uuid4()), "eventType": kind, "eventVersion": 1, "streamId": stream,
                      "eventNumber": revision, "position": position, "created": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                      "data": data, "metadata": {"actor": "pipeline"}}))
