//! Which namespaces may use which roots: the node operator's decision, never a tenant's.
//!
//! `--namespace-root NAMESPACE=DIR` (repeatable; DIR one of the `--allowed-root`s) assigns a
//! root to a namespace. A root assigned to some namespaces is theirs alone: a `DiskChain` of
//! another namespace sees it as if it were not a root at all (the same message as a path outside
//! the roots, which tells nothing of what is there). A root assigned to no namespace is shared
//! by every namespace, and there a `DiskChain` only changes what it adopted by naming it (see
//! [`crate::plan::adoption_refused`]).

use std::path::PathBuf;

use crate::observe::Roots;

/// The operator's assignment of roots to namespaces.
#[derive(Clone, Debug, Default)]
pub struct Tenancy {
    /// (root, namespace), roots canonical.
    grants: Vec<(PathBuf, String)>,
    /// (namespace, domain pattern): the libvirt domains a namespace may name.
    domains: Vec<(String, String)>,
}

impl Tenancy {
    /// The assignments `NAMESPACE=DIR`, each DIR one of `roots`. `Err` says which and why.
    pub fn new(grants: &[String], roots: &Roots) -> Result<Tenancy, String> {
        let mut out = Vec::new();
        for g in grants {
            let (ns, dir) = g.split_once('=').ok_or_else(|| {
                format!("--namespace-root {g:?}: write NAMESPACE=DIR (DIR one of the --allowed-root directories)")
            })?;
            if diskchain_crd::DiskKey::parse(&format!("{ns}/x")).is_err() || ns.is_empty() {
                return Err(format!(
                    "--namespace-root {g:?}: {ns:?} is not a namespace name"
                ));
            }
            let canonical = std::path::Path::new(dir)
                .canonicalize()
                .map_err(|e| format!("--namespace-root {g:?}: {dir} cannot be resolved: {e}"))?;
            if !roots.iter().any(|r| r == canonical) {
                return Err(format!(
                    "--namespace-root {g:?}: {dir} is not one of the --allowed-root directories ({})",
                    roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            out.push((canonical, ns.to_string()));
        }
        Ok(Tenancy {
            grants: out,
            domains: Vec::new(),
        })
    }

    /// With the operator's assignments of libvirt domains to namespaces (`NAMESPACE=PATTERN`,
    /// `*` matching any run of characters). Once any is given, a namespace names only the
    /// domains of its patterns (none without one).
    pub fn with_domains(mut self, grants: &[String]) -> Result<Tenancy, String> {
        for g in grants {
            let (ns, pattern) = g.split_once('=').filter(|(n, p)| !n.is_empty() && !p.is_empty()).ok_or_else(|| {
                format!("--namespace-domain {g:?}: write NAMESPACE=PATTERN (a domain name, `*` matching any run of characters)")
            })?;
            self.domains.push((ns.to_string(), pattern.to_string()));
        }
        Ok(self)
    }

    /// True when namespace `ns` may name libvirt domain `domain`: no domain is assigned to any
    /// namespace, or one of `ns`'s patterns matches it.
    pub fn domain_allowed(&self, ns: &str, domain: &str) -> bool {
        self.domains.is_empty() || self.domains.iter().any(|(n, p)| n == ns && glob(p, domain))
    }

    fn assigned(&self, root: &std::path::Path) -> bool {
        self.grants.iter().any(|(r, _)| r == root)
    }

    /// The roots namespace `ns` may use: those assigned to it and those assigned to nobody.
    pub fn roots_for(&self, ns: &str, roots: &Roots) -> Roots {
        roots.subset(|r| !self.assigned(r) || self.grants.iter().any(|(g, n)| g == r && n == ns))
    }

    /// The roots assigned to no namespace (every namespace shares them).
    pub fn shared(&self, roots: &Roots) -> Vec<PathBuf> {
        roots
            .iter()
            .filter(|r| !self.assigned(r))
            .map(|r| r.to_path_buf())
            .collect()
    }
}

/// `text` matches `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|i| tail.is_char_boundary(*i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_namespace_names_only_the_domains_assigned_to_it() {
        let t = super::Tenancy::default();
        assert!(t.domain_allowed("any", "vm"));
        let t = t
            .with_domains(&["team-a=team-a-*".into(), "team-b=db".into()])
            .unwrap();
        assert!(t.domain_allowed("team-a", "team-a-web"));
        assert!(!t.domain_allowed("team-a", "db"));
        assert!(t.domain_allowed("team-b", "db"));
        assert!(!t.domain_allowed("evil", "team-a-web"));
        assert!(
            super::Tenancy::default()
                .with_domains(&["x".into()])
                .is_err()
        );
    }

    use super::*;

    #[test]
    fn an_assigned_root_is_its_namespaces_alone_and_the_others_are_shared() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let roots = Roots::new(&[a.clone(), b.clone()]).unwrap();
        let t = Tenancy::new(&[format!("team-a={}", a.display())], &roots).unwrap();
        let a = a.canonicalize().unwrap();
        let b = b.canonicalize().unwrap();
        let of = |ns: &str| {
            t.roots_for(ns, &roots)
                .iter()
                .map(|r| r.to_path_buf())
                .collect::<Vec<_>>()
        };
        assert_eq!(of("team-a"), vec![a.clone(), b.clone()]);
        assert_eq!(of("evil"), vec![b.clone()]);
        assert_eq!(t.shared(&roots), vec![b]);
        assert!(Tenancy::new(&["team-a=/etc".into()], &roots).is_err());
        assert!(Tenancy::new(&["team-a".into()], &roots).is_err());
    }
}
