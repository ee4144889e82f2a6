#!/bin/bash
# A cluster whose API server does not serve CRD field selectors (Kubernetes < 1.31 by default: the
# CRD's selectableFields is dropped and `fieldSelector=spec.nodeName=...` answers 400). Expect: the
# agent says so clearly and /readyz fails (or it falls back to a label/client-side filter); the chart
# declares the Kubernetes versions it needs (Chart.yaml kubeVersion).
export KP_LIB="$(cd "$(dirname "$0")" && pwd)"
exec timeout 120 python3 - "$@" <<'EOF'
import sys, time, urllib.request, yaml
sys.path.insert(0, __import__("os").environ["KP_LIB"])
import kp
e = kp.Env("15_old_apiserver", selectable=False)
r = e.r
f = kp.chain(e.img, "d", 2)
e.create(kp.dc("default", "d", "node-a", f[-1], [{"name": "p0", "file": f[0]}]))
lp = kp.free_port()
e.start("a1", "node-a", args=["--listen", f"127.0.0.1:{lp}"])
ok = e.wait(lambda: e.ready("default", "d"), 30)
r.check(ok, "the node's resource is reconciled on an API server without CRD field selectors")
try:
    rz = urllib.request.urlopen(f"http://127.0.0.1:{lp}/readyz", timeout=5).status
except Exception as ex:
    rz = getattr(ex, "code", str(ex))
bad = [q for q in e.reqs(["a1"]) if q["status"] == 400]
r.info(f"400 answers to the agent: {len(bad)}; e.g. {bad[0]['path'] + '?' + bad[0]['query'] if bad else None}")
r.check(ok or rz != 200, f"/readyz is not 200 while it can list nothing (got {rz})")
log = e.log("a1")
r.check("field label not supported" in log or "selectableFields" in log or "1.31" in log,
        "the agent's log names the cause (field selector not supported)")
chart = yaml.safe_load(open(__import__("os").environ["CHART_DIR"] + "/Chart.yaml"))
r.check("kubeVersion" in chart, f"Chart.yaml declares kubeVersion (selectableFields needs >= 1.31): {chart.get('kubeVersion')}")
sys.exit(e.finish())
EOF
