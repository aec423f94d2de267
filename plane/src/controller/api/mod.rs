//! The HTTP API's handlers and extractors: each handler turns a request into a call to a
//! domain operation or a store query, and its result into JSON (errors through
//! [`ApiErrorResponse`](super::error::ApiErrorResponse)).

pub mod body;
pub mod cluster;
pub mod connect;
pub mod drain;
pub mod logs;
pub mod overview;
pub mod paths;
pub mod prepull;
pub mod revoke;
pub mod status;
pub mod terminate;
pub mod warm;
