//! Executors: what runs a step's action. Remote ones (HTTP, Rust functions, your
//! own [`TaskExecutor`]) run outside any transaction, at least once; SQL and NATS
//! actions are completed inside the transaction that records the step's success.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
#[cfg(feature = "http")]
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::transition::{BoundStatement, SqlWork};
use crate::flow::model::definition::Action;
use crate::flow::model::events::{Phase, StepId};
use crate::flow::model::failure::TaskError;
use crate::flow::model::template::{self, Context};

/// The executor kinds this build runs (`http` needs the `http` feature).
pub(crate) const AVAILABLE: &[&str] = &[
    #[cfg(feature = "http")]
    "http",
    "sql",
    "nats",
    "rust",
];

/// Everything an attempt knows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TaskContext {
    /// The instance.
    pub instance: Uuid,
    /// The flow's name.
    pub flow: String,
    /// The step (task, participant, phase).
    pub step: StepId,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// `<instance>/<task>[.<participant>]/<phase>`: the same on every attempt of
    /// the step; send it so the receiver can deduplicate.
    pub idempotency_key: String,
    /// The task's input, templates resolved.
    pub input: Value,
    /// The flow instance's input.
    pub flow_input: Value,
    /// Outputs of the tasks done so far.
    pub outputs: BTreeMap<String, Value>,
    /// The instance's business key.
    pub business_key: Option<String>,
}

impl TaskContext {
    /// The phase of this attempt.
    pub fn phase(&self) -> Phase {
        self.step.phase
    }
}

/// Runs a step's action outside the store's transaction. Implemented for async
/// closures `Fn(TaskContext) -> Future<Output = Result<Value, TaskError>>`; register
/// one with [`Flows::function`](crate::flow::Flows::function) and name it in an
/// `executor: rust` action.
pub trait TaskExecutor: Send + Sync + 'static {
    /// Runs one attempt; the value is the step's output.
    fn execute(&self, ctx: TaskContext) -> impl Future<Output = Result<Value, TaskError>> + Send;
}

impl<F, Fut> TaskExecutor for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    fn execute(&self, ctx: TaskContext) -> impl Future<Output = Result<Value, TaskError>> + Send {
        self(ctx)
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A [`TaskExecutor`] behind a pointer.
pub(crate) trait Erased: Send + Sync {
    fn call(self: Arc<Self>, ctx: TaskContext) -> BoxFuture<Result<Value, TaskError>>;
}

impl<T: TaskExecutor> Erased for T {
    fn call(self: Arc<Self>, ctx: TaskContext) -> BoxFuture<Result<Value, TaskError>> {
        Box::pin(async move { self.execute(ctx).await })
    }
}

/// What an attempt produced.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Done remotely: record the output.
    Output(Value),
    /// Run these statements in the completion transaction.
    Sql(Vec<BoundStatement>),
    /// Append this message for the outbox with the completion.
    Message { subject: String, payload: Value },
}

fn render_err(e: String) -> TaskError {
    TaskError::fatal(e).code("template")
}

/// Resolves an action into an effect, running it if it is remote.
pub(crate) async fn run(
    action: &Action,
    ctx: TaskContext,
    #[cfg(feature = "http")] http: &reqwest::Client,
    functions: Option<Arc<dyn Erased>>,
) -> Result<Effect, TaskError> {
    let instance = ctx.instance.to_string();
    let t = Context {
        flow_input: &ctx.flow_input,
        outputs: &ctx.outputs,
        input: Some(&ctx.input),
        instance: &instance,
        idempotency_key: &ctx.idempotency_key,
        business_key: ctx.business_key.as_deref(),
    };
    match action {
        Action::Rust { function } => match functions {
            Some(f) => f.call(ctx).await.map(Effect::Output),
            None => Err(
                TaskError::fatal(format!("rust function {function:?} is not registered"))
                    .code("unregistered"),
            ),
        },
        Action::Sql { statements } => {
            let mut out = Vec::with_capacity(statements.len());
            for s in statements {
                let params = s
                    .params
                    .iter()
                    .map(|p| {
                        Ok(match template::render(p, &t)? {
                            Value::Null => None,
                            Value::String(s) => Some(s),
                            other => Some(other.to_string()),
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(render_err)?;
                out.push(BoundStatement {
                    sql: s.sql.clone(),
                    params,
                });
            }
            Ok(Effect::Sql(out))
        }
        Action::Nats { subject, payload } => Ok(Effect::Message {
            subject: template::render_text(subject, &t).map_err(render_err)?,
            payload: template::render(payload, &t).map_err(render_err)?,
        }),
        #[cfg(not(feature = "http"))]
        Action::Http { .. } => Err(TaskError::fatal(
            "this build of dcbflow has no HTTP executor (feature `http`)",
        )
        .code("unavailable")),
        #[cfg(feature = "http")]
        Action::Http {
            method,
            url,
            headers,
            body,
        } => {
            let url = template::render_text(url, &t).map_err(render_err)?;
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                .map_err(|e| TaskError::fatal(e.to_string()).code("http_method"))?;
            let mut request = http
                .request(method, &url)
                .header("Idempotency-Key", &ctx.idempotency_key);
            for (name, value) in headers {
                request =
                    request.header(name, template::render_text(value, &t).map_err(render_err)?);
            }
            if let Some(body) = body {
                request = request.json(&template::render(body, &t).map_err(render_err)?);
            }
            let response = request.send().await.map_err(|e| {
                TaskError::retryable(format!("{url}: {e}")).code(if e.is_timeout() {
                    "timeout"
                } else {
                    "http_connect"
                })
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let text = response.text().await.unwrap_or_default();
            if status.is_success() {
                let output = serde_json::from_str(&text).unwrap_or(if text.is_empty() {
                    Value::Null
                } else {
                    Value::String(text)
                });
                return Ok(Effect::Output(output));
            }
            let code = status.as_u16();
            let message = format!(
                "{url}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            let mut err = if matches!(code, 408 | 425 | 429) || status.is_server_error() {
                TaskError::retryable(message)
            } else {
                TaskError::fatal(message)
            }
            .code(format!("http_{code}"));
            err.retry_after = retry_after;
            Err(err)
        }
    }
}

/// `Retry-After`: delta seconds or an HTTP date.
#[cfg(feature = "http")]
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
    }
}

impl Effect {
    /// The SQL work of a SQL step, with the step's timeout.
    pub(crate) fn sql_work(&self, timeout_ms: u64) -> Option<SqlWork> {
        match self {
            Effect::Sql(statements) => Some(SqlWork {
                statements: statements.clone(),
                timeout_ms,
            }),
            _ => None,
        }
    }
}
