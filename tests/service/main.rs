//! Integration tests of the HTTP service (one test binary, many modules, to save link time).
//! Every request goes to loopback addresses only.

mod auth;
mod backend;
mod common;
mod contract;
mod errors;
mod generate;
mod inputs;
mod pool;
mod queue;
mod stages;
