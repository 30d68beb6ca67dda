//! What the guest runs: its programs built statically, and the initramfs that carries them
//! (an uncompressed newc cpio written here: `/init`, `/bin/*`, `/dev/console`).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use super::systemd;
use crate::Ctx;
use crate::cmd::{describe, output, status};

/// The programs the guest needs; the first is `/init`.
const PROGRAMS: [&str; 4] = ["vm-runner", "lifecycle-helper", "claude", "fake-agent"];
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Where [`build_static`] leaves its programs.
pub(crate) fn static_dir(ctx: &Ctx) -> PathBuf {
    ctx.target_dir
        .join("vm-build")
        .join(HOST_TRIPLE)
        .join("release")
}

/// Builds the guest's programs statically; returns their paths in [`PROGRAMS`]' order.
/// `cargo xtask dist` packages the daemon built here: one build (same packages, same flags,
/// so cargo's feature resolution is the same too) serves both.
pub(crate) fn build_static(ctx: &Ctx) -> anyhow::Result<Vec<PathBuf>> {
    let target_dir = ctx.target_dir.join("vm-build");
    let mut cmd = ctx.cargo();
    // `--target` makes the flags below apply to the target artifacts only: build scripts and
    // proc macros stay dynamic, and aya-build's nested eBPF build sets its own flags.
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args([
            "build",
            "--release",
            "--target",
            HOST_TRIPLE,
            "--package",
            "reaper-tests",
            // The daemon too, for the systemd machine: static, so the guest's libc never matters.
            "--package",
            "reaper-user",
            "--bin",
            "reaper",
        ]);
    for program in PROGRAMS.iter().chain(&[systemd::CHECKER]) {
        cmd.args(["--bin", program]);
    }
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    let dir = static_dir(ctx);
    let mut bins = Vec::new();
    for program in PROGRAMS {
        let path = dir.join(program);
        let what = output(Command::new("file").arg("-b").arg(&path))?;
        if !(what.contains("statically linked") || what.contains("static-pie linked")) {
            bail!(
                "{} is not statically linked: {}",
                path.display(),
                what.trim()
            );
        }
        bins.push(path);
    }
    Ok(bins)
}

/// One newc cpio entry.
pub(super) fn cpio_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("a file under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).expect("a short name"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// `/init` = vm-runner, `/bin/<program>`, the mount points and `/dev/console` (the kernel opens
/// it as init's stdio before devtmpfs exists). Uncompressed: under emulation, decompressing
/// costs more than copying.
pub(super) fn write(path: &Path, bins: &[PathBuf]) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let mut ino = 1;
    let mut next = || {
        ino += 1;
        ino
    };
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio_entry(&mut out, next(), dir, 0o040755, (0, 0), &[]);
    }
    cpio_entry(&mut out, next(), "dev/console", 0o020600, (5, 1), &[]);
    for (i, bin) in bins.iter().enumerate() {
        let data = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
        let name = if i == 0 {
            "init".to_owned()
        } else {
            format!("bin/{}", PROGRAMS[i])
        };
        cpio_entry(&mut out, next(), &name, 0o100755, (0, 0), &data);
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_cpio() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 2, "init", 0o100755, (0, 0), b"abc");
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // 110-byte header, "init\0" padded to 116, 3 data bytes padded to 120.
        assert_eq!(out.len(), 120);
        assert_eq!(&out[110..114], b"init");
        assert_eq!(&out[116..119], b"abc");
    }
}
