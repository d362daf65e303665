//! Unit tests of definition validation: valid definitions pass, and each kind of
//! problem is reported, all of them at once.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::flow::{OnExhausted, TaskRetry, TccParticipant};

const FUNCTIONS: &[&str] = &["reserve", "release", "audit"];

fn problems(flow: &FlowDefinition) -> Vec<String> {
    match validate(flow, FUNCTIONS) {
        Ok(()) => Vec::new(),
        Err(e) => {
            assert_eq!(e.flow, flow.name);
            e.problems
        }
    }
}

#[track_caller]
fn assert_has(problems: &[String], expected: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "no problem contains {expected:?} in:\n{}",
        problems.join("\n")
    );
}

#[track_caller]
fn assert_lacks(problems: &[String], unexpected: &str) {
    assert!(
        !problems.iter().any(|p| p.contains(unexpected)),
        "a problem contains {unexpected:?} in:\n{}",
        problems.join("\n")
    );
}

fn participant(name: &str) -> TccParticipant {
    TccParticipant {
        name: name.into(),
        try_action: Action::http("POST", "https://stock.example/{{input.sku}}/hold", None),
        confirm: Action::rust("audit"),
        cancel: Action::nats(
            "stock.{{input.sku}}.release",
            json!({"sku": "{{input.sku}}"}),
        ),
    }
}

#[test]
fn a_valid_serial_and_parallel_flow_passes() {
    let flow = FlowDefinition::builder("order.placed-v2")
        .input("amount", ValueType::Number)
        .input("customer", ValueType::Object)
        .input("sku", ValueType::String)
        .deadline(Duration::from_secs(600))
        .task(
            TaskDefinition::new("reserve", Action::rust("reserve"))
                .compensate(Action::rust("release"))
                .retry(
                    TaskRetry::attempts(5)
                        .backoff(Duration::from_millis(50), Duration::from_secs(2)),
                ),
        )
        .task(
            TaskDefinition::new(
                "charge",
                Action::http(
                    "post",
                    "https://pay.example/charges?c={{flow.input.customer.id}}",
                    Some(json!({
                        "amount": "{{flow.input.amount}}",
                        "reservation": "{{tasks.reserve.output.id}}",
                        "key": "{{idempotency_key}}",
                    })),
                ),
            )
            .after(["reserve"])
            .compensate(Action::http("DELETE", "{{input.refund_url}}", None))
            .input(
                "refund_url",
                json!("https://pay.example/refunds/{{instance}}"),
            )
            .on_exhausted(OnExhausted::Pause),
        )
        .task(
            TaskDefinition::new(
                "notify",
                Action::nats(
                    "orders.{{flow.input.customer.id}}",
                    json!({"order": "{{business_key}}", "items": ["{{flow.input.sku}}"]}),
                ),
            )
            .after(["reserve"]),
        )
        .task(
            TaskDefinition::tcc("hold", vec![participant("stock"), participant("backup")])
                .try_deadline(Duration::from_secs(5))
                .input("sku", json!("{{flow.input.sku}}"))
                .after(["reserve"]),
        )
        .task(
            TaskDefinition::new(
                "ship",
                Action::sql([(
                    "insert into shipments (charge, total) values ($1, $2::numeric)",
                    vec![json!("{{input.charge}}"), json!("{{flow.input.amount}}")],
                )]),
            )
            .after(["charge", "notify", "hold"])
            .input("charge", json!("{{tasks.charge.output.id}}"))
            .input("reserved", json!({"id": "{{tasks.reserve.output.id}}"})),
        )
        .build();
    assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
}

#[test]
fn a_valid_yaml_definition_passes() {
    let flow = FlowDefinition::from_yaml(
        r#"
name: payment
input: { amount: integer, order: object }
deadline_ms: 120000
tasks:
  - name: book
    input: { order: "{{flow.input.order}}" }
    action:
      executor: http
      url: "{{input.order}}"
      headers: { X-Amount: "{{flow.input.amount}}" }
      body: "{{flow.input.order}}"
    timeout_ms: 10000
  - name: record
    depends_on: [book]
    action:
      executor: sql
      statements:
        - sql: "insert into bookings (id) values ($1)"
          params: ["{{tasks.book.output.id}}"]
"#,
    )
    .unwrap();
    assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
}

#[test]
fn every_problem_is_reported() {
    let flow = FlowDefinition::from_yaml(
            r#"
name: "bad flow"
input: { amount: number }
tasks:
  - name: ship
    depends_on: [shipp, ship, pack, pack]
    action: { executor: rust, function: "" }
  - name: pack
    action: { executor: http, method: FETCH, url: "ftp://x", headers: { "": "a", "Bad Header": "b" } }
  - name: pack
    action: { executor: sql, statements: [] }
  - name: "a b"
    action: { executor: nats, subject: " " }
  - name: empty
  - name: both
    action: { executor: sql, statements: [{ sql: "  " }] }
    compensate: { executor: rust, function: refund }
    tcc: { participants: [], try_deadline_ms: 0 }
    retry: { max_attempts: 0, multiplier: 0.5, initial_backoff_ms: 10, max_backoff_ms: 5, retry_on: [""] }
    timeout_ms: 0
  - name: templ
    depends_on: [pack]
    input:
      own: "{{input.other}}"
      cost: "{{flow.input.cost}}"
    action:
      executor: nats
      subject: "x.{{input.missing}}.{{nonsense.path}}"
      payload: { a: "{{tasks.ship.output.id}}", b: "{{tasks.nowhere.output}}", c: "{{tasks.templ.output}}" }
  - name: tcc
    tcc:
      participants:
        - name: p
          try: { executor: rust, function: nope }
          confirm: { executor: http, url: "" }
          cancel: { executor: rust, function: release }
        - name: p
          try: { executor: rust, function: reserve }
          confirm: { executor: rust, function: audit }
          cancel: { executor: rust, function: release }
"#,
        )
        .unwrap();
    let problems = problems(&flow);
    for expected in [
        r#"flow name "bad flow" may only contain"#,
        r#"task "ship": depends on unknown task "shipp" (did you mean "ship"?)"#,
        r#"task "ship": depends on itself"#,
        r#"task "ship": depends on "pack" more than once"#,
        r#"task "ship": rust function name is empty"#,
        r#"task "pack" is defined 2 times"#,
        r#"task "pack": http method "FETCH" is not one of GET, POST"#,
        r#"task "pack": http url "ftp://x" must start with http:// or https://"#,
        r#"task "pack": http header with an empty name"#,
        r#"task "pack": http header name "Bad Header" is not a valid header name"#,
        r#"task "pack": sql action has no statements"#,
        r#"task "a b": its name may only contain"#,
        r#"task "a b": nats subject is empty"#,
        r#"task "empty": has none of action, tcc, wait, signal, await_event and flow"#,
        r#"task "both": has an action and a tcc group"#,
        r#"task "both": sql statement 1 is empty"#,
        r#"task "both": a tcc task cannot have a compensate action"#,
        r#"task "both": compensate: rust function "refund" is not registered"#,
        r#"task "both": its tcc group has no participants"#,
        r#"task "both": its tcc try deadline must be more than 0 ms"#,
        r#"task "both": retry max_attempts must be at least 1"#,
        r#"task "both": retry multiplier must be a finite number of at least 1, not 0.5"#,
        r#"task "both": retry initial_backoff_ms (10) exceeds max_backoff_ms (5)"#,
        r#"task "both": retry_on holds an empty error code"#,
        r#"task "both": timeout_ms must be more than 0"#,
        r#"task "templ": input "own" refers to the task input ("{{input.other}}"), but a task input cannot refer to the task's own input"#,
        r#"task "templ": input "cost" refers to undeclared flow input "cost""#,
        r#"task "templ": nats subject refers to undeclared task input "missing""#,
        r#"task "templ": nats subject has an unknown template {{nonsense.path}}"#,
        r#"task "templ": nats payload refers to the output of "ship", which is not among the tasks it depends on"#,
        r#"task "templ": nats payload refers to the output of unknown task "nowhere""#,
        r#"task "templ": nats payload refers to the task's own output"#,
        r#"task "tcc": participant "p" is defined more than once"#,
        r#"task "tcc": participant "p" try: rust function "nope" is not registered"#,
        r#"task "tcc": participant "p" confirm: http url is empty"#,
    ] {
        assert_has(&problems, expected);
    }
    // Each problem once, each naming what it is about.
    let unique: BTreeSet<&String> = problems.iter().collect();
    assert_eq!(unique.len(), problems.len(), "{problems:#?}");
    assert!(
        problems
            .iter()
            .all(|p| p.starts_with("task") || p.starts_with("flow")),
        "{problems:#?}"
    );
    let shown = validate(&flow, FUNCTIONS).unwrap_err().to_string();
    assert!(
        shown.contains(&format!("({} problems)", problems.len())),
        "{shown}"
    );
}

#[test]
fn flow_level_problems() {
    let flow = FlowDefinition::builder("").deadline(Duration::ZERO).build();
    let problems = problems(&flow);
    assert_has(&problems, "the flow's name is empty");
    assert_has(&problems, "the flow has no tasks");
    assert_has(&problems, "the flow deadline must be more than 0 ms");
}

#[test]
fn cycles_and_joins_that_can_never_complete() {
    let rust = || Action::rust("audit");
    let flow = FlowDefinition::builder("graph")
        .task(TaskDefinition::new("start", rust()))
        .task(TaskDefinition::new("a", rust()).after(["start", "b"]))
        .task(TaskDefinition::new("b", rust()).after(["a"]))
        .task(TaskDefinition::new("c", rust()).after(["a", "start"]))
        .task(TaskDefinition::new("d", rust()).after(["c"]))
        .task(TaskDefinition::new("x", rust()).after(["y"]))
        .task(TaskDefinition::new("y", rust()).after(["z"]))
        .task(TaskDefinition::new("z", rust()).after(["x", "w"]))
        .task(TaskDefinition::new("w", rust()).after(["y"]))
        .task(TaskDefinition::new("orphan", rust()).after(["ghost"]))
        .task(TaskDefinition::new("after-orphan", rust()).after(["orphan", "start"]))
        .task(TaskDefinition::new("selfish", rust()).after(["selfish"]))
        .task(TaskDefinition::new("after-selfish", rust()).after(["selfish"]))
        .task(TaskDefinition::new("fine", rust()).after(["start"]))
        .build();
    let problems = problems(&flow);
    assert_has(
        &problems,
        r#"tasks "a" -> "b" -> "a" form a cycle (each depends on the next)"#,
    );
    assert_has(
        &problems,
        r#"tasks "x" -> "y" -> "z" -> "x" form a cycle (each depends on the next); "w" is on further cycles with them"#,
    );
    assert_has(
        &problems,
        r#"task "c": joins on "a", which can never complete"#,
    );
    assert_has(
        &problems,
        r#"task "d": joins on "c", which can never complete"#,
    );
    assert_has(
        &problems,
        r#"task "orphan": depends on unknown task "ghost""#,
    );
    assert_has(
        &problems,
        r#"task "after-orphan": joins on "orphan", which can never complete"#,
    );
    assert_has(&problems, r#"task "selfish": depends on itself"#);
    assert_has(
        &problems,
        r#"task "after-selfish": joins on "selfish", which can never complete"#,
    );
    // Tasks on a cycle are reported as the cycle, not as joins; complete
    // tasks are not reported at all.
    assert_lacks(&problems, r#"task "a": joins"#);
    assert_lacks(&problems, r#"task "b": joins"#);
    assert_lacks(&problems, r#"task "w": joins"#);
    assert_lacks(&problems, r#"joins on "start""#);
    assert_lacks(&problems, r#"task "fine""#);
    assert_lacks(&problems, r#"task "start""#);
    assert_eq!(problems.len(), 8, "{problems:#?}");
}

#[test]
fn strongly_connected_components() {
    // 0 -> 1 -> 2 -> 0, 2 -> 3, 3 -> 4 -> 3, 5 alone
    let edges = vec![vec![1], vec![2], vec![0, 3], vec![4], vec![3], vec![]];
    let mut components: Vec<Vec<usize>> = strongly_connected(&edges)
        .into_iter()
        .map(|mut c| {
            c.sort_unstable();
            c
        })
        .collect();
    components.sort();
    assert_eq!(components, vec![vec![0, 1, 2], vec![3, 4], vec![5]]);
    let nodes = BTreeSet::from([0, 1, 2]);
    assert_eq!(shortest_cycle(&edges, &nodes, 1), Some(vec![1, 2, 0]));
    assert_eq!(shortest_cycle(&edges, &BTreeSet::from([5]), 5), None);
}

#[test]
fn a_retry_policy_outliving_the_flow_deadline() {
    let flow = FlowDefinition::builder("slow")
        .deadline(Duration::from_secs(10))
        .task(
            // 3 attempts of 5 s, then delays of up to 100 ms and 200 ms.
            TaskDefinition::new("slow", Action::rust("audit"))
                .timeout(Duration::from_secs(5))
                .retry(
                    TaskRetry::attempts(3)
                        .backoff(Duration::from_millis(100), Duration::from_secs(1)),
                ),
        )
        .task(
            // 2 attempts of 4.5 s and one delay of up to 1 s: exactly 10 s.
            TaskDefinition::new("just-in-time", Action::rust("audit"))
                .timeout(Duration::from_millis(4500))
                .retry(
                    TaskRetry::attempts(2).backoff(Duration::from_secs(1), Duration::from_secs(1)),
                ),
        )
        .task(
            TaskDefinition::new("forever", Action::rust("audit"))
                .timeout(Duration::from_millis(1))
                .retry(TaskRetry::attempts(u32::MAX)),
        )
        .task(
            TaskDefinition::tcc("hold", vec![participant("stock")])
                .input("sku", json!("abc"))
                .timeout(Duration::from_secs(1))
                .try_deadline(Duration::from_secs(11)),
        )
        .build();
    let problems = problems(&flow);
    assert_has(
        &problems,
        r#"task "slow": its retry policy can take up to 15300 ms, beyond the flow deadline of 10000 ms"#,
    );
    assert_lacks(&problems, r#"task "just-in-time""#);
    // u32::MAX attempts of 1 ms, delays capped at 10 s: computed without looping over them.
    assert_has(
        &problems,
        r#"task "forever": its retry policy can take up to "#,
    );
    assert_has(
        &problems,
        r#"task "hold": its tcc try deadline of 11000 ms is beyond the flow deadline of 10000 ms"#,
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

#[test]
fn worst_case_adds_timeouts_and_backoff_ceilings() {
    let task = TaskDefinition::new("t", Action::rust("audit"))
        .timeout(Duration::from_millis(10))
        .retry(
            TaskRetry::attempts(5).backoff(Duration::from_millis(100), Duration::from_millis(300)),
        );
    // 5 × 10 + 100 + 200 + 300 + 300
    assert_eq!(worst_case_ms(&task), 950);
    let many = TaskDefinition::new("t", Action::rust("audit"))
        .timeout(Duration::from_millis(1))
        .retry(
            TaskRetry::attempts(100).backoff(Duration::from_millis(1), Duration::from_secs(3600)),
        );
    let expected: u128 = 100
        + (1..100)
            .map(|r| many.retry.ceiling(r).as_millis())
            .sum::<u128>();
    assert_eq!(worst_case_ms(&many), expected);
}

#[test]
fn an_unregistered_rust_function() {
    let flow = FlowDefinition::builder("f")
        .task(TaskDefinition::new("a", Action::rust("reserv")))
        .task(TaskDefinition::new("b", Action::rust("reserve")).compensate(Action::rust("undo")))
        .build();
    let problems = problems(&flow);
    assert_eq!(
        problems,
        vec![
            r#"task "a": rust function "reserv" is not registered (did you mean "reserve"?)"#
                .to_owned(),
            r#"task "b": compensate: rust function "undo" is not registered"#.to_owned(),
        ]
    );
    assert_eq!(
        validate(&flow, &["reserv", "undo"])
            .unwrap_err()
            .problems
            .len(),
        1
    );
}

#[test]
fn templates_may_only_refer_to_outputs_of_tasks_depended_on() {
    let flow = FlowDefinition::builder("outputs")
        .task(TaskDefinition::new("a", Action::rust("audit")))
        .task(TaskDefinition::new("b", Action::rust("audit")).after(["a"]))
        .task(
            // Parallel to "b": its output may not exist yet.
            TaskDefinition::new(
                "c",
                Action::nats("c.{{tasks.a.output.id}}", json!("{{tasks.b.output}}")),
            )
            .after(["a"]),
        )
        .task(
            // Depends on "a" through "b".
            TaskDefinition::new("d", Action::rust("audit"))
                .after(["b"])
                .input("a", json!("{{tasks.a.output.id}}"))
                .input("c", json!(["{{tasks.c.output.id}}"])),
        )
        .build();
    let problems = problems(&flow);
    assert_eq!(
            problems,
            vec![
                r#"task "c": nats payload refers to the output of "b", which is not among the tasks it depends on"#
                    .to_owned(),
                r#"task "d": input "c" refers to the output of "c", which is not among the tasks it depends on"#
                    .to_owned(),
            ]
        );
}

#[test]
fn an_http_body_of_the_wrong_type() {
    let body = |b: &str| Action::http("PUT", "https://x.example/", Some(json!(b)));
    let flow = FlowDefinition::builder("bodies")
        .input("amount", ValueType::Number)
        .input("order", ValueType::Object)
        .input("lines", ValueType::Array)
        .input("anything", ValueType::Any)
        .input("name", ValueType::String)
        .task(TaskDefinition::new("amount", body("{{flow.input.amount}}")))
        .task(TaskDefinition::new("order", body("{{ flow.input.order }}")))
        .task(TaskDefinition::new("lines", body("{{flow.input.lines}}")))
        .task(TaskDefinition::new(
            "anything",
            body("{{flow.input.anything}}"),
        ))
        .task(
            TaskDefinition::new("name", body("{{flow.input.amount}}"))
                .compensate(body(" {{flow.input.name}} ")),
        )
        .task(TaskDefinition::new(
            "embedded",
            body("total {{flow.input.amount}}"),
        ))
        .task(TaskDefinition::new(
            "nested",
            body("{{flow.input.order.total}}"),
        ))
        .build();
    let problems = problems(&flow);
    assert_eq!(
            problems,
            vec![
                r#"task "amount": http body must be a JSON object or array, but flow input "amount" is number"#
                    .to_owned(),
                r#"task "name": http body must be a JSON object or array, but flow input "amount" is number"#
                    .to_owned(),
                r#"task "name": compensate: http body must be a JSON object or array, but flow input "name" is string"#
                    .to_owned(),
            ]
        );
}

#[test]
fn urls() {
    for ok in [
        "https://x.example/a",
        "HTTP://x",
        "{{input.url}}",
        "{{input.base}}/orders",
        " https://{{input.host}}/x ",
    ] {
        assert!(valid_url(ok), "{ok}");
    }
    for bad in [
        "ftp://x",
        "https://",
        "x.example",
        "/path",
        "http:/x",
        "é://x",
    ] {
        assert!(!valid_url(bad), "{bad}");
    }
}

#[test]
fn undeclared_flow_inputs_are_only_checked_when_inputs_are_declared() {
    let task = TaskDefinition::new("a", Action::rust("audit"))
        .input("x", json!("{{flow.input.whatever}}"))
        .input("all", json!("{{flow.input}}"));
    let flow = FlowDefinition::builder("open").task(task.clone()).build();
    assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
    let flow = FlowDefinition::builder("closed")
        .input("whatevr", ValueType::Any)
        .task(task)
        .build();
    assert_eq!(
            problems(&flow),
            vec![
                r#"task "a": input "x" refers to undeclared flow input "whatever" (did you mean "whatevr"?)"#
                    .to_owned()
            ]
        );
}

#[test]
fn conditions_waits_and_signals_are_checked_at_register() {
    let ok = FlowDefinition::builder("loan")
        .input("amount", ValueType::Number)
        .input("at", ValueType::String)
        .task(TaskDefinition::new("score", Action::rust("audit")))
        .task(
            TaskDefinition::new("auto", Action::rust("audit"))
                .after(["score"])
                .when("tasks.score.output.value >= 700 && flow.input.amount < 10000"),
        )
        .task(
            TaskDefinition::signal("approval", "approved")
                .after(["score"])
                .when("!(tasks.score.output.value >= 700 && flow.input.amount < 10000)")
                .signal_timeout(std::time::Duration::from_secs(60))
                .on_exhausted(OnExhausted::Fail),
        )
        .task(
            TaskDefinition::wait("cool_off", std::time::Duration::from_secs(1))
                .after(["auto", "approval"]),
        )
        .task(TaskDefinition::wait_until("at", "{{flow.input.at}}").after(["cool_off"]))
        .build();
    assert_eq!(validate(&ok, FUNCTIONS), Ok(()));

    let mut both = TaskDefinition::wait("both", std::time::Duration::from_secs(1));
    both.wait.as_mut().unwrap().until = Some("{{flow.input.at}}".into());
    let bad = FlowDefinition::builder("bad")
        .input("amount", ValueType::Number)
        .task(TaskDefinition::new("score", Action::rust("audit")))
        .task(TaskDefinition::new("later", Action::rust("audit")))
        .task(
            TaskDefinition::new("typed", Action::rust("audit"))
                .after(["score"])
                .when("flow.input.amount == 'lots'"),
        )
        .task(
            TaskDefinition::new("names", Action::rust("audit"))
                .after(["score"])
                .when("tasks.later.output.x > 1 || flow.input.amont > 2"),
        )
        .task(
            TaskDefinition::new("syntax", Action::rust("audit"))
                .after(["score"])
                .when("tasks.score.output.x >")
                .requires(["later"]),
        )
        .task(both)
        .task(
            TaskDefinition::signal("sig", "bad name!")
                .signal_timeout(std::time::Duration::ZERO)
                .compensate(Action::rust("audit")),
        )
        .task({
            let mut t = TaskDefinition::wait("wait_and_act", std::time::Duration::from_secs(1));
            t.action = Some(Action::rust("audit"));
            t
        })
        .build();
    let problems = problems(&bad);
    for expected in [
        r#"task "typed": condition "flow.input.amount == 'lots'" compares a number with a string"#,
        r#"task "names": condition "tasks.later.output.x > 1 || flow.input.amont > 2" refers to task "later", which is not among the tasks it depends on"#,
        r#"task "names": condition "tasks.later.output.x > 1 || flow.input.amont > 2" refers to undeclared flow input "amont""#,
        r#"task "syntax": condition "tasks.score.output.x >" does not parse"#,
        r#"task "syntax": requires "later", which is not among its depends_on"#,
        r#"task "both": its wait has both duration_ms and until"#,
        r#"task "sig": signal name "bad name!" must be non-empty"#,
        r#"task "sig": its signal timeout_ms must be more than 0"#,
        r#"task "sig": a wait, signal or await_event task has nothing to compensate"#,
        r#"task "wait_and_act": has an action and a wait"#,
    ] {
        assert_has(&problems, expected);
    }
}

#[cfg(feature = "yaml")]
#[test]
fn conditions_waits_and_signals_read_from_yaml() {
    let flow = FlowDefinition::from_yaml(
        r#"
name: loan
input: { amount: number }
tasks:
  - name: score
    action: { executor: rust, function: audit }
  - name: approval
    depends_on: [score]
    when: "tasks.score.output.value < 700"
    signal: { name: approved, timeout_ms: 60000 }
    on_exhausted: fail
  - name: cool_off
    depends_on: [approval]
    requires: [approval]
    wait: { duration_ms: 500 }
"#,
    )
    .expect("parses");
    assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
    let approval = flow.task("approval").unwrap();
    assert_eq!(approval.signal.as_ref().unwrap().name, "approved");
    assert_eq!(
        approval.when.as_deref(),
        Some("tasks.score.output.value < 700")
    );
    assert_eq!(
        flow.task("cool_off")
            .unwrap()
            .wait
            .as_ref()
            .unwrap()
            .duration_ms,
        Some(500)
    );
}

#[cfg(feature = "yaml")]
#[test]
fn input_fields_with_required_and_default_read_from_yaml() {
    let flow = FlowDefinition::from_yaml(
        r#"
name: inputs
input:
  amount: integer
  currency: { type: string, default: EUR }
  note: { type: string, required: false, description: "free text" }
  count: { type: integer, required: true, default: "3" }
tasks:
  - name: a
    action: { executor: rust, function: audit }
"#,
    )
    .expect("parses");
    let problems = problems(&flow);
    assert_eq!(
        problems,
        [
            r#"flow input "count": has a default, so it cannot be required (remove one of required and default)"#,
            r#"flow input "count": its default "3" must be an integer (write 3)"#,
        ]
    );
    assert_eq!(
        flow.prepare_input(&json!({"amount": 1})).unwrap(),
        json!({"amount": 1, "currency": "EUR", "count": "3"})
    );
    // A type alone reads back as a type alone: the version of a definition
    // written before input rules existed is unchanged.
    assert_eq!(
        serde_json::to_value(&flow.input["amount"]).unwrap(),
        json!("integer")
    );
}

#[test]
fn for_each_problems() {
    let flow = FlowDefinition::builder("fan")
        .task(
            TaskDefinition::new("ok", Action::rust("reserve"))
                .for_each("{{flow.input.lines}}", 4)
                .input("sku", json!("{{item.sku}}"))
                .input("n", json!("{{item_index}}")),
        )
        .task(
            TaskDefinition::new("stray", Action::rust("audit")).input("sku", json!("{{item.sku}}")),
        )
        .task(
            TaskDefinition::new("zero", Action::rust("audit")).for_each("{{flow.input.lines}}", 0),
        )
        .task(
            TaskDefinition::new("mixed", Action::rust("audit"))
                .for_each("lines: {{flow.input.lines}}", 2),
        )
        .task(TaskDefinition::new("itself", Action::rust("audit")).for_each("{{item}}", 2))
        .task(TaskDefinition::signal("waiting", "go").for_each("{{flow.input.lines}}", 2))
        .build();
    let problems = problems(&flow);
    assert_lacks(&problems, "task \"ok\"");
    assert_has(&problems, "task \"stray\"");
    assert_has(&problems, "task \"zero\"");
    assert_has(&problems, "task \"mixed\"");
    assert_has(&problems, "task \"itself\"");
    assert_has(&problems, "task \"waiting\"");
    assert_eq!(problems.len(), 5, "{problems:#?}");
}

#[cfg(feature = "yaml")]
#[test]
fn a_grpc_action_reads_from_yaml_and_its_syntax_is_checked() {
    let flow = FlowDefinition::from_yaml(
        r#"
name: grpc
input: { sku: string }
tasks:
  - name: reserve
    action:
      executor: grpc
      endpoint: "https://inventory.internal:443"
      method: inventory.v1.Inventory/Reserve
      descriptor_set: inventory
      message: { sku: "{{flow.input.sku}}", quantity: 1 }
      metadata: { x-tenant: acme }
    timeout_ms: 3000
  - name: bad
    action:
      executor: grpc
      endpoint: "inventory:443"
      method: Reserve
      descriptor_set: ""
      message: [1]
      metadata: { X-Tenant: "{{flow.input.nope}}" }
"#,
    )
    .expect("parses");
    let Some(Action::Grpc { metadata, .. }) = &flow.task("reserve").unwrap().action else {
        panic!("a grpc action")
    };
    assert_eq!(metadata["x-tenant"], "acme");
    let problems = problems(&flow);
    assert_lacks(&problems, "task \"reserve\"");
    for expected in [
        "grpc endpoint \"inventory:443\" must start with http:// or https://",
        "grpc method \"Reserve\" must be package.Service/Method",
        "grpc descriptor_set is empty",
        "grpc message must be a JSON object",
        "grpc metadata key \"X-Tenant\"",
        "undeclared flow input \"nope\"",
    ] {
        assert_has(&problems, expected);
    }
}
