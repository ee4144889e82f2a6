//! The desired disk's settings past the spec boundary: a live disk's libvirt target and time
//! budget, and a revert request, validated into the project's own types (durations parsed once,
//! when a [`crate::DesiredDisk`] is made). The agent's planner report, journal and libvirt
//! backend use these, never the CRD's types, so a change to the spec's shape (a new `v1beta1`,
//! Kubernetes mode) stops at this boundary. Their JSON shape is the spec's, so journals written
//! before them still load.

use std::time::Duration;

use crate::{ConvergeAction, LibvirtSource, RevertSpec};
use serde::{Deserialize, Serialize};

/// A disk of a libvirt domain, as the reconcile and the journal use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveTarget {
    /// The libvirt connection URI.
    pub uri: String,
    /// The domain name.
    pub domain: String,
    /// The disk's target device.
    pub target: String,
    /// Freeze the guest's file systems for a snapshot.
    #[serde(default)]
    pub quiesce: bool,
    /// The time budget of a job that must catch up with the guest's writes.
    #[serde(default)]
    pub converge: Budget,
}

/// How long a live job may take to become ready to pivot, and what happens then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The time it may take.
    #[serde(with = "duration_text")]
    pub within: Duration,
    /// What happens when it runs out.
    pub then: OnTimeout,
    /// The guest write limit while throttled, in bytes per second.
    pub throttle_bytes_per_sec: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            within: Duration::from_secs(600),
            then: OnTimeout::Abort,
            throttle_bytes_per_sec: 10 * 1024 * 1024,
        }
    }
}

/// What a live job does when its time budget runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnTimeout {
    /// Keep waiting.
    Wait,
    /// Limit the guest's writes until the job catches up.
    Throttle,
    /// Cancel the job cleanly.
    Abort,
}

/// A revert to do, as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revert {
    /// The point reverted to.
    pub to: String,
    /// The revert's id (a revert runs once per id).
    pub id: String,
    /// A running domain is shut down, reverted and started again.
    #[serde(default)]
    pub restart: bool,
    /// How long a clean shutdown may take before a power-off.
    #[serde(with = "duration_text", default = "default_shutdown")]
    pub shutdown_timeout: Duration,
}

fn default_shutdown() -> Duration {
    Duration::from_secs(120)
}

/// Why a spec's setting cannot be taken past the boundary: the field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a path in the spec.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn duration(field: &'static str, text: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(text).map_err(|e| Invalid {
        field,
        message: format!("{text:?} is not a duration ({e}); write it as e.g. 90s, 10m or 1h"),
    })
}

impl TryFrom<&LibvirtSource> for LiveTarget {
    type Error = Invalid;

    fn try_from(l: &LibvirtSource) -> Result<Self, Invalid> {
        Ok(LiveTarget {
            uri: l.uri.clone(),
            domain: l.domain.clone(),
            target: l.target.clone(),
            quiesce: l.quiesce,
            converge: Budget {
                within: duration("spec.source.libvirt.converge.within", &l.converge.within)?,
                then: match l.converge.then {
                    ConvergeAction::Wait => OnTimeout::Wait,
                    ConvergeAction::Throttle => OnTimeout::Throttle,
                    ConvergeAction::Abort => OnTimeout::Abort,
                },
                throttle_bytes_per_sec: l.converge.throttle_bytes_per_sec,
            },
        })
    }
}

impl TryFrom<&RevertSpec> for Revert {
    type Error = Invalid;

    fn try_from(r: &RevertSpec) -> Result<Self, Invalid> {
        Ok(Revert {
            to: r.to.clone(),
            id: r.id.clone(),
            restart: r.restart,
            shutdown_timeout: duration("spec.revert.shutdownTimeout", &r.shutdown_timeout)?,
        })
    }
}

/// Durations as the spec writes them (`10m`, `90s`), in and out.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_settings_cross_the_boundary_with_their_durations_parsed() {
        let spec: LibvirtSource = serde_json::from_str(
            r#"{"domain":"web","target":"vda","converge":{"within":"90s","then":"throttle"}}"#,
        )
        .unwrap();
        let t = LiveTarget::try_from(&spec).unwrap();
        assert_eq!(t.uri, "qemu:///system");
        assert_eq!(t.converge.within, Duration::from_secs(90));
        assert_eq!(t.converge.then, OnTimeout::Throttle);
        let r: RevertSpec = serde_json::from_str(r#"{"to":"p","id":"1"}"#).unwrap();
        assert_eq!(
            Revert::try_from(&r).unwrap().shutdown_timeout,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let mut spec: LibvirtSource =
            serde_json::from_str(r#"{"domain":"web","target":"vda"}"#).unwrap();
        spec.converge.within = "soon".into();
        let e = LiveTarget::try_from(&spec).unwrap_err();
        assert_eq!(e.field, "spec.source.libvirt.converge.within");
        assert!(e.to_string().contains("\"soon\""), "{e}");
    }

    #[test]
    fn journals_written_with_the_spec_types_still_load() {
        // As a journal stored `libvirt` and `revert` before these types.
        let old = r#"{"uri":"qemu:///system","domain":"web","target":"vda","quiesce":false,"converge":{"within":"10m","then":"abort","throttleBytesPerSec":10485760}}"#;
        let t: LiveTarget = serde_json::from_str(old).unwrap();
        assert_eq!(t.converge, Budget::default());
        assert_eq!(serde_json::to_string(&t).unwrap(), old);
        let r: Revert =
            serde_json::from_str(r#"{"to":"p","id":"1","restart":true,"shutdownTimeout":"0s"}"#)
                .unwrap();
        assert_eq!(r.shutdown_timeout, Duration::ZERO);
    }
}
