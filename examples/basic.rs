//! The event store in a nutshell: append, read, and an append condition that
//! succeeds and one that conflicts.
//!
//! Run with `cargo run --example basic`. Uses `DATABASE_URL` when set, otherwise a
//! throwaway PostgreSQL (see `examples/support/mod.rs`).

mod support;

use dcbflow::{AppendCondition, Error, Event, Query, ReadOptions, Store};
use futures::TryStreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    support::run(async |db| {
        db.with_store("basic", None, async |store| run(store).await)
            .await
    })
    .await
}

async fn run(store: Store) -> Result<(), Box<dyn std::error::Error>> {
    // 1. Append: a course with a capacity of one, unconditionally.
    let r = store
        .append(
            vec![Event::new(
                "CourseDefined",
                ["course:c1"],
                json!({"capacity": 1}),
            )],
            None,
        )
        .await?;
    println!("appended CourseDefined at position {}", r.positions[0]);

    // 2. Read the decision model for "enrol s1 in c1": everything about course c1.
    let course = Query::items_of(Vec::<String>::new(), ["course:c1"]);
    let mut stream = store.read(&course, ReadOptions::default()).await?;
    let (mut capacity, mut enrolled) = (0, 0);
    while let Some(e) = stream.try_next().await? {
        println!(
            "  read #{} {} {:?} {}",
            e.position,
            e.event_type(),
            e.tags(),
            e.data()
        );
        match e.event_type() {
            "CourseDefined" => capacity = e.data()["capacity"].as_i64().unwrap_or(0),
            "StudentEnrolled" => enrolled += 1,
            _ => {}
        }
    }
    let cursor = stream.cursor().expect("the stream has ended");
    println!("decision: capacity {capacity}, enrolled {enrolled}, cursor {cursor}");

    // 3. A condition that succeeds: nothing about c1 was appended since the read.
    let condition = AppendCondition::new(course.clone()).after(cursor.clone());
    let enrol = |student: &str| {
        Event::new(
            "StudentEnrolled",
            ["course:c1".to_string(), format!("student:{student}")],
            json!({"student": student}),
        )
    };
    let r = store
        .append(vec![enrol("s1")], Some(condition.clone()))
        .await?;
    println!(
        "s1 enrolled at position {} (condition held)",
        r.positions[0]
    );

    // 4. The same decision again, from the same stale cursor: it conflicts, because
    //    the enrolment of s1 matches the query and was not seen by that read.
    match store.append(vec![enrol("s2")], Some(condition)).await {
        Err(Error::Conflict { position }) => {
            println!("s2 refused: conflict with the event at position {position} (as expected)");
        }
        other => return Err(format!("expected a conflict, got {other:?}").into()),
    }

    let all = store
        .read_all(&Query::all(), ReadOptions::default())
        .await?;
    println!(
        "the log holds {} events; head {:?}",
        all.events.len(),
        store.head().await?
    );
    assert_eq!(all.events.len(), 2);
    Ok(())
}
