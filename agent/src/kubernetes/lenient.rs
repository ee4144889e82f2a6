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
    match serde_path_to_error::deserialize::<_, DiskChain>(v.clone()) {
        Ok(d) => Ok((d, dropped)),
        // The status is the agents' own report: one another writer shaped differently never
        // makes the object unreadable; it is read without the part that does not read.
        Err(e) if e.path().to_string().starts_with("status.") => {
            let field = e.path().to_string();
            let key = field
                .trim_start_matches("status.")
                .split(['.', '['])
                .next()
                .unwrap_or_default()
                .to_string();
            if let Some(st) = v.get_mut("status").and_then(Value::as_object_mut)
                && st.remove(&key).is_none()
            {
                st.clear();
            }
            dropped.push(format!("status.{key}"));
            serde_json::from_value::<DiskChain>(v)
                .or_else(|_| {
                    let mut v = serde_json::to_value(obj).map_err(|e| e.to_string())?;
                    if let Some(o) = v.as_object_mut() {
                        o.remove("status");
                    }
                    serde_json::from_value::<DiskChain>(v).map_err(|e| e.to_string())
                })
                .map(|d| (d, dropped))
                .map_err(|e| e.to_string())
        }
        Err(e) => {
            let path = e.path().to_string();
            Err(format!("{path}: {}", e.into_inner()))
        }
    }
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
        assert_eq!(dropped, vec!["spec.someNewField", "spec.source.future"]);
    }

    #[test]
    fn a_status_another_writer_shaped_differently_does_not_make_the_object_unreadable() {
        let mut o = object(json!({"nodeName": "n", "source": {"file": "/x.qcow2"}}));
        o.data["status"] =
            json!({"lastApply": {"steps": 3}, "bindings": [{"name": "p", "file": "/p"}]});
        let (d, dropped) = read(&o).unwrap();
        assert_eq!(d.status.unwrap().bindings[0].name, "p");
        assert_eq!(dropped, vec!["status.lastApply"]);
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let e = read(&object(json!({"nodeName": "n", "source": {"file": 123}}))).unwrap_err();
        assert!(e.starts_with("spec.source.file:"), "{e}");
    }
}
