//! The pure heart of lian-build: names, directives, sizing, cache-namespace rules, build
//! events and the lifecycle state machine. No I/O, no async runtime, no clock: time is an
//! argument. Everything here can be tested without a server and runs faster than real time.

pub mod cache;
pub mod control;
pub mod directives;
pub mod dockerignore;
pub mod event;
pub mod lifecycle;
pub mod names;
pub mod request;
pub mod sizing;
pub mod subjects;

pub use directives::BuildDirectives;
pub use event::{BuildEvent, CacheReport, CookerReport, Envelope, StoreUse, Transfer};
pub use names::{BuildId, ImageRef, LayerName, LeaseKey, NameError, SecretId, Workspace};
pub use request::{BuildRequest, CascadeRef, ContextRef};
