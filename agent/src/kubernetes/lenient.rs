//! `DiskChain` objects read one by one, as the API server would keep them: a field this agent's
//! CRD does not know (one a newer CRD adds) is dropped against the CRD's own structural schema,
//! as the API server prunes unknown fields; an object that still does not read (a field of the
//! wrong type, which a missing or older schema let through) is returned as an error naming the
//! field, so that one object never stops the node's watch.

use diskchain_crd::DiskChain;
use serde_json::Value;

/// The schema of a `DiskChain` object (`openAPIV3Schema`), from the CRD this agent ships.
fn schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(DiskChain::crd()).unwrap_or_default();
        crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or_default()
    })
}

/// Removes from `v` the fields `schema` does not declare; returns their paths (under `at`).
fn prune(v: &mut Value, schema: &Value, at: &str, dropped: &mut Vec<String>) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let sub = props.and_then(|p| p.get(&k)).or(extra);
                match sub {
                    Some(sub) => {
                        if let Some(child) = map.get_mut(&k) {
                            prune(child, sub, &format!("{at}.{k}"), dropped);
                        }
                    }
                    None if props.is_some() => {
                        map.remove(&k);
                        dropped.push(format!("{at}.{k}"));
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item, sub, &format!("{at}[{i}]"), dropped);
                }
            }
        }
        _ => {}
    }
}

/// A `DiskChain` from an object as the API server returns it: fields the CRD does not declare
/// dropped (their paths returned); `Err` names the field that does not read.
pub fn read(obj: &kube::api::DynamicObject) -> Result<(DiskChain, Vec<String>), String> {
    let mut v = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    let mut dropped = Vec::new();
    for part in ["spec", "status"] {
        if let (Some(sub), Some(schema)) = (
            v.get_mut(part),
            schema().pointer(&format!("/properties/{part}")),
        ) {
            prune(sub, schema, part, &mut dropped);
        }
    }
    let de = serde_json::from_value::<Value>(v).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize::<_, DiskChain>(de)
        .map(|d| (d, dropped))
        .map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec: Value) -> kube::api::DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "diskchain.dev/v1alpha1", "kind": "DiskChain",
            "metadata": {"name": "d", "namespace": "t"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_field_a_newer_crd_adds_is_dropped_and_named() {
        let (d, dropped) = read(&object(json!({
            "nodeName": "n", "source": {"file": "/x.qcow2", "future": 1}, "someNewField": true
        })))
        .unwrap();
        assert_eq!(
            d.spec.source.file.as_deref(),
            Some(std::path::Path::new("/x.qcow2"))
        );
        assert_eq!(dropped, vec!["spec.source.future", "spec.someNewField"]);
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let e = read(&object(json!({"nodeName": "n", "source": {"file": 123}}))).unwrap_err();
        assert!(e.starts_with("spec.source.file:"), "{e}");
    }
}
