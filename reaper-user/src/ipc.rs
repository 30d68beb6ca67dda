//! The daemon's local interface: a Unix socket, readable by root only, that answers one
//! request per connection with one JSON document. Read-only: nothing on it changes what the
//! daemon does.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::app::PipelineHandle;

/// Where `reaper run` listens and `reaper tree` connects by default.
pub const DEFAULT_SOCKET: &str = "/run/reaper/reaper.sock";

/// Requests are single words: the name of what to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Tree,
    Stats,
    Targets,
    Sessions,
    Explain(u32),
}

/// Why a request line was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown request {0:?}")]
pub struct UnknownRequest(pub String);

impl Request {
    /// Parses one request line (the peer's bytes: anything at all). Whitespace around and
    /// between the words is ignored; the answer to `line()` parses back to the same request.
    pub fn parse(line: &str) -> Result<Self, UnknownRequest> {
        let mut words = line.split_whitespace();
        let request = match (words.next(), words.next(), words.next()) {
            (Some("tree"), None, None) => Self::Tree,
            (Some("stats"), None, None) => Self::Stats,
            (Some("targets"), None, None) => Self::Targets,
            (Some("sessions"), None, None) => Self::Sessions,
            (Some("explain"), Some(pid), None) => match pid.parse() {
                Ok(pid) => Self::Explain(pid),
                Err(_) => return Err(UnknownRequest(line.trim().to_owned())),
            },
            _ => return Err(UnknownRequest(line.trim().to_owned())),
        };
        Ok(request)
    }

    /// The request as sent on the wire (without the newline).
    pub fn line(self) -> String {
        match self {
            Self::Tree => "tree".into(),
            Self::Stats => "stats".into(),
            Self::Targets => "targets".into(),
            Self::Sessions => "sessions".into(),
            Self::Explain(pid) => format!("explain {pid}"),
        }
    }
}

/// Longest a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read (`explain 4294967295` is 18 bytes).
const MAX_REQUEST: u64 = 64;

/// Listens on `path` until the task is dropped. The socket is created mode 0600 in a
/// directory of mode 0700, and peers other than root are refused.
pub struct Server {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl Server {
    /// Binds now (no runtime needed: start-up binds before it drops its privileges and starts
    /// any thread); [`Server::serve`] runs on a tokio runtime.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket left by a daemon that died: if nobody answers on it, it is ours to replace.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another reaper is already listening on {}", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        listener.set_nonblocking(true)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    pub async fn serve(self, pipeline: PipelineHandle) {
        let listener = match self.listener.try_clone().and_then(UnixListener::from_std) {
            Ok(listener) => listener,
            Err(err) => return tracing::error!(%err, "cannot serve the local interface"),
        };
        let mut errors = AcceptErrors::new("the local interface");
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    errors.failed(&err).await;
                    continue;
                }
            };
            errors.accepted();
            let pipeline = pipeline.clone();
            tokio::spawn(async move {
                if let Err(err) = answer(stream, &pipeline).await {
                    tracing::debug!(%err, "local client request failed");
                }
            });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What an accept loop does when `accept` fails. Out of file descriptors (`EMFILE`, `ENFILE`)
/// or memory, the pending connection stays queued and the next `accept` fails at once: retrying
/// straight away spins a core. So those back off, 10 ms doubling to 1 s, with one warning per
/// run of failures; anything else (a peer that reset before it was accepted) is retried at once.
pub(crate) struct AcceptErrors {
    what: &'static str,
    delay: Option<Duration>,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        Self { what, delay: None }
    }

    /// The delay before the next `accept` after `err`, if any.
    fn next_delay(&mut self, err: &std::io::Error) -> Option<Duration> {
        let scarce = matches!(
            err.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !scarce {
            return None;
        }
        let delay = self.delay.map_or(Duration::from_millis(10), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        self.delay = Some(delay);
        Some(delay)
    }

    pub(crate) async fn failed(&mut self, err: &std::io::Error) {
        let first = self.delay.is_none();
        if let Some(delay) = self.next_delay(err) {
            if first {
                tracing::warn!(%err, "{}: cannot accept connections; backing off", self.what);
            }
            tokio::time::sleep(delay).await;
        }
    }

    pub(crate) fn accepted(&mut self) {
        if self.delay.take().is_some() {
            tracing::info!("{}: accepting connections again", self.what);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(mut stream: UnixStream, pipeline: &PipelineHandle) -> anyhow::Result<()> {
    let peer = stream.peer_cred()?;
    if peer.uid() != 0 && peer.uid() != rustix::process::geteuid().as_raw() {
        anyhow::bail!("refused a client with uid {}", peer.uid());
    }
    let mut line = String::new();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(&mut stream)
            .take(MAX_REQUEST)
            .read_line(&mut line),
    )
    .await
    .context("no request line in time")??;
    let body = match Request::parse(&line) {
        Ok(Request::Tree) => serde_json::to_vec(&pipeline.snapshot().await)?,
        Ok(Request::Stats) => serde_json::to_vec(&pipeline.stats().await)?,
        Ok(Request::Targets) => serde_json::to_vec(&pipeline.targets().await)?,
        Ok(Request::Sessions) => serde_json::to_vec(&pipeline.sessions().await)?,
        Ok(Request::Explain(pid)) => serde_json::to_vec(&pipeline.explain(pid).await)?,
        Err(unknown) => serde_json::to_vec(&serde_json::json!({ "error": unknown.to_string() }))?,
    };
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Sends one request to the daemon at `path` and returns its JSON answer.
pub async fn request(path: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the reaper daemon at {} (is `reaper run` running, and are you root?)",
            path.display()
        )
    })?;
    stream
        .write_all(format!("{}\n", request.line()).as_bytes())
        .await?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    serde_json::from_slice(&body).context("the daemon's answer is not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_round_trip() {
        for request in [
            Request::Tree,
            Request::Stats,
            Request::Targets,
            Request::Explain(0),
            Request::Explain(u32::MAX),
        ] {
            assert_eq!(
                Request::parse(&format!("{}\n", request.line())),
                Ok(request)
            );
        }
        assert_eq!(Request::parse("  explain\t42 \n"), Ok(Request::Explain(42)));
        for bad in [
            "",
            "\n",
            "tree x",
            "explain",
            "explain -1",
            "explain 4294967296",
            "explain 1 2",
            "TREE",
            "kill 1",
        ] {
            let err = Request::parse(bad).unwrap_err();
            assert_eq!(err.0, bad.trim());
        }
    }

    #[test]
    fn only_scarce_resources_back_off_and_the_delay_is_bounded() {
        let mut errors = AcceptErrors::new("test");
        let reset = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(
            errors.next_delay(&reset),
            None,
            "a peer that went away: retry at once"
        );
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<_> = (0..10)
            .map(|_| errors.next_delay(&emfile).unwrap())
            .collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert_eq!(delays[1], Duration::from_millis(20));
        assert_eq!(
            *delays.last().unwrap(),
            Duration::from_secs(1),
            "{delays:?}"
        );
        errors.accepted();
        assert_eq!(
            errors.next_delay(&std::io::Error::from_raw_os_error(libc::ENFILE)),
            Some(Duration::from_millis(10))
        );
    }
}
