//! One writer per disk across the cluster. Nodes on shared storage see the same images: a
//! `DiskChain` of one node and one of another naming the same active image would each rewrite
//! the chain to their own spec. Before its first write, a reconcile takes the image's claim: a
//! `coordination.k8s.io` Lease named after the image's resolved path (shared storage is mounted
//! at one path on every node, as live migration needs), in the agents' namespace, recording the
//! resource (namespace, name, uid) and the node that works on it.
//!
//! - Nobody holds the claim: it is created (of two nodes racing, the API server lets one
//!   through).
//! - This resource holds it on this node: go on (remembered, so a resync costs no request).
//! - This resource holds it on another node (the resource was moved with `spec.nodeName`): wait,
//!   writing nothing, until that node releases it; a node whose agent's lease expired is gone,
//!   and its claim is taken over.
//! - Another resource holds it: refused, naming that resource only when it is in the same
//!   namespace. A claim whose resource no longer exists (deleted while its agent was down) is
//!   taken over.
//!
//! A node releases a claim when its resource is deleted or leaves the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use diskchain_crd::{DiskChain, DiskKey};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use sha2::{Digest, Sha256};

const RESOURCE: &str = "diskchain.dev/resource";
const UID: &str = "diskchain.dev/uid";
const NODE: &str = "diskchain.dev/node";
const IMAGE: &str = "diskchain.dev/image";
/// The label every claim carries (`kubectl get lease -l diskchain.dev/claim`).
pub const LABEL: &str = "diskchain.dev/claim";

/// Who holds an image's claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The resource.
    pub key: DiskKey,
    /// Its uid.
    pub uid: String,
    /// The node working on it.
    pub node: String,
}

/// What taking a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This resource, on this node, holds it.
    Ours,
    /// This resource holds it on another node, which has not released it yet.
    Waiting {
        /// That node.
        node: String,
    },
    /// Another resource holds it.
    Refused(Holder),
}

impl Claim {
    /// Why `key` may not work on `image`, for its status: the holder is named only when it is
    /// in the same namespace.
    pub fn message(&self, key: &DiskKey, origin: &str, image: &Path) -> Option<String> {
        match self {
            Claim::Ours => None,
            Claim::Waiting { node } => Some(format!(
                "{origin}: the disk {} is still held by node {node}, where this resource was before; waiting for that node to finish and release it (nothing was done)",
                image.display()
            )),
            Claim::Refused(h) if h.key.namespace == key.namespace => Some(format!(
                "{origin}: spec.source resolves to {}, which DiskChain {:?} already manages; one disk is managed by one resource: delete this one or point it at another disk (nothing was done)",
                image.display(),
                h.key.to_string()
            )),
            Claim::Refused(_) => Some(format!(
                "{origin}: spec.source resolves to {}, which another DiskChain already manages; one disk is managed by one resource: point this one at another disk (nothing was done)",
                image.display()
            )),
        }
    }
}

/// The cluster-wide claims on images, as this node's agent takes them.
pub struct Ownership {
    leases: Api<Lease>,
    client: Client,
    node: String,
    /// The claims this node holds: image -> uid of the resource.
    held: Mutex<BTreeMap<PathBuf, String>>,
}

/// The claim's Lease name for `image`.
pub fn lease_name(image: &Path) -> String {
    let h = Sha256::digest(image.as_os_str().as_encoded_bytes());
    let hex: String = h.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("diskchain-image-{hex}")
}

fn annotation<'a>(l: &'a Lease, k: &str) -> &'a str {
    l.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(k))
        .map_or("", String::as_str)
}

fn holder(l: &Lease) -> Holder {
    Holder {
        key: DiskKey::parse(annotation(l, RESOURCE)).unwrap_or_else(|_| DiskKey::new(None, "")),
        uid: annotation(l, UID).to_string(),
        node: annotation(l, NODE).to_string(),
    }
}

impl Ownership {
    /// Claims in `namespace` (the agents' own), taken for `node`.
    pub fn new(client: Client, namespace: &str, node: &str) -> Ownership {
        Ownership {
            leases: Api::namespaced(client.clone(), namespace),
            client,
            node: node.to_string(),
            held: Mutex::new(BTreeMap::new()),
        }
    }

    fn lease(&self, image: &Path, key: &DiskKey, uid: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(image)),
                labels: Some([(LABEL.to_string(), "true".to_string())].into()),
                annotations: Some(
                    [
                        (RESOURCE.to_string(), key.to_string()),
                        (UID.to_string(), uid.to_string()),
                        (NODE.to_string(), self.node.clone()),
                        (IMAGE.to_string(), image.display().to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                acquire_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    Timestamp::now(),
                )),
                ..Default::default()
            }),
        }
    }

    /// True when node `node`'s agent holds its node lease (renewed within the lease's duration).
    async fn node_alive(&self, node: &str) -> Result<bool, kube::Error> {
        let Some(l) = self.leases.get_opt(&format!("diskchain-{node}")).await? else {
            return Ok(false);
        };
        let s = l.spec.unwrap_or_default();
        if s.holder_identity.as_deref().is_none_or(str::is_empty) {
            return Ok(false);
        }
        let d = SignedDuration::from_secs(i64::from(s.lease_duration_seconds.unwrap_or(0)));
        Ok(s.renew_time.is_some_and(|r| r.0 + d >= Timestamp::now()))
    }

    /// True when resource `h` still exists with its uid.
    async fn exists(&self, h: &Holder) -> Result<bool, kube::Error> {
        if h.key.name.is_empty() {
            return Ok(false);
        }
        let api: Api<DiskChain> = Api::namespaced(self.client.clone(), &h.key.namespace);
        // A list by name rather than a get: the agent's role grants list and watch, no get.
        let found = api
            .list_metadata(
                &kube::api::ListParams::default().fields(&format!("metadata.name={}", h.key.name)),
            )
            .await?;
        Ok(found
            .items
            .iter()
            .any(|m| m.metadata.uid.as_deref() == Some(h.uid.as_str())))
    }

    /// Takes (or confirms) the claim of resource `key` (uid `uid`) on `image` for this node.
    pub async fn claim(&self, image: &Path, key: &DiskKey, uid: &str) -> Result<Claim, String> {
        self.try_claim(image, key, uid).await.map_err(|e| {
            format!(
                "failed to take the cluster-wide claim on {} (Lease {}): {e}",
                image.display(),
                lease_name(image)
            )
        })
    }

    async fn try_claim(
        &self,
        image: &Path,
        key: &DiskKey,
        uid: &str,
    ) -> Result<Claim, kube::Error> {
        if self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(image)
            .is_some_and(|u| u == uid)
        {
            return Ok(Claim::Ours);
        }
        let name = lease_name(image);
        for _ in 0..3 {
            let found = self.leases.get_opt(&name).await?;
            let write = match found {
                None => {
                    self.leases
                        .create(&PostParams::default(), &self.lease(image, key, uid))
                        .await
                }
                Some(l) => {
                    let h = holder(&l);
                    let take = if h.uid == uid {
                        h.node == self.node || !self.node_alive(&h.node).await?
                    } else {
                        !self.exists(&h).await?
                    };
                    if !take {
                        return Ok(if h.uid == uid {
                            Claim::Waiting { node: h.node }
                        } else {
                            Claim::Refused(h)
                        });
                    }
                    if h.uid == uid && h.node == self.node {
                        Ok(l)
                    } else {
                        let mut new = self.lease(image, key, uid);
                        new.metadata.resource_version = l.metadata.resource_version.clone();
                        self.leases
                            .replace(&name, &PostParams::default(), &new)
                            .await
                    }
                }
            };
            match write {
                Ok(_) => {
                    self.held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(image.to_path_buf(), uid.to_string());
                    return Ok(Claim::Ours);
                }
                // Another node wrote it between our read and our write: read it again.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        // Written by others three times in a row: looked at again at the next reconcile.
        Ok(Claim::Waiting {
            node: "another node (the claim kept changing)".into(),
        })
    }

    /// Releases the claims resource `uid` holds on this node: every image it claimed here. A
    /// claim another node holds now is left alone.
    pub async fn release(&self, uid: &str) -> Result<(), kube::Error> {
        let images: Vec<PathBuf> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, u)| *u == uid)
            .map(|(i, _)| i.clone())
            .collect();
        for image in images {
            self.release_image(&image, uid).await?;
        }
        Ok(())
    }

    /// Releases the claim on `image` when resource `uid` holds it from this node.
    pub async fn release_image(&self, image: &Path, uid: &str) -> Result<(), kube::Error> {
        let name = lease_name(image);
        if let Some(l) = self.leases.get_opt(&name).await? {
            let h = holder(&l);
            if h.uid == uid && h.node == self.node {
                let dp = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        resource_version: l.metadata.resource_version.clone(),
                        uid: None,
                    }),
                    ..Default::default()
                };
                match self.leases.delete(&name, &dp).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(image);
        Ok(())
    }

    /// The images this node holds claims on for resource `uid`.
    pub fn held_for(&self, uid: &str) -> Vec<PathBuf> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, u)| *u == uid)
            .map(|(i, _)| i.clone())
            .collect()
    }
}
