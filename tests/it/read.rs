//! Reads: query semantics, options, cursors, streaming.

use dcbflow::{Position, Query, QueryItem, ReadOptions};
use futures::TryStreamExt;
use serde_json::json;

use crate::support::{TestStore, ev};

async fn positions(t: &TestStore, q: &Query, o: ReadOptions) -> Vec<i64> {
    let r = t.store.read_all(q, o).await.unwrap();
    r.events.iter().map(|e| e.position.0).collect()
}

#[tokio::test]
async fn query_semantics_follow_the_dcb_specification() {
    let t = TestStore::new().await;
    let r = t
        .store
        .append(
            vec![
                ev("A", &["x:1"]),        // 1
                ev("B", &["x:1", "y:1"]), // 2
                ev("C", &["y:1"]),        // 3
                ev("A", &["x:2", "y:1"]), // 4
                ev("D", &[]),             // 5
            ],
            None,
        )
        .await
        .unwrap();
    let p: Vec<i64> = r.positions.iter().map(|p| p.0).collect();
    let item = QueryItem::new;
    let cases = [
        (Query::all(), vec![0, 1, 2, 3, 4]),
        (Query::default(), vec![]),
        (Query::from_items([item().types(["A"])]), vec![0, 3]),
        (Query::from_items([item().types(["A", "C"])]), vec![0, 2, 3]),
        (Query::from_items([item().tags(["x:1"])]), vec![0, 1]),
        (Query::from_items([item().tags(["x:1", "y:1"])]), vec![1]),
        (
            Query::from_items([item().types(["A"]).tags(["y:1"])]),
            vec![3],
        ),
        (
            Query::from_items([item().types(["A"]), item().tags(["y:1"])]),
            vec![0, 1, 2, 3],
        ),
        (
            Query::from_items([item().tags(["nope"]), item()]),
            vec![0, 1, 2, 3, 4],
        ),
        (Query::from_items([item().tags(["x:1", "x:2"])]), vec![]),
    ];
    for (q, idx) in cases {
        let expected: Vec<i64> = idx.iter().map(|i| p[*i]).collect();
        assert_eq!(
            positions(&t, &q, ReadOptions::default()).await,
            expected,
            "{q:?}"
        );
        // The in-memory matcher agrees with the database.
        let all = t
            .store
            .read_all(&Query::all(), ReadOptions::default())
            .await
            .unwrap();
        let mem: Vec<i64> = all
            .events
            .iter()
            .filter(|e| q.matches_sequenced(e))
            .map(|e| e.position.0)
            .collect();
        assert_eq!(mem, expected, "in memory: {q:?}");
    }
}

#[tokio::test]
async fn options_after_limit_backwards_and_cursors() {
    let t = TestStore::new().await;
    let events = (0..10)
        .map(|i| dcbflow::Event::new("E", ["k"], json!({"i": i})))
        .collect();
    let r = t.store.append(events, None).await.unwrap();
    let p: Vec<i64> = r.positions.iter().map(|p| p.0).collect();
    let q = Query::all();
    assert_eq!(
        positions(&t, &q, ReadOptions::default().after(Position(p[6]))).await,
        p[7..]
    );
    assert_eq!(
        positions(&t, &q, ReadOptions::default().limit(3)).await,
        p[..3]
    );
    let back: Vec<i64> = p.iter().rev().copied().collect();
    assert_eq!(
        positions(&t, &q, ReadOptions::default().backwards()).await,
        back
    );
    assert_eq!(
        positions(&t, &q, ReadOptions::default().backwards().limit(2)).await,
        back[..2]
    );
    assert_eq!(
        positions(
            &t,
            &q,
            ReadOptions::default().backwards().after(Position(p[7]))
        )
        .await,
        vec![p[9], p[8]]
    );

    // Cursors: forward = last yielded, backwards = newest yielded, empty = `after`.
    let fwd = t
        .store
        .read_all(&q, ReadOptions::default().limit(4))
        .await
        .unwrap();
    assert_eq!(fwd.cursor.position, Some(Position(p[3])));
    assert!(fwd.cursor.snapshot.is_some());
    let bwd = t
        .store
        .read_all(&q, ReadOptions::default().backwards().limit(4))
        .await
        .unwrap();
    assert_eq!(bwd.cursor.position, Some(Position(p[9])));
    let none = t
        .store
        .read_all(&q, ReadOptions::default().after(Position(p[9])))
        .await
        .unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.cursor.position, Some(Position(p[9])));

    // A partially consumed stream's cursor covers what was handed out.
    let mut s = t.store.read(&q, ReadOptions::default()).await.unwrap();
    s.try_next().await.unwrap().unwrap();
    s.try_next().await.unwrap().unwrap();
    assert_eq!(s.cursor().unwrap().position, Some(Position(p[1])));
    assert!(!s.is_finished());
    drop(s);

    let last = t
        .store
        .read_last(&Query::items_of(["E"], ["k"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.position.0, p[9]);
    assert_eq!(last.data()["i"], 9);
    assert!(
        t.store
            .read_last(&Query::items_of(["Nope"], Vec::<String>::new()))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(t.store.head().await.unwrap(), Some(Position(p[9])));
}

#[tokio::test]
async fn empty_store_has_no_head_and_cursor_from_start() {
    let t = TestStore::new().await;
    assert_eq!(t.store.head().await.unwrap(), None);
    let r = t
        .store
        .read_all(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    assert!(r.events.is_empty());
    assert_eq!(r.cursor.position, None);
    let text = r.cursor.to_string();
    assert_eq!(text.parse::<dcbflow::Cursor>().unwrap(), r.cursor);
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Streaming holds a bounded number of rows in memory: 40,000 events of 8 KiB
/// (320 MiB on the wire) pass through with far less resident memory growth.
#[tokio::test]
async fn streaming_read_keeps_memory_flat() {
    // Measures the process's memory: not while another test balloons it.
    let _memory = crate::support::MEMORY.lock().await;
    let t = TestStore::new().await;
    let c = t.store.pool().get().await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO \"{s}\".events (transaction_id, type, tags, data) \
         SELECT pg_current_xact_id(), 'Big', ARRAY['big:' || g], \
                jsonb_build_object('g', g, 'pad', repeat(md5(g::text), 256)) \
         FROM generate_series(1, 40000) g",
        s = t.schema
    ))
    .await
    .unwrap();
    drop(c);
    let before = rss_kib();
    let mut peak = before;
    let mut stream = t
        .store
        .read(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    let mut n = 0u64;
    let mut bytes = 0usize;
    while let Some(e) = stream.try_next().await.unwrap() {
        n += 1;
        bytes += e.data()["pad"].as_str().map_or(0, str::len);
        if n.is_multiple_of(1000) {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(n, 40_000);
    assert!(bytes > 300 << 20);
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 100,
        "resident memory grew by {growth_mib} MiB while streaming"
    );
}

/// `unseen_by`: every event a cursor's reader did not see (those after its
/// position, and below it the events of a transaction its snapshot did not
/// see, a late committer, first), and none that it saw. The catch-up fold of
/// the flow engine (ADR 0013) relies on it.
#[tokio::test]
async fn unseen_by_returns_what_a_cursor_did_not_see_late_committers_included() {
    let t = TestStore::new().await;
    let q = Query::items_of(["Step"], ["instance:1"]);
    let seen = t
        .store
        .append(vec![ev("Step", &["instance:1"])], None)
        .await
        .unwrap()
        .positions[0];
    // A writer takes a position inside a transaction it keeps open.
    let mut late = t.store.pool().get().await.unwrap();
    let late_tx = late.transaction().await.unwrap();
    let p_late = t
        .store
        .append_in_tx(&late_tx, vec![ev("Step", &["instance:1", "late"])], None)
        .await
        .unwrap()
        .positions[0];
    let p_after = t
        .store
        .append(vec![ev("Step", &["instance:1"])], None)
        .await
        .unwrap()
        .positions[0];
    let read = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(
        read.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [seen, p_after]
    );
    assert!(read.cursor.position == Some(p_after) && p_late < p_after);
    late_tx.commit().await.unwrap();
    let p_new = t
        .store
        .append(
            vec![ev("Step", &["instance:1"]), ev("Step", &["instance:2"])],
            None,
        )
        .await
        .unwrap()
        .positions[0];
    let unseen = t
        .store
        .read_all(&q, ReadOptions::default().unseen_by(&read.cursor))
        .await
        .unwrap();
    assert_eq!(
        unseen.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [p_late, p_new],
        "the late committer below the cursor and the event after it, nothing seen"
    );
    // From that read's cursor, nothing is unseen.
    let again = t
        .store
        .read_all(&q, ReadOptions::default().unseen_by(&unseen.cursor))
        .await
        .unwrap();
    assert!(again.events.is_empty(), "{:?}", again.events);
    // It reads forwards only.
    let backwards = t
        .store
        .read_all(
            &q,
            ReadOptions::default().unseen_by(&unseen.cursor).backwards(),
        )
        .await;
    assert!(
        matches!(backwards, Err(dcbflow::Error::InvalidInput(_))),
        "{backwards:?}"
    );
}
