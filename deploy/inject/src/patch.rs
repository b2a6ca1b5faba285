//! JSON Patch (RFC 6902) from the difference of two JSON documents, for the admission webhook.
//!
//! Correct rather than minimal: maps are compared key by key (`add`, `remove`, recursion);
//! a list that only gained elements in one run (such as the sidecar put first into
//! `initContainers`) gets `add` operations at their indices; any other list change replaces
//! the whole list.

use serde::Serialize;
use serde_json::Value;

/// One JSON Patch operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    /// Add a member or insert into a list.
    Add {
        /// JSON Pointer.
        path: String,
        /// The value.
        value: Value,
    },
    /// Remove a member.
    Remove {
        /// JSON Pointer.
        path: String,
    },
    /// Replace a value.
    Replace {
        /// JSON Pointer.
        path: String,
        /// The value.
        value: Value,
    },
}

/// Escapes one reference token (RFC 6901): `~` as `~0`, `/` as `~1`.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The operations that turn `from` into `to`.
pub fn diff(from: &Value, to: &Value) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    walk(from, to, String::new(), &mut ops);
    ops
}

fn walk(from: &Value, to: &Value, path: String, ops: &mut Vec<PatchOp>) {
    if from == to {
        return;
    }
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}/{}", escape(k));
                match b.get(k) {
                    Some(vb) => walk(va, vb, p, ops),
                    None => ops.push(PatchOp::Remove { path: p }),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    ops.push(PatchOp::Add {
                        path: format!("{path}/{}", escape(k)),
                        value: vb.clone(),
                    });
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if b.len() > a.len() => {
            let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            let suffix = a[prefix..]
                .iter()
                .rev()
                .zip(b[prefix..].iter().rev())
                .take_while(|(x, y)| x == y)
                .count();
            if prefix + suffix == a.len() {
                for (i, v) in b[prefix..b.len() - suffix].iter().enumerate() {
                    ops.push(PatchOp::Add {
                        path: format!("{path}/{}", prefix + i),
                        value: v.clone(),
                    });
                }
            } else {
                replace(path, to, ops);
            }
        }
        _ => replace(path, to, ops),
    }
}

fn replace(path: String, to: &Value, ops: &mut Vec<PatchOp>) {
    ops.push(PatchOp::Replace {
        path,
        value: to.clone(),
    });
}

/// A small RFC 6902 applier (add, remove, replace), to check patches in tests.
#[cfg(test)]
pub(crate) fn apply(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    fn unescape(t: &str) -> String {
        t.replace("~1", "/").replace("~0", "~")
    }
    for op in ops {
        let path = op["path"].as_str().ok_or("no path")?;
        let kind = op["op"].as_str().ok_or("no op")?;
        if path.is_empty() {
            if kind == "remove" {
                return Err("cannot remove the root".into());
            }
            *doc = op["value"].clone();
            continue;
        }
        let (parent_path, last) = path.rsplit_once('/').ok_or("bad pointer")?;
        let last = unescape(last);
        let parent = doc
            .pointer_mut(parent_path)
            .ok_or_else(|| format!("no parent for {path}"))?;
        match (parent, kind) {
            (Value::Object(m), "add" | "replace") => {
                if kind == "replace" && !m.contains_key(&last) {
                    return Err(format!("replace of missing {path}"));
                }
                m.insert(last, op["value"].clone());
            }
            (Value::Object(m), "remove") => {
                m.remove(&last).ok_or_else(|| format!("no {path}"))?;
            }
            (Value::Array(a), k) => {
                let i = if last == "-" {
                    a.len()
                } else {
                    last.parse::<usize>()
                        .map_err(|_| format!("bad index {path}"))?
                };
                match k {
                    "add" if i <= a.len() => a.insert(i, op["value"].clone()),
                    "replace" if i < a.len() => a[i] = op["value"].clone(),
                    "remove" if i < a.len() => {
                        a.remove(i);
                    }
                    _ => return Err(format!("index out of range: {path}")),
                }
            }
            _ => return Err(format!("cannot {kind} at {path}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(a: Value, b: Value) -> Vec<PatchOp> {
        let ops = diff(&a, &b);
        let as_json: Vec<Value> = ops
            .iter()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect();
        let mut x = a.clone();
        apply(&mut x, &as_json).unwrap();
        assert_eq!(x, b, "{as_json:#?}");
        ops
    }

    #[test]
    fn diffs_apply_back_to_the_target() {
        assert!(check(json!({"a": 1}), json!({"a": 1})).is_empty());
        check(json!({"a": 1}), json!({"a": 2, "b/c~d": {"x": [1]}}));
        check(json!({"a": 1, "b": 2}), json!({"b": 3}));
        check(json!([1, 2, 3]), json!([0, 1, 2, 3, 4]));
        check(json!([1, 2, 3]), json!([3, 2]));
        check(json!({"l": [1, 2]}), json!({"l": [1, 9, 2]}));
        check(json!(1), json!({"a": 1}));
        let ops = check(
            json!({"spec": {"initContainers": [{"name": "x"}]}}),
            json!({"spec": {"initContainers": [{"name": "mayfly-sidecar"}, {"name": "x"}]}}),
        );
        assert_eq!(
            ops,
            vec![PatchOp::Add {
                path: "/spec/initContainers/0".into(),
                value: json!({"name": "mayfly-sidecar"})
            }]
        );
        let ops = check(
            json!({"metadata": {"annotations": {"a": "b"}}}),
            json!({"metadata": {"annotations": {"a": "b", "mayfly.io/injected": "true"}}}),
        );
        assert_eq!(
            serde_json::to_value(&ops).unwrap(),
            json!([{"op": "add", "path": "/metadata/annotations/mayfly.io~1injected", "value": "true"}])
        );
    }
}
