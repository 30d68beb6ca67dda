//! Exists so that reaper-user can name this crate as a build dependency (cargo needs a lib
//! target); the programs are in main.rs.
#![no_std]
