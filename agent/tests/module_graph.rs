//! The agent's modules depend on each other in one direction (README, "Layout"): spec source ->
//! desired disk -> reconcile -> backends, with no cycle. Read from the sources: every
//! `crate::MODULE` a module's code (not its comments) names is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_string())
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Some(from) = module_of(&src, &p) else {
                continue;
            };
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines() {
                let code = line.split("//").next().unwrap_or("");
                for (i, _) in code.match_indices("crate::") {
                    let to: String = code[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !to.is_empty() && to != from {
                        out.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
    }
    out
}

fn cycle(e: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        e: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in e.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, e, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    e.keys()
        .find_map(|n| visit(n, e, &mut Vec::new(), &mut done))
}

#[test]
fn the_agent_modules_have_no_cycle() {
    let e = edges();
    // The graph is read for real: the reconcile drives apply, apply the backends.
    assert!(e["reconcile"].contains("apply"), "{e:?}");
    assert!(e["apply"].contains("execute"), "{e:?}");
    assert!(e["libvirt"].contains("execute"), "{e:?}");
    if let Some(c) = cycle(&e) {
        panic!("module cycle: {}", c.join(" -> "));
    }
    // The leaves import no backend.
    for leaf in ["state", "journal", "observe", "bind"] {
        let deps = e.get(leaf).cloned().unwrap_or_default();
        for backend in ["execute", "libvirt", "apply", "reconcile"] {
            assert!(!deps.contains(backend), "{leaf} imports {backend}");
        }
    }
}

#[test]
fn a_cycle_is_found() {
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&e), None);
    e.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&e),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
