//! reaper: watches every process's life through eBPF and reaps leaked AI-agent children.
pub mod app;
pub mod cli;
pub mod events;
pub mod ipc;
pub mod probes;
pub mod tree;
