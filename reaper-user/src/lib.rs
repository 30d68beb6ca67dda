//! reaper: watches every process's life through eBPF and reaps leaked AI-agent children.
pub mod app;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod detect;
pub mod events;
pub mod host;
pub mod http;
pub mod ipc;
pub mod metrics;
pub mod privileges;
pub mod probes;
pub mod reap;
pub mod service;
pub mod tree;
