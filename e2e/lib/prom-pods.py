#!/usr/bin/env python3
"""Prometheus's targets for the chart's pods on the local environment's
kubelet nodes (`e2e/env.sh up --kubelets`). Debian's Prometheus is built
without Kubernetes service discovery, so this lists the release
namespace's running pods every 5 s and writes them as a file_sd target file:
each is scraped through the API server's pod proxy (the only way into the
nodes' namespaces), labelled component (agent|controller) and name (an
agent's node, a controller's pod), as the processes are. Stops when the
API server is gone for a minute (`env.sh down` also stops it by its PID).

Usage: prom-pods.py KUBECTL NAMESPACE API_ADDRESS OUT_FILE  (KUBECONFIG set)
"""
import json
import os
import subprocess
import sys
import time

KUBECTL, NS, API, OUT = sys.argv[1:5]


def targets(pods):
    out = []
    for p in pods["items"]:
        if p.get("status", {}).get("phase") != "Running" or p["metadata"].get("deletionTimestamp"):
            continue
        component = p["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component not in ("agent", "controller"):
            continue
        for c in p["spec"]["containers"]:
            for port in c.get("ports", []):
                if port.get("name") != "metrics":
                    continue
                name = p["spec"].get("nodeName") if component == "agent" else p["metadata"]["name"]
                out.append({
                    "targets": [API],
                    "labels": {
                        "component": component,
                        "name": name or p["metadata"]["name"],
                        "__scheme__": "https",
                        "__metrics_path__": "/api/v1/namespaces/%s/pods/%s:%d/proxy/metrics"
                        % (NS, p["metadata"]["name"], port["containerPort"]),
                    },
                })
    return sorted(out, key=lambda t: (t["labels"]["component"], t["labels"]["name"]))


failing_since = None
while True:
    try:
        pods = json.loads(subprocess.run([KUBECTL, "-n", NS, "get", "pods", "-o", "json"],
                                         check=True, capture_output=True, timeout=20).stdout)
        failing_since = None
        tmp = OUT + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(targets(pods), fh, indent=1)
        os.replace(tmp, OUT)
    except (subprocess.SubprocessError, ValueError):
        failing_since = failing_since or time.time()
        if time.time() - failing_since > 60:
            sys.exit("the API server is gone for a minute: stopping")
    time.sleep(5)
