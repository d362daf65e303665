//! Course enrolment with two limits at once: a course's capacity and a student's
//! maximum number of courses.
//!
//! The decision model has three projectors (capacity, the course's enrolments, the
//! student's courses); its condition therefore has items for the course and for the
//! student, OR'd: an enrolment anywhere in either scope since the read fails it.
//! Concurrent workers enrol random students in random courses; at the end the log
//! is read back and checked: no course over capacity, no student over the limit,
//! nobody enrolled twice in one course.
//!
//! Run with `cargo run --example enrollment [WORKERS] [ATTEMPTS]` (defaults 8, 400).

mod support;

use std::collections::{HashMap, HashSet};

use dcbflow::{
    Command, CommandError, CommandExecutor, CommandRetry, Decided, Event, Projector, Query,
    ReadOptions, Store,
};
use rand::Rng;
use serde_json::json;

const CAPACITIES: [i64; 5] = [3, 5, 2, 8, 6];
const STUDENTS: u32 = 12;
const MAX_COURSES: usize = 2;

struct Enroll {
    student: u32,
    course: usize,
}

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("course is full")]
    CourseFull,
    #[error("student has reached the course limit")]
    StudentLimit,
    #[error("already enrolled")]
    AlreadyEnrolled,
}

type Model = (Projector<i64>, Projector<i64>, Projector<Vec<usize>>);

impl Command for Enroll {
    type Model = Model;
    type Error = Refused;

    fn command_type(&self) -> &str {
        "Enroll"
    }

    fn model(&self) -> Model {
        let course = format!("course:{}", self.course);
        let student = format!("student:{}", self.student);
        let capacity = Projector::new(
            Query::items_of(["CourseDefined"], [course.clone()]),
            0,
            |c, e| *c = e.data()["capacity"].as_i64().unwrap_or(0),
        );
        let enrolled = Projector::new(Query::items_of(["StudentEnrolled"], [course]), 0, |n, _| {
            *n += 1
        });
        let courses = Projector::new(
            Query::items_of(["StudentEnrolled"], [student]),
            Vec::new(),
            |v, e| v.push(e.data()["course"].as_u64().unwrap_or(0) as usize),
        );
        (capacity, enrolled, courses)
    }

    fn decide(
        &self,
        (capacity, enrolled, courses): (i64, i64, Vec<usize>),
    ) -> Result<Decided, Refused> {
        if courses.contains(&self.course) {
            return Err(Refused::AlreadyEnrolled);
        }
        if enrolled >= capacity {
            return Err(Refused::CourseFull);
        }
        if courses.len() >= MAX_COURSES {
            return Err(Refused::StudentLimit);
        }
        Ok(vec![Event::new(
            "StudentEnrolled",
            [
                format!("course:{}", self.course),
                format!("student:{}", self.student),
            ],
            json!({"course": self.course, "student": self.student}),
        )]
        .into())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let attempts: usize = args.next().map_or(Ok(400), |a| a.parse())?;
    support::run(async |db| {
        db.with_store("enrollment", Some(workers + 2), async |store| {
            run(store, workers, attempts).await
        })
        .await
    })
    .await
}

async fn run(
    store: Store,
    workers: usize,
    attempts: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let courses = CAPACITIES
        .iter()
        .enumerate()
        .map(|(c, cap)| {
            Event::new(
                "CourseDefined",
                [format!("course:{c}")],
                json!({"capacity": cap}),
            )
        })
        .collect();
    store.append(courses, None).await?;

    let executor = CommandExecutor::new(store.clone()).retry(CommandRetry::attempts(100));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let executor = executor.clone();
            let mine = attempts / workers + usize::from(w < attempts % workers);
            tokio::spawn(async move {
                let mut refused: HashMap<String, u32> = HashMap::new();
                for _ in 0..mine {
                    let (student, course) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(0..STUDENTS),
                            rng.random_range(0..CAPACITIES.len()),
                        )
                    };
                    match executor.execute(&Enroll { student, course }).await {
                        Ok(_) => {}
                        Err(CommandError::Rejected(r)) => {
                            *refused.entry(r.to_string()).or_default() += 1
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(refused)
            })
        })
        .collect();
    let mut refused: HashMap<String, u32> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await?? {
            *refused.entry(k).or_default() += v;
        }
    }

    let log = store
        .read_all(
            &Query::items_of(["StudentEnrolled"], Vec::<String>::new()),
            ReadOptions::default(),
        )
        .await?;
    let mut per_course = vec![0i64; CAPACITIES.len()];
    let mut per_student: HashMap<u64, usize> = HashMap::new();
    let mut pairs = HashSet::new();
    for e in &log.events {
        let (c, s) = (
            e.data()["course"].as_u64().unwrap_or(0),
            e.data()["student"].as_u64().unwrap_or(0),
        );
        per_course[c as usize] += 1;
        *per_student.entry(s).or_default() += 1;
        if !pairs.insert((c, s)) {
            return Err(format!("student {s} enrolled twice in course {c}").into());
        }
    }
    for (c, (n, cap)) in per_course.iter().zip(CAPACITIES).enumerate() {
        println!("course {c}: {n}/{cap} enrolled");
        if *n > cap {
            return Err(format!("course {c} over capacity").into());
        }
    }
    if let Some((s, n)) = per_student.iter().find(|(_, n)| **n > MAX_COURSES) {
        return Err(format!("student {s} in {n} courses").into());
    }
    println!("{} enrolments; refused: {refused:?}", log.events.len());
    println!("invariants hold: no course over capacity, no student over {MAX_COURSES} courses");
    Ok(())
}
