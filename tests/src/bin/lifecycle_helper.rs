//! Drives the process shapes the lifecycle tests need. Started only by the tests; every
//! process it creates is its own descendant. Prints the pids it creates, one `key=value` per
//! line, then waits for stdin to close (the test's signal to finish) unless told otherwise.
use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    process::exit,
};

use nix::{
    sys::wait::waitpid,
    unistd::{ForkResult, Pid, fork, getpid, setsid},
};

fn say(key: &str, value: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{key}={value}");
    let _ = out.flush();
}

/// Blocks until stdin reaches EOF (the test closes it, or the test process dies).
fn wait_stdin() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// A child that only waits for stdin EOF (inherited), then exits 0.
fn spawn_waiter() -> Pid {
    // SAFETY: the child only calls async-signal-safe functions until it exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            // Keep only stdin: holding the parent's stdout would keep a reader of it waiting
            // for EOF as long as this child lives.
            // SAFETY: close(2) on an fd this process owns.
            unsafe { libc::close(1) };
            let mut byte = [0u8; 1];
            // SAFETY: read(2) on fd 0 into a stack buffer.
            while unsafe { libc::read(0, byte.as_mut_ptr().cast(), 1) } > 0 {}
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        // Exit at once with the given code.
        "exit" => exit(arg(1).parse().expect("exit code")),
        // Join the cgroups whose `cgroup.procs` files follow the file, then read random pages
        // of the file (mapped, its cache dropped first) until stdin closes: a working set
        // larger than a memory limit thrashes, which PSI counts as memory stall.
        "thrash" => {
            for procs in &args[2..] {
                std::fs::write(procs, getpid().to_string()).expect("join the cgroup");
            }
            let file = std::fs::File::open(arg(1)).expect("open the file to thrash");
            let len = file.metadata().expect("its size").len() as usize;
            use std::os::fd::AsRawFd as _;
            // SAFETY: fadvise and a read-only shared mapping of a file we hold open; the
            // mapping is only read, and never unmapped while in use (the process exits).
            let base = unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED, "mmap");
            std::thread::spawn(|| {
                wait_stdin();
                exit(0);
            });
            say("pid", getpid());
            let pages = len / 4096;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut sum = 0u8;
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // SAFETY: an offset inside the mapping.
                sum = sum
                    .wrapping_add(unsafe { *base.cast::<u8>().add((x as usize % pages) * 4096) });
                std::hint::black_box(sum);
            }
        }
        // Wait for stdin to close, then exit 0.
        "wait" => {
            say("pid", getpid());
            wait_stdin();
        }
        // Create and join threads, then wait: threads are not processes.
        "threads" => {
            let n: usize = arg(1).parse().expect("thread count");
            let tids: Vec<i32> = (0..n)
                .map(|_| {
                    std::thread::spawn(|| nix::unistd::gettid().as_raw())
                        .join()
                        .expect("thread")
                })
                .collect();
            say("pid", getpid());
            say(
                "tids",
                tids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            );
            wait_stdin();
        }
        // The main thread exits first; two threads keep the process alive until stdin closes.
        "leader-exits-first" => {
            say("pid", getpid());
            for _ in 0..2 {
                std::thread::spawn(|| {
                    wait_stdin();
                    // The last thread's exit(2)… the process's status is the group's.
                    // SAFETY: exit_group with a code, from a live thread.
                    unsafe { libc::syscall(libc::SYS_exit_group, 7) };
                });
            }
            say("leader", "exiting");
            // The raw exit(2) syscall ends only the calling thread, without unwinding (glibc's
            // pthread_exit would unwind through Rust's main and abort).
            // SAFETY: nothing on this thread runs after it.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!("exit(2) returned");
        }
        // Fork N waiting children, print them, then exit: the children are orphaned.
        "orphan" => {
            let n: usize = arg(1).parse().expect("child count");
            say("pid", getpid());
            for _ in 0..n {
                say("child", spawn_waiter());
            }
            exit(0);
        }
        // Become a child subreaper, start `orphan N` below, report, then wait.
        "subreaper" => {
            assert_eq!(
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
                0
            );
            say("pid", getpid());
            let n = arg(1).to_owned();
            let exe = std::env::current_exe().expect("own path");
            let mut middle = std::process::Command::new(exe)
                .args(["orphan", &n])
                .stdin(std::process::Stdio::inherit())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn middle");
            let mut text = String::new();
            middle
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            middle.wait().unwrap();
            for line in text.lines() {
                let (key, value) = line.split_once('=').unwrap();
                say(if key == "pid" { "middle" } else { key }, value);
            }
            say("done", 1);
            wait_stdin();
        }
        // The classic daemon: fork, setsid, fork, the first child exits.
        "double-fork" => {
            say("pid", getpid());
            let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
            // SAFETY: the children use only fork/setsid/write/read/_exit.
            match unsafe { fork() }.expect("fork") {
                ForkResult::Child => {
                    let _ = setsid();
                    // SAFETY: as above.
                    match unsafe { fork() }.expect("fork") {
                        ForkResult::Child => {
                            let me = format!("{}\n", getpid());
                            let _ = nix::unistd::write(&write_end, me.as_bytes());
                            drop(write_end);
                            let mut byte = [0u8; 1];
                            // SAFETY: read(2) on fd 0.
                            while unsafe { libc::read(0, byte.as_mut_ptr().cast(), 1) } > 0 {}
                            // SAFETY: async-signal-safe exit.
                            unsafe { libc::_exit(0) }
                        }
                        // SAFETY: async-signal-safe exit.
                        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
                    }
                }
                ForkResult::Parent { child } => {
                    drop(write_end);
                    let mut text = String::new();
                    std::fs::File::from(read_end)
                        .read_to_string(&mut text)
                        .unwrap();
                    let _ = waitpid(child, None);
                    say("first", child);
                    say("daemon", text.trim());
                    wait_stdin();
                }
            }
        }
        // Rename the main thread with prctl(PR_SET_NAME), then wait.
        "rename" => {
            let name = CString::new(arg(1)).unwrap();
            assert_eq!(
                // SAFETY: prctl with a NUL-terminated string that outlives the call.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) },
                0
            );
            say("pid", getpid());
            wait_stdin();
        }
        // Fork N waiting children, print them, then wait. Later arguments are ignored: they
        // are there to be read (the children share this process's argv, however large).
        "fork-wait" => {
            let n: usize = arg(1).parse().expect("child count");
            say("pid", getpid());
            for _ in 0..n {
                say("child", spawn_waiter());
            }
            wait_stdin();
        }
        // Rename this process to NAME (prctl(PR_SET_NAME): any bytes but NUL, cut at 15), then
        // start PROGRAM ARGS… as its child (stdin inherited), print both pids and wait. With
        // `rename-spawn-on-cue`, its pid is printed first and the child started only after
        // one line on stdin (the test's cue).
        mode @ ("spawn-as" | "rename-spawn-on-cue") => {
            let name = CString::new(arg(1)).expect("a name without NUL");
            assert_eq!(
                // SAFETY: prctl with a NUL-terminated string that outlives the call.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) },
                0
            );
            let on_cue = mode == "rename-spawn-on-cue";
            if on_cue {
                say("pid", getpid());
                let mut cue = String::new();
                let _ = std::io::stdin().read_line(&mut cue);
            }
            let mut child = std::process::Command::new(arg(2))
                .args(&args[3..])
                .stdin(std::process::Stdio::inherit())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn PROGRAM");
            if !on_cue {
                say("pid", getpid());
            }
            say("child", child.id());
            wait_stdin();
            let _ = child.wait();
        }
        // Print its pid, wait for one line on stdin (the test's cue, given once it watches this
        // process), then fork N children that wait for stdin to close; print each, then wait.
        "children-on-cue" => {
            let n: usize = arg(1).parse().expect("child count");
            say("pid", getpid());
            let mut cue = String::new();
            let _ = std::io::stdin().read_line(&mut cue);
            for _ in 0..n {
                say("child", spawn_waiter());
            }
            say("forked", n);
            wait_stdin();
        }
        // Fork+exec `/bin/true` N times from W threads as fast as possible; report the rate.
        // An optional PAD adds one argument of PAD bytes to each exec (bigger exec records).
        "storm" => {
            let n: usize = arg(1).parse().expect("count");
            let workers: usize = arg(2).parse().unwrap_or(2);
            let pad: usize = arg(3).parse().unwrap_or(0);
            let started = std::time::Instant::now();
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let share = n / workers + usize::from(w < n % workers);
                    std::thread::spawn(move || {
                        let padding = "x".repeat(pad);
                        for _ in 0..share {
                            let mut cmd = std::process::Command::new("/bin/true");
                            if pad > 0 {
                                cmd.arg(&padding);
                            }
                            let status = cmd.status().expect("spawn /bin/true");
                            assert!(status.success());
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("storm worker");
            }
            let secs = started.elapsed().as_secs_f64();
            say("spawned", n);
            say("seconds", format!("{secs:.3}"));
            say("per_second", format!("{:.0}", n as f64 / secs));
        }
        // Fork+exec `/bin/true` from W threads until stdin closes (the test's cue); print
        // `storming` once the first has ended, and how many were spawned at the end.
        "storm-until-eof" => {
            use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
            let workers: usize = arg(1).parse().unwrap_or(2);
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let spawned = std::sync::Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let (stop, spawned) = (stop.clone(), spawned.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let status = std::process::Command::new("/bin/true")
                                .status()
                                .expect("spawn /bin/true");
                            assert!(status.success());
                            if spawned.fetch_add(1, Ordering::Relaxed) == 0 {
                                say("storming", 1);
                            }
                        }
                    })
                })
                .collect();
            wait_stdin();
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                h.join().expect("storm worker");
            }
            say("spawned", spawned.load(Ordering::Relaxed));
        }
        other => {
            eprintln!("unknown mode {other:?}");
            exit(2);
        }
    }
}
