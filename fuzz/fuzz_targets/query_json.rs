//! `Query` (and `AppendCondition`, which carries a query and a cursor) from
//! arbitrary JSON bytes: never a panic, and whatever parses serializes and
//! parses back equal.
#![no_main]

use dcbflow::{AppendCondition, Event, Query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = serde_json::from_slice::<Query>(data) {
        let json = serde_json::to_vec(&query).expect("a query serializes");
        let back: Query = serde_json::from_slice(&json).expect("a serialized query parses");
        assert_eq!(back, query);
        // Matching in memory: an item with neither types nor tags matches everything.
        let e = Event::new("A", ["x:1"], serde_json::Value::Null);
        if query.is_all() {
            assert!(query.matches(&e));
        }
        if query.is_empty() {
            assert!(!query.matches(&e));
        }
    }
    if let Ok(condition) = serde_json::from_slice::<AppendCondition>(data) {
        let json = serde_json::to_vec(&condition).expect("a condition serializes");
        let back: AppendCondition =
            serde_json::from_slice(&json).expect("a serialized condition parses");
        assert_eq!(back, condition);
    }
});
