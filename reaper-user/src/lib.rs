//! reaper: watches every process's life through eBPF and reaps leaked AI-agent children.
pub mod events;
pub mod probes;
pub mod tree;
