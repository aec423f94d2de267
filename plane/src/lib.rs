//! Plane: the controller, the all-in-one `plane dev`, and the pieces of the `plane` CLI.
//!
//! The drone and proxy live in their own crates (`plane-drone`, `plane-proxy`); this crate
//! ties them together behind one binary.

pub mod admin;
pub mod controller;
pub mod demo_backend;
pub mod demo_image;
pub mod dev;
mod dev_tls;
pub mod logging;
pub mod signals;
