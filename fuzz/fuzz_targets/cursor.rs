//! Cursor text (`"<position>@<xmin>:<xmax>:<xip,...>"`), as it will arrive over
//! HTTP: parsing never panics, whatever parses is valid, and its text form (and
//! serde form) parses back equal.
#![no_main]

use dcbflow::{Cursor, Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(snapshot) = text.parse::<Snapshot>() {
        assert!(snapshot.check().is_ok(), "{text:?} parsed to an invalid {snapshot:?}");
        let shown = snapshot.to_string();
        assert_eq!(shown.parse::<Snapshot>().as_ref(), Ok(&snapshot), "{shown:?}");
    }
    let Ok(cursor) = text.parse::<Cursor>() else {
        return;
    };
    if let Some(p) = cursor.position {
        assert!(p.value() >= 0, "{text:?} parsed to a negative position");
    }
    if let Some(s) = &cursor.snapshot {
        assert!(s.check().is_ok(), "{text:?} parsed to an invalid {s:?}");
    }
    let shown = cursor.to_string();
    assert_eq!(shown.parse::<Cursor>().as_ref(), Ok(&cursor), "{text:?} -> {shown:?}");
    let json = serde_json::to_string(&cursor).expect("a cursor serializes");
    let back: Cursor = serde_json::from_str(&json).expect("a cursor deserializes");
    assert_eq!(back, cursor, "{json}");
});
