//! Integration tests against the real kernel.
