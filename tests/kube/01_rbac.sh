#!/bin/bash
# RBAC: every API call the agent makes over a full lifecycle (create, edit, scheduled backup,
# retention, verify, event series, delete, lease acquire/renew, a second agent waiting), classified
# as verb/resource/scope and compared with the chart's Role + ClusterRole.
export KP_LIB="$(cd "$(dirname "$0")" && pwd)"
exec timeout 420 python3 - "$@" <<'EOF'
import os, sys, time, re, json, yaml, collections
sys.path.insert(0, __import__("os").environ["KP_LIB"])
import kp
e = kp.Env("01_rbac")
r = e.r
f = kp.chain(e.img, "d1", 3)
g = kp.chain(e.img, "d2", 2)
repo = f"{e.img}/backups/d1"
e.create(kp.dc("tenant-a", "d1", "node-a", f[-1], [{"name": "p0", "file": f[0]}],
               backup={"repository": repo, "schedule": "* * * * *", "retention": {"keepLast": 1},
                       "verify": {"schedule": "* * * * *"}}))
e.create(kp.dc("tenant-b", "d2", "node-a", g[-1], [{"name": "p0", "file": g[0]}]))
e.create(kp.dc("tenant-b", "nonode", None, g[-1]))
e.start("a1", "node-a", args=["--resync", "20s"])
r.check(e.wait(lambda: e.ready("tenant-a", "d1") and e.ready("tenant-b", "d2"), 90), "both resources converge")
e.start("a2", "node-a")  # a second agent for node-a: waits on the lease
# edits: two new snapshots (same StepStarted note twice: an event series patch)
e.patch("tenant-b", "d2", {"spec": {"snapshots": [{"name": "p0", "file": g[0]}, {"name": "n1"}]}})
e.wait(lambda: e.ready("tenant-b", "d2"), 60)
e.patch("tenant-b", "d2", {"spec": {"snapshots": [{"name": "p0", "file": g[0]}, {"name": "n1"}, {"name": "n2"}]}})
e.wait(lambda: e.ready("tenant-b", "d2"), 60)
ok = e.wait(lambda: len([x for x in e.events("tenant-a", "d1") if x.get("reason") == "BackupTaken"]) >= 2, 170, 2)
r.check(ok, "two scheduled backups taken (BackupTaken x2)")
e.wait(lambda: any(x.get("reason") == "RetentionMerged" for x in e.events("tenant-a", "d1")), 30)
e.wait(lambda: any(x.get("reason") in ("Verified", "BackupDamaged") for x in e.events("tenant-a", "d1")), 60)
r.info("event reasons: " + ", ".join(sorted({x.get("reason") for x in e.events()})))
# delete
e.delete("tenant-b", "d2")
r.check(e.wait(lambda: e.obj("tenant-b", "d2") is None, 60), "deletion finalised")
time.sleep(6)

# ---- classify every call of both agents
def classify(q):
    p = [x for x in q["path"].strip("/").split("/")]
    params = q["params"]
    if p[0] == "api":
        group, rest = "", p[2:]
    else:
        group, rest = p[1], p[3:]
    ns = None
    if rest and rest[0] == "namespaces" and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    res = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    m = q["method"]
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(m)
    if m == "GET":
        verb = "get" if name else ("watch" if params.get("watch") in ("true", "1") else "list")
    return group, res + (f"/{sub}" if sub else ""), verb, ns

calls = collections.Counter()
for q in e.reqs(["a1", "a2"]):
    g_, res, verb, ns = classify(q)
    ct = q["content_type"].split(";")[0] if q["method"] == "PATCH" else ""
    calls[(q["listener"], q["method"], g_, res, verb, "cluster" if ns is None else ns, ct, q["status"])] += 1
print("\n  agent  method  group/resource  verb  scope  patch-type  http  count")
for k, n in sorted(calls.items()):
    print("  ", *k, n)

def rules(path):
    txt = re.sub(r"\{\{[^}]*\}\}", "x", open(path).read())
    return yaml.safe_load(txt)["rules"]

cr = rules(os.environ["CHART_DIR"] + "/templates/clusterrole.yaml")
ro = rules(os.environ["CHART_DIR"] + "/templates/role.yaml")
RELEASE_NS = "diskchain-system"

def granted(group, res, verb, ns):
    for rl in cr:
        if group in rl["apiGroups"] and res in rl["resources"] and verb in rl["verbs"]:
            return "ClusterRole"
    if ns == RELEASE_NS:
        for rl in ro:
            if group in rl["apiGroups"] and res in rl["resources"] and verb in rl["verbs"]:
                return "Role"
    return None

used = set()
for (tag, m, g_, res, verb, scope, ct, st), n in calls.items():
    used.add((g_, res, verb))
    how = granted(g_, res, verb, None if scope == "cluster" else scope)
    r.check(how is not None, f"{tag} {verb} {g_ or 'core'}/{res} ({scope}) granted by {how}")
for rl in cr + ro:
    for g_ in rl["apiGroups"]:
        for res in rl["resources"]:
            for v in rl["verbs"]:
                r.check((g_, res, v) in used, f"grant {v} {g_}/{res} is exercised by the agent (least privilege)")
sys.exit(e.finish())
EOF
