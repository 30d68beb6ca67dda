//! Load shapes for `cargo xtask bench`. Started only by the bench; every process it creates is
//! its own descendant. Prints `key=value` lines (flushed).
//!
//! - `rusage CMD ARGS…`: runs CMD, waits for it, passes its output through, then prints
//!   `wall_us=`, `user_us=`, `sys_us=`: the wall time and the CPU time of CMD and every
//!   descendant it waited for (`getrusage(RUSAGE_CHILDREN)`, microseconds). Exits with CMD's
//!   status.
//! - `threads N`: creates and joins N threads, one at a time, as fast as it can; prints
//!   `threads=N`.
//! - `park N`: forks N children that block reading a pipe (no exec: they share the parent's
//!   pages), prints `parked=N` and `ready=1`, then waits for stdin to close (or for the bench to
//!   die); closing the pipe ends the children, which it reaps before exiting.
//! - `floor`: loads the bench's floor programs (reaper-ebpf/src/floor.rs: a header-sized
//!   ring-buffer record per event on reaper's four lifecycle tracepoints, nothing else),
//!   attaches them, prints `ready=1`, drains their ring buffer every few milliseconds until
//!   stdin closes, then prints `records=` and `bytes=` (what it drained) and detaches them by
//!   exiting. `floor content`: the same with, on exec, the floor that carries the record's
//!   path and argv instead (`EXEC_CONTENT_FLOOR`), whose field offsets come from the kernel's
//!   BTF as reaper's do.
use std::{
    io::{Read as _, Write as _},
    process::{Command, exit},
    time::Instant,
};

fn say(key: &str, value: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{key}={value}");
    let _ = out.flush();
}

fn usage(msg: &str) -> ! {
    eprintln!("bench-load: {msg}");
    exit(2)
}

fn micros(tv: libc::timeval) -> i64 {
    tv.tv_sec * 1_000_000 + tv.tv_usec
}

fn rusage(args: &[String]) -> ! {
    let Some((program, rest)) = args.split_first() else {
        usage("rusage CMD ARGS…")
    };
    let started = Instant::now();
    let status = Command::new(program)
        .args(rest)
        .status()
        .unwrap_or_else(|e| usage(&format!("cannot run {program}: {e}")));
    let wall = started.elapsed();
    // SAFETY: getrusage fills a zeroed struct this function owns.
    let usage = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru),
            0,
            "getrusage"
        );
        ru
    };
    say("wall_us", wall.as_micros());
    say("user_us", micros(usage.ru_utime));
    say("sys_us", micros(usage.ru_stime));
    exit(status.code().unwrap_or(1))
}

fn threads(n: usize) {
    for _ in 0..n {
        std::thread::spawn(|| std::hint::black_box(0u64))
            .join()
            .expect("thread");
    }
    say("threads", n);
}

/// Raises RLIMIT_NPROC's soft limit (to the hard one) if `n` more processes would pass it.
fn room_for(n: usize) {
    // SAFETY: getrlimit/setrlimit on a struct this function owns.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NPROC, &mut lim) == 0
            && lim.rlim_cur != libc::RLIM_INFINITY
            && lim.rlim_cur < (n as u64).saturating_add(4096)
        {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NPROC, &lim);
        }
    }
}

fn park(n: usize) {
    room_for(n);
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    let [read_end, write_end] = fds;
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the child only calls async-signal-safe functions (close, read, _exit).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            // Whoever was parked ends with the pipe when this process exits.
            eprintln!("bench-load: fork {} of {n}: {err}", i + 1);
            exit(1);
        }
        if pid == 0 {
            // SAFETY: raw syscalls on this process's own fds and a stack buffer.
            unsafe {
                libc::close(write_end);
                libc::close(0);
                libc::close(1);
                let mut byte = [0u8; 1];
                loop {
                    let r = libc::read(read_end, byte.as_mut_ptr().cast(), 1);
                    if r == 0 || (r < 0 && *libc::__errno_location() != libc::EINTR) {
                        libc::_exit(0);
                    }
                }
            }
        }
        children.push(pid);
    }
    // SAFETY: our copy of the read end; the children hold theirs.
    unsafe { libc::close(read_end) };
    say("parked", n);
    say("ready", 1);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    // SAFETY: closing the write end: every child reads EOF and exits.
    unsafe { libc::close(write_end) };
    for pid in children {
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}

/// `bench-load floor [content]`: see the module doc.
fn floor(content: bool) {
    use aya::{maps::RingBuf, programs::BtfTracePoint};
    use reaper_common::{EXEC_CONTENT_FLOOR, LIFECYCLE_TRACEPOINTS};
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("bench-load floor: {what}: {e}");
        exit(1)
    };
    let layout = reaper::probes::layout::vmlinux()
        .and_then(|btf| reaper::probes::layout::kernel_layout(&btf))
        .unwrap_or_else(|e| fail("the kernel's layout", &e));
    let mut ebpf = aya::EbpfLoader::new()
        .override_global("OFFSETS", &layout.offsets, true)
        .load(reaper::BENCH_FLOOR_OBJECT)
        .unwrap_or_else(|e| fail("loading the floor object", &e));
    let btf = aya::Btf::from_sys_fs().unwrap_or_else(|e| fail("reading the kernel's BTF", &e));
    // With `content`, exec's floor is the one carrying the record's path and argv; the other
    // tracepoints keep theirs, so the ring is used between execs as reaper's is.
    let programs = LIFECYCLE_TRACEPOINTS.iter().map(|&tp| match tp {
        "sched_process_exec" if content => (EXEC_CONTENT_FLOOR.to_owned(), tp),
        _ => (format!("floor_{tp}"), tp),
    });
    for (name, tracepoint) in programs {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(&name)
            .unwrap_or_else(|| fail("no program", &name))
            .try_into()
            .unwrap_or_else(|e| fail(&name, &e));
        prog.load(tracepoint, &btf)
            .unwrap_or_else(|e| fail(&format!("loading {name}"), &e));
        prog.attach()
            .unwrap_or_else(|e| fail(&format!("attaching {name}"), &e));
    }
    let mut ring = RingBuf::try_from(
        ebpf.take_map("FLOOR_EVENTS")
            .unwrap_or_else(|| fail("no map", &"FLOOR_EVENTS")),
    )
    .unwrap_or_else(|e| fail("FLOOR_EVENTS", &e));
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&closed);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    say("ready", 1);
    let (mut records, mut bytes) = (0u64, 0u64);
    while !closed.load(std::sync::atomic::Ordering::Relaxed) {
        while let Some(record) = ring.next() {
            records += 1;
            bytes += record.len() as u64;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    say("records", records);
    say("bytes", bytes);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage("expected a count"))
    };
    match args.first().map(String::as_str) {
        Some("rusage") => rusage(&args[1..]),
        Some("threads") => threads(count(1)),
        Some("park") => park(count(1)),
        Some("floor") => match args.get(1).map(String::as_str) {
            None => floor(false),
            Some("content") => floor(true),
            Some(other) => usage(&format!("unknown floor {other:?} (floor [content])")),
        },
        other => usage(&format!(
            "unknown mode {other:?} (rusage | threads N | park N | floor [content])"
        )),
    }
}
