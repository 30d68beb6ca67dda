//! What `cargo xtask dist` built into `target/dist/`, checked the way an operator meets it: the
//! tarball's contents and checksums, the .deb through lintian and its own metadata, and the OCI
//! image loaded into podman and run with the DaemonSet's own settings, read from the manifest.
//! (The .deb is installed and removed for real by `cargo xtask vm-test`'s systemd machine: this
//! host has no systemd as PID 1.)
//!
//! `cargo xtask test` runs `cargo xtask dist` first and names the directory in
//! `REAPER_DIST_DIR`. Every check is also shown something broken that it must reject.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use reaper_tests::{DEADLINE, Helper, TempDir, alive, ensure_tool, yaml_documents};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// `target/dist/`, as `cargo xtask test` built it.
fn dist() -> PathBuf {
    if let Ok(err) = std::env::var("REAPER_DIST_ERROR") {
        panic!("`cargo xtask dist` failed before the tests: {err}");
    }
    let dir = std::env::var_os("REAPER_DIST_DIR").map(PathBuf::from).unwrap_or_else(|| {
        panic!("REAPER_DIST_DIR is not set: run these tests through `cargo xtask test`, which runs `cargo xtask dist` first")
    });
    assert!(dir.is_dir(), "{} is missing", dir.display());
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs, requires success, returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> BTreeSet<String> {
    let out = ok(Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-printf", "%P\\n"]));
    out.lines().map(str::to_owned).collect()
}

fn git_revision() -> String {
    ok(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo()))
    .trim()
    .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The tarball.

#[test]
fn the_tarball_holds_the_static_binary_its_docs_and_their_checksums() {
    let dist = dist();
    // target/dist/SHA256SUMS covers the three artifacts.
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).expect("target/dist/SHA256SUMS");
    let named: BTreeSet<&str> = sums
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let tar_name = format!("reaper-{VERSION}-x86_64-linux.tar.gz");
    let deb_name = format!("reaper_{VERSION}_amd64.deb");
    let oci_name = format!("reaper-{VERSION}.oci.tar");
    assert_eq!(
        named,
        BTreeSet::from([tar_name.as_str(), deb_name.as_str(), oci_name.as_str()]),
        "{sums}"
    );
    ok(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist));

    // Every entry owned by root, under one top directory.
    let listing = ok(Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(dist.join(&tar_name)));
    let top = format!("reaper-{VERSION}-x86_64-linux");
    for line in listing.lines() {
        let mut fields = line.split_whitespace();
        let owner = fields.nth(1).unwrap_or_default();
        let path = line.split_whitespace().last().unwrap_or_default();
        assert_eq!(owner, "0/0", "{line}");
        assert!(
            path.starts_with(&format!("{top}/")) || path == top,
            "{line}"
        );
    }

    let dir = TempDir::new("tarball");
    ok(Command::new("tar")
        .arg("-xzf")
        .arg(dist.join(&tar_name))
        .arg("-C")
        .arg(&dir.0));
    let root = dir.join(&top);
    let files = files_under(&root);
    for wanted in [
        "reaper",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "README.md",
        "SHA256SUMS",
        "man/reaper.1",
        "man/reaper-run.1",
        "man/reaper-stats.1",
        "completions/reaper",
        "completions/_reaper",
        "completions/reaper.fish",
    ] {
        assert!(
            files.contains(wanted),
            "{wanted} is not in the tarball: {files:?}"
        );
    }
    // The docs and deploy/ are the repository's, byte for byte.
    let deploy = files_under(&repo().join("deploy"));
    assert!(deploy.contains("reaper.service") && deploy.contains("kubernetes/daemonset.yaml"));
    for file in deploy
        .iter()
        .map(|f| format!("deploy/{f}"))
        .chain(["LICENSE-MIT", "LICENSE-APACHE", "README.md"].map(String::from))
    {
        assert_eq!(
            std::fs::read(root.join(&file))
                .unwrap_or_else(|e| panic!("{file} in the tarball: {e}")),
            std::fs::read(repo().join(&file)).unwrap(),
            "{file} differs from the repository's"
        );
    }

    // SHA256SUMS lists every other file, and verifies; a changed file fails it.
    let listed: BTreeSet<String> = std::fs::read_to_string(root.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, f)| f.to_owned()))
        .collect();
    let mut others = files.clone();
    others.remove("SHA256SUMS");
    assert_eq!(listed, others, "SHA256SUMS lists every file but itself");
    ok(Command::new("sha256sum")
        .args(["--check", "--strict", "--quiet", "SHA256SUMS"])
        .current_dir(&root));
    std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("README.md"))
        .and_then(|mut f| f.write_all(b"tampered\n"))
        .unwrap();
    let tampered = run(Command::new("sha256sum")
        .args(["--check", "--quiet", "SHA256SUMS"])
        .current_dir(&root));
    assert!(
        !tampered.status.success(),
        "a changed README still verified"
    );
    assert!(
        text(&tampered).contains("README.md: FAILED"),
        "{}",
        text(&tampered)
    );

    // The binary: static, stripped, executable, and saying what it is.
    let bin = root.join("reaper");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let what = ok(Command::new("file").arg("-b").arg(&bin));
    assert!(
        (what.contains("statically linked") || what.contains("static-pie linked"))
            && what.contains("stripped"),
        "{what}"
    );
    assert!(!what.contains("not stripped"), "{what}");
    let version = ok(Command::new(&bin).arg("--version"));
    let rustc = ok(Command::new("rustc").arg("--version"));
    let rustc = rustc.split_whitespace().nth(1).unwrap();
    assert_eq!(
        version.trim(),
        format!("reaper {VERSION} (git {}, rustc {rustc})", git_revision()),
        "reaper --version"
    );

    // Man pages and completions, generated from the parser: every subcommand is there.
    // roff escapes hyphens (`\-`).
    let page = std::fs::read_to_string(root.join("man/reaper.1"))
        .unwrap()
        .replace("\\-", "-");
    assert!(
        page.starts_with(".ie") || page.contains(".TH reaper 1"),
        "{page}"
    );
    for sub in [
        "run",
        "tree",
        "stats",
        "explain",
        "events",
        "check",
        "check-config",
    ] {
        assert!(page.contains(sub), "reaper.1 names {sub}");
        assert!(
            files.contains(&format!("man/reaper-{sub}.1")),
            "man/reaper-{sub}.1"
        );
    }
    assert!(
        !page.contains("generate"),
        "the packagers' subcommand stays hidden"
    );
    ensure_tool("man", "man-db");
    let out = run(Command::new("man")
        .args(["--warnings", "-l", "-Tutf8"])
        .arg(root.join("man/reaper-run.1"))
        .env("MANWIDTH", "100"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "groff: {}",
        text(&out)
    );
    // Without a terminal, man marks bold and underline by overstriking: `X\bX`.
    let mut rendered = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            rendered.pop();
        } else {
            rendered.push(c);
        }
    }
    assert!(
        rendered.contains("--config") && rendered.contains("--dry-run"),
        "{rendered}"
    );
    let bash = ok(Command::new("bash")
        .arg("-n")
        .arg(root.join("completions/reaper")));
    assert!(bash.is_empty());
    let completion = std::fs::read_to_string(root.join("completions/reaper")).unwrap();
    assert!(
        completion.contains("check-config") && completion.contains("--dry-run"),
        "{completion}"
    );
}

// ---------------------------------------------------------------------------------------------
// The .deb.

fn deb() -> PathBuf {
    dist().join(format!("reaper_{VERSION}_amd64.deb"))
}

/// `lintian` on a package: (passed, output). Errors fail it; warnings are shown.
fn lintian(deb: &Path) -> (bool, String) {
    ensure_tool("lintian", "lintian");
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb));
    (out.status.success(), text(&out))
}

#[test]
fn the_deb_is_lintian_clean_of_errors() {
    let (passed, report) = lintian(&deb());
    eprintln!("lintian:\n{report}");
    assert!(passed, "lintian found errors:\n{report}");
    assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");

    // A copy without its copyright file is refused: lintian is really looking.
    let dir = TempDir::new("deb-broken");
    let tree = dir.join("tree");
    ok(Command::new("dpkg-deb").arg("-R").arg(deb()).arg(&tree));
    std::fs::remove_file(tree.join("usr/share/doc/reaper/copyright")).unwrap();
    let broken = dir.join("broken.deb");
    ok(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&tree)
        .arg(&broken));
    let (passed, report) = lintian(&broken);
    assert!(!passed && report.contains("no-copyright-file"), "{report}");
}

#[test]
fn the_deb_installs_the_binary_the_unit_and_a_conffile_and_enables_the_service() {
    let deb = deb();
    let field = |name: &str| {
        ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "reaper");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");

    // Paths, modes and owners.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .to_owned()
    };
    for (path, mode) in [
        ("usr/bin/reaper", "-rwxr-xr-x"),
        ("lib/systemd/system/reaper.service", "-rw-r--r--"),
        ("etc/reaper/reaper.toml", "-rw-r--r--"),
        ("usr/share/man/man1/reaper.1.gz", "-rw-r--r--"),
        ("usr/share/man/man1/reaper-run.1.gz", "-rw-r--r--"),
        ("usr/share/bash-completion/completions/reaper", "-rw-r--r--"),
        ("usr/share/zsh/vendor-completions/_reaper", "-rw-r--r--"),
        (
            "usr/share/fish/vendor_completions.d/reaper.fish",
            "-rw-r--r--",
        ),
        ("usr/share/doc/reaper/copyright", "-rw-r--r--"),
        ("usr/share/doc/reaper/changelog.gz", "-rw-r--r--"),
    ] {
        let line = entry(path);
        assert!(
            line.starts_with(mode) && line.contains(" root/root "),
            "{line}"
        );
    }
    assert!(
        !listing.contains("./usr/local"),
        "nothing in /usr/local:\n{listing}"
    );

    // The control area: a conffile, and debhelper's systemd snippets.
    let dir = TempDir::new("deb");
    let control = dir.join("DEBIAN");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/reaper/reaper.toml\n"
    );
    let script = |name: &str| std::fs::read_to_string(control.join(name)).unwrap();
    for (name, needles) in [
        (
            "postinst",
            &[
                "deb-systemd-helper enable 'reaper.service'",
                "deb-systemd-invoke $_dh_action 'reaper.service'",
            ][..],
        ),
        ("prerm", &["deb-systemd-invoke stop 'reaper.service'"][..]),
        (
            "postrm",
            &["deb-systemd-helper purge 'reaper.service'", "daemon-reload"][..],
        ),
    ] {
        let body = script(name);
        for needle in needles {
            assert!(body.contains(needle), "{name} lacks {needle:?}:\n{body}");
        }
        ok(Command::new("sh").arg("-n").arg(control.join(name)));
        assert!(
            std::fs::metadata(control.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o111
                != 0
        );
    }

    // The unit is deploy/reaper.service with the binary at /usr/bin; the conffile is
    // deploy/reaper.toml.
    let files = dir.join("files");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&files));
    let unit = std::fs::read_to_string(files.join("lib/systemd/system/reaper.service")).unwrap();
    let ours = std::fs::read_to_string(repo().join("deploy/reaper.service")).unwrap();
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    };
    let expected: Vec<String> = settings(&ours)
        .into_iter()
        .map(|l| l.replace("/usr/local/bin/reaper", "/usr/bin/reaper"))
        .collect();
    assert_eq!(settings(&unit), expected);
    assert!(
        unit.contains("ExecStart=/usr/bin/reaper run --config /etc/reaper/reaper.toml"),
        "{unit}"
    );
    assert!(unit.contains("[Install]") && unit.contains("WantedBy=multi-user.target"));
    assert_eq!(
        std::fs::read(files.join("etc/reaper/reaper.toml")).unwrap(),
        std::fs::read(repo().join("deploy/reaper.toml")).unwrap()
    );
    let version = ok(Command::new(files.join("usr/bin/reaper")).arg("--version"));
    assert!(
        version.starts_with(&format!("reaper {VERSION} (git ")),
        "{version}"
    );
}

// ---------------------------------------------------------------------------------------------
// The OCI image, run as the DaemonSet runs it.

/// podman with a store of the test's own (vfs: no overlay mounts), Debian's runc (crun refuses
/// a hybrid cgroup layout) and no systemd.
struct Podman {
    store: TempDir,
    runtime: PathBuf,
}

impl Podman {
    fn new() -> Self {
        ensure_tool("podman", "podman");
        ensure_tool("runc", "runc");
        let runtime = ok(Command::new("sh").args(["-c", "command -v runc"]));
        Self {
            store: TempDir::new("podman"),
            runtime: PathBuf::from(runtime.trim()),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .arg("--runtime")
            .arg(&self.runtime);
        cmd
    }
}

/// A container this test started: removed (`podman rm --force`) when the test ends.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .cmd()
            .args(["rm", "--force", "--time", "5", &self.name])
            .output();
    }
}

/// `GET path` on 127.0.0.1:`port` inside the network namespace of `pid` (a thread of ours
/// joins it; the container has no network of its own but loopback).
fn http_in_netns(pid: u32, port: u16, path: &str) -> Option<String> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .join()
    .ok()
    .flatten()
}

/// `1Mi` → `1m`, `128Mi` → `128m` (podman's sizes).
fn podman_size(k8s: &str) -> String {
    let (n, unit) = k8s.split_at(k8s.find(|c: char| !c.is_ascii_digit()).unwrap_or(k8s.len()));
    match unit {
        "Ki" => format!("{n}k"),
        "Mi" => format!("{n}m"),
        "Gi" => format!("{n}g"),
        "" => n.to_owned(),
        other => panic!("unexpected size unit {other} in {k8s}"),
    }
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    let podman = Podman::new();
    let oci = dist().join(format!("reaper-{VERSION}.oci.tar"));
    let loaded = ok(podman.cmd().arg("load").arg("--input").arg(&oci));
    eprintln!("podman load: {}", loaded.trim());

    let docs = yaml_documents(&repo().join("deploy/kubernetes/daemonset.yaml"));
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("a {k}"))
    };
    let pod = &kind("DaemonSet")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let image = c["image"].as_str().expect("image");
    assert_eq!(
        image,
        format!("localhost/reaper:{VERSION}"),
        "the DaemonSet names the built image"
    );
    assert!(
        loaded.contains(image),
        "podman load gave {loaded}, the DaemonSet wants {image}"
    );

    // The pod's settings, as podman options.
    let name = format!("reaper-ship-{}", std::process::id());
    let mut args: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name".into(),
        name.clone(),
    ];
    // The pod network is the cluster's business: loopback only here, reached through setns.
    args.push("--network=none".into());
    if pod["hostPID"] == true {
        args.push("--pid=host".into());
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false, "not privileged");
    if let Some(uid) = sc["runAsUser"].as_u64() {
        args.push(format!("--user={uid}"));
    }
    for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
        args.push(format!("--cap-drop={}", cap.as_str().unwrap()));
    }
    for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        args.push(format!("--cap-add=CAP_{}", cap.as_str().unwrap()));
    }
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.push("--security-opt=no-new-privileges".into());
    }
    // RuntimeDefault is podman's own default seccomp profile.
    match sc["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") | None => {}
        Some(other) => panic!("seccompProfile {other}: not something podman can mirror"),
    }
    if sc["appArmorProfile"]["type"] == "Unconfined" {
        args.push("--security-opt=apparmor=unconfined".into());
    }
    for env in c["env"].as_array().into_iter().flatten() {
        args.push(format!(
            "--env={}={}",
            env["name"].as_str().unwrap(),
            env["value"].as_str().unwrap()
        ));
    }
    if let Some(memory) = c["resources"]["limits"]["memory"].as_str() {
        args.push(format!("--memory={}", podman_size(memory)));
    }
    // podman's default ulimits exceed what runc may set on this host (the pod spec has none):
    // the test's own open-file limit, and 4096 processes (runc is refused anything near the
    // host's hard nproc limit here).
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let show = |v: u64| {
        if v == nix::sys::resource::RLIM_INFINITY {
            "-1".to_owned()
        } else {
            v.to_string()
        }
    };
    args.push(format!("--ulimit=nofile={}:{}", show(soft), show(hard)));
    args.push("--ulimit=nproc=4096:4096".into());

    // Volumes. The ConfigMap's reaper.toml as the kubelet lays it out (symlinks through
    // ..data, defaultMode), with two changes so the test can watch a real kill without
    // endangering the host's own processes: its rule also requires this test's agent as the
    // parent, and the idle timeout is 3 s.
    let agent_comm = reaper_tests::agent_comm("ship");
    let volumes: Vec<&Value> = pod["volumes"].as_array().unwrap().iter().collect();
    let volume = |name: &str| {
        *volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let scratch = TempDir::new("pod");
    for mount in c["volumeMounts"].as_array().unwrap() {
        let path = mount["mountPath"].as_str().unwrap();
        let ro = if mount["readOnly"] == true { ":ro" } else { "" };
        let v = volume(mount["name"].as_str().unwrap());
        if let Some(map) = v["configMap"].as_object() {
            let map_name = map["name"].as_str().unwrap();
            let cm = kind("ConfigMap");
            assert_eq!(cm["metadata"]["name"], map_name);
            let dir = scratch.join(map_name);
            let data = dir.join("..2026_01_01_00_00_00.000000000");
            std::fs::create_dir_all(&data).unwrap();
            let mode = map
                .get("defaultMode")
                .and_then(Value::as_u64)
                .unwrap_or(0o644) as u32;
            for (file, content) in cm["data"].as_object().unwrap() {
                let mut content = content.as_str().unwrap().to_owned();
                if file == "reaper.toml" {
                    assert!(content.contains("idle_timeout = \"15m\""), "{content}");
                    content = content.replace("idle_timeout = \"15m\"", "idle_timeout = \"3s\"");
                    assert!(
                        content.trim_end().ends_with("require_no_tty = true"),
                        "the rule ends the file: {content}"
                    );
                    content.push_str(&format!("parent_comm = [\"{agent_comm}\"]\n"));
                }
                std::fs::write(data.join(file), content).unwrap();
                std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(mode))
                    .unwrap();
                std::os::unix::fs::symlink(format!("..data/{file}"), dir.join(file)).unwrap();
            }
            std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
            args.push(format!("--volume={}:{path}{ro}", dir.display()));
        } else if let Some(host) = v["hostPath"]["path"].as_str() {
            args.push(format!("--volume={host}:{path}{ro}"));
        } else if let Some(empty) = v["emptyDir"].as_object() {
            let size = empty
                .get("sizeLimit")
                .and_then(Value::as_str)
                .map(podman_size);
            let mut opts = vec!["rw".to_owned(), "mode=0777".to_owned()];
            if let Some(size) = size {
                opts.push(format!("size={size}"));
            }
            args.push(format!("--tmpfs={path}:{}", opts.join(",")));
        } else {
            panic!("a volume the test does not know how to mount: {v}");
        }
    }
    args.push(image.to_owned());
    args.extend(
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let port = c["ports"][0]["containerPort"].as_u64().unwrap() as u16;

    eprintln!("podman {}", args.join(" "));
    ok(podman.cmd().args(&args));
    let container = Container {
        podman: &podman,
        name: name.clone(),
    };
    let logs = || text(&run(podman.cmd().args(["logs", &container.name])));
    let pid: u32 = ok(podman
        .cmd()
        .args(["inspect", "--format", "{{.State.Pid}}", &name]))
    .trim()
    .parse()
    .expect("the container's pid");

    // /healthz, as the probes ask it.
    let started = Instant::now();
    let healthz = loop {
        if let Some(r) = http_in_netns(pid, port, "/healthz")
            && r.starts_with("HTTP/1.1 200")
        {
            break r;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no 200 from /healthz:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "/healthz after {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        healthz.lines().next().unwrap()
    );

    // A process started on the host shows in `reaper explain`, asked inside the container as
    // `kubectl exec` would.
    let mut helper = Helper::spawn(&["wait"]);
    let host_pid = helper.read_pid("pid");
    let explain = |pid: u32| {
        run(podman.cmd().args([
            "exec",
            &name,
            "/usr/local/bin/reaper",
            "explain",
            &pid.to_string(),
        ]))
    };
    let started = Instant::now();
    loop {
        let out = explain(host_pid);
        if out.status.success() && text(&out).contains("lifecycle-helper wait") {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "pid {host_pid} not followed:\n{}\n{}",
            text(&out),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    helper.finish();

    // A leaked double on the host is reaped from inside the container, its parent spared.
    let mut agent = reaper_tests::agent("ship", &["--leak"]);
    let claude = agent.read_pid("claude");
    agent.read("ready");
    let started = Instant::now();
    while alive(claude) {
        assert!(
            started.elapsed() < DEADLINE,
            "the leaked claude {claude} was not reaped:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(alive(agent.pid()), "the agent survives its child's reaping");
    // The kill is counted when the reap task reports, a moment after the process is gone.
    let started = Instant::now();
    loop {
        let metrics = http_in_netns(pid, port, "/metrics").expect("/metrics");
        let kills: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("reaper_kills_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(kills <= 1.0, "one kill only:\n{metrics}");
        if kills == 1.0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the kill was never counted:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.finish();

    // The kubelet's stop: SIGTERM, a clean exit within the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    ok(podman
        .cmd()
        .args(["stop", "--time", &grace.to_string(), &name]));
    let code = ok(podman
        .cmd()
        .args(["inspect", "--format", "{{.State.ExitCode}}", &name]));
    let log = logs();
    assert_eq!(code.trim(), "0", "exit status after SIGTERM:\n{log}");
    assert!(
        log.contains("\"stopped\""),
        "a final `stopped` line:\n{log}"
    );
    assert!(
        !log.contains("could not drop capabilities"),
        "the DaemonSet's capabilities suffice:\n{log}"
    );
    drop(container);
}
