//! Bad input: a typed error naming the problem, and nothing written.

use dcbflow::{AppendCondition, Error, Event, InvalidInput, Limits, Query, QueryItem, ReadOptions};
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestStore, ev};

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_payload_bytes = 1000;
    l.max_events_per_append = 5;
    l.max_type_len = 20;
    l.max_tag_len = 30;
    l.max_tags_per_event = 3;
    l
}

#[tokio::test]
async fn bad_appends_are_refused_and_write_nothing() {
    let t = TestStore::with_limits(limits(), None).await;
    let id = Uuid::new_v4();
    let cases: Vec<(Vec<Event>, InvalidInput)> = vec![
        (vec![], InvalidInput::NoEvents),
        (
            (0..6).map(|_| ev("A", &[])).collect(),
            InvalidInput::TooManyEvents { count: 6, max: 5 },
        ),
        (
            vec![ev("A", &[]), ev("", &[])],
            InvalidInput::EmptyType { index: 1 },
        ),
        (
            vec![ev("A", &["ok", ""])],
            InvalidInput::EmptyTag { index: 0 },
        ),
        (
            vec![ev(&"T".repeat(21), &[])],
            InvalidInput::TypeTooLong {
                index: 0,
                len: 21,
                max: 20,
            },
        ),
        (
            vec![ev("A", &[&"t".repeat(31)])],
            InvalidInput::TagTooLong {
                index: 0,
                len: 31,
                max: 30,
            },
        ),
        (
            vec![ev("A", &["a", "b", "c", "d"])],
            InvalidInput::TooManyTags {
                index: 0,
                count: 4,
                max: 3,
            },
        ),
        (
            vec![
                ev("A", &[]),
                Event::new("A", ["x"], json!({"big": "x".repeat(1000)})),
            ],
            InvalidInput::PayloadTooLarge {
                index: 1,
                size: 1010,
                max: 1000,
            },
        ),
        (
            vec![ev("A", &[]).with_metadata(json!({"m": "y".repeat(990)}))],
            InvalidInput::PayloadTooLarge {
                index: 0,
                size: 1005,
                max: 1000,
            },
        ),
        (
            vec![ev("A\0B", &[])],
            InvalidInput::NulByte {
                index: 0,
                field: "type",
            },
        ),
        (
            vec![ev("A", &["t\0"])],
            InvalidInput::NulByte {
                index: 0,
                field: "tag",
            },
        ),
        (
            vec![Event::new("A", ["t"], json!({"s": "nul\u{0}"}))],
            InvalidInput::NulByte {
                index: 0,
                field: "data",
            },
        ),
        (
            vec![ev("A", &[]).with_metadata(json!({"k\u{0}": 1}))],
            InvalidInput::NulByte {
                index: 0,
                field: "metadata",
            },
        ),
        (
            vec![ev("A", &[]).with_id(id), ev("B", &[])],
            InvalidInput::MixedIds,
        ),
        (
            vec![ev("A", &[]).with_id(id), ev("B", &[]).with_id(id)],
            InvalidInput::DuplicateId { index: 1 },
        ),
    ];
    for (events, expected) in cases {
        let err = t.store.append(events, None).await.unwrap_err();
        match err {
            Error::InvalidInput(got) => assert_eq!(got, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
        assert!(!expected.to_string().is_empty());
    }
    assert_eq!(t.count().await, 0, "nothing may be written");
}

#[tokio::test]
async fn bad_queries_and_conditions_are_refused() {
    let t = TestStore::with_limits(limits(), None).await;
    let bad = [
        (
            Query::from_items([QueryItem::new().tags([""])]),
            InvalidInput::EmptyTag { index: 0 },
        ),
        (
            Query::from_items([QueryItem::new(), QueryItem::new().types([""])]),
            InvalidInput::EmptyType { index: 1 },
        ),
        (
            Query::from_items([QueryItem::new().tags(["a\0"])]),
            InvalidInput::NulByte {
                index: 0,
                field: "tag",
            },
        ),
    ];
    for (q, expected) in bad {
        let err = t.store.read(&q, ReadOptions::default()).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(got) if *got == expected),
            "{err:?}"
        );
        let err = t
            .store
            .append(vec![ev("A", &[])], Some(AppendCondition::new(q)))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(got) if *got == expected),
            "{err:?}"
        );
    }
    let err = t
        .store
        .read(&Query::all(), ReadOptions::default().limit(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(InvalidInput::Option(_))));
    assert_eq!(t.count().await, 0);
}

#[tokio::test]
async fn invalid_configuration_is_refused() {
    let url = crate::support::db::Database::shared_url();
    let pool = dcbflow::pool_from_url(url, Some(1)).unwrap();
    for schema in ["", "Bad", "a;b", "x\"y", "9lives"] {
        let err = dcbflow::Store::builder(pool.clone())
            .schema(schema)
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{schema}: {err:?}");
    }
    assert!(matches!(
        dcbflow::pool_from_url("postgres://a:b@h:notaport/x", None),
        Err(Error::Config(_))
    ));
}
