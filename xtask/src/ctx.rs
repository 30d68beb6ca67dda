//! What every verb needs: the workspace, the tools directory, `PATH` and cargo's target
//! directory, and the cargo commands run with them.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::cmd::{describe, status};
use crate::setup;

/// Paths shared by the verbs.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// Workspace root (the directory holding the root Cargo.toml).
    pub(crate) workspace: PathBuf,
    /// Where bpf-linker is installed (`<tools>/bin`) and its LLVM symlinks live (`<tools>/llvm/lib`).
    pub(crate) tools: PathBuf,
    /// `PATH` for child processes: `<tools>/bin` first.
    pub(crate) path: OsString,
    /// Cargo's target directory, as children will see it.
    pub(crate) target_dir: PathBuf,
}

impl Ctx {
    pub(crate) fn new(tools_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let tools = match tools_dir {
            Some(dir) => std::path::absolute(&dir)
                .with_context(|| format!("cannot make {} absolute", dir.display()))?,
            None => workspace.join(".tools"),
        };
        let mut dirs = vec![tools.join("bin")];
        if let Some(old) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&old));
        }
        let path = std::env::join_paths(dirs).context("cannot build PATH for child processes")?;
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => std::path::absolute(PathBuf::from(dir))
                .context("cannot make CARGO_TARGET_DIR absolute")?,
            None => workspace.join("target"),
        };
        Ok(Self {
            workspace,
            tools,
            path,
            target_dir,
        })
    }

    /// A `cargo` command run from the workspace root with `<tools>/bin` on `PATH`.
    pub(crate) fn cargo(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("cargo");
        cmd.current_dir(&self.workspace)
            .env("PATH", &self.path)
            .env("CARGO_TARGET_DIR", &self.target_dir);
        cmd
    }

    /// `rustup run nightly cargo`, same directory and `PATH`; the outer cargo's compiler
    /// settings are dropped so nightly's own rustc is used.
    pub(crate) fn nightly_cargo(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("rustup");
        cmd.args(["run", setup::NIGHTLY, "cargo"])
            .current_dir(&self.workspace)
            .env("PATH", &self.path)
            .env("RUSTUP_AUTO_INSTALL", "0");
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTUP_TOOLCHAIN",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    pub(crate) fn daemon_path(&self, debug: bool) -> PathBuf {
        self.target_dir
            .join(if debug { "debug" } else { "release" })
            .join("reaper")
    }

    /// `cargo build [--release] -p reaper-user`; returns the path of the daemon binary.
    pub(crate) fn build_daemon(&self, debug: bool) -> anyhow::Result<PathBuf> {
        let mut cmd = self.cargo();
        cmd.args(["build", "--package", "reaper-user"]);
        if !debug {
            cmd.arg("--release");
        }
        println!("xtask: {}", describe(&cmd));
        let st = status(&mut cmd)?;
        if !st.success() {
            bail!("`{}` failed ({st})", describe(&cmd));
        }
        let bin = self.daemon_path(debug);
        if !bin.is_file() {
            bail!("cargo build succeeded but {} does not exist", bin.display());
        }
        Ok(bin)
    }
}
