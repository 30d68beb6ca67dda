//! The process heap (glibc malloc): one arena, and free memory handed back after the spikes.
//! Used by the probes (after parsing the kernel's BTF), the tree (after each `/proc` scan) and
//! `reaper run` (before any thread starts); on other C libraries both do nothing.

/// One malloc arena for the whole daemon. glibc gives each new thread an arena of its own (up
/// to 8 per core), and memory freed in one stays there, out of [`give_back`]'s reach from the
/// others. The daemon's threads allocate little and rarely at once, so they lose nothing by
/// sharing. Call it before any thread starts.
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; the caller runs before other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the heap's free memory back to the OS. glibc keeps freed memory in the process
/// unless asked (`malloc_trim(3)` releases free pages anywhere in the heap, not only at its
/// top); called after the spikes: parsing the kernel's BTF, and each `/proc` scan, whose
/// snapshots (10,000 processes: several MB) are freed once the tree has taken what it keeps.
pub(crate) fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
