//! Debian tools the kernel matrix needs (QEMU, `file`, debootstrap), installed with apt when
//! missing.
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::bail;

use crate::cmd::{describe, status};

pub(super) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

pub(super) fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    Ok(())
}

/// Installs Debian `package` when `tool` is not on PATH (apt-get update first if needed).
pub(crate) fn ensure_tool(tool: &str, package: &str) -> anyhow::Result<()> {
    if which(tool).is_some() {
        return Ok(());
    }
    println!("xtask: {tool} not found; installing the Debian package {package}");
    if which("apt-get").is_none() {
        bail!("{tool} is missing and there is no apt-get: install {package} and run again");
    }
    let install = ["install", "-y", "--no-install-recommends", package];
    if apt_get(&install).is_err() {
        apt_get(&["update"])?;
        apt_get(&install)?;
    }
    if which(tool).is_none() {
        bail!("{package} is installed but {tool} is not on PATH");
    }
    Ok(())
}
