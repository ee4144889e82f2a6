//! The identity of a disk: its namespace and name, as a `DiskChain` object has them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The namespace of a spec that names none (file mode), as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A disk's key: `metadata.namespace` (default `default`) and `metadata.name`. State, journal
/// and locks are kept per key, so two `DiskChain`s named alike in two namespaces never share
/// a record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DiskKey {
    /// The namespace (records written before namespaces have none: the default one).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The name.
    pub name: String,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

impl Default for DiskKey {
    /// An empty name in the default namespace.
    fn default() -> Self {
        DiskKey::new(None, "")
    }
}

impl DiskKey {
    /// The key of `name` in `namespace` (`None`: the default namespace).
    pub fn new(namespace: Option<&str>, name: &str) -> DiskKey {
        DiskKey {
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_string(),
            name: name.to_string(),
        }
    }

    /// Reads `NAME` (the default namespace) or `NAMESPACE/NAME`, as [`DiskKey`]'s `Display`
    /// writes it, with the rules a spec's metadata follows (so a key never names a path outside
    /// the state directory).
    pub fn parse(s: &str) -> Result<DiskKey, String> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, s),
        };
        if let Some(ns) = ns {
            check_namespace(ns).map_err(|m| format!("namespace {m}"))?;
        }
        check_name(name).map_err(|m| format!("name {m}"))?;
        Ok(DiskKey::new(ns, name))
    }

    /// True in the default namespace.
    pub fn is_default_namespace(&self) -> bool {
        self.namespace == DEFAULT_NAMESPACE
    }
}

/// `name` in the default namespace, `namespace/name` elsewhere: what messages, logs, metrics
/// and `status` show.
impl fmt::Display for DiskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default_namespace() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// `metadata.name`: a Kubernetes object name.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not allowed; use a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        ))
    }
}

/// `metadata.namespace`: a Kubernetes namespace name.
pub(crate) fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && ns.as_bytes()[0].is_ascii_alphanumeric()
        && ns.as_bytes()[ns.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ns:?} is not allowed; use a Kubernetes namespace name: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_namespace_is_implied_and_others_are_shown() {
        let d = DiskKey::new(None, "vda");
        assert_eq!(d.namespace, "default");
        assert_eq!(d.to_string(), "vda");
        assert_eq!(DiskKey::new(Some("default"), "vda"), d);
        let p = DiskKey::new(Some("prod"), "vda");
        assert_eq!(p.to_string(), "prod/vda");
        assert_ne!(p, d);
        assert_eq!(DiskKey::parse("prod/vda"), Ok(p));
        assert_eq!(DiskKey::parse("vda"), Ok(d));
        for bad in ["../x", "a/b/c", "Prod/vda", "", "prod/", "/vda"] {
            assert!(DiskKey::parse(bad).is_err(), "{bad}");
        }
    }
}
