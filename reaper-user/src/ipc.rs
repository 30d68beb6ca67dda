//! The daemon's local interface: a Unix socket, readable by root only, that answers one
//! request per connection with one JSON document. Read-only: nothing on it changes what the
//! daemon does.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
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

impl Request {
    fn line(self) -> String {
        match self {
            Self::Tree => "tree".into(),
            Self::Stats => "stats".into(),
            Self::Targets => "targets".into(),
            Self::Sessions => "sessions".into(),
            Self::Explain(pid) => format!("explain {pid}"),
        }
    }
}

/// Listens on `path` until the task is dropped. The socket is created mode 0600 in a
/// directory of mode 0700, and peers other than root are refused.
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
}

impl Server {
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket left by a daemon that died: if nobody answers on it, it is ours to replace.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another reaper is already listening on {}", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    pub async fn serve(self, pipeline: PipelineHandle) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else { continue };
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(mut stream: UnixStream, pipeline: &PipelineHandle) -> anyhow::Result<()> {
    let peer = stream.peer_cred()?;
    if peer.uid() != 0 && peer.uid() != nix::unistd::geteuid().as_raw() {
        anyhow::bail!("refused a client with uid {}", peer.uid());
    }
    let mut line = String::new();
    BufReader::new(&mut stream).take(64).read_line(&mut line).await?;
    let mut words = line.split_whitespace();
    let body = match (words.next(), words.next().map(str::parse::<u32>)) {
        (Some("tree"), None) => serde_json::to_vec(&pipeline.snapshot().await)?,
        (Some("stats"), None) => serde_json::to_vec(&pipeline.stats().await)?,
        (Some("targets"), None) => serde_json::to_vec(&pipeline.targets().await)?,
        (Some("sessions"), None) => serde_json::to_vec(&pipeline.sessions().await)?,
        (Some("explain"), Some(Ok(pid))) => serde_json::to_vec(&pipeline.explain(pid).await)?,
        _ => serde_json::to_vec(&serde_json::json!({ "error": format!("unknown request {:?}", line.trim()) }))?,
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
    stream.write_all(format!("{}\n", request.line()).as_bytes()).await?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    serde_json::from_slice(&body).context("the daemon's answer is not JSON")
}
