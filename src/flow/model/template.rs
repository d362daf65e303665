//! Templates in task inputs and actions: `{{flow.input.amount}}`,
//! `{{tasks.reserve.output.id}}`, `{{input.sku}}`, `{{instance}}`,
//! `{{idempotency_key}}`, `{{business_key}}`.
//!
//! A string that is exactly one template takes the referenced JSON value with its
//! type (a number stays a number); templates inside longer strings are replaced by
//! the value's text.

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

#[cfg(test)]
mod tests {
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
}
