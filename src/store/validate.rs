//! Input checks and the conversion of events into the parameters of one append.

use std::collections::HashSet;

use bytes::BufMut;
use serde_json::Value;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use uuid::Uuid;

use super::error::{InvalidInput, Result};
use super::{Event, Limits, Query};

/// JSON serialized once, sent as `jsonb` without another round of serialization.
#[derive(Debug)]
pub(crate) struct RawJson(Vec<u8>);

impl ToSql for RawJson {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// The column arrays of one append.
#[derive(Debug, Default)]
pub(crate) struct Columns {
    pub types: Vec<String>,
    pub tags: Vec<String>,
    pub tag_starts: Vec<i32>,
    pub tag_counts: Vec<i32>,
    pub data: Vec<RawJson>,
    pub metadata: Vec<Option<RawJson>>,
    pub ids: Vec<Option<Uuid>>,
}

/// Checks `events` against `limits`, normalizes tags to sorted sets, and serializes payloads.
pub(crate) fn columns(events: Vec<Event>, limits: &Limits) -> Result<Columns, InvalidInput> {
    if events.is_empty() {
        return Err(InvalidInput::NoEvents);
    }
    if events.len() > limits.max_events_per_append {
        return Err(InvalidInput::TooManyEvents {
            count: events.len(),
            max: limits.max_events_per_append,
        });
    }
    let with_ids = events.iter().filter(|e| e.id.is_some()).count();
    if with_ids != 0 && with_ids != events.len() {
        return Err(InvalidInput::MixedIds);
    }
    let mut seen_ids = HashSet::with_capacity(with_ids);
    let mut total = 0usize;
    let mut cols = Columns {
        types: Vec::with_capacity(events.len()),
        tag_starts: Vec::with_capacity(events.len()),
        tag_counts: Vec::with_capacity(events.len()),
        data: Vec::with_capacity(events.len()),
        metadata: Vec::with_capacity(events.len()),
        ids: Vec::with_capacity(events.len()),
        tags: Vec::new(),
    };
    for (index, mut e) in events.into_iter().enumerate() {
        check_name(&e.event_type, index, limits, true)?;
        e.tags.sort_unstable();
        e.tags.dedup();
        if e.tags.len() > limits.max_tags_per_event {
            return Err(InvalidInput::TooManyTags {
                index,
                count: e.tags.len(),
                max: limits.max_tags_per_event,
            });
        }
        for t in &e.tags {
            check_name(t, index, limits, false)?;
        }
        json(&e.data, index, "data", limits)?;
        if let Some(m) = &e.metadata {
            json(m, index, "metadata", limits)?;
        }
        let data = serde_json::to_vec(&e.data).expect("a JSON value always serializes");
        let metadata = e
            .metadata
            .as_ref()
            .map(|m| serde_json::to_vec(m).expect("a JSON value always serializes"));
        let size = data.len() + metadata.as_ref().map_or(0, Vec::len);
        if size > limits.max_payload_bytes {
            return Err(InvalidInput::PayloadTooLarge {
                index,
                size,
                max: limits.max_payload_bytes,
            });
        }
        total += size + e.event_type.len() + e.tags.iter().map(String::len).sum::<usize>();
        if total > limits.max_append_bytes {
            return Err(InvalidInput::AppendTooLarge {
                size: total,
                max: limits.max_append_bytes,
            });
        }
        if let Some(id) = e.id
            && !seen_ids.insert(id)
        {
            return Err(InvalidInput::DuplicateId { index });
        }
        // 1-based start of this event's slice of the flattened tag array.
        cols.tag_starts.push(cols.tags.len() as i32 + 1);
        cols.tag_counts.push(e.tags.len() as i32);
        cols.tags.append(&mut e.tags);
        cols.types.push(e.event_type);
        cols.data.push(RawJson(data));
        cols.metadata.push(metadata.map(RawJson));
        cols.ids.push(e.id);
    }
    Ok(cols)
}

/// Checks the types and tags of a query (used by reads and conditions).
pub(crate) fn query(q: &Query, limits: &Limits) -> Result<(), InvalidInput> {
    if q.items().len() > limits.max_query_items {
        return Err(InvalidInput::TooManyItems {
            count: q.items().len(),
            max: limits.max_query_items,
        });
    }
    for (index, item) in q.items().iter().enumerate() {
        if item.types.len() + item.tags.len() > limits.max_tags_per_event.max(64) * 2 {
            return Err(InvalidInput::TooManyTags {
                index,
                count: item.types.len() + item.tags.len(),
                max: limits.max_tags_per_event.max(64) * 2,
            });
        }
        for t in &item.types {
            check_name(t, index, limits, true)?;
        }
        for t in &item.tags {
            check_name(t, index, limits, false)?;
        }
    }
    Ok(())
}

fn check_name(s: &str, index: usize, limits: &Limits, is_type: bool) -> Result<(), InvalidInput> {
    let (max, field) = if is_type {
        (limits.max_type_len, "type")
    } else {
        (limits.max_tag_len, "tag")
    };
    if s.is_empty() {
        return Err(if is_type {
            InvalidInput::EmptyType { index }
        } else {
            InvalidInput::EmptyTag { index }
        });
    }
    if s.len() > max {
        let len = s.len();
        return Err(if is_type {
            InvalidInput::TypeTooLong { index, len, max }
        } else {
            InvalidInput::TagTooLong { index, len, max }
        });
    }
    if s.contains('\0') {
        return Err(InvalidInput::NulByte { index, field });
    }
    Ok(())
}

/// Checks a JSON value without recursion (a value built in code may be nested
/// far deeper than any parser allows): at most `max_json_depth` levels, so that
/// whatever is stored can be read back, and no NUL character, which PostgreSQL
/// cannot store.
fn json(v: &Value, index: usize, field: &'static str, limits: &Limits) -> Result<(), InvalidInput> {
    let max = limits.max_json_depth;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 1)];
    while let Some((v, depth)) = stack.pop() {
        let nested = matches!(v, Value::Array(_) | Value::Object(_));
        if nested && depth > max {
            return Err(InvalidInput::TooDeep { index, field, max });
        }
        match v {
            Value::String(s) if s.contains('\0') => {
                return Err(InvalidInput::NulByte { index, field });
            }
            Value::Array(a) => stack.extend(a.iter().map(|v| (v, depth + 1))),
            Value::Object(o) => {
                for (k, v) in o {
                    if k.contains('\0') {
                        return Err(InvalidInput::NulByte { index, field });
                    }
                    stack.push((v, depth + 1));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a cursor that came from outside: no negative position, and a
/// snapshot that PostgreSQL could have produced.
pub(crate) fn cursor(c: &super::Cursor) -> Result<(), InvalidInput> {
    if let Some(p) = c.position
        && p.0 < 0
    {
        return Err(InvalidInput::Cursor(format!("negative position {p}")));
    }
    if let Some(s) = &c.snapshot {
        s.check().map_err(InvalidInput::Cursor)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_tags_as_sorted_sets() {
        let events = vec![
            Event::new("A", ["b", "a", "b"], json!(1)),
            Event::new("B", Vec::<String>::new(), json!(2)),
            Event::new("C", ["c"], json!(3)),
        ];
        let c = columns(events, &Limits::default()).unwrap();
        assert_eq!(c.tags, ["a", "b", "c"]);
        assert_eq!(c.tag_starts, [1, 3, 3]);
        assert_eq!(c.tag_counts, [2, 0, 1]);
    }

    fn check(v: &Value) -> Result<(), InvalidInput> {
        json(v, 0, "data", &Limits::default())
    }

    #[test]
    fn finds_nul_anywhere() {
        assert!(check(&json!({"a": [1, {"b": "x\u{0}"}]})).is_err());
        assert!(check(&json!({"k\u{0}": 1})).is_err());
        assert!(check(&json!({"a": "\\u0000"})).is_ok());
    }

    /// Nested deeper than any parser reads back: refused, without recursion
    /// (100,000 levels would overflow the stack of a recursive check).
    #[test]
    fn bounds_nesting_depth_iteratively() {
        let nest = |n: usize| {
            let mut v = json!(1);
            for _ in 0..n {
                v = Value::Array(vec![v]);
            }
            v
        };
        assert!(check(&nest(63)).is_ok());
        assert!(check(&nest(64)).is_ok());
        assert_eq!(
            check(&nest(65)),
            Err(InvalidInput::TooDeep {
                index: 0,
                field: "data",
                max: 64
            })
        );
        let deep = nest(100_000);
        assert!(check(&deep).is_err());
        // Dropping a value that deep recurses too: leak it in the test.
        std::mem::forget(deep);
    }
}
