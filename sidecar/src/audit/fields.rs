//! A record's fields without a `serde_json::Map`: the per-request records (`http.request`,
//! `http.response`) are built from static keys and shared or borrowed-once values, and written
//! straight into the line buffer in the order the `Map` (sorted by key) always gave them, so the
//! bytes, and with them the hash chain, are the same as ever.

use std::sync::Arc;

use serde_json::{Map, Value};

/// One value of a [`FieldList`].
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A string shared by every record of a connection (identities, its address).
    Shared(Arc<str>),
    /// A fixed string (`inbound`, `allow`, a standard method).
    Static(&'static str),
    /// A string of this record alone.
    Owned(String),
    /// A number.
    U64(u64),
    /// A flag.
    Bool(bool),
    /// Anything else (rare: a dry-run verdict).
    Json(Value),
}

impl Field {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Shared(s) => Some(s),
            Field::Static(s) => Some(s),
            Field::Owned(s) => Some(s),
            _ => None,
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Field::U64(n) => Value::from(*n),
            Field::Bool(b) => Value::Bool(*b),
            Field::Json(v) => v.clone(),
            s => Value::from(s.as_str().unwrap_or_default()),
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Field::U64(n) => write_json(out, n),
            Field::Bool(true) => out.extend_from_slice(b"true"),
            Field::Bool(false) => out.extend_from_slice(b"false"),
            Field::Json(v) => write_json(out, v),
            s => write_json(out, s.as_str().unwrap_or_default()),
        }
    }
}

/// Fields by static key, kept sorted and unique like a `serde_json::Map` (a `BTreeMap`): an
/// insert replaces the value of a key already there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldList(Vec<(&'static str, Field)>);

impl FieldList {
    /// Room for `n` fields.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Sets `key` (replacing its value if it is there).
    pub fn insert(&mut self, key: &'static str, value: Field) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// Keeps only the fields `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(k, _)| keep(k));
    }

    /// A copy of the fields `keep` accepts, with room for `extra` more.
    pub fn subset(&self, keep: impl Fn(&str) -> bool, extra: usize) -> Self {
        let mut out = Vec::with_capacity(self.0.len() + extra);
        out.extend(self.0.iter().filter(|(k, _)| keep(k)).cloned());
        Self(out)
    }

    /// This list with room for `extra` more fields (one allocation).
    pub fn with_room(&self, extra: usize) -> Self {
        let mut out = Vec::with_capacity(self.0.len() + extra);
        out.extend(self.0.iter().cloned());
        Self(out)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.0
            .binary_search_by(|(k, _)| (*k).cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The same fields as a `serde_json::Map`.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_value()))
            .collect()
    }
}

/// The fields of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Fields {
    /// Built as JSON values (everything but the per-request records).
    Map(Map<String, Value>),
    /// Built from static keys (the per-request records).
    List(FieldList),
}

impl From<Map<String, Value>> for Fields {
    fn from(m: Map<String, Value>) -> Self {
        Fields::Map(m)
    }
}

impl From<FieldList> for Fields {
    fn from(l: FieldList) -> Self {
        Fields::List(l)
    }
}

impl Fields {
    /// The fields as a `serde_json::Map`.
    pub fn into_map(self) -> Map<String, Value> {
        match self {
            Fields::Map(m) => m,
            Fields::List(l) => l.into_map(),
        }
    }

    /// Writes `,"key":value` for every field, in key order.
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Fields::Map(m) => {
                for (k, v) in m {
                    out.push(b',');
                    write_json(out, k);
                    out.push(b':');
                    write_json(out, v);
                }
            }
            Fields::List(l) => {
                for (k, v) in &l.0 {
                    out.push(b',');
                    write_json(out, k);
                    out.push(b':');
                    v.write_json(out);
                }
            }
        }
    }
}

/// serde_json's compact form of `v` (a string escaped as serde_json escapes it).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing strings, numbers and `Value`s into a Vec cannot fail (no maps with non-string
    // keys, no I/O).
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The line of a record, exactly as `mayfly_ca::audit::Record::line` serializes it (its fields
/// in this order, then the event's fields, flattened, in key order), written into one buffer.
#[allow(clippy::too_many_arguments)]
pub fn line(
    source: &str,
    epoch: &str,
    seq: u64,
    prev: &str,
    ts_ms: i64,
    kind: &str,
    fields: &Fields,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(LINE_CAPACITY);
    out.extend_from_slice(b"{\"v\":");
    write_json(&mut out, &mayfly_ca::audit::VERSION);
    out.extend_from_slice(b",\"source\":");
    write_json(&mut out, source);
    out.extend_from_slice(b",\"epoch\":");
    write_json(&mut out, epoch);
    out.extend_from_slice(b",\"seq\":");
    write_json(&mut out, &seq);
    out.extend_from_slice(b",\"prev\":");
    write_json(&mut out, prev);
    out.extend_from_slice(b",\"ts_ms\":");
    write_json(&mut out, &ts_ms);
    out.extend_from_slice(b",\"kind\":");
    write_json(&mut out, kind);
    fields.write_json(&mut out);
    out.push(b'}');
    out
}

/// Room for a typical request record's line in one allocation.
const LINE_CAPACITY: usize = 768;

#[cfg(test)]
mod tests {
    use mayfly_ca::audit::{Record, VERSION};
    use proptest::prelude::*;

    use super::*;

    const KEYS: [&str; 8] = [
        "status", "path", "decision", "a", "peer_id", "zz", "method", "dry_run",
    ];

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            any::<String>().prop_map(|s| Field::Shared(s.into())),
            any::<String>().prop_map(Field::Owned),
            Just(Field::Static("GET")),
            any::<u64>().prop_map(Field::U64),
            any::<bool>().prop_map(Field::Bool),
            (any::<String>(), any::<i64>())
                .prop_map(|(s, n)| Field::Json(serde_json::json!({"rule": s, "n": n}))),
        ]
    }

    fn record_line(
        source: &str,
        prev: &str,
        seq: u64,
        ts_ms: i64,
        kind: &str,
        m: Map<String, Value>,
    ) -> Vec<u8> {
        Record {
            v: VERSION,
            source: source.into(),
            epoch: "e1".into(),
            seq,
            prev: prev.into(),
            ts_ms,
            kind: kind.into(),
            fields: m,
        }
        .line()
    }

    proptest! {
        #[test]
        fn a_list_writes_the_bytes_its_map_serializes_to_as_a_record(
            source in any::<String>(),
            prev in any::<String>(),
            seq in any::<u64>(),
            ts_ms in any::<i64>(),
            entries in proptest::collection::vec((0..KEYS.len(), field()), 0..12),
        ) {
            let mut list = FieldList::default();
            for (k, v) in entries {
                list.insert(KEYS[k], v);
            }
            let map = list.clone().into_map();
            let expected = record_line(&source, &prev, seq, ts_ms, "http.request", map.clone());
            let from_list = line(&source, "e1", seq, &prev, ts_ms, "http.request", &Fields::List(list));
            let from_map = line(&source, "e1", seq, &prev, ts_ms, "http.request", &Fields::Map(map));
            prop_assert_eq!(&from_list, &expected);
            prop_assert_eq!(&from_map, &expected);
        }
    }

    #[test]
    fn an_insert_replaces_and_a_retain_keeps_key_order_like_a_map() {
        let mut list = FieldList::default();
        list.insert("path", Field::Static("/a"));
        list.insert("error", Field::Static("timeout"));
        list.insert("path", Field::Static("/b"));
        list.insert("status", Field::U64(200));
        assert_eq!(list.get("path"), Some(&Field::Static("/b")));
        list.retain(|k| k != "error");
        let keys: Vec<_> = list.clone().into_map().keys().cloned().collect();
        assert_eq!(keys, ["path", "status"]);
        assert_eq!(list.subset(|k| k == "status", 0).into_map().len(), 1);
    }
}
