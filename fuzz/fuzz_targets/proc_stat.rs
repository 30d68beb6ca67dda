//! `/proc/PID/stat` and `/proc/PID/task/TID/stat` text as reaper reads it: its own task-state
//! parse (`reaper::tree::scan::task_state`, used to tell a zombie leader with live threads from a
//! dead process) and procfs's `Stat` for the fields reaper uses. A process chooses its comm: up
//! to 15 bytes of anything but NUL, `") Z "` included, placed between the pid and the fields
//! (do_task_stat() in fs/proc/array.c). Input: a state byte, a comm, then free text.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use procfs::{FromRead as _, process::Stat};
use reaper::tree::scan::task_state;

/// The states `/proc/PID/stat` shows (task_state_array in fs/proc/array.c).
const STATES: &[u8] = b"RSDTtXZPI";

#[derive(Arbitrary, Debug)]
struct Input {
    pid: u32,
    state: u8,
    comm: Vec<u8>,
    ppid: u32,
    starttime: u64,
    free: String,
}

fuzz_target!(|i: Input| {
    // Any text at all: no panic, and the answer is the character after the last ") ".
    let expected = i
        .free
        .rfind(") ")
        .and_then(|at| i.free[at + 2..].chars().next());
    assert_eq!(task_state(&i.free), expected, "{:?}", i.free);

    // Kernel-shaped, with a hostile comm: the real state, and procfs agrees on what reaper uses.
    let comm: Vec<u8> = i
        .comm
        .iter()
        .copied()
        .filter(|b| *b != 0)
        .take(15)
        .collect();
    let state = STATES[usize::from(i.state) % STATES.len()] as char;
    let pid = (i.pid % (1 << 22)).max(1);
    let ppid = i.ppid % (1 << 22);
    let mut fields = vec![state.to_string(), ppid.to_string()];
    fields.extend(std::iter::repeat_n("0".to_owned(), 17));
    fields.push(i.starttime.to_string());
    fields.extend(std::iter::repeat_n("0".to_owned(), 30));
    let mut stat = format!("{pid} (").into_bytes();
    stat.extend_from_slice(&comm);
    stat.extend_from_slice(format!(") {}\n", fields.join(" ")).as_bytes());
    let text = String::from_utf8_lossy(&stat);
    assert_eq!(task_state(&text), Some(state), "{text:?}");
    let parsed = Stat::from_read(&stat[..]).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(parsed.pid, pid as i32);
    assert_eq!(parsed.state, state);
    assert_eq!(parsed.ppid, ppid as i32);
    assert_eq!(parsed.starttime, i.starttime);
    assert_eq!(parsed.comm, String::from_utf8_lossy(&comm));
});
