//! Stands in for a Claude Agent SDK daemon (node or bun): spawns the `claude` double as a direct
//! child with fds 0/1/2 on AF_UNIX socketpairs (what libuv gives a child), the SDK's argv and
//! environment, sends the `initialize` control request and one user message, reads until the
//! `result`, then — per mode — leaks the child, keeps chatting, or closes it (the fix).
//!
//! Prints `key=value` lines (flushed): `agent=<pid>`, `started=<pid>:<start ticks>` per child as
//! it is spawned (read while the child is unreaped, so the pair names that child however late the
//! reader looks: a closed child can be reaped, and its pid reused, before the reader sees
//! `ready=1`), `model=<pid>:<model from its init line>`
//! per child, then per child `claude=<pid>` (after its
//! result) and `tool=<pid>` (if the result named one), `mcp=<pid>` (its MCP servers), `holder=<pid>` with `--orphanable`, then
//! `ready=1`. Whenever a child is reaped: `exit=<pid>:code:<n>` or `exit=<pid>:signal:<n>`.
//! `--close-after-result` adds `exit_us=<pid>:<µs from closing its stdin to reaping it>`.
//! A line a child wrote while nothing was asked of it: `unsolicited=<pid>:<line>`.
//! `--chat-every` prints `chats=<n>` when it ends.
//!
//! Modes: `--leak` (default: hold the sockets forever, never close), `--chat-every MS` (a user
//! message every MS ms, waiting for each result), `--close-after-result` (shut down the child's
//! stdin, wait for its exit, print it, keep running).
//! Options: `--message TEXT` (first message; `tool:busy` etc.), `--claude PATH` (default:
//! `claude` next to this executable), `--claude-arg-style equals|space`, `--claude-arg ARG`
//! (repeatable, appended to the child's argv), `--count N` (children, each with its own
//! socketpairs), `--orphanable` (fork a holder that keeps dups of the agent's socket ends, so
//! a SIGKILLed agent's children see no EOF and are orphaned; it exits when its stdin, inherited
//! from the agent, reaches EOF).
//!
//! The agent exits when its own stdin reaches EOF: it shuts down every child's stdin (they exit
//! by themselves), SIGTERMs any child still alive after 500 ms (as the SDK does on exit), then
//! SIGKILLs after 2 s more.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::Shutdown,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Generous: CI machines are shared and slow.
const REPLY_DEADLINE: Duration = Duration::from_secs(20);

fn say(key: &str, value: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{key}={value}");
    let _ = out.flush();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Leak,
    ChatEvery(u64),
    CloseAfterResult,
}

struct Opts {
    mode: Mode,
    message: String,
    claude: PathBuf,
    space_style: bool,
    count: usize,
    orphanable: bool,
    claude_args: Vec<String>,
}

fn usage(msg: &str) -> ! {
    eprintln!("fake-agent: {msg}");
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        mode: Mode::Leak,
        message: "hello".into(),
        claude: std::env::current_exe()
            .expect("own path")
            .with_file_name("claude"),
        space_style: false,
        count: 1,
        orphanable: false,
        claude_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match name.as_str() {
            "--leak" => o.mode = Mode::Leak,
            "--close-after-result" => o.mode = Mode::CloseAfterResult,
            "--chat-every" => {
                let ms = value().parse().unwrap_or_else(|_| usage("--chat-every MS"));
                o.mode = Mode::ChatEvery(ms);
            }
            "--message" => o.message = value(),
            "--claude" => o.claude = value().into(),
            "--claude-arg-style" => match value().as_str() {
                "equals" => o.space_style = false,
                "space" => o.space_style = true,
                other => usage(&format!("--claude-arg-style equals|space, not {other}")),
            },
            "--claude-arg" => o.claude_args.push(value()),
            "--count" => o.count = value().parse().unwrap_or_else(|_| usage("--count N")),
            "--orphanable" => o.orphanable = true,
            other => usage(&format!("unknown option {other}")),
        }
    }
    o
}

/// The argv the SDK spawns the CLI with (order as measured), in either flag style.
fn sdk_argv(space: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "--output-format",
        "stream-json",
        "--verbose",
        "--input-format",
        "stream-json",
    ]
    .map(String::from)
    .to_vec();
    for (flag, value) in [
        ("--model", "claude-sonnet-4-5"),
        ("--disallowedTools", "Bash,Read,Write,Edit"),
        ("--setting-sources", ""),
        ("--permission-mode", "default"),
    ] {
        if space {
            v.push(flag.into());
            v.push(value.into());
        } else {
            v.push(format!("{flag}={value}"));
        }
    }
    v
}

/// One spawned `claude` double and the agent's ends of its sockets.
struct Session {
    pid: u32,
    stdin: Option<UnixStream>,
    /// Lines the child wrote in answer to something (everything else is reported unsolicited).
    replies: Receiver<Value>,
    /// Replies still owed: the init line, control responses, results.
    owed: Arc<AtomicUsize>,
    requests: u64,
}

impl Session {
    fn spawn(o: &Opts, exits: Sender<(u32, Instant)>) -> Self {
        let (stdin_agent, stdin_child) = UnixStream::pair().expect("socketpair");
        let (stdout_agent, stdout_child) = UnixStream::pair().expect("socketpair");
        let (stderr_agent, stderr_child) = UnixStream::pair().expect("socketpair");
        let mut child = {
            // The Command (holding the child's ends) is dropped at the end of this block, so
            // the agent keeps only its own ends (all CLOEXEC: no sibling inherits them).
            let mut cmd = Command::new(&o.claude);
            cmd.args(sdk_argv(o.space_style))
                .args(&o.claude_args)
                .env("CLAUDE_CODE_ENTRYPOINT", "sdk-ts")
                .env("CLAUDE_AGENT_SDK_VERSION", "0.3.329-double")
                .stdin(Stdio::from(OwnedFd::from(stdin_child)))
                .stdout(Stdio::from(OwnedFd::from(stdout_child)))
                .stderr(Stdio::from(OwnedFd::from(stderr_child)));
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", o.claude.display()))
        };
        let pid = child.id();
        // Nothing waits for the child before the waiter thread below: its /proc entry is still
        // this process (a zombie at worst).
        let start_ticks = reaper_tests::proc_stat(pid)
            .unwrap_or_else(|| panic!("the unreaped child {pid} is not in /proc"))
            .start_ticks;
        say("started", format!("{pid}:{start_ticks}"));
        // The child's stderr, prefixed, to ours.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_agent).lines() {
                let Ok(line) = line else { break };
                eprintln!("claude[{pid}]: {line}");
            }
        });
        // The child's stdout: replies to the main thread, anything unasked-for reported.
        let owed = Arc::new(AtomicUsize::new(1)); // the init line
        let (tx, replies) = mpsc::channel();
        let reader_owed = owed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout_agent).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let closes = matches!(
                    value.get("type").and_then(Value::as_str),
                    Some("result" | "control_response")
                ) || (value["type"] == "system" && value["subtype"] == "init");
                let owed_now = reader_owed.load(Ordering::SeqCst);
                if owed_now == 0 {
                    say("unsolicited", format!("{pid}:{line}"));
                    continue;
                }
                if closes {
                    reader_owed.fetch_sub(1, Ordering::SeqCst);
                }
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for a child");
            let reaped = Instant::now();
            use std::os::unix::process::ExitStatusExt as _;
            match (status.code(), status.signal()) {
                (Some(code), _) => say("exit", format!("{pid}:code:{code}")),
                (_, Some(sig)) => say("exit", format!("{pid}:signal:{sig}")),
                _ => say("exit", format!("{pid}:unknown:{status}")),
            }
            let _ = exits.send((pid, reaped));
        });
        Self {
            pid,
            stdin: Some(stdin_agent),
            replies,
            owed,
            requests: 0,
        }
    }

    fn send(&mut self, v: &Value) {
        self.owed.fetch_add(1, Ordering::SeqCst);
        let mut line = v.to_string();
        line.push('\n');
        let stdin = self.stdin.as_mut().expect("stdin still open");
        if let Err(err) = stdin.write_all(line.as_bytes()) {
            eprintln!("fake-agent: writing to claude {}: {err}", self.pid);
        }
    }

    /// Waits for the next line of type `kind`; `None` if the child's stdout ended.
    fn wait_for(&self, kind: &str) -> Option<Value> {
        let deadline = Instant::now() + REPLY_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(v) if v.get("type").and_then(Value::as_str) == Some(kind) => return Some(v),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "claude {} sent no {kind} within {REPLY_DEADLINE:?}",
                        self.pid
                    )
                }
            }
        }
    }

    fn initialize(&mut self) {
        self.requests += 1;
        let id = format!("req_{}_{}", self.pid, self.requests);
        self.send(&json!({
            "type": "control_request",
            "request_id": id,
            "request": { "subtype": "initialize", "hooks": null },
        }));
        self.wait_for("control_response");
    }

    /// One turn: a user message, then everything up to its result.
    fn ask(&mut self, text: &str) -> Option<Value> {
        self.send(&json!({
            "type": "user",
            "message": { "role": "user", "content": text },
            "parent_tool_use_id": null,
            "session_id": "",
        }));
        self.wait_for("result")
    }

    /// Ends the child's input (the SDK's `close()`): EOF on its stdin, even if a holder keeps a
    /// dup of our end (shutdown acts on the socket, not on one fd).
    fn close_stdin(&mut self) {
        if let Some(s) = self.stdin.take() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

/// Forks the holder: it keeps every fd the agent has (the children's socket ends among them)
/// and exits when stdin, shared with the agent, reaches EOF.
fn fork_holder() -> i32 {
    // The holder says when it is renamed, so `holder=` never races its comm.
    let mut ready = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    let rc = unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: the child uses only async-signal-safe calls (prctl, close, read, write, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw syscalls on this process's own fds and a stack buffer.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"agent-holder".as_ptr(), 0, 0, 0);
            // Not the agent's stdout/stderr: a reader of those must see EOF when the agent ends.
            libc::close(1);
            libc::close(2);
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            libc::close(ready[0]);
            libc::close(ready[1]);
            let mut buf = [0u8; 512];
            loop {
                let n = libc::read(0, buf.as_mut_ptr().cast(), buf.len());
                if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                    libc::_exit(0);
                }
            }
        }
    }
    let mut byte = [0u8; 1];
    // SAFETY: closing our copy of the write end, then a 1-byte read into a stack buffer.
    unsafe {
        libc::close(ready[1]);
        while libc::read(ready[0], byte.as_mut_ptr().cast(), 1) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        libc::close(ready[0]);
    }
    pid
}

/// Waits until stdin has data or EOF, at most `timeout` (None: forever). True at EOF.
fn stdin_eof(timeout: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: poll on one stack pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        return false;
    }
    let mut buf = [0u8; 512];
    // SAFETY: read(2) into a stack buffer; poll said it will not block.
    let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    r == 0 || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
}

fn main() {
    let o = parse();
    say("agent", std::process::id());
    let (exit_tx, exit_rx) = mpsc::channel();
    let mut sessions: Vec<Session> = (0..o.count)
        .map(|_| Session::spawn(&o, exit_tx.clone()))
        .collect();
    drop(exit_tx);
    for s in &mut sessions {
        let init = s
            .wait_for("system")
            .unwrap_or_else(|| panic!("claude {} ended before its init line", s.pid));
        say(
            "model",
            format!("{}:{}", s.pid, init["model"].as_str().unwrap_or("?")),
        );
        s.initialize();
    }
    for s in &mut sessions {
        let result = s
            .ask(&o.message)
            .unwrap_or_else(|| panic!("claude {} ended before its result", s.pid));
        say("claude", s.pid);
        if let Some(pids) = result.get("tool_pids").and_then(Value::as_array) {
            for pid in pids {
                say("tool", pid);
            }
        }
        if let Some(pids) = result.get("mcp_pids").and_then(Value::as_array) {
            for pid in pids {
                say("mcp", pid);
            }
        }
    }
    let holder = o.orphanable.then(fork_holder);
    if let Some(h) = holder {
        say("holder", h);
    }
    say("ready", 1);

    let mut exited: HashMap<u32, Instant> = HashMap::new();
    let mut chats = 0u64;
    match o.mode {
        Mode::Leak => while !stdin_eof(None) {},
        Mode::ChatEvery(ms) => {
            let every = Duration::from_millis(ms);
            let mut next = Instant::now() + every;
            loop {
                if stdin_eof(Some(next.saturating_duration_since(Instant::now()))) {
                    break;
                }
                if Instant::now() < next {
                    continue;
                }
                for s in sessions.iter_mut().filter(|s| s.stdin.is_some()) {
                    chats += 1;
                    if s.ask(&format!("chat {chats}")).is_none() {
                        s.stdin = None; // the child is gone
                    }
                }
                next = (next + every).max(Instant::now());
            }
        }
        Mode::CloseAfterResult => {
            let closed = Instant::now();
            for s in &mut sessions {
                s.close_stdin();
            }
            while exited.len() < sessions.len() {
                match exit_rx.recv_timeout(REPLY_DEADLINE) {
                    Ok((pid, at)) => {
                        say(
                            "exit_us",
                            format!("{pid}:{}", at.duration_since(closed).as_micros()),
                        );
                        exited.insert(pid, at);
                    }
                    Err(err) => panic!("children did not exit after their stdin closed: {err}"),
                }
            }
            while !stdin_eof(None) {}
        }
    }

    // Our stdin ended: end the children the way the SDK does on exit.
    for s in &mut sessions {
        s.close_stdin();
    }
    let want = sessions.len();
    let reap = |exited: &mut HashMap<u32, Instant>, within: Duration| {
        let deadline = Instant::now() + within;
        while exited.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match exit_rx.recv_timeout(left) {
                Ok((pid, at)) => {
                    exited.insert(pid, at);
                }
                Err(_) => return false,
            }
        }
        true
    };
    for (sig, within) in [
        (None, Duration::from_millis(500)),
        (Some(libc::SIGTERM), Duration::from_secs(2)),
        (Some(libc::SIGKILL), REPLY_DEADLINE),
    ] {
        if let Some(sig) = sig {
            for s in sessions.iter().filter(|s| !exited.contains_key(&s.pid)) {
                // SAFETY: our own unreaped child (its waiter thread has not reported it).
                unsafe { libc::kill(s.pid as i32, sig) };
            }
        }
        if reap(&mut exited, within) {
            break;
        }
    }
    if let Some(h) = holder {
        // SAFETY: waiting for our own child, which exits at the same EOF.
        unsafe { libc::waitpid(h, std::ptr::null_mut(), 0) };
    }
    if let Mode::ChatEvery(_) = o.mode {
        say("chats", chats);
    }
}
