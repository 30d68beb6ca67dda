//! The bench's environment: tools it installs, the build, the scratch copies of what it runs.
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, output, status};

/// The Debian packages of the tools the bench compares reaper with, and a program each
/// installs (a package is installed, once, when its program is missing).
pub(super) const PEER_PACKAGES: [(&str, &str); 4] = [
    ("bpftrace", "bpftrace"),
    ("bpfcc-tools", "execsnoop-bpfcc"),
    ("auditd", "auditd"),
    ("prometheus-process-exporter", "prometheus-process-exporter"),
];

/// Installs the peers' packages that are missing, with one `apt-get install` (and an
/// `apt-get update` if that fails). Packages' services are not started by the install on this
/// machine (no systemd; a `policy-rc.d` denies it); the bench starts and stops each tool itself.
pub(super) fn ensure_peers() -> anyhow::Result<()> {
    let missing: Vec<&str> = PEER_PACKAGES
        .iter()
        .filter(|(_, program)| which(program).is_none())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {} with apt-get", missing.join(", "));
    if which("apt-get").is_none() {
        bail!(
            "{} not installed and there is no apt-get: install them and run again",
            missing.join(", ")
        );
    }
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(&mut cmd).map(|st| st.success())
    };
    if !install()? {
        println!("xtask: apt-get install failed; running apt-get update and trying again");
        let mut update = Command::new("apt-get");
        update.arg("update");
        let st = status(&mut update)?;
        if !st.success() {
            bail!(
                "`apt-get update` failed ({st}); install {} by hand and run again",
                missing.join(", ")
            );
        }
        if !install()? {
            bail!(
                "`apt-get install {}` failed; install them by hand and run again",
                missing.join(" ")
            );
        }
    }
    for (package, program) in PEER_PACKAGES {
        if which(program).is_none() {
            bail!("apt-get installed {package} but {program} is not on PATH");
        }
    }
    Ok(())
}

/// bpftrace attaches classic tracepoints through tracefs; mounts it if it is missing.
pub(super) fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    println!(
        "xtask: tracefs is not mounted; mounting it on /sys/kernel/tracing (bpftrace needs it)"
    );
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]);
    output(&mut cmd)?;
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        bail!("mounted tracefs on /sys/kernel/tracing but it has no events/ directory");
    }
    Ok(())
}

pub(super) fn which(program: &str) -> Option<PathBuf> {
    // sbin directories too: auditd and bcc's tools live there.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.map(|dir| dir.join(program)).find(|p| p.is_file())
}

pub(super) fn build(ctx: &Ctx) -> anyhow::Result<()> {
    let mut cmd = ctx.cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "reaper-user",
        "-p",
        "reaper-tests",
        "--bins",
    ]);
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    Ok(())
}

/// The release binaries the benchmarks run.
pub(super) struct Bins {
    pub(super) reaper: PathBuf,
    pub(super) helper: PathBuf,
    pub(super) load: PathBuf,
    pub(super) agent: PathBuf,
    pub(super) script: PathBuf,
}

impl Bins {
    /// Copies the release binaries (and the bpftrace script) into the scratch directory, so the
    /// whole run uses this build even if the shared target directory is rebuilt meanwhile.
    pub(super) fn new(ctx: &Ctx, scratch: &Scratch) -> anyhow::Result<Self> {
        let from = ctx.target_dir.join("release");
        let to = scratch.path("bin");
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        let copy = |name: &str, src: &Path| -> anyhow::Result<PathBuf> {
            if !src.is_file() {
                bail!("{} is missing after the build", src.display());
            }
            let dst = to.join(name);
            std::fs::copy(src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            Ok(dst)
        };
        // fake-agent runs the `claude` double from its own directory.
        copy("claude", &from.join("claude"))?;
        Ok(Self {
            reaper: copy("reaper", &from.join("reaper"))?,
            helper: copy("lifecycle-helper", &from.join("lifecycle-helper"))?,
            load: copy("bench-load", &from.join("bench-load"))?,
            agent: copy("fake-agent", &from.join("fake-agent"))?,
            script: copy("execsnoop.bt", &ctx.workspace.join("bench/execsnoop.bt"))?,
        })
    }

    /// The process storm as arguments for `bench-load rusage` ([`super::procs::measure`]):
    /// `lifecycle-helper storm N 1`, N processes forked, exec'd and waited for one at a time.
    pub(super) fn process_storm(&self, n: usize) -> Vec<OsString> {
        let helper = self.helper.clone().into_os_string();
        vec![helper, "storm".into(), n.to_string().into(), "1".into()]
    }

    /// The thread storm as arguments for `bench-load rusage`: `bench-load threads N`, N threads
    /// created and joined.
    pub(super) fn thread_storm(&self, n: usize) -> Vec<OsString> {
        let load = self.load.clone().into_os_string();
        vec![load, "threads".into(), n.to_string().into()]
    }
}

/// A private directory for sockets, logs, configs and symlinks; removed at the end.
pub(super) struct Scratch {
    pub(super) dir: PathBuf,
    pub(super) tag: String,
}

impl Scratch {
    pub(super) fn new() -> anyhow::Result<Self> {
        let tag = std::process::id().to_string();
        let dir = std::env::temp_dir().join(format!("reaper-bench-{tag}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("runtime"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir, tag })
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A root-owned (we are root) mode-0600 file.
    pub(super) fn write_private(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// `name` → `target`, so a program exec'd through it gets `name` as its comm.
    pub(super) fn symlink(&self, name: &str, target: &Path) -> anyhow::Result<PathBuf> {
        let link = self.path(name);
        if !link.exists() {
            std::os::unix::fs::symlink(target, &link)
                .with_context(|| format!("linking {} → {}", link.display(), target.display()))?;
        }
        Ok(link)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
