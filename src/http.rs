//! The HTTP client every HTTP caller of the crate builds on (webhooks, the flow
//! engine's HTTP tasks): TLS through rustls with the ring provider, verified
//! against the platform's roots.
//!
//! A leaf module: it depends on no layer.

/// A `reqwest` client builder with dcbflow's TLS set up.
///
/// reqwest is built with rustls but without a crypto provider of its own (the
/// one NATS already uses is ring, and two providers would leave rustls without
/// a default), so the process-wide default provider is installed first: ring,
/// unless the application installed one already.
pub fn client_builder() -> reqwest::ClientBuilder {
    // Err: a provider is installed already (by us or by the application): keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}
