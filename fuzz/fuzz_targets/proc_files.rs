//! `/proc/PID/stat`, `/proc/PID/statm` and `/proc/PID/io` → the procfs parsers reaper reads
//! them with (`Process::stat`, `statm`, `io`: start time, parent, comm, state, tty, CPU ticks,
//! RSS, I/O bytes).
//!
//! reaper has no /proc text parser of its own (it goes through the procfs crate), so this fuzzes
//! procfs with the input reaper meets. The kernel writes these files; a process controls only
//! its `comm` (up to 15 bytes of anything but NUL: spaces, parentheses, newlines, invalid
//! UTF-8) and, indirectly, the numbers. Inputs are therefore laid out exactly as
//! fs/proc/array.c prints them, with a hostile comm and arbitrary values, and every field
//! reaper uses must come back unchanged. (Free-form text is not fed: procfs slices by byte
//! offsets that only kernel-shaped text satisfies, e.g. `Stat` takes the pid from before the
//! first '(' minus one, and `Io` strips the last byte of each key.)
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use procfs::{
    FromRead as _,
    process::{Io, ProcState, Stat, StatM},
};

/// The states `/proc/PID/stat` shows (task_state_array in fs/proc/array.c).
const STATES: &[u8] = b"RSDTtXZPI";

#[derive(Arbitrary, Debug)]
struct Input {
    pid: u32,
    comm: Vec<u8>,
    state: u8,
    ppid: u32,
    pgrp: i32,
    session: i32,
    tty_nr: i32,
    tpgid: i32,
    flags: u32,
    faults: [u64; 4],
    utime: u64,
    stime: u64,
    cutime: i64,
    cstime: i64,
    priority: i64,
    nice: i8,
    num_threads: u16,
    starttime: u64,
    vsize: u64,
    rss: u32,
    more: [u64; 13],
    exit_signal: i8,
    processor: u16,
    rt_priority: u8,
    policy: u8,
    delayacct: u64,
    guest: u64,
    cguest: i64,
    areas: [u64; 7],
    exit_code: i32,
    statm: [u64; 5],
    io: [u64; 7],
}

fuzz_target!(|i: Input| {
    // The kernel's comm: at most TASK_COMM_LEN - 1 bytes, no NUL.
    let comm: Vec<u8> = i
        .comm
        .iter()
        .copied()
        .filter(|b| *b != 0)
        .take(15)
        .collect();
    let pid = (i.pid % (1 << 22)).max(1);
    let ppid = i.ppid % (1 << 22);
    let state = STATES[usize::from(i.state) % STATES.len()];
    // Fields 3 to 52, as do_task_stat() prints them (field 21, itrealvalue, is always 0).
    let mut fields: Vec<String> = vec![(state as char).to_string(), ppid.to_string()];
    fields.extend([i.pgrp, i.session, i.tty_nr, i.tpgid].map(|n| n.to_string()));
    fields.push(i.flags.to_string());
    fields.extend(i.faults.map(|n| n.to_string()));
    fields.extend([i.utime, i.stime].map(|n| n.to_string()));
    fields.extend(
        [
            i.cutime,
            i.cstime,
            i.priority,
            i.nice.into(),
            i.num_threads.into(),
            0,
        ]
        .map(|n: i64| n.to_string()),
    );
    fields.extend([i.starttime, i.vsize, i.rss.into()].map(|n: u64| n.to_string()));
    fields.extend(i.more.map(|n| n.to_string()));
    fields.extend(
        [
            i.exit_signal.into(),
            i.processor.into(),
            i.rt_priority.into(),
            i.policy.into(),
        ]
        .map(|n: i64| n.to_string()),
    );
    fields.extend([i.delayacct, i.guest].map(|n| n.to_string()));
    fields.push(i.cguest.to_string());
    fields.extend(i.areas.map(|n| n.to_string()));
    fields.push(i.exit_code.to_string());
    assert_eq!(fields.len(), 50);
    let mut stat = format!("{pid} (").into_bytes();
    stat.extend_from_slice(&comm);
    stat.extend_from_slice(format!(") {}\n", fields.join(" ")).as_bytes());
    let parsed = Stat::from_read(&stat[..]).unwrap_or_else(|e| {
        panic!(
            "kernel-shaped stat refused: {e}: {:?}",
            String::from_utf8_lossy(&stat)
        )
    });
    assert_eq!(parsed.pid, pid as i32);
    assert_eq!(
        parsed.comm,
        String::from_utf8_lossy(&comm),
        "comm of {stat:?}"
    );
    assert_eq!(parsed.ppid, ppid as i32);
    assert_eq!(parsed.tty_nr, i.tty_nr);
    assert_eq!((parsed.utime, parsed.stime), (i.utime, i.stime));
    assert_eq!(parsed.starttime, i.starttime);
    assert_eq!(parsed.state, state as char);
    let zombie = matches!(parsed.state(), Ok(ProcState::Zombie | ProcState::Dead));
    assert_eq!(zombie, state == b'Z' || state == b'X');
    // What reaper's zombie-thread check in tree/scan.rs reads from a task's stat.
    let text = String::from_utf8_lossy(&stat);
    assert_eq!(
        reaper::tree::scan::task_state(&text),
        Some(state as char),
        "{text:?}"
    );

    // statm: size resident shared text lib(0) data dt(0).
    let s = &i.statm;
    let statm = format!("{} {} {} {} 0 {} 0\n", s[0], s[1], s[2], s[3], s[4]);
    let parsed = StatM::from_read(statm.as_bytes()).expect("kernel-shaped statm");
    assert_eq!((parsed.size, parsed.resident), (s[0], s[1]));

    let v = &i.io;
    let io = format!(
        "rchar: {}\nwchar: {}\nsyscr: {}\nsyscw: {}\nread_bytes: {}\nwrite_bytes: {}\ncancelled_write_bytes: {}\n",
        v[0], v[1], v[2], v[3], v[4], v[5], v[6]
    );
    let parsed = Io::from_read(io.as_bytes()).expect("kernel-shaped io");
    assert_eq!((parsed.rchar, parsed.wchar), (v[0], v[1]));
});
