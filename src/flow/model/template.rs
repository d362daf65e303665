//! Templates in task inputs and actions: `{{flow.input.amount}}`,
//! `{{tasks.reserve.output.id}}`, `{{input.sku}}`, `{{instance}}`,
//! `{{idempotency_key}}`, `{{business_key}}`.
//!
//! A string that is exactly one template takes the referenced JSON value with its
//! type (a number stays a number); templates inside longer strings are replaced by
//! the value's text.
//!
//! In an HTTP task's URL ([`render_url`], feature `http`), a template in the path,
//! the query or the fragment is percent-encoded, so a value like `../admin?x=1`
//! stays one path segment or one query component and cannot change the URL's
//! shape; a template where the URL begins (`{{flow.input.service}}/orders`) is the
//! base URL and goes in as it is, and one in the host must be a host name.

use std::collections::BTreeMap;

use serde_json::Value;

/// What templates can refer to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The flow instance's input.
    pub flow_input: &'a Value,
    /// Outputs of the tasks that succeeded (or were skipped with an output).
    pub outputs: &'a BTreeMap<String, Value>,
    /// The task's resolved input (`None` while resolving it).
    pub input: Option<&'a Value>,
    /// The instance id.
    pub instance: &'a str,
    /// The attempt's idempotency key.
    pub idempotency_key: &'a str,
    /// The instance's business key.
    pub business_key: Option<&'a str>,
    /// A `for_each` item and its index (`{{item}}`, `{{item_index}}`).
    pub item: Option<(&'a Value, u32)>,
}

/// A reference found in a template, for validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `flow.input.<field>...`
    FlowInput(String),
    /// `tasks.<task>.output...`
    TaskOutput(String),
    /// `input.<key>...`
    Input(String),
    /// `instance`, `idempotency_key`, `business_key`.
    Builtin,
    /// `item...` or `item_index`: a `for_each` task's item.
    Item,
    /// Anything else (an error).
    Unknown(String),
}

/// Every template reference inside `value`.
pub fn references(value: &Value) -> Vec<Reference> {
    let mut out = Vec::new();
    visit(value, &mut |s| {
        for path in templates(s) {
            out.push(classify(&path));
        }
    });
    out
}

fn visit(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|v| visit(v, f)),
        Value::Object(o) => o.values().for_each(|v| visit(v, f)),
        _ => {}
    }
}

/// The paths of the `{{...}}` templates in `s`.
fn templates(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push(rest[start + 2..start + 2 + len].trim().to_owned());
        rest = &rest[start + 2 + len + 2..];
    }
    out
}

fn classify(path: &str) -> Reference {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        ["flow", "input", field, ..] => Reference::FlowInput((*field).to_owned()),
        ["flow", "input"] => Reference::FlowInput(String::new()),
        ["tasks", task, "output", ..] => Reference::TaskOutput((*task).to_owned()),
        ["input", key, ..] => Reference::Input((*key).to_owned()),
        ["input"] => Reference::Input(String::new()),
        ["instance"] | ["idempotency_key"] | ["business_key"] => Reference::Builtin,
        ["item", ..] | ["item_index"] => Reference::Item,
        _ => Reference::Unknown(path.to_owned()),
    }
}

fn lookup(path: &str, ctx: &Context<'_>) -> Option<Value> {
    let parts: Vec<&str> = path.split('.').collect();
    let (root, rest): (Value, &[&str]) = match parts.as_slice() {
        ["flow", "input", rest @ ..] => (ctx.flow_input.clone(), rest),
        ["tasks", task, "output", rest @ ..] => (ctx.outputs.get(*task)?.clone(), rest),
        ["input", rest @ ..] => (ctx.input?.clone(), rest),
        ["instance"] => (Value::String(ctx.instance.to_owned()), &[]),
        ["idempotency_key"] => (Value::String(ctx.idempotency_key.to_owned()), &[]),
        ["business_key"] => (Value::String(ctx.business_key?.to_owned()), &[]),
        ["item_index"] => (Value::from(ctx.item?.1), &[]),
        ["item", rest @ ..] => (ctx.item?.0.clone(), rest),
        _ => return None,
    };
    let mut v = root;
    for p in rest {
        v = match v {
            Value::Object(mut o) => o.remove(*p)?,
            Value::Array(mut a) => {
                let i: usize = p.parse().ok()?;
                if i >= a.len() {
                    return None;
                }
                a.swap_remove(i)
            }
            _ => return None,
        };
    }
    Some(v)
}

/// `value` with its templates replaced.
///
/// # Errors
/// The first template that refers to nothing.
pub fn render(value: &Value, ctx: &Context<'_>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => render_str(s, ctx)?,
        Value::Array(a) => {
            Value::Array(a.iter().map(|v| render(v, ctx)).collect::<Result<_, _>>()?)
        }
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// A string with its templates replaced by text.
///
/// # Errors
/// The first template that refers to nothing.
pub fn render_text(s: &str, ctx: &Context<'_>) -> Result<String, String> {
    Ok(match render_str(s, ctx)? {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

fn render_str(s: &str, ctx: &Context<'_>) -> Result<Value, String> {
    let trimmed = s.trim();
    if trimmed.starts_with("{{")
        && trimmed.ends_with("}}")
        && trimmed[2..].find("{{").is_none()
        && trimmed[2..].find("}}") == Some(trimmed.len() - 4)
    {
        let path = trimmed[2..trimmed.len() - 2].trim();
        return lookup(path, ctx)
            .ok_or_else(|| format!("template {{{{{path}}}}} refers to nothing"));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let path = rest[start + 2..start + 2 + len].trim();
        match lookup(path, ctx) {
            Some(Value::String(v)) => out.push_str(&v),
            Some(v) => out.push_str(&v.to_string()),
            None => return Err(format!("template {{{{{path}}}}} refers to nothing")),
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Where in a URL a template stands (by the text rendered before it).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UrlPart {
    /// Before `://`: the template is (the start of) the base URL.
    Base,
    /// After `://`, before the path: the host (and port).
    Authority,
    Path,
    Query,
    Fragment,
}

/// The part of a URL that `rendered` (a prefix of it) ends in.
#[cfg(feature = "http")]
fn url_part(rendered: &str) -> UrlPart {
    let mut part = UrlPart::Base;
    let mut rest = rendered;
    if let Some(i) = rest.find("://") {
        part = UrlPart::Authority;
        rest = &rest[i + 3..];
    } else {
        return part;
    }
    for c in rest.chars() {
        part = match (part, c) {
            (UrlPart::Authority, '/' | '\\') => UrlPart::Path,
            (UrlPart::Authority | UrlPart::Path, '?') => UrlPart::Query,
            (UrlPart::Authority | UrlPart::Path | UrlPart::Query, '#') => UrlPart::Fragment,
            (p, _) => p,
        };
    }
    part
}

/// Everything but the unreserved characters of RFC 3986 (`A-Z a-z 0-9 - . _ ~`):
/// what a templated path segment or query component is encoded with.
#[cfg(feature = "http")]
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An HTTP task's URL with its templates replaced, safely for the URL's shape:
///
/// - a template where the URL begins (before any `://`) is the base URL, inserted
///   as it is (`{{flow.input.service}}/orders`, or a whole `{{input.url}}`): which
///   hosts it may name is the engine's [`HttpPolicy`](crate::flow::HttpPolicy)'s
///   business;
/// - a template in the host must render to host characters (letters, digits,
///   `-`, `.`, `_`, `:` and the brackets of an IPv6 address), or it is refused;
/// - a template in the path, the query or the fragment is percent-encoded (every
///   byte but `A-Z a-z 0-9 - . _ ~`), so `/`, `?`, `&`, `=`, `#` in a value stay
///   data; and a path segment a template makes empty, `.` or `..` is refused
///   (it would change which resource the URL names).
///
/// # Errors
/// The first template that refers to nothing, or a value refused as above.
#[cfg(feature = "http")]
pub fn render_url(s: &str, ctx: &Context<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    // Byte ranges of `out` filled by templates in the path.
    let mut in_path: Vec<(usize, usize)> = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let path = rest[start + 2..start + 2 + len].trim();
        let value = match lookup(path, ctx) {
            Some(Value::String(v)) => v,
            Some(v) => v.to_string(),
            None => return Err(format!("template {{{{{path}}}}} refers to nothing")),
        };
        match url_part(&out) {
            UrlPart::Base => out.push_str(&value),
            UrlPart::Authority => {
                let host_like = !value.is_empty()
                    && value.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
                    });
                if !host_like {
                    return Err(format!(
                        "template {{{{{path}}}}} in the URL's host is not a host name"
                    ));
                }
                out.push_str(&value);
            }
            UrlPart::Path => {
                let from = out.len();
                out.extend(percent_encoding::utf8_percent_encode(&value, COMPONENT));
                in_path.push((from, out.len()));
            }
            UrlPart::Query | UrlPart::Fragment => {
                out.extend(percent_encoding::utf8_percent_encode(&value, COMPONENT));
            }
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    // URL parsers drop tabs and newlines anywhere and trim spaces and control
    // characters at the ends, which would join a templated `..` to its
    // neighbours after the check below (a YAML `url: |` block ends with a
    // newline). Template values are percent-encoded, so such characters can only
    // come from the URL text itself: refuse them.
    if let Some(c) = out.chars().find(|c| c.is_ascii_control() || *c == ' ') {
        return Err(format!(
            "the URL contains {c:?}; spaces and control characters must be percent-encoded"
        ));
    }
    check_templated_segments(&out, &in_path)?;
    Ok(out)
}

/// Refuses a path segment of `url` that contains a templated range of `ranges`
/// and is empty, `.` or `..` (also spelled `%2e`): a URL parser would drop it or
/// step up a level.
#[cfg(feature = "http")]
fn check_templated_segments(url: &str, ranges: &[(usize, usize)]) -> Result<(), String> {
    if ranges.is_empty() {
        return Ok(());
    }
    let Some(scheme_end) = url.find("://") else {
        return Ok(());
    };
    let after = scheme_end + 3;
    let Some(path_start) = url[after..].find(['/', '\\', '?', '#']).map(|i| i + after) else {
        return Ok(());
    };
    let path_end = url[path_start..]
        .find(['?', '#'])
        .map_or(url.len(), |i| i + path_start);
    let mut seg_start = path_start;
    for (i, c) in url[path_start..path_end].char_indices() {
        let at = path_start + i;
        if c == '/' || c == '\\' {
            check_segment(url, seg_start, at, ranges)?;
            seg_start = at + 1;
        }
    }
    check_segment(url, seg_start, path_end, ranges)
}

#[cfg(feature = "http")]
fn check_segment(
    url: &str,
    from: usize,
    to: usize,
    ranges: &[(usize, usize)],
) -> Result<(), String> {
    if from > to || !ranges.iter().any(|&(a, b)| a >= from && b <= to) {
        return Ok(());
    }
    let segment = url[from..to].to_ascii_lowercase().replace("%2e", ".");
    if matches!(segment.as_str(), "" | "." | "..") {
        return Err(format!(
            "a template makes the URL path segment {:?}, which would change the path",
            &url[from..to]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Found by the `template_url` fuzz target: whitespace or control characters
    /// next to a templated `..` were stripped by the URL parser after the check.
    #[cfg(feature = "http")]
    #[test]
    fn whitespace_cannot_smuggle_a_dot_dot_segment() {
        use serde_json::json;
        let input = json!({"dots": ".."});
        let outputs = std::collections::BTreeMap::new();
        let ctx = super::Context {
            flow_input: &input,
            outputs: &outputs,
            input: None,
            instance: "i",
            idempotency_key: "k",
            business_key: None,
            item: None,
        };
        for url in [
            "https://files.example/users/{{flow.input.dots}}\n",
            "https://files.example/users/{{flow.input.dots}} ",
            "https://files.example/users/{{flow.input.dots}}\t/admin",
            "p:////.{{flow.input.dots}}\u{4}",
        ] {
            assert!(super::render_url(url, &ctx).is_err(), "{url:?}");
        }
        assert!(
            super::render_url("https://files.example/users/{{flow.input.dots}}x", &ctx).is_ok()
        );
    }

    use serde_json::json;

    use super::*;

    #[test]
    fn whole_templates_keep_their_type_and_embedded_ones_become_text() {
        let input = json!({"amount": 42, "customer": {"id": "c1"}});
        let mut outputs = BTreeMap::new();
        outputs.insert("reserve".to_owned(), json!({"ids": ["r1", "r2"]}));
        let ctx = Context {
            flow_input: &input,
            outputs: &outputs,
            input: None,
            instance: "i1",
            idempotency_key: "i1/pay/action",
            business_key: Some("order-7"),
            item: None,
        };
        let v = json!({
            "amount": "{{flow.input.amount}}",
            "who": "customer {{ flow.input.customer.id }} of {{business_key}}",
            "first": "{{tasks.reserve.output.ids.0}}",
            "static": 3,
        });
        assert_eq!(
            render(&v, &ctx).unwrap(),
            json!({"amount": 42, "who": "customer c1 of order-7", "first": "r1", "static": 3})
        );
        assert!(render(&json!("{{tasks.ship.output}}"), &ctx).is_err());
        assert!(render(&json!("x {{flow.input.nope}}"), &ctx).is_err());
        let refs = references(&v);
        assert_eq!(refs.len(), 4);
        for r in [
            Reference::FlowInput("amount".into()),
            Reference::FlowInput("customer".into()),
            Reference::Builtin,
            Reference::TaskOutput("reserve".into()),
        ] {
            assert!(refs.contains(&r), "{r:?}");
        }
    }

    #[cfg(feature = "http")]
    fn url_ctx<'a>(input: &'a Value, outputs: &'a BTreeMap<String, Value>) -> Context<'a> {
        Context {
            flow_input: input,
            outputs,
            input: None,
            instance: "i1",
            idempotency_key: "i1/call/action",
            business_key: Some("order 7/8"),
            item: None,
        }
    }

    #[cfg(feature = "http")]
    #[test]
    fn templates_in_a_url_path_or_query_cannot_change_its_shape() {
        let input = json!({
            "id": "../admin?x=1",
            "q": "a&b=c#d",
            "n": 42,
            "service": "http://shop.internal:8080/api",
            "unicode": "café/ü",
        });
        let outputs = BTreeMap::new();
        let ctx = url_ctx(&input, &outputs);
        let url = |s: &str| render_url(s, &ctx);
        assert_eq!(
            url("https://x.example/users/{{flow.input.id}}/orders").unwrap(),
            "https://x.example/users/..%2Fadmin%3Fx%3D1/orders"
        );
        assert_eq!(
            url("https://x.example/search?q={{flow.input.q}}&n={{flow.input.n}}").unwrap(),
            "https://x.example/search?q=a%26b%3Dc%23d&n=42"
        );
        assert_eq!(
            url("https://x.example/o/{{business_key}}#{{flow.input.q}}").unwrap(),
            "https://x.example/o/order%207%2F8#a%26b%3Dc%23d"
        );
        assert_eq!(
            url("https://x.example/{{flow.input.unicode}}").unwrap(),
            "https://x.example/caf%C3%A9%2F%C3%BC"
        );
        // The base URL is the template at the start, inserted as it is; what
        // follows it is encoded again.
        assert_eq!(
            url("{{flow.input.service}}/stock/{{flow.input.id}}").unwrap(),
            "http://shop.internal:8080/api/stock/..%2Fadmin%3Fx%3D1"
        );
        assert_eq!(
            url("{{flow.input.service}}").unwrap(),
            "http://shop.internal:8080/api"
        );
        // Unreserved characters stay as they are.
        assert_eq!(
            url("https://x.example/{{instance}}/{{idempotency_key}}").unwrap(),
            "https://x.example/i1/i1%2Fcall%2Faction"
        );
        // No template: unchanged, whatever it contains.
        assert_eq!(
            url("https://x.example/a/../b?c=d").unwrap(),
            "https://x.example/a/../b?c=d"
        );
        assert!(url("https://x.example/{{flow.input.nope}}").is_err());
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_template_making_a_dot_or_empty_segment_or_a_bad_host_is_refused() {
        let input = json!({"dots": "..", "dot": ".", "empty": "", "host": "evil.example/x?", "ok": "api.example:8443"});
        let outputs = BTreeMap::new();
        let ctx = url_ctx(&input, &outputs);
        let url = |s: &str| render_url(s, &ctx);
        for bad in [
            "https://x.example/users/{{flow.input.dots}}",
            "https://x.example/users/{{flow.input.dots}}/admin",
            "https://x.example/users/{{flow.input.dot}}/admin",
            "https://x.example/users/.{{flow.input.dot}}/admin",
            "https://x.example/users/{{flow.input.dot}}%2E",
            "https://x.example/users/{{flow.input.empty}}",
            "https://x.example/users/{{flow.input.empty}}/delete",
            "https://{{flow.input.host}}/x",
            "https://{{flow.input.empty}}/x",
        ] {
            assert!(url(bad).is_err(), "{bad} was accepted: {:?}", url(bad));
        }
        // Dots inside a longer segment, and in the query, are fine.
        assert_eq!(
            url("https://x.example/f/{{flow.input.dots}}x?up={{flow.input.dots}}").unwrap(),
            "https://x.example/f/..x?up=.."
        );
        assert_eq!(
            url("https://{{flow.input.ok}}/x").unwrap(),
            "https://api.example:8443/x"
        );
        // An empty value in the query is just an empty value.
        assert_eq!(
            url("https://x.example/s?q={{flow.input.empty}}").unwrap(),
            "https://x.example/s?q="
        );
    }
}
