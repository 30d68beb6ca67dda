//! A mock of the Anthropic Messages API on loopback, for driving the real Claude Code CLI
//! offline (see ../shared/CLAUDE-PROCESS.md, "Running the real SDK and CLI offline").
//!
//! Prints its port on stdout as its first line, then serves until killed (or, when its stdin
//! is a pipe, until that pipe is closed: a test that dies takes its mock with it). Every
//! request is logged on stderr.
//!
//! - `POST /v1/messages[?beta=true]`: with `"stream": true`, server-sent events in the API's
//!   order (`message_start`, `content_block_start`, `ping`, `content_block_delta`…,
//!   `content_block_stop`, `message_delta`, `message_stop`); otherwise one JSON message.
//!   If the last user message contains `RUN_TOOL:<command>` (to the end of its line) and the
//!   request offers the `Bash` tool, the reply is a `Bash` tool call running `<command>`
//!   (`stop_reason: tool_use`); a request whose last message carries a `tool_result` gets a
//!   normal text answer.
//! - `POST /v1/messages/count_tokens`: `{"input_tokens": N}`.
//! - `GET /v1/models`, `GET /v1/models/<id>`: a one-model list, or that model.
//! - Anything else: 404 with an Anthropic-style error body.
//!
//! Every response closes its connection, so a CLI holds no API socket once its turn is over.
//! `--dump DIR` writes each request body to `DIR/<n>.json`; `--event-delay-ms N` (default 5)
//! spaces the streamed events.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde_json::{Value, json};

const MODEL: &str = "claude-sonnet-4-5";
/// Refuse request bodies larger than this (the CLI's first request is ≈ 100 KB).
const MAX_BODY: usize = 64 << 20;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `--dump DIR`: every request body is written to `DIR/<n>.json` (for debugging the CLI).
static DUMP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn main() {
    let mut delay = Duration::from_millis(5);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--event-delay-ms" => {
                let ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
                delay = Duration::from_millis(ms);
            }
            "--dump" => {
                let dir = args.next().unwrap_or_else(|| usage());
                std::fs::create_dir_all(&dir).expect("create the dump directory");
                let _ = DUMP.set(dir.into());
            }
            "-h" | "--help" => {
                println!("usage: mock-api [--event-delay-ms N] [--dump DIR]");
                return;
            }
            _ => usage(),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local address").port();
    println!("{port}");
    std::io::stdout().flush().expect("flush stdout");
    eprintln!("mock-api: listening on 127.0.0.1:{port}");
    exit_with_stdin_pipe();
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, delay) {
                        eprintln!("mock-api: connection error: {e}");
                    }
                });
            }
            Err(e) => eprintln!("mock-api: accept: {e}"),
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: mock-api [--event-delay-ms N] [--dump DIR]");
    std::process::exit(2);
}

/// When stdin is a pipe, exit as soon as it is closed (the writer, a test, is gone).
fn exit_with_stdin_pipe() {
    // SAFETY: fstat on fd 0 into a zeroed stat buffer.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(0, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if is_pipe {
        std::thread::spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            eprintln!("mock-api: stdin closed, exiting");
            std::process::exit(0);
        });
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(std::io::Error::other(format!("bad request line {line:?}")));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("connection closed in the headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err(std::io::Error::other("request body too large"));
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            reader.read_exact(&mut req.body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad content-length {len:?}")))?;
        if len > MAX_BODY {
            return Err(std::io::Error::other("request body too large"));
        }
        req.body.resize(len, 0);
        reader.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn serve(stream: TcpStream, delay: Duration) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let Some(req) = read_request(&mut reader)? else {
        return Ok(());
    };
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if let Some(dir) = DUMP.get() {
        let _ = std::fs::write(dir.join(format!("{n:04}.json")), &req.body);
    }
    let path = req.path().to_owned();
    let authed = req.header("x-api-key").is_some_and(|k| !k.is_empty())
        || req.header("authorization").is_some_and(|k| !k.is_empty());
    match (req.method.as_str(), path.as_str()) {
        (_, p) if p.starts_with("/v1/") && !authed => {
            log(&req, "401 no x-api-key");
            error(
                &mut out,
                401,
                "authentication_error",
                "x-api-key header is required",
            )
        }
        ("POST", "/v1/messages") => messages(&mut out, &req, n, delay),
        ("POST", "/v1/messages/count_tokens") => {
            let tokens = (req.body.len() / 4).max(1);
            log(&req, &format!("200 count_tokens {tokens}"));
            send_json(&mut out, 200, &json!({ "input_tokens": tokens }))
        }
        ("GET", "/v1/models") => {
            log(&req, "200 models");
            send_json(
                &mut out,
                200,
                &json!({
                    "data": [model()],
                    "has_more": false,
                    "first_id": MODEL,
                    "last_id": MODEL,
                }),
            )
        }
        ("GET", p) if p.starts_with("/v1/models/") => {
            log(&req, "200 model");
            let mut m = model();
            m["id"] = Value::String(p["/v1/models/".len()..].to_owned());
            send_json(&mut out, 200, &m)
        }
        _ => {
            log(&req, "404");
            let message = format!("Not found: {} {}", req.method, req.target);
            error(&mut out, 404, "not_found_error", &message)
        }
    }
}

fn log(req: &Request, what: &str) {
    eprintln!(
        "mock-api: {} {} ({} bytes) -> {what}",
        req.method,
        req.target,
        req.body.len()
    );
}

fn model() -> Value {
    json!({
        "type": "model",
        "id": MODEL,
        "display_name": "Claude Sonnet 4.5 (mock)",
        "created_at": "2025-09-29T00:00:00Z",
    })
}

/// What the reply to a Messages request is.
enum Reply {
    Text(String),
    Tool { command: String },
}

fn decide(body: &Value) -> (Reply, &'static str) {
    let messages = body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(last) = messages.last() else {
        return (
            Reply::Text("Hello from the mock API.".into()),
            "text (no messages)",
        );
    };
    let blocks: Vec<&Value> = match &last["content"] {
        Value::Array(blocks) => blocks.iter().collect(),
        other => vec![other],
    };
    if blocks.iter().any(|b| b["type"] == "tool_result") {
        let output: String = blocks
            .iter()
            .filter(|b| b["type"] == "tool_result")
            .map(|b| match &b["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        let output: String = output.chars().take(200).collect();
        return (
            Reply::Text(format!("The command finished. Its output: {output:?}")),
            "text after tool_result",
        );
    }
    let text: String = blocks
        .iter()
        .filter_map(|b| b.as_str().or_else(|| b["text"].as_str()))
        .collect::<Vec<_>>()
        .join("\n");
    let offers_bash = body["tools"]
        .as_array()
        .is_some_and(|tools| tools.iter().any(|t| t["name"] == "Bash"));
    if let Some(at) = text.find("RUN_TOOL:")
        && offers_bash
    {
        let command = text[at + "RUN_TOOL:".len()..]
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        return (Reply::Tool { command }, "tool_use");
    }
    let asked: String = text
        .lines()
        .rfind(|l| !l.trim().is_empty() && !l.contains("system-reminder"))
        .unwrap_or("")
        .chars()
        .take(80)
        .collect();
    (Reply::Text(format!("Mock reply to: {asked}")), "text")
}

fn messages(out: &mut TcpStream, req: &Request, n: u64, delay: Duration) -> std::io::Result<()> {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            log(req, "400 bad JSON");
            return error(out, 400, "invalid_request_error", &format!("bad JSON: {e}"));
        }
    };
    let model = body["model"].as_str().unwrap_or(MODEL).to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let (reply, kind) = decide(&body);
    let input_tokens = (req.body.len() / 4).max(1);
    let id = format!("msg_mock_{n:06}");
    let tool_id = format!("toolu_mock_{n:06}");
    let detail = match &reply {
        Reply::Tool { command } => format!("{kind} Bash {command:?}"),
        Reply::Text(_) => kind.to_owned(),
    };
    log(
        req,
        &format!("200 {} {detail}", if stream { "stream" } else { "json" }),
    );
    if !stream {
        let (content, stop) = match &reply {
            Reply::Text(text) => (json!([{ "type": "text", "text": text }]), "end_turn"),
            Reply::Tool { command } => (
                json!([{
                    "type": "tool_use",
                    "id": tool_id,
                    "name": "Bash",
                    "input": tool_input(command),
                }]),
                "tool_use",
            ),
        };
        return send_json(
            out,
            200,
            &json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": null,
                "usage": usage_json(input_tokens, 12),
            }),
        );
    }

    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
         Cache-Control: no-cache\r\nrequest-id: req_mock_{n:06}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut events: Vec<(&str, Value)> = vec![(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage_json(input_tokens, 1),
            },
        }),
    )];
    let stop = match &reply {
        Reply::Text(text) => {
            events.push((
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0,
                        "content_block": { "type": "text", "text": "" } }),
            ));
            events.push(("ping", json!({ "type": "ping" })));
            // A few deltas, as the API streams words.
            let words: Vec<&str> = text.split_inclusive(' ').collect();
            for piece in words.chunks(3) {
                events.push((
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": 0,
                            "delta": { "type": "text_delta", "text": piece.concat() } }),
                ));
            }
            "end_turn"
        }
        Reply::Tool { command } => {
            events.push((
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0,
                        "content_block": { "type": "tool_use", "id": tool_id, "name": "Bash",
                                           "input": {} } }),
            ));
            events.push(("ping", json!({ "type": "ping" })));
            events.push((
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0,
                        "delta": { "type": "input_json_delta",
                                   "partial_json": tool_input(command).to_string() } }),
            ));
            "tool_use"
        }
    };
    events.push((
        "content_block_stop",
        json!({ "type": "content_block_stop", "index": 0 }),
    ));
    events.push((
        "message_delta",
        json!({ "type": "message_delta",
                "delta": { "stop_reason": stop, "stop_sequence": null },
                "usage": { "output_tokens": 12 } }),
    ));
    events.push(("message_stop", json!({ "type": "message_stop" })));
    for (i, (name, data)) in events.iter().enumerate() {
        if i > 0 && !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let chunk = format!("event: {name}\ndata: {data}\n\n");
        write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
        out.flush()?;
    }
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

fn tool_input(command: &str) -> Value {
    json!({ "command": command, "description": "Run the command the test asked for" })
}

fn usage_json(input: usize, output: usize) -> Value {
    json!({
        "input_tokens": input,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

fn send_json(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nrequest-id: req_mock\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()
}

fn error(out: &mut TcpStream, status: u16, kind: &str, message: &str) -> std::io::Result<()> {
    send_json(
        out,
        status,
        &json!({ "type": "error", "error": { "type": kind, "message": message } }),
    )
}
