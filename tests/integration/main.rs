//! Plane's integration tests: real controller, drone and proxy on loopback ports, a real
//! Docker engine, and both databases. One module per feature.

mod harness;
mod netns;

mod acme;
mod admin;
mod admission;
mod auth;
mod backup;
mod browser;
mod client;
mod connect;
mod controllers;
mod crashes;
mod database_restart;
mod dev_https;
mod dns;
mod errors;
mod health;
mod https;
mod leases;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod openapi;
mod placement;
mod plane_compat;
mod proxy;
mod pull;
mod relay;
mod restarts;
mod retention;
mod sweep;
mod volumes;
mod walkthrough;
mod warm;
