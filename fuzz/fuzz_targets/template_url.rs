//! `render_url` (an HTTP task's URL, feature `http`) on arbitrary text.
//!
//! Input: `<url template>\0<flow input JSON>`; a missing or unparsable flow input
//! takes a default with hostile values. Besides never panicking: a URL without
//! templates renders unchanged, an unknown reference is an error, and when the
//! scheme, host and start of the path are literal, the values put in by templates
//! cannot change the URL's scheme, host, port, number of path segments, query
//! components (`&`) or fragment, as the `url` crate (what reqwest uses) parses it.
#![no_main]

use std::collections::BTreeMap;

use dcbflow::flow::template::{Context, Reference, references, render_url};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// What the URL's structure is, as far as templates may not change it.
type Shape = (String, Option<String>, Option<u16>, usize, usize, bool, bool);

fn shape(u: &url::Url) -> Shape {
    (
        u.scheme().to_owned(),
        u.host_str().map(str::to_owned),
        u.port(),
        u.path_segments().map_or(0, Iterator::count),
        u.query().map_or(0, |q| q.split('&').count()),
        u.query().is_some(),
        u.fragment().is_some(),
    )
}

/// `s` with every template replaced by a plain `x`.
fn neutral(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push('x');
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Whether the scheme, the authority and the start of the path come before the
/// first template.
fn literal_origin(s: &str) -> bool {
    let head = &s[..s.find("{{").unwrap_or(s.len())];
    head.find("://")
        .is_some_and(|i| head[i + 3..].contains(['/', '\\', '?', '#']))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, rest) = text.split_once('\0').unwrap_or((text, ""));
    let flow_input: Value = serde_json::from_str(rest).unwrap_or_else(|_| {
        json!({
            "id": "../admin?x=1#f", "dots": "..", "dot": ".", "empty": "",
            "host": "api.example:8443", "service": "http://shop.internal/api",
            "n": 42, "pct": "%2e%2E", "slash": "a/b\\c", "uni": "café",
        })
    });
    let outputs = BTreeMap::from([("t".to_owned(), json!({"id": "a&b=c"}))]);
    let ctx = Context {
        flow_input: &flow_input,
        outputs: &outputs,
        input: None,
        instance: "0b3c1b9e-5d0e-4a8e-9a63-6f1f2a0d9e11",
        idempotency_key: "0b3c1b9e-5d0e-4a8e-9a63-6f1f2a0d9e11/t/action/1",
        business_key: Some("order 7/8"),
    };
    let refs = references(&Value::String(template.to_owned()));
    let rendered = render_url(template, &ctx);
    if refs.is_empty() {
        assert_eq!(rendered.as_deref(), Ok(template), "no template, yet rendering changed it");
    }
    if refs.iter().any(|r| matches!(r, Reference::Unknown(_))) {
        assert!(rendered.is_err(), "an unknown reference rendered: {rendered:?}");
    }
    let Ok(rendered) = rendered else {
        return;
    };
    if !literal_origin(template) {
        return;
    }
    let (Ok(expected), Ok(got)) = (url::Url::parse(&neutral(template)), url::Url::parse(&rendered))
    else {
        return;
    };
    assert_eq!(
        shape(&got),
        shape(&expected),
        "templates changed the URL's shape: {template:?} rendered {rendered:?}"
    );
});
