//! The backend the integration tests run in containers: Plane's demo backend, built as
//! its own small program so the suite can package it without the `plane` binary.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    plane::demo_backend::run().await
}
