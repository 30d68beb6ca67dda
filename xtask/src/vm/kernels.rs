//! Which Debian kernels the matrix boots, and downloading them: `apt-cache search` for
//! `linux-image-*-cloud-amd64-unsigned`, the newest of each series the configured archive has,
//! plus Debian 11's 5.x through a private apt state; `apt-get download` + `dpkg-deb -x` into
//! `target/vm/kernels/<package>/`, once.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::apt::{apt_get, which};
use crate::cmd::{describe, output, status};

const PACKAGE_SUFFIX: &str = "-cloud-amd64-unsigned";

/// A Debian kernel package of the archive.
#[derive(Clone, Debug)]
pub(super) struct KernelPackage {
    name: String,
    /// The numbers in its name: 6.1.0-56 → [6, 1, 0, 56]; 6.12.117+deb12 → [6, 12, 117, 12].
    numbers: Vec<u32>,
    /// `-o` options for apt-get to reach the archive that has it (none: the host's).
    apt_options: Vec<String>,
}

/// Debian 11's archive, for a 5.x kernel (5.10): BTF, ring buffers and BTF tracepoints, but
/// older layouts and verifier than anything bookworm packages.
const OLDER_ARCHIVE: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";
/// Only these series are taken from [`OLDER_ARCHIVE`] (its 6.1 backports duplicate bookworm's).
const OLDER_SERIES_MAJOR: u32 = 5;

impl KernelPackage {
    fn from_name(name: &str) -> Option<Self> {
        let middle = name
            .strip_prefix("linux-image-")?
            .strip_suffix(PACKAGE_SUFFIX)?;
        let numbers: Vec<u32> = middle
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (numbers.len() >= 2).then(|| Self {
            name: name.to_owned(),
            numbers,
            apt_options: Vec::new(),
        })
    }

    fn series(&self) -> String {
        format!("{}.{}", self.numbers[0], self.numbers[1])
    }
}

/// A kernel ready to boot.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(super) package: String,
    pub(super) version: String,
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
}

/// The series a full matrix boots: Debian 11's 5.10, bookworm's 6.1 and 6.12.
const EXPECTED_SERIES: [&str; 3] = ["5.10", "6.1", "6.12"];

/// How old the host's newest apt list is (None: no lists).
fn apt_lists_age() -> Option<Duration> {
    fs::read_dir("/var/lib/apt/lists")
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("InRelease"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .and_then(|newest| newest.elapsed().ok())
}

/// The packages of each series (or of the series asked for), newest first: the host archive's,
/// and Debian 11's 5.x. Without apt's lists it runs `apt-get update` once; with no archive at
/// all it uses the kernels already downloaded.
pub(super) fn choose(vm_dir: &Path, wanted: &[String]) -> anyhow::Result<Vec<Vec<KernelPackage>>> {
    let search = |apt_options: &[String]| -> anyhow::Result<Vec<KernelPackage>> {
        let mut cmd = Command::new("apt-cache");
        cmd.args(apt_options).args([
            "search",
            "--names-only",
            &format!("^linux-image-.*{PACKAGE_SUFFIX}$"),
        ]);
        let text = output(&mut cmd)?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(KernelPackage::from_name)
            .map(|p| KernelPackage {
                apt_options: apt_options.to_vec(),
                ..p
            })
            .collect())
    };
    // A machine image's apt lists can be months old and miss a whole series (bookworm's
    // 6.12 cloud kernels came with a point release): refresh them once a day.
    if which("apt-get").is_some()
        && apt_lists_age().is_none_or(|age| age > Duration::from_secs(24 * 3600))
    {
        println!(
            "xtask: apt's package lists are missing or older than a day; running apt-get update"
        );
        apt_get(&["update"])?;
    }
    let mut found = if which("apt-cache").is_some() {
        search(&[])?
    } else {
        Vec::new()
    };
    if found.is_empty() && which("apt-get").is_some() {
        println!("xtask: apt knows no cloud kernel package; running apt-get update");
        apt_get(&["update"])?;
        found = search(&[])?;
    }
    // Debian 11's archive only when a 5.x series may be wanted.
    if wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w.starts_with(&format!("{OLDER_SERIES_MAJOR}.")))
    {
        found.extend(older_kernels(vm_dir, &search));
    }
    // Whatever was downloaded before stands in for what the archives no longer list.
    if let Ok(entries) = fs::read_dir(vm_dir.join("kernels")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().join("version").is_file()
                && !found.iter().any(|p| p.name == name)
                && let Some(p) = KernelPackage::from_name(&name)
            {
                found.push(p);
            }
        }
    }
    let mut by_series: BTreeMap<(u32, u32), Vec<KernelPackage>> = BTreeMap::new();
    for p in found {
        by_series
            .entry((p.numbers[0], p.numbers[1]))
            .or_default()
            .push(p);
    }
    let chosen: Vec<Vec<KernelPackage>> = by_series
        .into_values()
        .map(|mut candidates| {
            candidates.sort_by(|a, b| b.numbers.cmp(&a.numbers));
            candidates
        })
        .filter(|c| wanted.is_empty() || wanted.contains(&c[0].series()))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no linux-image-*{PACKAGE_SUFFIX} package{} in the configured Debian archive",
            if wanted.is_empty() {
                String::new()
            } else {
                format!(" of series {}", wanted.join(", "))
            }
        );
    }
    // The matrix is these three series: one missing would make a green run claim more than it
    // checked.
    if wanted.is_empty() {
        let missing: Vec<&str> = EXPECTED_SERIES
            .iter()
            .copied()
            .filter(|want| !chosen.iter().any(|c| c[0].series() == *want))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the kernel matrix needs the {} series, which no reachable Debian archive offers \
                 (nor target/vm/kernels/): check apt's sources, or run `cargo xtask vm-test --kernel …` \
                 for the series at hand",
                missing.join(" and ")
            );
        }
    }
    println!(
        "xtask: kernel series: {}",
        chosen
            .iter()
            .map(|c| format!("{} (newest {})", c[0].series(), c[0].name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(chosen)
}

/// Debian 11's 5.x cloud kernels, through a private apt state (sources, lists and cache under
/// `target/vm/apt-debian11/`). An archive that cannot be reached is reported and skipped: the
/// kernels downloaded before still run.
fn older_kernels(
    vm_dir: &Path,
    search: &dyn Fn(&[String]) -> anyhow::Result<Vec<KernelPackage>>,
) -> Vec<KernelPackage> {
    let state = vm_dir.join("apt-debian11");
    let setup = || -> anyhow::Result<Vec<String>> {
        for dir in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(state.join(dir))?;
        }
        let sources = state.join("sources.list");
        fs::write(&sources, OLDER_ARCHIVE)?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let options = [
            format!("Dir::Etc::SourceList={}", path(&sources)),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", path(&state.join("lists"))),
            format!("Dir::Cache={}", path(&state.join("cache"))),
            "Dir::State::Status=/dev/null".to_owned(),
            // Its own lists: no lock on the host's apt is needed.
            "Debug::NoLocking=1".to_owned(),
        ];
        Ok(options
            .into_iter()
            .flat_map(|o| ["-o".to_owned(), o])
            .collect())
    };
    let found = setup().and_then(|options| {
        // Refreshed once a day at most.
        let fresh = fs::metadata(state.join("updated"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                t.elapsed()
                    .is_ok_and(|age| age < Duration::from_secs(86_400))
            });
        if !fresh {
            let mut cmd = Command::new("apt-get");
            cmd.args(&options)
                .args(["-q", "update"])
                .stdin(Stdio::null());
            output(&mut cmd)?;
            fs::write(state.join("updated"), "")?;
        }
        search(&options)
    });
    match found {
        Ok(packages) => packages
            .into_iter()
            .filter(|p| p.numbers[0] == OLDER_SERIES_MAJOR)
            .collect(),
        Err(err) => {
            println!(
                "xtask: Debian 11's archive is out of reach ({err:#}); no new 5.x kernel this run"
            );
            Vec::new()
        }
    }
}

/// The newest kernel of a series that is cached or can be downloaded (candidates come newest
/// first: a newer package than the cached one is fetched; an older cached one is the fallback
/// when the archive is out of reach).
pub(super) fn fetch_series(vm_dir: &Path, candidates: &[KernelPackage]) -> anyhow::Result<Kernel> {
    let mut errors = Vec::new();
    for package in candidates {
        match fetch_kernel(vm_dir, package) {
            Ok(kernel) => return Ok(kernel),
            Err(err) => {
                println!(
                    "xtask: {}: {err:#}; trying the next older package",
                    package.name
                );
                errors.push(format!("{}: {err:#}", package.name));
            }
        }
    }
    bail!(
        "no kernel of series {} could be downloaded:\n  {}",
        candidates[0].series(),
        errors.join("\n  ")
    )
}

/// `target/vm/kernels/<package>/` when it was unpacked before.
fn cached_kernel(vm_dir: &Path, package: &KernelPackage) -> Option<Kernel> {
    let dir = vm_dir.join("kernels").join(&package.name);
    let version = fs::read_to_string(dir.join("version")).ok()?;
    let vmlinuz = fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
    let release = vmlinuz
        .file_name()?
        .to_string_lossy()
        .strip_prefix("vmlinuz-")?
        .to_owned();
    Some(Kernel {
        package: package.name.clone(),
        version: version.trim().to_owned(),
        release,
        vmlinuz,
    })
}

/// `target/vm/kernels/<package>/`: `boot/` of the package and its version; downloaded once.
fn fetch_kernel(vm_dir: &Path, package: &KernelPackage) -> anyhow::Result<Kernel> {
    let dir = vm_dir.join("kernels").join(&package.name);
    if let Some(kernel) = cached_kernel(vm_dir, package) {
        return Ok(kernel);
    }
    let work = vm_dir
        .join("kernels")
        .join(format!("{}.download", package.name));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let started = Instant::now();
    let mut cmd = Command::new("apt-get");
    cmd.args(&package.apt_options)
        .args(["download", &package.name])
        .current_dir(&work)
        .stdin(Stdio::null());
    // The private archive's `-o` options are long; the line names the archive instead.
    let shown = format!(
        "apt-get download {}{}",
        package.name,
        if package.apt_options.is_empty() {
            ""
        } else {
            " (Debian 11 archive, apt state in target/vm/apt-debian11)"
        }
    );
    println!("xtask: {shown} (in {})", work.display());
    let st = status(&mut cmd)?;
    if !st.success() {
        let _ = fs::remove_dir_all(&work);
        bail!("`{shown}` failed ({st})");
    }
    let deb = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let version = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
    )?;
    let root = work.join("root");
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(&root);
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    fs::create_dir_all(&dir)?;
    // boot/ holds vmlinuz, config and System.map; the modules (lib/) are not needed.
    for entry in fs::read_dir(root.join("boot")).context("the package has no boot/")? {
        let entry = entry?;
        fs::rename(entry.path(), dir.join(entry.file_name()))?;
    }
    fs::write(dir.join("version"), version.trim())?;
    fs::remove_dir_all(&work)?;
    println!(
        "xtask: {} {} unpacked in {:.1}s",
        package.name,
        version.trim(),
        started.elapsed().as_secs_f64()
    );
    cached_kernel(vm_dir, package)
        .with_context(|| format!("no vmlinuz-* in {} after unpacking", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_package_names() {
        let old = KernelPackage::from_name("linux-image-6.1.0-56-cloud-amd64-unsigned").unwrap();
        assert_eq!(old.numbers, [6, 1, 0, 56]);
        assert_eq!(old.series(), "6.1");
        let new =
            KernelPackage::from_name("linux-image-6.12.117+deb12-cloud-amd64-unsigned").unwrap();
        assert_eq!(new.numbers, [6, 12, 117, 12]);
        assert_eq!(new.series(), "6.12");
        let five = KernelPackage::from_name("linux-image-5.10.0-32-cloud-amd64-unsigned").unwrap();
        assert_eq!(
            (five.numbers.as_slice(), five.series().as_str()),
            (&[5, 10, 0, 32][..], "5.10")
        );
        assert!(KernelPackage::from_name("linux-image-cloud-amd64-unsigned").is_none());
        assert!(KernelPackage::from_name("linux-image-6.1.0-56-cloud-amd64-dbg").is_none());
    }
}
