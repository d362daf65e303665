//! A real tonic server of `inventory.v1.Inventory` (proto/inventory.proto) for
//! dcbflow's gRPC executor tests: it records every call with its metadata and
//! answers as the proto's comments say.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

/// The generated messages and server.
pub mod inventory {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("inventory.v1");
}

use inventory::inventory_server::{Inventory, InventoryServer};
use inventory::{ReleaseReply, ReleaseRequest, ReserveReply, ReserveRequest};

/// The encoded `FileDescriptorSet` of proto/inventory.proto.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inventory.bin"));

/// One call the server received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `Reserve` or `Release`.
    pub method: &'static str,
    /// The `idempotency-key` metadata.
    pub idempotency_key: Option<String>,
    /// The `traceparent` metadata.
    pub traceparent: Option<String>,
    /// The `x-tenant` metadata (a templated entry of the definition).
    pub tenant: Option<String>,
    /// The `grpc-timeout` the client sent, as sent.
    pub timeout: Option<String>,
    /// The request, as `Debug`.
    pub request: String,
    /// For `Reserve`: the SKU and quantity; for `Release`: the reservation.
    pub key: String,
    /// The quantity of a `Reserve`.
    pub quantity: i32,
}

/// The calls so far.
#[derive(Debug, Clone, Default)]
pub struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    /// A copy of the calls so far.
    pub fn all(&self) -> Vec<Call> {
        self.0.lock().expect("calls lock").clone()
    }
}

#[derive(Debug, Default)]
struct Service {
    calls: Calls,
    attempts: Mutex<HashMap<String, i64>>,
}

fn metadata(request: &tonic::metadata::MetadataMap, key: &str) -> Option<String> {
    request
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl Service {
    fn record<T: std::fmt::Debug>(
        &self,
        method: &'static str,
        request: &Request<T>,
        key: String,
        quantity: i32,
    ) -> i64 {
        let m = request.metadata();
        let idempotency_key = metadata(m, "idempotency-key");
        self.calls.0.lock().expect("calls lock").push(Call {
            method,
            idempotency_key: idempotency_key.clone(),
            traceparent: metadata(m, "traceparent"),
            tenant: metadata(m, "x-tenant"),
            timeout: metadata(m, "grpc-timeout"),
            request: format!("{:?}", request.get_ref()),
            key,
            quantity,
        });
        let mut attempts = self.attempts.lock().expect("attempts lock");
        let n = attempts
            .entry(format!("{method}:{}", idempotency_key.unwrap_or_default()))
            .or_default();
        *n += 1;
        *n
    }
}

#[tonic::async_trait]
impl Inventory for Service {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveReply>, Status> {
        let (sku, quantity) = (request.get_ref().sku.clone(), request.get_ref().quantity);
        let attempt = self.record("Reserve", &request, sku.clone(), quantity);
        match sku.as_str() {
            "flaky" if attempt <= 2 => Err(Status::unavailable("warming up")),
            "exhausted" if attempt <= 1 => Err(Status::resource_exhausted("quota")),
            "unknown" => Err(Status::not_found("no such sku")),
            _ => Ok(Response::new(ReserveReply {
                reservation_id: format!("r-{sku}-{quantity}"),
                sku,
                quantity,
                attempt,
            })),
        }
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        let id = request.get_ref().reservation_id.clone();
        self.record("Release", &request, id, 0);
        Ok(Response::new(ReleaseReply { released: true }))
    }

    type WatchStream = tokio_stream::Empty<Result<ReserveReply, Status>>;

    async fn watch(
        &self,
        _request: Request<ReserveRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
}

/// Starts the server on a free loopback port; it runs until the runtime ends.
///
/// # Panics
/// If no port can be bound.
pub async fn start() -> (SocketAddr, Calls) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let service = Service::default();
    let calls = service.calls.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(InventoryServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("serve");
    });
    (addr, calls)
}
