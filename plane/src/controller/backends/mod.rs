//! Domain operations on backends: connect (join the key's backend or start one), spawn,
//! and terminate. They return [`ControllerError`](super::error::ControllerError), not HTTP,
//! so the API handlers and the sweeper call the same code.

mod connect;
mod placement;
mod terminate;
pub(crate) mod validate;

pub use connect::{connect, spawn_new};
pub(crate) use placement::pick_drone;
pub use terminate::terminate;
