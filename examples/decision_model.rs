//! A decision model of several projectors, folded in one streaming pass.
//!
//! May student s1 enrol in course c1? Three projectors answer it together: the
//! course's capacity (from `CourseDefined` and `CourseCapacityChanged`), the number
//! of students enrolled in the course, and the number of courses the student takes
//! (at most 3). `dcbflow::project(&store, &(capacity, enrolled, student_courses))` reads the
//! union of their queries once and returns the three states with the append
//! condition protecting a decision taken on them. The example shows a refused
//! decision (course full), a capacity change, an accepted enrolment under the fresh
//! condition, and the stale condition of the first projection conflicting.
//!
//! Run with `cargo run --example decision_model`. Uses `DATABASE_URL` when set,
//! otherwise a throwaway PostgreSQL (see `examples/support/mod.rs`).

mod support;

use dcbflow::{DecisionModel, Error, Event, Projector, Query, ReadOptions, Store};
use serde_json::json;

/// Most courses one student may take.
const MAX_COURSES_PER_STUDENT: i64 = 3;

fn enrolment(student: &str, course: &str) -> Event {
    Event::new(
        "StudentEnrolled",
        [format!("course:{course}"), format!("student:{student}")],
        json!({"student": student, "course": course}),
    )
}

/// Why enrolling s1 in c1 is refused, or `None` if it may go ahead.
fn refusal(capacity: i64, enrolled: i64, student_courses: i64) -> Option<String> {
    if enrolled >= capacity {
        Some(format!("course c1 is full ({enrolled}/{capacity})"))
    } else if student_courses >= MAX_COURSES_PER_STUDENT {
        Some(format!(
            "s1 already takes {student_courses} courses (limit {MAX_COURSES_PER_STUDENT})"
        ))
    } else {
        None
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    support::run(async |db| {
        db.with_store("decision_model", None, async |store| run(store).await)
            .await
    })
    .await
}

async fn run(store: Store) -> Result<(), Box<dyn std::error::Error>> {
    // 1. The past: c1 holds 2 students and has s2 and s3; s1 takes c7 and c8.
    let setup = vec![
        Event::new("CourseDefined", ["course:c1"], json!({"capacity": 2})),
        Event::new("CourseDefined", ["course:c7"], json!({"capacity": 10})),
        Event::new("CourseDefined", ["course:c8"], json!({"capacity": 10})),
        enrolment("s2", "c1"),
        enrolment("s3", "c1"),
        enrolment("s1", "c7"),
        enrolment("s1", "c8"),
    ];
    let setup_len = setup.len();
    let r = store.append(setup, None).await?;
    println!(
        "setup: {setup_len} events at positions {}..={}",
        r.positions[0],
        r.last_position()
    );

    // 2. The decision model: three projectors, each with its own query and state.
    let capacity = Projector::new(
        Query::items_of(["CourseDefined", "CourseCapacityChanged"], ["course:c1"]),
        0i64,
        |c, e| {
            *c = e.data()["capacity"].as_i64().unwrap_or(0);
        },
    );
    let enrolled = Projector::new(
        Query::items_of(["StudentEnrolled"], ["course:c1"]),
        0i64,
        |n, _| *n += 1,
    );
    let student_courses = Projector::new(
        Query::items_of(["StudentEnrolled"], ["student:s1"]),
        0i64,
        |n, _| *n += 1,
    );
    let model = (capacity, enrolled, student_courses);
    println!(
        "decision model: 3 projectors, one read over the union of {} query items",
        model.query().items().len()
    );

    // 3. First projection: c1 is full, so enrolling s1 is refused.
    let first = dcbflow::project(&store, &model).await?;
    let (cap, enr, courses) = first.states;
    let stale = first.condition;
    println!(
        "projection 1: capacity {cap}, enrolled {enr}, s1 takes {courses} courses (cursor {})",
        stale
            .after
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    if (cap, enr, courses) != (2, 2, 2) {
        return Err(
            format!("projection 1: expected (2, 2, 2), got ({cap}, {enr}, {courses})").into(),
        );
    }
    match refusal(cap, enr, courses) {
        Some(reason) => println!("enrol s1 in c1: refused, {reason}"),
        None => return Err("projection 1: expected the enrolment to be refused".into()),
    }

    // 4. The course is given one more seat.
    let raised = store
        .append(
            vec![Event::new(
                "CourseCapacityChanged",
                ["course:c1"],
                json!({"capacity": 3}),
            )],
            None,
        )
        .await?;
    println!(
        "CourseCapacityChanged to 3 at position {}",
        raised.positions[0]
    );

    // 5. Second projection: there is room; enrol s1 under the fresh condition.
    let second = dcbflow::project(&store, &model).await?;
    let (cap, enr, courses) = second.states;
    println!("projection 2: capacity {cap}, enrolled {enr}, s1 takes {courses} courses");
    if (cap, enr, courses) != (3, 2, 2) {
        return Err(
            format!("projection 2: expected (3, 2, 2), got ({cap}, {enr}, {courses})").into(),
        );
    }
    if let Some(reason) = refusal(cap, enr, courses) {
        return Err(format!("projection 2: expected room for s1, but {reason}").into());
    }
    let accepted = store
        .append(vec![enrolment("s1", "c1")], Some(second.condition))
        .await?;
    println!(
        "enrol s1 in c1: accepted at position {} (condition held)",
        accepted.positions[0]
    );

    // 6. A decision taken on the first projection is stale: the capacity change and
    //    the new enrolment match the model's query and were not seen by it.
    let unseen = [raised.positions[0], accepted.positions[0]];
    match store.append(vec![enrolment("s1", "c1")], Some(stale)).await {
        Err(Error::Conflict { position }) if unseen.contains(&position) => {
            println!(
                "stale condition from projection 1: conflict with the event at position {position} (as expected)"
            );
        }
        other => {
            return Err(format!(
                "expected a conflict with one of the positions {unseen:?}, got {other:?}"
            )
            .into());
        }
    }

    // 7. Check the final state: c1 has 3 of 3, s1 takes 3 courses, and the refused
    //    append wrote nothing.
    let last = dcbflow::project(&store, &model).await?;
    let (cap, enr, courses) = last.states;
    println!("final: capacity {cap}, enrolled {enr}, s1 takes {courses} courses");
    if (cap, enr, courses) != (3, 3, 3) {
        return Err(format!("final: expected (3, 3, 3), got ({cap}, {enr}, {courses})").into());
    }
    let log = store
        .read_all(&Query::all(), ReadOptions::default())
        .await?;
    let expected = setup_len + 2;
    println!("the log holds {} events", log.events.len());
    if log.events.len() != expected {
        return Err(format!(
            "expected {expected} events in the log, found {}",
            log.events.len()
        )
        .into());
    }
    Ok(())
}
