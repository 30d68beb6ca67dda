//! The systemd machine of `cargo xtask vm-test`: the .deb of `cargo xtask dist` installed with
//! `dpkg -i` under a real systemd, and `deploy/reaper.service` run by it, sandbox and all, which
//! the host (no systemd as PID 1) cannot do.
//!
//! 1. Root file system: `debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm`
//!    into `target/vm/systemd/root` (once; ~30 s, ~240 MB), packed by `cpio` into
//!    `target/vm/systemd/base.cpio` (once).
//! 2. Overlay, written here: the package at `/root/reaper.deb`, and `reaper-vm-check.service`:
//!    runs `service-check` (tests/src/bin/service_check.rs), which installs the package (its
//!    postinst enables and starts reaper.service), checks the running service, removes and purges
//!    the package, prints its `vm-check` lines on the console and powers off.
//! 3. QEMU boots the newest kernel of the matrix with both archives concatenated as the
//!    initramfs (the kernel unpacks one after the other) and `rdinit=/lib/systemd/systemd`.
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use super::initramfs::cpio_entry;
use super::qemu::{Machine, boot};
use super::{Kernel, Opts, Run, ensure_tool};
use crate::cmd::{describe, status};

/// The checker, built statically with the matrix's programs.
pub(super) const CHECKER: &str = "service-check";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Written last into the root: its presence means debootstrap finished.
const STAMP: &str = ".reaper-vm-root";

/// The unit that runs the checks and ends the machine, whatever they find.
const CHECK_UNIT: &str = "\
[Unit]
Description=vm-test: install reaper's .deb, check reaper.service under systemd, then power off
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/local/bin/service-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
# A hung check still ends the machine (FailureAction).
TimeoutStartSec=420
";

pub(super) fn run(
    vm_dir: &Path,
    kernel: &Kernel,
    opts: &Opts,
    static_dir: &Path,
    deb: &Path,
) -> anyhow::Result<Run> {
    let dir = vm_dir.join("systemd");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = base_archive(&dir)?;
    // Built statically with the matrix's programs (`build_static`).
    let checker = static_dir.join(CHECKER);

    let mut overlay = Vec::new();
    let mut ino = 1_000_000;
    let mut next = || {
        ino += 1;
        ino
    };
    for d in [
        "etc",
        "etc/systemd",
        "etc/systemd/system",
        "etc/systemd/system/multi-user.target.wants",
        "root",
        "usr",
        "usr/local",
        "usr/local/bin",
    ] {
        cpio_entry(&mut overlay, next(), d, 0o040755, (0, 0), &[]);
    }
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    for (name, mode, data) in [
        ("root/reaper.deb", 0o100644, read(deb)?),
        ("usr/local/bin/service-check", 0o100755, read(&checker)?),
        (
            "etc/systemd/system/reaper-vm-check.service",
            0o100644,
            CHECK_UNIT.as_bytes().to_vec(),
        ),
    ] {
        cpio_entry(&mut overlay, next(), name, mode, (0, 0), &data);
    }
    // `systemctl enable`: a symlink in the target's .wants directory.
    cpio_entry(
        &mut overlay,
        next(),
        "etc/systemd/system/multi-user.target.wants/reaper-vm-check.service",
        0o120777,
        (0, 0),
        b"/etc/systemd/system/reaper-vm-check.service",
    );
    cpio_entry(&mut overlay, 0, "TRAILER!!!", 0, (0, 0), &[]);

    let initramfs = dir.join("initramfs.cpio");
    let mut all = read(&base)?;
    all.extend_from_slice(&overlay);
    fs::write(&initramfs, &all).with_context(|| format!("writing {}", initramfs.display()))?;
    println!(
        "xtask: systemd machine: initramfs {} ({:.0} MB), booting {} in QEMU (limit {}s)",
        initramfs.display(),
        all.len() as f64 / 1e6,
        kernel.release,
        opts.timeout
    );
    let machine = Machine {
        label: format!("{}-systemd", kernel.release),
        memory_mb: 2048,
        append: "rdinit=/lib/systemd/systemd systemd.unit=multi-user.target \
                 systemd.show_status=false"
            .to_owned(),
        ready_marker: "vm-check deb_installs_and_enables",
    };
    boot(vm_dir, kernel, &initramfs, opts, &machine)
}

/// Deleting a tree follows into what is mounted under it: a debootstrap killed half-way can
/// leave its /proc or /sys mounted in the root. Refuses (naming the mounts) rather than delete.
fn refuse_mounts_under(dir: &Path) -> anyhow::Result<()> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(());
    };
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let inside: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| Path::new(m).starts_with(&dir))
        .collect();
    if !inside.is_empty() {
        bail!(
            "{} has file systems mounted inside ({}): unmount them (umount -R) and run again",
            dir.display(),
            inside.join(", ")
        );
    }
    Ok(())
}

/// `base.cpio`: the debootstrapped root, packed once.
fn base_archive(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let root = dir.join("root");
    let archive = dir.join("base.cpio");
    // The stamp holds what the root was made from: a change here makes a new one.
    let recipe = format!("{SUITE} {MIRROR} minbase systemd,systemd-sysv");
    if fs::read_to_string(root.join(STAMP)).ok().as_deref() != Some(recipe.as_str()) {
        ensure_tool("debootstrap", "debootstrap")?;
        let partial = dir.join("root.partial");
        refuse_mounts_under(&partial)?;
        let _ = fs::remove_dir_all(&partial);
        let mut cmd = Command::new("debootstrap");
        cmd.args(["--variant=minbase", "--include=systemd,systemd-sysv", SUITE])
            .arg(&partial)
            .arg(MIRROR);
        println!("xtask: {} (once, about 30 s)", describe(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("running {}", describe(&cmd)))?;
        if !out.status.success() {
            let tail = |bytes: &[u8]| {
                let text = String::from_utf8_lossy(bytes);
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
            };
            bail!(
                "`{}` failed ({}): {} {} (more in {}/debootstrap/debootstrap.log)",
                describe(&cmd),
                out.status,
                tail(&out.stdout),
                tail(&out.stderr),
                partial.display()
            );
        }
        // Documentation and the package cache only make the archive bigger.
        for sub in [
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
            "var/cache/apt",
            "var/lib/apt/lists",
        ] {
            let _ = fs::remove_dir_all(partial.join(sub));
        }
        fs::write(partial.join(STAMP), &recipe)?;
        refuse_mounts_under(&root)?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&partial, &root)?;
        let _ = fs::remove_file(&archive);
    }
    if !archive.exists() {
        ensure_tool("cpio", "cpio")?;
        let partial = dir.join("base.cpio.partial");
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg("set -o pipefail; find . -print0 | cpio --null --create --format=newc --quiet > \"$1\"")
            .arg("bash")
            .arg(&partial)
            .current_dir(&root);
        let st = status(&mut cmd)?;
        if !st.success() {
            bail!("packing {} with cpio failed ({st})", root.display());
        }
        fs::rename(&partial, &archive)?;
    }
    Ok(archive)
}
