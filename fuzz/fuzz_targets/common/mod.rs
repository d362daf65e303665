//! What every definition target checks once its format's parser has run.

use dcbflow::flow::{Action, DefinitionError, FlowDefinition, validate};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// The names of the Rust functions `def` calls, so that validation can also be
/// run as an engine that registered all of them would run it.
fn rust_functions(def: &FlowDefinition) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |a: &Action| {
        if let Action::Rust { function } = a {
            out.push(function.clone());
        }
    };
    for task in &def.tasks {
        task.action.iter().chain(&task.compensate).for_each(&mut add);
        for p in task.tcc.iter().flat_map(|t| &t.participants) {
            add(&p.try_action);
            add(&p.confirm);
            add(&p.cancel);
        }
    }
    out
}

/// Nesting depth of a JSON value (iterative).
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|v| (v, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|v| (v, d + 1))),
            _ => {}
        }
    }
    max
}

/// Validates a parsed definition; one that passes must survive what
/// `Flows::register` and `Flows::definition` do to it (JSON and back) unchanged.
///
/// With `DCBFLOW_FUZZ_DEBUG` set, prints what the parser and validation said (to
/// check seeds: `DCBFLOW_FUZZ_DEBUG=1 cargo fuzz run <target> <file>`).
pub fn check(parsed: Result<FlowDefinition, DefinitionError>) {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    let debug = *DEBUG.get_or_init(|| std::env::var_os("DCBFLOW_FUZZ_DEBUG").is_some());
    let def = match parsed {
        Ok(def) => def,
        Err(e) => {
            let e = e.to_string();
            if debug {
                eprintln!("parse error: {e}");
            }
            return;
        }
    };
    let bare = validate(&def, &[]);
    if debug {
        eprintln!("parsed {:?} ({} tasks); validate(&[]): {bare:?}", def.name, def.tasks.len());
    }
    if let Err(e) = &bare {
        let _ = e.to_string();
    }
    let functions = rust_functions(&def);
    let functions: Vec<&str> = functions.iter().map(String::as_str).collect();
    let registered = validate(&def, &functions);
    if bare.is_ok() {
        assert!(
            registered.is_ok(),
            "registering more functions made a valid definition invalid: {registered:?}"
        );
    }
    if registered.is_err() {
        return;
    }
    // Flows::register stores the definition as JSON; Flows::definition reads it
    // back with FlowDefinition::deserialize and recomputes the version.
    let version = def.version();
    let value = serde_json::to_value(&def).expect("a definition serializes");
    let back = FlowDefinition::deserialize(&value).expect("a valid definition reads back");
    assert_eq!(back, def, "JSON value round trip changed the definition");
    assert_eq!(back.version(), version, "JSON value round trip changed the version");
    // Through JSON text, as PostgreSQL hands it back (serde_json parses 128 levels;
    // the store refuses data nested deeper than 64).
    if depth(&value) < 120 {
        let text = serde_json::to_string(&def).expect("a definition serializes");
        let back = FlowDefinition::from_json(&text).expect("a valid definition re-parses");
        assert_eq!(back, def, "JSON text round trip changed the definition");
        assert_eq!(back.version(), version, "JSON text round trip changed the version");
    }
}
