//! reaper: watches every process's life through eBPF and reaps leaked AI-agent children.
pub mod app;
pub mod check;
pub mod clock;
pub mod config;
pub mod detect;
pub mod events;
pub mod heap;
pub mod host;
pub mod http;
pub mod ipc;
pub mod metrics;
pub mod privileges;
pub mod probes;
pub mod reap;
pub mod render;
pub mod service;
pub mod tree;

/// `cargo xtask bench`'s floor programs (reaper-ebpf/src/floor.rs), built beside reaper's own by
/// build.rs; loaded only by `bench-load floor`. The daemon never refers to them.
pub static BENCH_FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-floor"));
