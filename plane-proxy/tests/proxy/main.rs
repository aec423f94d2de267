//! Tests of the proxy as a black box: real HTTP and WebSocket traffic through a running proxy,
//! a fake controller on the proxy socket, and a real upstream server.

mod controller;
mod errors;
mod forwarding;
mod holding;
mod shutdown;
mod support;
mod websockets;
