//! What reaper's programs (main.rs) and the bench's floor (floor.rs) share: the typed kernel
//! load, the offsets global's accessor, and the copy of an exec's path and argv into its
//! record, so that the floor's "record with the exec's content" measures the very code
//! reaper runs. (It is also the lib target reaper-user names as a build dependency.)
#![no_std]

use aya_ebpf::helpers::{bpf_probe_read_kernel_str_bytes, generated};
use reaper_common::{
    ARGV_LEN, EXEC_ARGV_TRUNCATED, EXEC_ARGV_UNREADABLE, EXEC_FILENAME_TRUNCATED, ExecEvent,
    ExecHead, FILENAME_LEN,
};

/// One field of the program's `OFFSETS` global (a `reaper_common::KernelOffsets` each binary
/// declares under that name, which user space writes before loading), read alone where it is
/// used (not the whole struct copied to the stack first). The volatile read stops the compiler
/// from folding the all-zero initializer into the code. The map is read-only for the programs
/// and frozen before they load, so the verifier knows the value as a constant
/// (`bpf_map_direct_read()` in check_mem_access():
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/verifier.c>) and the direct
/// loads through typed pointers ([`load`]) see a constant field offset.
#[macro_export]
macro_rules! off {
    ($field:ident) => {
        // SAFETY: a plain global of u32 fields, read by address.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) }
    };
}

/// Loads a `T` at `base + off` straight from kernel memory: no helper call. `base` must be a
/// pointer whose BTF type the verifier knows (a BTF tracepoint's `struct` argument, or a
/// pointer member loaded from one this way) and `off` a field of that type at a constant
/// offset: the verifier checks the access against the kernel's BTF (check_ptr_to_btf_access()
/// → btf_struct_access()) and marks it `BPF_PROBE_MEM`, so the JIT emits a plain load that
/// yields 0 instead of faulting (ex_handler_bpf()): <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/verifier.c>,
/// <https://github.com/torvalds/linux/blob/v6.18/arch/x86/net/bpf_jit_comp.c>. A loaded
/// struct pointer is typed again, so chains (`task->real_parent->tgid`) stay direct.
#[inline(always)]
pub fn load<T>(base: *const u8, off: u32) -> T {
    // SAFETY: see above; the kernel makes a faulting load read 0.
    unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize).cast::<T>()) }
}

/// Copies an exec's path (`filename`, kernel memory) and then its argv (user memory from
/// `arg_start` to `arg_end` of the new `mm`) into `ev`'s data, the argv right after the path's
/// last byte, and fills in the head's `flags`, `filename_len`, `argv_len` and `_pad`. Returns
/// the record's used size: the head and the bytes present (≈ 100 bytes for `/bin/true`), which
/// is all that goes into the ring, not the arrays' full 4.4 KiB.
///
/// # Safety
/// `ev` must point at a writable [`ExecEvent`] (a per-CPU scratch record: it is too big for
/// the 512-byte BPF stack).
#[inline(always)]
pub unsafe fn exec_content(
    ev: *mut ExecEvent,
    filename: *const u8,
    arg_start: u64,
    arg_end: u64,
) -> usize {
    // SAFETY: the caller's promise: `ev` is a whole ExecEvent.
    let filename_len = unsafe {
        let path =
            core::slice::from_raw_parts_mut((&raw mut (*ev).data).cast::<u8>(), FILENAME_LEN);
        match bpf_probe_read_kernel_str_bytes(filename, path) {
            // The mask keeps the length provably below FILENAME_LEN for the verifier (the
            // helper returns at most FILENAME_LEN - 1 bytes before the NUL).
            Ok(bytes) => (bytes.len() as u32) & (FILENAME_LEN as u32 - 1),
            Err(_) => 0,
        }
    };
    // The helper keeps room for the NUL: a full buffer means the path may have been longer.
    let mut flags = if filename_len as usize >= FILENAME_LEN - 1 {
        EXEC_FILENAME_TRUNCATED
    } else {
        0
    };
    let total = arg_end.saturating_sub(arg_start);
    let argv_len = if total >= ARGV_LEN as u64 {
        if total > ARGV_LEN as u64 {
            flags |= EXEC_ARGV_TRUNCATED;
        }
        ARGV_LEN as u32
    } else {
        // The mask keeps the length provably below ARGV_LEN for the verifier.
        (total as u32) & (ARGV_LEN as u32 - 1)
    };
    // SAFETY: reads at most ARGV_LEN bytes of user memory into the record's data array, at
    // most FILENAME_LEN - 1 bytes in: within its FILENAME_LEN + ARGV_LEN bytes.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            (&raw mut (*ev).data)
                .cast::<u8>()
                .add(filename_len as usize)
                .cast(),
            argv_len,
            arg_start as *const core::ffi::c_void,
        )
    };
    let argv_len = if rc == 0 {
        argv_len
    } else {
        flags |= EXEC_ARGV_UNREADABLE;
        0
    };
    // SAFETY: the caller's promise.
    unsafe { exec_lengths(&raw mut (*ev).head, flags, filename_len, argv_len) }
}

/// Fills in an exec record head's flags and the lengths of the path and argv that follow it;
/// returns the record's used size. For every exec record: [`exec_content`]'s, and reaper's
/// head alone (both lengths 0).
///
/// # Safety
/// `head` must point at a writable [`ExecHead`].
#[inline(always)]
pub unsafe fn exec_lengths(
    head: *mut ExecHead,
    flags: u32,
    filename_len: u32,
    argv_len: u32,
) -> usize {
    // SAFETY: the caller's promise; plain stores into the record's head.
    unsafe {
        (*head).flags = flags;
        (*head).filename_len = filename_len;
        (*head).argv_len = argv_len;
        (*head)._pad = 0;
    }
    size_of::<ExecHead>() + filename_len as usize + argv_len as usize
}
