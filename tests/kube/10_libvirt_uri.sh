#!/bin/bash
# spec.source.libvirt.uri is not validated: any namespace's DiskChain makes the node agent (root,
# privileged pod) open any libvirt URI. (a) qemu+ext runs a program of the author's choosing;
# (b) a URI whose "server" never answers (ext command that reads stdin forever) hangs reconciles:
# how many resources does it take to stop the node, and does deletion/SIGTERM still work?
export KP_LIB="$(cd "$(dirname "$0")" && pwd)"
exec timeout 300 python3 - "$@" <<'EOF'
import sys, time, os, subprocess
sys.path.insert(0, __import__("os").environ["KP_LIB"])
import kp
e = kp.Env("10_libvirt_uri")
r = e.r
canary_out = kp.KP + "/canary.out"
open(kp.KP + "/canary.sh", "w").write('#!/bin/sh\necho "ran uid=$(id -u) pid=$$ ppid=$PPID" >> ' + canary_out + '\nexit 0\n')
os.chmod(kp.KP + "/canary.sh", 0o755)
if os.path.exists(canary_out):
    os.unlink(canary_out)
lv = lambda uri: {"libvirt": {"uri": uri, "domain": "anything", "target": "vda"}}
e.create({"apiVersion": "diskchain.dev/v1alpha1", "kind": "DiskChain", "metadata": {"name": "ext", "namespace": "tenant-evil"},
          "spec": {"nodeName": "node-a", "source": lv("qemu+ext:///system?command=" + kp.KP + "/canary.sh")}})
e.start("a1", "node-a", args=["--max-parallel", "2"])
e.wait(lambda: os.path.exists(canary_out), 20)
ran = open(canary_out).read() if os.path.exists(canary_out) else ""
r.info(f"canary: {ran.strip()!r}; agent pid {e.agents['a1'].pid}")
r.check(not ran, "a tenant's spec.source.libvirt.uri cannot make the agent execute a program (qemu+ext:///...?command=)")
c = e.cond("tenant-evil", "ext", "Degraded")
r.info(f"ext: {c.get('reason')}: {c.get('message','')[:200]}")
# (b) one hanging URI, then good resources
e.create({"apiVersion": "diskchain.dev/v1alpha1", "kind": "DiskChain", "metadata": {"name": "hang", "namespace": "tenant-evil"},
          "spec": {"nodeName": "node-a", "source": lv("qemu+ext:///system?command=/usr/bin/tail")}})
time.sleep(3)
goods = []
for i in range(3):
    f = kp.chain(e.img, f"g{i}", 2)
    e.create(kp.dc("tenant-good", f"g{i}", "node-a", f[-1], [{"name": "p0", "file": f[0]}]))
    goods.append(f"g{i}")
ok = e.wait(lambda: all(e.ready("tenant-good", g) for g in goods), 40)
r.check(ok, f"with ONE hanging-URI resource on the node, other tenants' resources still converge "
            f"({sum(e.ready('tenant-good', g) for g in goods)}/3 ready)")
tails = subprocess.run(["pgrep", "-x", "tail"], capture_output=True, text=True).stdout.split()
r.info(f"hung 'tail' children of the agent: {len([t for t in tails if str(e.agents['a1'].pid) in open(f'/proc/{t}/stat').read().split()[3:4]])}")
# deletion of the hanging resource
e.delete("tenant-evil", "hang")
r.check(e.wait(lambda: e.obj("tenant-evil", "hang") is None, 20), "the hanging resource can be deleted (finalizer released)")
t0 = time.time()
rc = e.stop("a1", wait=90)
r.check(rc == 0 and time.time() - t0 < 70, f"SIGTERM with a hung libvirt connect: exit {rc} after {time.time()-t0:.0f}s")
sys.exit(e.finish())
EOF
