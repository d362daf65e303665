//! Templates: `render`, `render_text` and `references` on arbitrary text.
//!
//! Input: `<template>\0<flow input JSON>\0<outputs JSON object>\0<task input JSON>`;
//! missing or unparsable parts take defaults. The template is rendered both as a
//! plain string and, when it parses as JSON, as a JSON value.
#![no_main]

use std::collections::BTreeMap;

use dcbflow::flow::template::{Context, Reference, references, render, render_text};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn part<T: serde::de::DeserializeOwned>(p: Option<&str>) -> Option<T> {
    p.and_then(|s| serde_json::from_str(s).ok())
}

/// What must hold between `references(value)` and `render(value)`.
fn check(value: &Value, ctx: &Context<'_>) {
    let refs = references(value);
    let rendered = render(value, ctx);
    if refs.is_empty() {
        assert_eq!(rendered.as_ref(), Ok(value), "no template, yet rendering changed it");
    }
    if refs.iter().any(|r| matches!(r, Reference::Unknown(_))) {
        assert!(rendered.is_err(), "an unknown reference rendered: {rendered:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(4, '\0');
    let template = parts.next().unwrap_or("");
    let flow_input: Value = part(parts.next()).unwrap_or_else(
        || json!({"name": "Ada", "amount": 42, "items": [1, "two", {"x": [true, null]}]}),
    );
    let outputs: BTreeMap<String, Value> = part(parts.next()).unwrap_or_else(|| {
        BTreeMap::from([
            ("greet".to_owned(), json!({"text": "hi", "ids": ["r1", "r2"]})),
            ("charge".to_owned(), json!(7.5)),
        ])
    });
    let input: Option<Value> = part(parts.next());
    let ctx = Context {
        flow_input: &flow_input,
        outputs: &outputs,
        input: input.as_ref(),
        instance: "0b3c1b9e-5d0e-4a8e-9a63-6f1f2a0d9e11",
        idempotency_key: "0b3c1b9e-5d0e-4a8e-9a63-6f1f2a0d9e11/greet/action/1",
        business_key: template.len().is_multiple_of(2).then_some("order-7"),
    };

    let as_string = Value::String(template.to_owned());
    check(&as_string, &ctx);
    let as_value = render(&as_string, &ctx);
    let as_text = render_text(template, &ctx);
    assert_eq!(as_value.is_ok(), as_text.is_ok(), "{as_value:?} vs {as_text:?}");
    if let (Ok(Value::String(v)), Ok(t)) = (&as_value, &as_text) {
        assert_eq!(v, t);
    }
    if let Ok(value) = serde_json::from_str::<Value>(template) {
        check(&value, &ctx);
    }
});
