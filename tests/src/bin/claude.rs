//! A test double of the Claude Code CLI as the Claude Agent SDK runs it, built from measured
//! facts (the real CLI 2.1.x under the SDK 0.3.x), not guesses:
//!
//! - argv: the SDK's flags, in `--flag=value` or `--flag value` form; unknown flags are ignored.
//! - stdio: fds 0/1/2 are whatever the parent passed (AF_UNIX socketpairs under the SDK); fds 5
//!   and 6 (or the next free ones) are dups of 2 and 1, as in the real process.
//! - protocol: newline-delimited JSON. A `system/init` line at startup; per `user` message one
//!   or more `assistant` lines and a `result/success` line; `control_request`s are answered.
//! - idle: seven threads (`claude`, `Bun Pool 0`, `HTTP Client`, `HeapHelper`, `JITWorker`,
//!   `fs.watch`, `mi-scavenger`), a main loop waking every 1 s (epoll), `statx` of the config
//!   files on every wake, an 8-byte eventfd write on every wake, a read of `/proc/self/statm`
//!   every 30 s, a helper thread cloned (and exiting) every 10–30 s, three epoll + three eventfd
//!   fds, an inotify fd and a listening socket at
//!   `${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}/cc-socks/<pid>.sock`; about 1 ms of CPU per wake
//!   (≈ 0.14 % of a core with the overhead: the measured 7–8 ticks/min); never any traffic on its stdio sockets.
//! - exit: EOF on stdin → `exit(0)` at once (the real one takes ~40 ms); SIGINT → removes its
//!   socket file and exits 0 (the real CLI takes SIGINT as a request to end: the SDKs' loops end
//!   without an error); SIGTERM/SIGHUP → removes its socket file and dies of the signal (status
//!   143/129, which the SDKs throw). It never leaves its parent's process group or session.
//! - the model: every turn is one request to "the API" over TCP on loopback (a listener of the
//!   double's own), so the kernel sees the target receive network bytes as the real CLI does;
//!   no connection is left open between requests.
//! - stdio MCP servers (`--mcp N`): N children started at session start, before any request,
//!   renamed `mcp-server`, stdin and stdout pipes to the double; each exits at EOF on its stdin
//!   (or ignores it: `--mcp-ignore-eof`) and is SIGTERMed when the double ends
//!   (PR_SET_PDEATHSIG), as the real CLI ends its direct MCP children. `--mcp-wrapper` starts
//!   each through a wrapper (`mcp-wrapper`, like `npm exec`) that dies with the double without
//!   passing anything on: its server (ignoring EOF) is left behind, re-parented.
//!
//! Test commands, anywhere in a user message's text (whitespace-separated words):
//! `tool:busy` (a child burning CPU), `tool:idle` (a child blocked reading a pipe), `tool:io` (a
//! child pinging over its own UNIX socketpair every 200 ms), `tool:stop` (SIGKILL and reap every
//! tool), `slow:MS` (a turn streaming an assistant line every 100 ms for MS ms). These tools
//! outlive their turn (like `run_in_background` tasks): the double tells the model and the
//! model answers before the result. `tool:wait:SECS` is a turn's foreground tool, like the
//! Bash tool: a child in a session of its own (setsid), stdin `/dev/null`, silent for SECS
//! seconds; the turn's result comes only after it exited (and one more request to the model).
//! Children that outlive the double: `tool:stay` (stdin a pipe from the double, EOF ignored),
//! `tool:stay-as:UID` (the same, as another uid), `tool:detached` (a dev server: a session of
//! its own, stdin `/dev/null`, output to a file).
//! Tools are forked (not exec'd) and renamed `tool-busy`/`tool-idle`/`tool-io`/`tool-wait`, so
//! no tool has comm `claude`; each dies with the double (PR_SET_PDEATHSIG SIGKILL). The result
//! line carries `"tool_pid":N` (the first) and `"tool_pids":[…]`, and `"mcp_pids":[…]` (the
//! MCP servers, or their wrappers) when there are any.
//!
//! Test-only flags: `--ignore-stdin-eof` (keep idling after EOF, like the children older
//! wrappers orphan), `--idle-cpu-us N` (CPU burnt per 1 s wake; default 1000),
//! `--rss-mb N` (touch N MiB, the real one holds ~175 MiB; default 0),
//! `--no-startup-child` (skip the short-lived `git ls-files` child the real one runs at start).
use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStringExt as _, fs::DirBuilderExt as _, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicPtr, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

const TICK: Duration = Duration::from_secs(1);
const STATM_EVERY: Duration = Duration::from_secs(30);

/// The socket file to remove when a signal ends the process (read by the signal handler).
static SOCK_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

#[derive(Debug)]
struct Args {
    model: String,
    output_format: String,
    input_format: String,
    permission_mode: String,
    disallowed_tools: String,
    setting_sources: String,
    resume: Option<String>,
    verbose: bool,
    ignore_stdin_eof: bool,
    mcp: usize,
    mcp_ignore_eof: bool,
    mcp_wrapper: bool,
    idle_cpu_us: u64,
    rss_mb: usize,
    startup_child: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: "claude-sonnet-4-5".into(),
        output_format: "text".into(),
        input_format: "text".into(),
        permission_mode: "default".into(),
        disallowed_tools: String::new(),
        setting_sources: String::new(),
        resume: None,
        verbose: false,
        ignore_stdin_eof: false,
        mcp: 0,
        mcp_ignore_eof: false,
        mcp_wrapper: false,
        idle_cpu_us: 1000,
        rss_mb: 0,
        startup_child: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            continue; // positionals (a prompt) are ignored: input comes from stdin
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        // `--flag=value` or `--flag value` (the value may be empty: `--setting-sources=`).
        let mut value = || inline.clone().or_else(|| it.next()).unwrap_or_default();
        match name {
            "model" => a.model = value(),
            "output-format" => a.output_format = value(),
            "input-format" => a.input_format = value(),
            "permission-mode" => a.permission_mode = value(),
            "disallowedTools" | "disallowed-tools" => a.disallowed_tools = value(),
            "setting-sources" => a.setting_sources = value(),
            "resume" => a.resume = Some(value()),
            "idle-cpu-us" => a.idle_cpu_us = value().parse().unwrap_or(a.idle_cpu_us),
            "rss-mb" => a.rss_mb = value().parse().unwrap_or(0),
            "mcp" => a.mcp = value().parse().unwrap_or(0),
            "mcp-ignore-eof" => a.mcp_ignore_eof = true,
            "mcp-wrapper" => a.mcp_wrapper = true,
            // Known value flags of the real CLI: consume the value so it is not misread.
            "allowedTools"
            | "allowed-tools"
            | "max-turns"
            | "system-prompt"
            | "append-system-prompt"
            | "fallback-model"
            | "mcp-config"
            | "add-dir"
            | "permission-prompt-tool"
            | "settings"
            | "max-thinking-tokens"
            | "agents"
            | "session-id" => {
                let _ = value();
            }
            "verbose" => a.verbose = true,
            "ignore-stdin-eof" => a.ignore_stdin_eof = true,
            "no-startup-child" => a.startup_child = false,
            _ => {} // unknown flags are ignored
        }
    }
    a
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Where the config lives: `$CLAUDE_CONFIG_DIR`, else the temp dir (never `$HOME`).
fn config_dir() -> PathBuf {
    env_dir("CLAUDE_CONFIG_DIR")
        .or_else(|| env_dir("TMPDIR"))
        .unwrap_or_else(|| "/tmp".into())
}

fn cvt(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(ret: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: `ret` is a fresh fd returned by the kernel to this process, owned by nobody else.
    cvt(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll() -> OwnedFd {
    // SAFETY: epoll_create1 with a flag.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).expect("epoll_create1")
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with flags.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }).expect("eventfd")
}

fn epoll_add(ep: RawFd, fd: RawFd, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: a valid epoll fd, fd and event struct.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

fn epoll_del(ep: RawFd, fd: RawFd) {
    // SAFETY: as above; the event argument may be null for DEL.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// Blocks in epoll_wait forever: the shape of an idle Bun worker with its own event loop.
fn idle_event_loop(ep: OwnedFd, efd: OwnedFd) {
    epoll_add(ep.as_raw_fd(), efd.as_raw_fd(), libc::EPOLLIN as u32).expect("epoll_ctl");
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    loop {
        // SAFETY: a valid epoll fd and a buffer of 4 events.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 4, -1) };
        if n > 0 {
            let mut v = [0u8; 8];
            // SAFETY: reading 8 bytes from an eventfd into a stack buffer.
            unsafe { libc::read(efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a stack timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Spends `us` microseconds of this thread's CPU time (GC/JIT-like work on each wake).
fn burn_cpu(us: u64) {
    if us == 0 {
        return;
    }
    let start = thread_cpu_ns();
    let mut x = 0u64;
    while thread_cpu_ns().saturating_sub(start) < us * 1000 {
        for _ in 0..50_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn uuid_like(seed: u64) -> String {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (a, b) = (next(), next());
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

#[derive(Clone, Copy, Debug)]
enum ToolKind {
    Busy,
    Idle,
    Io,
    /// A turn's foreground tool, silent for this many seconds.
    Wait(u32),
    /// A stdio MCP server (stdin and stdout pipes to the double).
    Mcp {
        ignore_eof: bool,
    },
    /// A stdio MCP server started through a wrapper (`npm exec` style) that dies with the
    /// double without passing anything on: the server (ignoring EOF) is left behind.
    WrappedMcp,
    /// A child that outlives the double: stdin a pipe from it (connected), EOF ignored, no
    /// death signal; as another uid if given.
    Stay(Option<u32>),
    /// A dev server the user asked for: a session of its own, stdin `/dev/null`, output to a
    /// file, no death signal. Detached on purpose.
    Detached,
}

struct Tool {
    pid: libc::pid_t,
    /// The write end of a `tool:idle` child's (or MCP server's) stdin pipe: it sees EOF when
    /// the double dies.
    _pipe: Option<OwnedFd>,
    /// The read end of an MCP server's stdout.
    _out: Option<OwnedFd>,
}

/// Forks a tool child. Runs on the main thread only: PR_SET_PDEATHSIG fires when the thread
/// that forked the child exits, and the main thread lives as long as the process.
fn spawn_tool(kind: ToolKind) -> std::io::Result<Tool> {
    let name: &std::ffi::CStr = match kind {
        ToolKind::Busy => c"tool-busy",
        ToolKind::Idle => c"tool-idle",
        ToolKind::Io => c"tool-io",
        ToolKind::Wait(_) => c"tool-wait",
        ToolKind::Mcp { .. } => c"mcp-server",
        ToolKind::WrappedMcp => c"mcp-wrapper",
        ToolKind::Stay(_) => c"tool-stay",
        ToolKind::Detached => c"dev-server",
    };
    let devnull = owned(
        // SAFETY: open(2) with a NUL-terminated literal path.
        unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
    )?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh from pipe2.
    let (pipe_r, pipe_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // An MCP server's stdout, read by the double.
    // SAFETY: pipe2 into a two-int array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh from pipe2.
    let (out_r, out_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child says when it is set up (renamed, stdio replaced, other fds closed) by closing
    // its end, so the result line that names it never races its comm or its fds.
    // SAFETY: pipe2 into a two-int array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds are fresh from pipe2.
    let (ready_r, ready_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child calls only async-signal-safe functions (raw syscalls) until it dies.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        let fds = ToolFds {
            devnull: devnull.as_raw_fd(),
            pipe_r: pipe_r.as_raw_fd(),
            out_w: out_w.as_raw_fd(),
        };
        // SAFETY: everything below is raw syscalls on fds and stack memory of this process.
        unsafe { tool_main(kind, name.as_ptr(), parent, fds) }
    }
    drop((pipe_r, out_w, ready_w));
    let mut byte = [0u8; 1];
    // SAFETY: a blocking 1-byte read into a stack buffer; EOF once the child closed its end
    // (or died first).
    while unsafe { libc::read(ready_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
    let mcp = matches!(kind, ToolKind::Mcp { .. } | ToolKind::WrappedMcp);
    Ok(Tool {
        pid,
        _pipe: (matches!(kind, ToolKind::Idle | ToolKind::Stay(_)) || mcp).then_some(pipe_w),
        _out: mcp.then_some(out_r),
    })
}

/// The fds a forked tool child starts from.
struct ToolFds {
    devnull: RawFd,
    /// The read end of `tool:idle`'s (or an MCP server's) stdin pipe. (The child's copy of
    /// the ready pipe's write end is not named: it goes with every other fd once the child is
    /// set up.)
    pipe_r: RawFd,
    /// The write end of an MCP server's stdout pipe.
    out_w: RawFd,
}

/// The body of a forked tool child. Never returns.
///
/// # Safety
/// Only to be called in a freshly forked child; uses async-signal-safe calls only.
unsafe fn tool_main(
    kind: ToolKind,
    name: *const libc::c_char,
    parent: libc::pid_t,
    fds: ToolFds,
) -> ! {
    let ToolFds {
        devnull,
        pipe_r,
        out_w,
    } = fds;
    // SAFETY: (for the whole body) raw syscalls with valid arguments, per the contract above.
    unsafe {
        // The real CLI's tools die by SIGKILL with it; its MCP servers are sent a signal.
        // What outlives it has no death signal.
        match kind {
            ToolKind::Mcp { .. } | ToolKind::WrappedMcp => {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            }
            ToolKind::Stay(_) | ToolKind::Detached => {}
            _ => {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            }
        }
        if libc::getppid() != parent {
            libc::_exit(1); // the double died before PDEATHSIG was armed
        }
        libc::prctl(libc::PR_SET_NAME, name, 0, 0, 0);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL); // not the double's socket-removing handler
        }
        libc::dup2(devnull, 0);
        libc::dup2(devnull, 1);
        libc::dup2(devnull, 2);
        if matches!(
            kind,
            ToolKind::Idle | ToolKind::Mcp { .. } | ToolKind::WrappedMcp | ToolKind::Stay(_)
        ) {
            libc::dup2(pipe_r, 0);
        }
        if matches!(kind, ToolKind::Mcp { .. } | ToolKind::WrappedMcp) {
            libc::dup2(out_w, 1);
        }
        if matches!(kind, ToolKind::Wait(_) | ToolKind::Detached) {
            libc::setsid(); // the Bash tool (and what it starts) runs in a session of its own
        }
        if matches!(kind, ToolKind::Detached) {
            let log = c"/tmp/reaper-double-dev-server.log";
            let fd = libc::open(
                log.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o600,
            );
            if fd >= 0 {
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
            }
        }
        if let ToolKind::Stay(Some(uid)) = kind
            && libc::setresuid(uid, uid, uid) != 0
        {
            libc::_exit(3);
        }
        // Drop every other fd: the double's stdio sockets, epolls, listener, dups of 1 and 2,
        // and the ready pipe's write end with them: the double reads EOF on it only once that
        // is done, so whoever it tells about this tool never sees it half set up.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        match kind {
            ToolKind::Busy => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            ToolKind::Idle | ToolKind::Mcp { ignore_eof: false } => {
                let mut b = [0u8; 1];
                loop {
                    let n = libc::read(0, b.as_mut_ptr().cast(), 1);
                    // The double's death closes the pipe (exit_files()) before it sends the
                    // death signal (exit_notify()): an idle tool waits for that, as the real
                    // CLI's tools die by SIGKILL with it, instead of racing it with exit 0.
                    if n == 0 && matches!(kind, ToolKind::Idle) {
                        loop {
                            libc::pause();
                        }
                    }
                    if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                        libc::_exit(0);
                    }
                }
            }
            ToolKind::Mcp { ignore_eof: true } | ToolKind::Stay(_) | ToolKind::Detached => loop {
                libc::pause();
            },
            ToolKind::WrappedMcp => {
                // The wrapper forks the server and waits; when the double dies it dies (its
                // death signal) without passing anything on. The server ignores EOF.
                let server = libc::fork();
                if server == 0 {
                    libc::prctl(libc::PR_SET_NAME, c"mcp-server".as_ptr(), 0, 0, 0);
                    loop {
                        libc::pause();
                    }
                }
                loop {
                    libc::pause();
                }
            }
            ToolKind::Wait(secs) => {
                let mut left = libc::timespec {
                    tv_sec: secs as libc::time_t,
                    tv_nsec: 0,
                };
                while libc::nanosleep(&left, &mut left) != 0 {}
                libc::_exit(0);
            }
            ToolKind::Io => {
                let mut sv = [0; 2];
                if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) != 0 {
                    libc::_exit(2);
                }
                let ping = *b"ping\0\0\0\n";
                let mut got = [0u8; 8];
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                loop {
                    libc::write(sv[0], ping.as_ptr().cast(), 8);
                    libc::read(sv[1], got.as_mut_ptr().cast(), 8);
                    libc::nanosleep(&pause, std::ptr::null_mut());
                }
            }
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let path = SOCK_PATH.load(Ordering::Relaxed);
    // SAFETY: unlink, _exit and raise are async-signal-safe; `path` is null or a leaked C
    // string. SA_RESETHAND restored the default action, and `sig` stays blocked until this
    // returns, so the process then dies of `sig` (its parent sees a death by signal, as with
    // the real CLI) — except SIGINT, which the real CLI takes as a request to end: status 0.
    unsafe {
        if !path.is_null() {
            libc::unlink(path);
        }
        if sig == libc::SIGINT {
            libc::_exit(0);
        }
        libc::raise(sig);
    }
}

/// "The API": a loopback TCP listener of the double's own, answering one request per
/// connection. Returns its address.
fn start_model() -> Option<std::net::SocketAddr> {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(err) => {
            eprintln!("claude double: no loopback for the model ({err}); turns make no requests");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    named("model", move || {
        for mut conn in listener.incoming().flatten() {
            let mut req = [0u8; 256];
            let _ = conn.read(&mut req);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nevent: message_stop\ndata: {}\n\n");
        }
    });
    Some(addr)
}

/// One request to the model and its whole answer; the connection is closed after it.
fn ask_model(addr: Option<std::net::SocketAddr>) {
    if let Some(addr) = addr
        && let Ok(mut conn) = std::net::TcpStream::connect(addr)
    {
        let _ = conn.write_all(b"POST /v1/messages HTTP/1.1\r\n\r\n");
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; we fill the handler and flags.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
        // SAFETY: a valid sigaction for a catchable signal.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn named(name: &str, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(f)
        .expect("spawn a helper thread");
}

/// Park forever (a worker waiting on a futex).
fn park_forever() {
    loop {
        std::thread::park();
    }
}

struct Claude {
    args: Args,
    session_id: String,
    cwd: String,
    config_files: Vec<PathBuf>,
    sock_path: PathBuf,
    epfd: OwnedFd,
    listener: Option<UnixListener>,
    heap_efd: OwnedFd,
    stdin_buf: Vec<u8>,
    stdin_open: bool,
    tools: Vec<Tool>,
    /// The MCP servers started at session start.
    _mcp: Vec<Tool>,
    model: Option<std::net::SocketAddr>,
    /// A turn waiting on its foreground tool: (the tool, when the turn started, its turn).
    waiting: Option<(Tool, Instant, u64)>,
    turns: u64,
    rng: u64,
    next_tick: Instant,
    next_statm: Instant,
    next_helper: Instant,
    _rss: Vec<u8>,
}

impl Claude {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn helper_period(&mut self) -> Duration {
        Duration::from_millis(10_000 + self.rand() % 20_001)
    }

    fn emit(&self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        let mut out = std::io::stdout().lock();
        // The parent may be gone (EPIPE, SIGPIPE is ignored): like the real one, carry on.
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }

    fn exit(&self, code: i32) -> ! {
        let _ = std::fs::remove_file(&self.sock_path);
        std::process::exit(code)
    }

    fn init_line(&self) -> Value {
        json!({
            "type": "system",
            "subtype": "init",
            "cwd": self.cwd,
            "session_id": self.session_id,
            "tools": ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch"],
            "mcp_servers": [],
            "model": self.args.model,
            "permissionMode": self.args.permission_mode,
            "slash_commands": [],
            "apiKeySource": "none",
            "claude_code_version": "2.1.329-double",
            "output_style": "default",
            "agents": [],
            "uuid": uuid_like(self.rng ^ 0x5eed),
            // Not in the real line: lets tests match a stream to a process.
            "pid": std::process::id(),
            "input_format": self.args.input_format,
            "output_format": self.args.output_format,
            "verbose": self.args.verbose,
            "disallowed_tools": self.args.disallowed_tools,
            "setting_sources": self.args.setting_sources,
            "resume": self.args.resume,
        })
    }

    fn on_line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let msg: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(err) => {
                eprintln!("claude double: ignoring a line that is not JSON ({err})");
                return;
            }
        };
        match msg.get("type").and_then(Value::as_str) {
            Some("user") => self.turn(&msg),
            Some("control_request") => {
                let id = msg.get("request_id").cloned().unwrap_or(Value::Null);
                let subtype = msg
                    .pointer("/request/subtype")
                    .cloned()
                    .unwrap_or(Value::Null);
                let response = if subtype == "initialize" {
                    json!({ "commands": [], "output_style": "default", "models": [] })
                } else {
                    json!({})
                };
                self.emit(&json!({
                    "type": "control_response",
                    "response": { "subtype": "success", "request_id": id, "response": response },
                }));
            }
            _ => {} // control responses, keep-alives, …
        }
    }

    fn turn(&mut self, msg: &Value) {
        let started = Instant::now();
        self.turns += 1;
        ask_model(self.model);
        let text = user_text(msg);
        let mut tool_pids = Vec::new();
        let mut notes = Vec::new();
        let mut slow_ms = 0u64;
        let mut wait_secs = None;
        for word in text.split_whitespace() {
            let kind = match word {
                "tool:busy" => Some(ToolKind::Busy),
                "tool:idle" => Some(ToolKind::Idle),
                "tool:io" => Some(ToolKind::Io),
                "tool:stop" => {
                    for tool in self.tools.drain(..) {
                        // SAFETY: signalling and reaping our own unreaped child.
                        unsafe {
                            libc::kill(tool.pid, libc::SIGKILL);
                            libc::waitpid(tool.pid, std::ptr::null_mut(), 0);
                        }
                        notes.push(format!("stopped tool {}", tool.pid));
                    }
                    None
                }
                w => {
                    if let Some(ms) = w.strip_prefix("slow:").and_then(|v| v.parse().ok()) {
                        slow_ms = ms;
                    }
                    if let Some(secs) = w.strip_prefix("tool:wait:").and_then(|v| v.parse().ok()) {
                        wait_secs = Some(secs);
                    }
                    match w {
                        "tool:stay" => Some(ToolKind::Stay(None)),
                        "tool:detached" => Some(ToolKind::Detached),
                        _ => w
                            .strip_prefix("tool:stay-as:")
                            .and_then(|v| v.parse().ok())
                            .map(|uid| ToolKind::Stay(Some(uid))),
                    }
                }
            };
            if let Some(kind) = kind {
                match spawn_tool(kind) {
                    Ok(tool) => {
                        notes.push(format!("started {kind:?} tool {}", tool.pid));
                        tool_pids.push(tool.pid);
                        self.tools.push(tool);
                    }
                    Err(err) => notes.push(format!("could not start {kind:?} tool: {err}")),
                }
            }
        }
        let msg_id = format!("msg_double_{}_{}", std::process::id(), self.turns);
        let assistant = |text: String| {
            json!({
                "type": "assistant",
                "message": {
                    "id": msg_id, "type": "message", "role": "assistant", "model": self.args.model,
                    "content": [{ "type": "text", "text": text }],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": { "input_tokens": 12, "output_tokens": 8 },
                },
                "parent_tool_use_id": null,
                "session_id": self.session_id,
                "uuid": uuid_like(now_ms() as u64 ^ self.turns),
            })
        };
        if !tool_pids.is_empty() {
            // Tools left running: the model is told, and answers.
            ask_model(self.model);
        }
        if let Some(secs) = wait_secs {
            match spawn_tool(ToolKind::Wait(secs)) {
                Ok(tool) => {
                    self.emit(&assistant(format!(
                        "running a tool for {secs}s (pid {})",
                        tool.pid
                    )));
                    // The result waits for the tool (see `tick`).
                    self.waiting = Some((tool, started, self.turns));
                    return;
                }
                Err(err) => notes.push(format!("could not start a wait tool: {err}")),
            }
        }
        let slow_until = started + Duration::from_millis(slow_ms);
        let mut chunk = 0;
        while Instant::now() < slow_until {
            chunk += 1;
            self.emit(&assistant(format!("… part {chunk}")));
            std::thread::sleep(Duration::from_millis(100).min(slow_until - Instant::now()));
        }
        let reply = if notes.is_empty() {
            format!("ok (turn {})", self.turns)
        } else {
            notes.join("; ")
        };
        self.emit(&assistant(reply.clone()));
        self.result(started, reply, &tool_pids);
    }

    /// The turn's `result` line.
    fn result(&self, started: Instant, reply: String, tool_pids: &[libc::pid_t]) {
        let elapsed = started.elapsed().as_millis() as u64;
        let mut result = json!({
            "type": "result",
            "subtype": "success",
            "is_error": false,
            "duration_ms": elapsed,
            "duration_api_ms": elapsed,
            "num_turns": 1,
            "result": reply,
            "session_id": self.session_id,
            "total_cost_usd": 0.0,
            "usage": { "input_tokens": 12, "output_tokens": 8,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0 },
            "permission_denials": [],
            "uuid": uuid_like(now_ms() as u64 ^ (self.turns << 8)),
        });
        if !self._mcp.is_empty() {
            result["mcp_pids"] = json!(self._mcp.iter().map(|t| t.pid).collect::<Vec<_>>());
        }
        if let Some(first) = tool_pids.first() {
            result["tool_pid"] = json!(first);
            result["tool_pids"] = json!(tool_pids);
        }
        self.emit(&result);
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        // One read per readiness: after EPOLLIN it does not block (stdin stays blocking, so a
        // shared file description is not changed under anyone else).
        // SAFETY: read(2) into a stack buffer.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return;
            }
        }
        if n <= 0 {
            self.on_eof();
            return;
        }
        self.stdin_buf.extend_from_slice(&buf[..n as usize]);
        while let Some(pos) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=pos).collect();
            self.on_line(&line);
        }
    }

    fn on_eof(&mut self) {
        let last = std::mem::take(&mut self.stdin_buf);
        self.on_line(&last); // a last line without its newline
        if !self.args.ignore_stdin_eof {
            self.exit(0);
        }
        // Keep idling: stop watching the (permanently readable) fd.
        epoll_del(self.epfd.as_raw_fd(), 0);
        self.stdin_open = false;
    }

    fn tick(&mut self) {
        let now = Instant::now();
        burn_cpu(self.args.idle_cpu_us);
        for file in &self.config_files {
            let _ = std::fs::metadata(file); // statx
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd from a stack buffer.
        unsafe { libc::write(self.heap_efd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if now >= self.next_statm {
            let _ = std::fs::read("/proc/self/statm");
            self.next_statm = now + STATM_EVERY;
        }
        if now >= self.next_helper {
            let name = if self.rand().is_multiple_of(2) {
                "JSCWarmUp"
            } else {
                "Bun Pool 1"
            };
            // A short-lived helper: cloned, a little work, exit.
            named(name, || burn_cpu(200));
            self.next_helper = now + self.helper_period();
        }
        // A turn waiting on its foreground tool ends when the tool has.
        if let Some((tool, _, _)) = &self.waiting
            // SAFETY: waitpid on our own child, non-blocking.
            && unsafe { libc::waitpid(tool.pid, std::ptr::null_mut(), libc::WNOHANG) } != 0
        {
            let (tool, started, turn) = self.waiting.take().expect("checked above");
            ask_model(self.model); // the tool's result goes to the model, which answers
            self.result(
                started,
                format!("tool {} done (turn {turn})", tool.pid),
                &[tool.pid],
            );
        }
        // Reap tools that died (killed by a test, say) so they do not linger as zombies.
        self.tools.retain(|t| {
            // SAFETY: waitpid on our own child, non-blocking.
            unsafe { libc::waitpid(t.pid, std::ptr::null_mut(), libc::WNOHANG) == 0 }
        });
    }

    fn run(&mut self) -> ! {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            let wait = self.next_tick.saturating_duration_since(Instant::now());
            let timeout = wait.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: a valid epoll fd and a buffer of 8 events.
            let n =
                unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), 8, timeout) };
            for ev in events.iter().take(n.max(0) as usize) {
                let fd = ev.u64 as RawFd;
                if fd == 0 && self.stdin_open {
                    self.read_stdin();
                } else if let Some(listener) = &self.listener
                    && fd == listener.as_raw_fd()
                {
                    // Nobody is expected to connect; accept and hang up.
                    while listener.accept().is_ok() {}
                }
            }
            if Instant::now() >= self.next_tick {
                self.tick();
                self.next_tick = (self.next_tick + TICK).max(Instant::now());
            }
        }
    }
}

/// The text of a user message: `message.content` as a string, or its text blocks.
fn user_text(msg: &Value) -> String {
    match msg.pointer("/message/content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => msg
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The listening socket at `${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}/cc-socks/<pid>.sock`.
fn listen_socket() -> (PathBuf, Option<UnixListener>) {
    let base = env_dir("XDG_RUNTIME_DIR")
        .or_else(|| env_dir("TMPDIR"))
        .unwrap_or_else(|| "/tmp".into());
    let dir = base.join("cc-socks");
    let path = dir.join(format!("{}.sock", std::process::id()));
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let _ = std::fs::remove_file(&path); // left by a SIGKILLed process with a recycled pid
    let listener = UnixListener::bind(&path).ok();
    if let Some(l) = &listener {
        let _ = l.set_nonblocking(true);
        let c = CString::new(path.clone().into_os_string().into_vec()).expect("no NUL in path");
        SOCK_PATH.store(c.into_raw(), Ordering::Relaxed);
    }
    (path, listener)
}

/// Writes the config file the way the real CLI updates `.claude.json` at startup (atomically),
/// so other doubles sharing the directory see inotify activity. Only in `$CLAUDE_CONFIG_DIR`.
fn touch_config(dir: &Path) {
    if env_dir("CLAUDE_CONFIG_DIR").is_none() {
        return;
    }
    let _ = std::fs::create_dir_all(dir);
    let tmp = dir.join(format!(".claude.json.tmp.{}", std::process::id()));
    let body = json!({ "numStartups": 1, "lastPid": std::process::id() }).to_string();
    if std::fs::write(&tmp, body).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(".claude.json"));
    }
}

fn start_fs_watch(dir: PathBuf) -> Option<()> {
    // SAFETY: inotify_init1 with a flag.
    let ino = owned(unsafe { libc::inotify_init1(libc::IN_CLOEXEC) }).ok()?;
    let cdir = CString::new(dir.clone().into_os_string().into_vec()).ok()?;
    let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;
    // SAFETY: a valid inotify fd and a NUL-terminated path.
    unsafe { libc::inotify_add_watch(ino.as_raw_fd(), cdir.as_ptr(), mask) };
    named("fs.watch", move || {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: read(2) of inotify events into a stack buffer.
            let n = unsafe { libc::read(ino.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            // Only changes to claude's own files wake the "settings reload" path.
            let mentions_claude = buf[..n as usize].windows(7).any(|w| w == b".claude");
            if mentions_claude {
                for sub in ["", "projects", "todos", "statsig", "shell-snapshots"] {
                    let _ = std::fs::metadata(dir.join(sub));
                }
            }
        }
    });
    Some(())
}

fn main() {
    let args = parse_args();
    // fds 5 and 6 of the real process are dups of 2 and 1 (F_DUPFD takes the lowest ≥ 5).
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on the standard fds; the dups are kept for the lifetime.
    unsafe {
        libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 5);
        libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 5);
    }
    let rss = vec![1u8; args.rss_mb << 20];

    let config = config_dir();
    touch_config(&config);
    let (sock_path, listener) = listen_socket();
    install_signal_handlers();
    start_fs_watch(config.clone());

    // Helper threads, idle the way the real ones are: three blocked on their own event loops
    // or eventfd, three parked on futexes.
    let heap_efd = eventfd();
    let heap_reader = heap_efd.try_clone().expect("dup eventfd");
    named("HeapHelper", move || {
        let mut v = [0u8; 8];
        loop {
            // SAFETY: an 8-byte read from an eventfd into a stack buffer.
            unsafe { libc::read(heap_reader.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        }
    });
    let (ep, efd) = (epoll(), eventfd());
    named("HTTP Client", move || idle_event_loop(ep, efd));
    let (ep, efd) = (epoll(), eventfd());
    named("Bun Pool 0", move || idle_event_loop(ep, efd));
    named("JITWorker", park_forever);
    named("mi-scavenger", park_forever);

    if args.startup_child {
        // The real CLI runs one short-lived `git … ls-files` at startup.
        std::thread::spawn(|| {
            let child = std::process::Command::new("git")
                .args(["ls-files", "--error-unmatch", "--", ".claude.json"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            if let Ok(mut child) = child {
                let _ = child.wait();
            }
        });
    }

    // stdio MCP servers start with the session, before any request to the model.
    let mcp: Vec<Tool> = (0..args.mcp)
        .filter_map(|_| {
            let kind = if args.mcp_wrapper {
                ToolKind::WrappedMcp
            } else {
                ToolKind::Mcp {
                    ignore_eof: args.mcp_ignore_eof,
                }
            };
            spawn_tool(kind).ok()
        })
        .collect();

    let epfd = epoll();
    let stdin_open = match epoll_add(
        epfd.as_raw_fd(),
        0,
        (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
    ) {
        Ok(()) => true,
        // A regular file or /dev/null cannot be polled: read it whole, synchronously.
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => false,
        Err(err) => panic!("epoll_ctl(stdin): {err}"),
    };
    if let Some(l) = &listener {
        let _ = epoll_add(epfd.as_raw_fd(), l.as_raw_fd(), libc::EPOLLIN as u32);
    }
    let seed = (std::process::id() as u64) << 32 ^ now_ms() as u64;
    let now = Instant::now();
    let mut claude = Claude {
        session_id: uuid_like(seed),
        cwd: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        config_files: vec![config.join(".claude.json"), config.join("settings.json")],
        sock_path,
        epfd,
        listener,
        heap_efd,
        stdin_buf: Vec::new(),
        stdin_open,
        tools: Vec::new(),
        _mcp: mcp,
        model: start_model(),
        waiting: None,
        turns: 0,
        rng: seed | 1,
        next_tick: now + TICK,
        next_statm: now + STATM_EVERY,
        next_helper: now,
        _rss: rss,
        args,
    };
    claude.next_helper = now + claude.helper_period();
    claude.emit(&claude.init_line());
    if !claude.stdin_open {
        let mut all = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut all);
        for line in all.split(|&b| b == b'\n') {
            claude.on_line(line);
        }
        claude.on_eof();
    }
    claude.run()
}
