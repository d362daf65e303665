//! The `grpc` executor (feature `grpc`): unary calls to any service described
//! by a registered protobuf descriptor set, with dynamic messages
//! (prost-reflect) built from the task's templated JSON, over tonic channels.
//!
//! - The idempotency key and the W3C trace context travel as the metadata
//!   `idempotency-key` and `traceparent`, beside the task's own entries.
//! - The step's timeout is sent as the call's deadline (`grpc-timeout`).
//! - UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and ABORTED are
//!   retryable; every other status is fatal. The error code is
//!   `grpc_<status>` (`grpc_unavailable`, `grpc_not_found`, …).
//! - The endpoint is checked against the engine's [`HttpPolicy`] before every
//!   call, as an HTTP task's URL is.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions,
};
use serde_json::Value;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::executor::{HttpPolicy, SharedPolicy};
use crate::flow::model::definition::{Action, FlowDefinition};
use crate::flow::model::failure::TaskError;

/// Descriptor sets by name, and a channel per endpoint.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpcTasks {
    sets: Arc<RwLock<HashMap<String, DescriptorPool>>>,
    channels: Arc<RwLock<HashMap<String, Channel>>>,
}

/// What [`Flows::grpc_descriptor_set`](crate::flow::Flows::grpc_descriptor_set)
/// could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("descriptor set {name:?} cannot be read: {reason}")]
pub struct DescriptorSetError {
    /// The name it was to be registered under.
    pub name: String,
    /// Why (a `FileDescriptorSet` that does not decode, or whose files do not
    /// resolve).
    pub reason: String,
}

/// One unary call, templates rendered.
pub(crate) struct Call<'a> {
    pub endpoint: &'a str,
    pub method: &'a str,
    pub descriptor_set: &'a str,
    pub message: Value,
    pub metadata: Vec<(String, String)>,
    pub idempotency_key: &'a str,
    pub traceparent: &'a str,
    pub timeout: Duration,
}

/// Checks that `bytes` is a descriptor set whose files resolve (what
/// [`Flows::grpc_descriptor_set`](crate::flow::Flows::grpc_descriptor_set)
/// accepts), without registering it: for configuration checks.
///
/// # Errors
/// [`DescriptorSetError`] saying why not.
pub fn check_descriptor_set(name: &str, bytes: &[u8]) -> Result<(), DescriptorSetError> {
    DescriptorPool::decode(bytes)
        .map(|_| ())
        .map_err(|e| DescriptorSetError {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

impl GrpcTasks {
    /// Registers (or replaces) descriptor set `name`.
    pub(crate) fn register(&self, name: &str, bytes: &[u8]) -> Result<(), DescriptorSetError> {
        let pool = DescriptorPool::decode(bytes).map_err(|e| DescriptorSetError {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        self.sets
            .write()
            .expect("descriptor sets lock")
            .insert(name.to_owned(), pool);
        Ok(())
    }

    /// The method `package.Service/Method` of set `set`, or why not.
    fn method(&self, set: &str, method: &str) -> Result<MethodDescriptor, String> {
        let sets = self.sets.read().expect("descriptor sets lock");
        let Some(pool) = sets.get(set) else {
            let mut known: Vec<&String> = sets.keys().collect();
            known.sort();
            return Err(format!(
                "descriptor set {set:?} is not registered (registered: {}; Flows::grpc_descriptor_set)",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        };
        let Some((service, name)) = method.split_once('/') else {
            return Err(format!(
                "grpc method {method:?} must be package.Service/Method"
            ));
        };
        let Some(svc) = pool.get_service_by_name(service) else {
            return Err(format!("descriptor set {set:?} has no service {service:?}"));
        };
        let Some(m) = svc.methods().find(|m| m.name() == name) else {
            let names: Vec<String> = svc.methods().map(|m| m.name().to_owned()).collect();
            return Err(format!(
                "service {service:?} has no method {name:?} (it has {})",
                names.join(", ")
            ));
        };
        if m.is_client_streaming() || m.is_server_streaming() {
            return Err(format!(
                "{method} is a streaming method: the grpc executor makes unary calls only"
            ));
        }
        Ok(m)
    }

    /// The problems of a definition's gRPC actions against the registered
    /// descriptor sets: unknown sets, services and methods, streaming methods,
    /// and message fields the request type does not have.
    pub(crate) fn problems(&self, def: &FlowDefinition) -> Vec<String> {
        let mut problems = Vec::new();
        for task in &def.tasks {
            let mut actions: Vec<(&str, &Action)> = Vec::new();
            if let Some(a) = &task.action {
                actions.push(("", a));
            }
            if let Some(a) = &task.compensate {
                actions.push(("compensate: ", a));
            }
            if let Some(tcc) = &task.tcc {
                for p in &tcc.participants {
                    actions.push(("try: ", &p.try_action));
                    actions.push(("confirm: ", &p.confirm));
                    actions.push(("cancel: ", &p.cancel));
                }
            }
            for (label, action) in actions {
                let Action::Grpc {
                    method,
                    descriptor_set,
                    message,
                    ..
                } = action
                else {
                    continue;
                };
                let prefix = format!("task {:?}: {label}", task.name);
                match self.method(descriptor_set, method) {
                    Err(why) => problems.push(format!("{prefix}{why}")),
                    Ok(m) => {
                        if let Value::Object(fields) = message {
                            let input = m.input();
                            for key in fields.keys() {
                                let known = input.get_field_by_name(key).is_some()
                                    || input.get_field_by_json_name(key).is_some();
                                if !known {
                                    let names: Vec<String> =
                                        input.fields().map(|f| f.name().to_owned()).collect();
                                    problems.push(format!(
                                        "{prefix}grpc message field {key:?} is not a field of {} (it has {})",
                                        input.full_name(),
                                        names.join(", ")
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        problems
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, TaskError> {
        if let Some(c) = self.channels.read().expect("channels lock").get(endpoint) {
            return Ok(c.clone());
        }
        let invalid = |e: &dyn std::fmt::Display| {
            TaskError::fatal(format!("grpc endpoint {endpoint:?}: {e}")).code("grpc_endpoint")
        };
        let mut e = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| invalid(&e))?
            .connect_timeout(Duration::from_secs(5));
        if endpoint.starts_with("https://") {
            e = e
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| invalid(&e))?;
        }
        let channel = e.connect_lazy();
        let mut channels = self.channels.write().expect("channels lock");
        if channels.len() >= 256 {
            channels.clear();
        }
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Makes the call; the reply as JSON.
    pub(crate) async fn call(
        &self,
        policy: &SharedPolicy,
        call: Call<'_>,
    ) -> Result<Value, TaskError> {
        let method = self
            .method(call.descriptor_set, call.method)
            .map_err(|why| TaskError::fatal(why).code("grpc_method"))?;
        let message = match call.message {
            Value::Null => DynamicMessage::new(method.input()),
            m => DynamicMessage::deserialize(method.input(), m).map_err(|e| {
                TaskError::fatal(format!(
                    "the grpc message is not a valid {}: {e}",
                    method.input().full_name()
                ))
                .code("grpc_message")
            })?,
        };
        let policy: Arc<HttpPolicy> = policy.read().expect("HTTP policy lock").clone();
        let url = reqwest::Url::parse(call.endpoint).map_err(|e| {
            TaskError::fatal(format!("grpc endpoint {:?}: {e}", call.endpoint))
                .code("grpc_endpoint")
        })?;
        policy.check(&url).await?;
        let max = policy.response_limit();
        let mut request = tonic::Request::new(message);
        request.set_timeout(call.timeout);
        let md = request.metadata_mut();
        for (key, value) in &call.metadata {
            let k = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).map_err(|_| {
                TaskError::fatal(format!("invalid grpc metadata key {key:?}")).code("grpc_metadata")
            })?;
            // The value may be a secret: no error names it.
            let v = value.parse().map_err(|_| {
                TaskError::fatal(format!(
                    "the value of grpc metadata {key} is not valid ASCII"
                ))
                .code("grpc_metadata")
            })?;
            md.insert(k, v);
        }
        for (key, value) in [
            ("idempotency-key", call.idempotency_key),
            ("traceparent", call.traceparent),
        ] {
            if let Ok(v) = value.parse() {
                md.insert(key, v);
            }
        }
        let path: tonic::codegen::http::uri::PathAndQuery =
            format!("/{}/{}", method.parent_service().full_name(), method.name())
                .parse()
                .map_err(|_| {
                    TaskError::fatal(format!("grpc method {:?} is not a valid path", call.method))
                        .code("grpc_method")
                })?;
        let mut client =
            tonic::client::Grpc::new(self.channel(call.endpoint)?).max_decoding_message_size(max);
        client.ready().await.map_err(|e| {
            TaskError::retryable(format!(
                "grpc endpoint {}: {e}",
                url.origin().ascii_serialization()
            ))
            .code("grpc_connect")
        })?;
        let reply = client
            .unary(request, path, DynamicCodec(method.output()))
            .await
            .map_err(|s| status_error(call.method, &s))?
            .into_inner();
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false)
            .stringify_64_bit_integers(false);
        reply
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| {
                TaskError::fatal(format!("the grpc reply does not convert to JSON: {e}"))
                    .code("grpc_reply")
            })
    }
}

/// Whether a status is worth retrying.
pub(crate) fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

fn status_error(method: &str, s: &Status) -> TaskError {
    let name = format!("{:?}", s.code());
    let mut code = String::from("grpc_");
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_lowercase());
    }
    let message = format!(
        "{method}: {}: {}",
        code.trim_start_matches("grpc_").to_uppercase(),
        s.message()
    );
    let e = if retryable(s.code()) {
        TaskError::retryable(message)
    } else {
        TaskError::fatal(message)
    };
    e.code(code)
}

/// tonic's codec for dynamic messages: encodes any, decodes the method's output
/// type.
struct DynamicCodec(MessageDescriptor);

struct DynamicEncoder;

struct DynamicDecoder(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.0.clone())
    }
}

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the reply: {e}")))
    }
}
