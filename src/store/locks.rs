//! Scope locks: which advisory locks an append takes (see docs/architecture.md).
//!
//! Every append takes **shared** locks on the store-wide key, on each of its event
//! types and on each of its tags. A condition takes **exclusive** locks: for an item
//! with tags, on one of them (every event matching the item carries it); for an item
//! with types only, on each type; for an item matching everything, on the store key.
//! A writer of a matching event therefore always holds a lock the condition's
//! exclusive lock conflicts with, so the two are serialized; writers of disjoint
//! scopes only share locks and never wait on each other.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use super::AppendCondition;

/// What a lock key protects.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Store,
    Type,
    Tag,
    Migrate,
    Lease,
    /// Held shared, for its session, by every connection that `LISTEN`s on
    /// the store's channel (see `wake`).
    Listen,
}

/// A 64-bit advisory lock key, derived from the schema so stores sharing a database
/// do not block each other.
pub(crate) fn key(schema: &str, kind: Kind, value: &str) -> i64 {
    let prefix = match kind {
        Kind::Store => "s",
        Kind::Type => "y",
        Kind::Tag => "t",
        Kind::Migrate => "m",
        Kind::Lease => "l",
        Kind::Listen => "w",
    };
    let mut buf = Vec::with_capacity(schema.len() + value.len() + 4);
    buf.extend_from_slice(b"dcbflow\x1f");
    buf.extend_from_slice(schema.as_bytes());
    buf.push(0x1f);
    buf.extend_from_slice(prefix.as_bytes());
    buf.push(0x1f);
    buf.extend_from_slice(value.as_bytes());
    xxh3_64(&buf) as i64
}

/// The sorted lock keys and modes (`true` = exclusive) for one append of events
/// with these types and tags.
pub(crate) fn plan(
    schema: &str,
    types: &[String],
    tags: &[String],
    condition: Option<&AppendCondition>,
    max_keys: usize,
) -> (Vec<i64>, Vec<bool>) {
    let mut locks: BTreeMap<i64, bool> = BTreeMap::new();
    let mut add = |k: i64, exclusive: bool| {
        let e = locks.entry(k).or_insert(exclusive);
        *e |= exclusive;
    };
    add(key(schema, Kind::Store, ""), false);
    for t in types {
        add(key(schema, Kind::Type, t), false);
    }
    for t in tags {
        add(key(schema, Kind::Tag, t), false);
    }
    if let Some(c) = condition {
        for item in c.fail_if_events_match.items() {
            if let Some(tag) = item.tags.iter().min() {
                add(key(schema, Kind::Tag, tag), true);
            } else if !item.types.is_empty() {
                for t in &item.types {
                    add(key(schema, Kind::Type, t), true);
                }
            } else {
                add(key(schema, Kind::Store, ""), true);
            }
        }
    }
    if locks.len() > max_keys {
        // Coarser but bounded: every append holds the store key shared, so one
        // exclusive lock on it serializes this append with all others.
        return (vec![key(schema, Kind::Store, "")], vec![true]);
    }
    locks.into_iter().unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Query, QueryItem};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn condition_locks_are_exclusive_and_sorted() {
        let cond = AppendCondition::new(Query::from_items([QueryItem::new().tags(["t:2"])]));
        let (keys, modes) = plan(
            "s",
            &strings(&["A"]),
            &strings(&["t:1", "t:2"]),
            Some(&cond),
            100,
        );
        assert_eq!(keys.len(), 4);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        let i = keys
            .iter()
            .position(|k| *k == key("s", Kind::Tag, "t:2"))
            .unwrap();
        assert!(modes[i]);
        assert_eq!(modes.iter().filter(|m| **m).count(), 1);
    }

    #[test]
    fn match_all_locks_store_exclusively_and_large_appends_fall_back() {
        let all = AppendCondition::new(Query::all());
        let (keys, modes) = plan("s", &strings(&["A"]), &strings(&["t:1"]), Some(&all), 100);
        let i = keys
            .iter()
            .position(|k| *k == key("s", Kind::Store, ""))
            .unwrap();
        assert!(modes[i]);
        let many: Vec<_> = (0..200).map(|i| format!("t:{i}")).collect();
        assert_eq!(
            plan("s", &strings(&["A"]), &many, None, 128),
            (vec![key("s", Kind::Store, "")], vec![true])
        );
        assert_ne!(key("s", Kind::Tag, "x"), key("other", Kind::Tag, "x"));
    }
}
