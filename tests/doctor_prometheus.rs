//! `chvkit doctor --format prometheus` and `--textfile DIR`: the exposition of a healthy and of
//! a broken host passes `promtool check metrics` (Debian's `prometheus` package) and says what
//! the JSON report of the same host says; label values survive any file name; the textfile is
//! replaced in one rename, so a reader never sees half of it.

mod common;
#[path = "setup_support/seed_net.rs"]
mod seed_net;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output, Stdio};

use common::{text, NetNs};
use serde_json::Value;

const NET_TOOLS: &[&str] = &["ip", "ip6tables", "nft", "sysctl", "promtool"];

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse the samples of a text exposition (the subset chvkit writes: no timestamps), undoing
/// label value escapes, so that values can be compared with the JSON report.
fn parse(exposition: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let mut key = String::new();
            let mut val = String::new();
            let mut in_value = false;
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match (in_value, c) {
                    (false, '}') => {
                        end = Some(i + 1);
                        break;
                    }
                    (false, '=') => {}
                    (false, ',') => {}
                    (false, '"') => in_value = true,
                    (false, c) => key.push(c),
                    (true, '\\') => match chars.next().map(|(_, e)| e) {
                        Some('n') => val.push('\n'),
                        Some(e) => val.push(e),
                        None => panic!("dangling escape in {line:?}"),
                    },
                    (true, '"') => {
                        labels.insert(std::mem::take(&mut key), std::mem::take(&mut val));
                        in_value = false;
                    }
                    (true, c) => val.push(c),
                }
            }
            rest = &r[end.unwrap_or_else(|| panic!("unclosed labels in {line:?}"))..];
        }
        let value = rest
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("value of {line:?}: {e}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn samples<'a>(all: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    all.iter().filter(|s| s.name == name).collect()
}

/// The one sample of `name` whose `label` is `value`.
fn sample<'a>(all: &'a [Sample], name: &str, label: &str, value: &str) -> &'a Sample {
    let found: Vec<&Sample> = samples(all, name)
        .into_iter()
        .filter(|s| s.labels.get(label).map(String::as_str) == Some(value))
        .collect();
    assert_eq!(found.len(), 1, "{name}{{{label}={value:?}}} in {all:#?}");
    found[0]
}

/// `promtool check metrics` on `exposition`: its verdict (success and no lint output), with
/// what it said.
fn promtool(exposition: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let quiet = out.stdout.is_empty() && out.stderr.is_empty();
    (out.status.success() && quiet, text(&out))
}

fn assert_promtool_passes(exposition: &str) {
    let (ok, said) = promtool(exposition);
    assert!(ok, "promtool check metrics rejects:\n{exposition}\n{said}");
}

/// Level per check id, from a `--json` report.
fn json_levels(out: &Output) -> BTreeMap<String, String> {
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(out)));
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["level"].as_str().unwrap_or_default().to_lowercase(),
            )
        })
        .collect()
}

/// The exposition says what the JSON report says: one `chvkit_check` per check at the same
/// level with the documented value, and counts that add up.
fn assert_matches_json(prom: &[Sample], levels: &BTreeMap<String, String>) {
    let checks = samples(prom, "chvkit_check");
    assert_eq!(checks.len(), levels.len(), "{prom:#?}");
    for (id, level) in levels {
        let s = sample(prom, "chvkit_check", "id", id);
        assert_eq!(s.labels["level"], *level, "{id}");
        let want = match level.as_str() {
            "pass" => 0.0,
            "skip" => 1.0,
            "warn" => 2.0,
            "fail" => 3.0,
            other => panic!("level {other}"),
        };
        assert_eq!(s.value, want, "{id}");
    }
    for level in ["pass", "skip", "warn", "fail"] {
        let n = levels.values().filter(|l| *l == level).count();
        assert_eq!(
            sample(prom, "chvkit_doctor_checks", "level", level).value,
            n as f64,
            "{level}"
        );
    }
    let info = samples(prom, "chvkit_info");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info[0].value, 1.0);
    let d = samples(prom, "chvkit_doctor_duration_seconds");
    assert!(
        d.len() == 1 && d[0].value > 0.0 && d[0].value < 60.0,
        "{d:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let t = samples(prom, "chvkit_doctor_last_run_timestamp_seconds");
    assert!(
        t.len() == 1 && (now - t[0].value).abs() < 120.0,
        "{t:?} vs {now}"
    );
}

/// Apply the hint of every WARN/FAIL `net.*` check until none is left.
fn converge_net(ns: &NetNs) {
    for _ in 0..4 {
        let out = ns.chvkit(&["doctor", "--json", "--only", "net"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let bad: Vec<&Value> = v["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .filter(|c| c["level"] == "WARN" || c["level"] == "FAIL")
            .collect();
        if bad.is_empty() {
            return;
        }
        for c in bad {
            ns.sh_ok(c["hint"].as_str().expect("hint"));
        }
    }
    panic!("net.* hints did not converge");
}

#[test]
fn healthy_host_exposition_passes_promtool() {
    let test = "doctor_prometheus::healthy_host_exposition_passes_promtool";
    if !common::require(test, true, NET_TOOLS) {
        return;
    }
    let ns = NetNs::new("prh");
    ns.sh_ok(seed_net::SEED_SETUP);
    ns.sh_ok(
        "ip tuntap add chv-p0 mode tap && ip link set chv-p0 master chvbr0 && ip link set chv-p0 up",
    );
    let _held = seed_net::hold_tap(&ns.name, "chv-p0").expect("hold TAP");
    converge_net(&ns);
    let out = ns.chvkit(&["doctor", "--format", "prometheus", "--only", "net"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let expo = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    assert_promtool_passes(&expo);
    let prom = parse(&expo);
    let levels = json_levels(&ns.chvkit(&["doctor", "--json", "--only", "net"]));
    assert!(levels.values().all(|l| l == "pass"), "{levels:?}");
    assert_matches_json(&prom, &levels);
    assert_eq!(
        sample(&prom, "chvkit_check", "id", "net.taps").value,
        0.0,
        "{expo}"
    );
}

#[test]
fn broken_host_exposition_passes_promtool() {
    let test = "doctor_prometheus::broken_host_exposition_passes_promtool";
    if !common::require(test, true, NET_TOOLS) {
        return;
    }
    // No bridge in the namespace, and an empty --root: the profile's binary, firmware and
    // kernel are all missing. Every check runs.
    let ns = NetNs::new("prb");
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let out = ns.chvkit(&["--root", r, "doctor", "--format", "prometheus"]);
    assert_eq!(out.status.code(), Some(1), "FAILs exit 1:\n{}", text(&out));
    let expo = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    assert_promtool_passes(&expo);
    let prom = parse(&expo);
    let levels = json_levels(&ns.chvkit(&["--root", r, "doctor", "--json"]));
    assert_matches_json(&prom, &levels);
    let bridge = sample(&prom, "chvkit_check", "id", "net.bridge");
    assert_eq!(
        (bridge.labels["level"].as_str(), bridge.value),
        ("fail", 3.0)
    );
    let binary = sample(&prom, "chvkit_check", "id", "chv.binary");
    assert_eq!(binary.labels["level"], "fail");
    assert!(sample(&prom, "chvkit_doctor_checks", "level", "fail").value >= 2.0);
    assert_eq!(samples(&prom, "chvkit_info")[0].labels["root"], r);
}

#[test]
fn label_values_survive_any_file_name() {
    let test = "doctor_prometheus::label_values_survive_any_file_name";
    if !common::require(test, false, &["promtool"]) {
        return;
    }
    // A quote, a backslash, a line feed and non-ASCII: all legal in a Linux file name.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("we\"ird\\prof\nile-ü.yaml");
    std::fs::write(&profile, include_str!("../profiles/default.yaml")).unwrap();
    let root = dir.path().join("root \"r\"");
    std::fs::create_dir(&root).unwrap();
    // kvm.device reads /dev/kvm only: no networking, no root needed.
    let out = Command::new(common::chvkit())
        .arg("--profile")
        .arg(&profile)
        .arg("--root")
        .arg(&root)
        .args(["doctor", "--format", "prometheus", "--only", "kvm.device"])
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    let expo = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    assert_promtool_passes(&expo);
    let prom = parse(&expo);
    let info = samples(&prom, "chvkit_info");
    assert_eq!(
        info[0].labels["profile"],
        profile.to_str().unwrap(),
        "{expo}"
    );
    // The control: the same path written unescaped is what promtool rejects.
    let raw = format!(
        "# HELP chvkit_info x\n# TYPE chvkit_info gauge\nchvkit_info{{profile=\"{}\"}} 1\n",
        profile.display()
    );
    assert!(
        !promtool(&raw).0,
        "promtool accepts an unescaped label value:\n{raw}"
    );
    assert_eq!(info[0].labels["root"], root.to_str().unwrap(), "{expo}");
    assert_eq!(samples(&prom, "chvkit_check").len(), 1, "{expo}");
}

fn doctor_kvm(args: &[&str]) -> Output {
    Command::new(common::chvkit())
        .args(["doctor", "--only", "kvm.device"])
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn textfile_is_replaced_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let prom = dir.path().join("chvkit.prom");
    // node_exporter runs as its own user: the file must be readable by it.
    let out = doctor_kvm(&["--textfile", d]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "--textfile alone prints nothing:\n{}",
        text(&out)
    );
    let md = std::fs::metadata(&prom).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o644);
    let first = std::fs::read_to_string(&prom).unwrap();
    assert_eq!(samples(&parse(&first), "chvkit_check").len(), 1, "{first}");

    // Replaced, not rewritten: a reader that opened the old file keeps reading all of it
    // while the path names a new inode.
    let old = std::fs::File::open(&prom).unwrap();
    let out = doctor_kvm(&["--textfile", d, "--format", "prometheus"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    assert_ne!(
        std::fs::metadata(&prom).unwrap().ino(),
        old.metadata().unwrap().ino()
    );
    assert_eq!(std::io::read_to_string(old).unwrap(), first);
    // With --format too, stdout gets the same exposition as the file.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(&prom).unwrap()
    );

    // A reader polling while doctor rewrites the file again and again only ever sees whole
    // files (each ends with the last family's sample).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let prom = prom.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::fs::read_to_string(&prom).expect("chvkit.prom always exists");
                let last = t.lines().last().unwrap_or_default();
                assert!(
                    last.starts_with("chvkit_doctor_last_run_timestamp_seconds ")
                        && t.ends_with('\n'),
                    "a partial file:\n{t}"
                );
                // info, one check, four counts, duration, timestamp.
                assert_eq!(parse(&t).len(), 8, "{t}");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..30 {
        let out = doctor_kvm(&["--textfile", d]);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", text(&out));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 30, "the reader ran ({reads} reads)");
    // Nothing else is left in the directory (no temp files for the collector to trip on).
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["chvkit.prom"]);
}

#[test]
fn textfile_dir_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = doctor_kvm(&["--textfile", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("not a directory"),
        "{err}"
    );
    assert!(!missing.exists(), "nothing created");
}

#[test]
fn json_flag_is_format_json() {
    let a = doctor_kvm(&["--json"]);
    let b = doctor_kvm(&["--format", "json"]);
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    assert_eq!(json_levels(&a), json_levels(&b));
    assert_eq!(json_levels(&a).len(), 1);
    // Asking for two formats is a usage error (exit 2), not a silent pick.
    let both = doctor_kvm(&["--json", "--format", "prometheus"]);
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
    let text_out = doctor_kvm(&["--format", "text"]);
    assert!(
        String::from_utf8_lossy(&text_out.stdout).contains("kvm.device"),
        "{}",
        text(&text_out)
    );
}

/// The exposition parser itself, on the escapes the format defines.
#[test]
fn parser_undoes_escapes() {
    let s = parse("# HELP x y\nx{a=\"q\\\"b\\\\c\\nd\",b=\"\"} 1.5\ny 2\n");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].labels["a"], "q\"b\\c\nd");
    assert_eq!(s[0].labels["b"], "");
    assert_eq!(s[0].value, 1.5);
    assert_eq!((s[1].name.as_str(), s[1].value), ("y", 2.0));
}
