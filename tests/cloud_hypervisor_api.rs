//! Conformance suite for Cloud Hypervisor v50's REST API and process behaviour, as chvkit
//! relies on it (facts.md §2). It runs against whichever VMM `tests/vmm` picks: the real
//! binary when present (`CHV_BIN`, or `cloud-hypervisor` on PATH), otherwise the stand-in;
//! `CHVKIT_TEST_VMM=standin` forces the stand-in. Each spawn prints which one it uses.
//!
//! On PVM hosts an ordinary guest kernel spins silently, so tests assert VMM-level facts only
//! (codes, bodies, states, events, files, host devices). The stand-in's guest hooks
//! (`standin.exit=N` …) have their own tests, skipped visibly against the real VMM.

mod common;
mod vmm;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::{Client, Reply, Spawn, Vmm};

const T: Duration = Duration::from_secs(15);

fn errors_are(r: &Reply, status: u16, expected: &[&str]) {
    assert_eq!(r.status, status, "status; body {:?}", r.text());
    assert_eq!(r.errors(), expected, "error chain");
}

/// Like `errors_are`, but the last message may carry an appended backtrace or host detail.
fn errors_start(r: &Reply, status: u16, expected: &[&str], last_contains: &str) {
    assert_eq!(r.status, status, "status; body {:?}", r.text());
    let got = r.errors();
    assert_eq!(
        &got[..expected.len().min(got.len())],
        expected,
        "error chain {got:?}"
    );
    assert!(
        got.last().is_some_and(|l| l.contains(last_contains)),
        "last error should contain {last_contains:?}: {got:?}"
    );
}

fn no_content(r: &Reply) {
    assert_eq!(r.status, 204, "expected 204, got body {:?}", r.text());
    assert!(r.body.is_empty());
    assert!(
        r.header("Content-Length").is_none(),
        "204 carries no Content-Length"
    );
}

fn state(c: &mut Client) -> String {
    let r = c.get("vm.info");
    assert_eq!(r.status, 200, "vm.info: {}", r.text());
    r.json()["state"].as_str().unwrap_or_default().to_string()
}

/// vm/vmm events only: a working guest adds `virtio-device` events, a PVM guest does not.
fn vm_events(v: &Vmm) -> Vec<String> {
    v.event_names()
        .into_iter()
        .filter(|e| e.starts_with("vm:") || e.starts_with("vmm:"))
        .collect()
}

/// Waits until the vm/vmm events are exactly `expected`. Events are written by a thread of the
/// VMM's own, so one may reach the file just after the API reply that caused it.
fn events_become(v: &Vmm, expected: &[&str]) {
    let ok = wait_until(T, || vm_events(v) == expected);
    assert!(ok, "events {:?}, expected {expected:?}", vm_events(v));
}

/// After the VMM has exited: the events are `expected`, except that up to
/// `expected.len() - certain` trailing ones may be missing (v50's event writer can lose the
/// last events when the process exits; launchers must not wait for them).
fn events_at_exit(v: &Vmm, expected: &[&str], certain: usize) {
    let got = vm_events(v);
    assert!(
        got.len() >= certain && got.len() <= expected.len() && got[..] == expected[..got.len()],
        "events {got:?}, expected {expected:?} (at least the first {certain})"
    );
    if got.len() < expected.len() {
        vmm::notice(
            &v.test,
            &format!(
                "{} trailing event(s) lost at exit, as v50's event writer can",
                expected.len() - got.len()
            ),
        );
    }
}

fn sparse_file(path: &Path, mib: u64) -> PathBuf {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(mib << 20).expect("size disk");
    path.to_path_buf()
}

fn need_kernel(test: &str) -> Option<PathBuf> {
    let k = vmm::kernel();
    if k.is_none() {
        common::skip(
            test,
            "no guest kernel (set CHV_KERNEL_PATH or install linux-image-cloud-amd64)",
        );
    }
    k
}

/// A minimal bootable configuration: kernel, one raw disk, serial to a file, console off.
fn config(v: &Vmm, kernel: &Path, cmdline: &str) -> Value {
    let disk = sparse_file(&v.path("disk.raw"), 16);
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128u64 << 20},
        "payload": {"kernel": kernel, "cmdline": format!("console=ttyS0 root=/dev/vda rw {cmdline}")},
        "disks": [{"path": disk, "image_type": "Raw"}],
        "serial": {"mode": "File", "file": v.path("serial.log")},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"}
    })
}

fn wait_until(budget: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < budget {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Tests of stand-in-only behaviour announce themselves as skipped against the real VMM.
fn standin_only(test: &str, v: &Spawn) -> bool {
    if v.binary().real {
        common::skip(
            test,
            "exercises a stand-in-only hook; the real VMM is under test (CHVKIT_TEST_VMM=standin runs it)",
        );
        return false;
    }
    true
}

// --- process and command line --------------------------------------------------------------

#[test]
fn cloud_hypervisor_version_flag() {
    let b = vmm::binary();
    vmm::notice("cloud_hypervisor_version_flag", &b.describe());
    let out = std::process::Command::new(&b.path)
        .arg("-V")
        .output()
        .expect("run -V");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("cloud-hypervisor v50.0"),
        "version line: {text:?}"
    );
}

#[test]
fn cloud_hypervisor_socket_is_private_and_removed_after_vmm_shutdown() {
    let mut v =
        Spawn::new("cloud_hypervisor_socket_is_private_and_removed_after_vmm_shutdown").start();
    let meta = std::fs::metadata(&v.api).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "socket mode");
    let ev = std::fs::metadata(&v.events).expect("event log exists");
    assert_eq!(ev.permissions().mode() & 0o777, 0o600, "event log mode");

    let r = v.client().put("vmm.shutdown", None);
    assert_eq!(r.status, 200, "vmm.shutdown answers 200: {}", r.text());
    assert_eq!(r.header("Content-Length"), Some("0"));
    let st = v.wait_exit(T).expect("VMM exits after vmm.shutdown");
    assert_eq!(st.code(), Some(0));
    assert!(!v.api.exists(), "socket removed on clean exit");
    events_at_exit(&v, &["vmm:starting", "vmm:shutdown"], 1);
}

#[test]
fn cloud_hypervisor_leftover_socket_file_makes_it_exit_1() {
    let test = "cloud_hypervisor_leftover_socket_file_makes_it_exit_1";
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&api).expect("bind"));
    assert!(
        api.exists(),
        "a stale socket file stays after its listener is gone"
    );
    let events = dir.path().join("events.json");
    let mut v = Spawn::new(test).start_in(dir, api.clone(), events);
    let st = v.wait_exit(T).expect("VMM gives up at once");
    assert_eq!(st.code(), Some(1));
    let err = v.stderr_text();
    assert!(err.contains("Address already in use"), "stderr: {err}");
    assert!(
        api.exists(),
        "the stale file is left for the caller to unlink"
    );
}

#[test]
fn cloud_hypervisor_sigterm_and_sigint_exit_0_and_remove_socket() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut v =
            Spawn::new("cloud_hypervisor_sigterm_and_sigint_exit_0_and_remove_socket").start();
        assert_eq!(v.client().put("vm.create", Some("{}")).status, 204);
        v.signal(sig);
        let st = v
            .wait_exit(T)
            .unwrap_or_else(|| panic!("{name}: VMM still running"));
        assert_eq!(st.code(), Some(0), "{name}");
        assert!(!v.api.exists(), "{name}: socket removed");
        events_at_exit(&v, &["vmm:starting", "vm:deleted", "vmm:shutdown"], 1);
    }
}

#[test]
fn cloud_hypervisor_sigkill_leaves_the_socket_behind() {
    let mut v = Spawn::new("cloud_hypervisor_sigkill_leaves_the_socket_behind").start();
    v.signal(libc::SIGKILL);
    let st = v.wait_exit(T).expect("killed");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(v.api.exists(), "SIGKILL leaves the socket file");
}

#[test]
fn cloud_hypervisor_event_log_is_pretty_json_blocks() {
    let mut v = Spawn::new("cloud_hypervisor_event_log_is_pretty_json_blocks").start();
    let mut c = v.client();
    assert_eq!(c.put("vm.create", Some("{}")).status, 204);
    assert_eq!(c.put("vm.boot", None).status, 500);
    no_content(&c.put("vm.delete", None));
    events_become(&v, &["vmm:starting", "vm:booting", "vm:deleted"]);
    let raw = std::fs::read_to_string(&v.events).expect("event log");
    assert!(raw.ends_with("}\n\n"), "each event ends with a blank line");
    let blocks: Vec<&str> = raw.split("\n\n").filter(|b| !b.is_empty()).collect();
    assert_eq!(blocks.len(), 3, "{raw}");
    for b in &blocks {
        assert!(
            b.starts_with("{\n  \"timestamp\": {\n    \"secs\": "),
            "pretty-printed, timestamp first: {b}"
        );
        let keys: Vec<&str> = b
            .lines()
            .filter(|l| l.starts_with("  \""))
            .map(|l| l.trim().split('"').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(keys, ["timestamp", "source", "event", "properties"], "{b}");
    }
    let evs = v.events();
    assert_eq!(
        evs.iter()
            .map(|e| (e.source.as_str(), e.event.as_str()))
            .collect::<Vec<_>>(),
        [("vmm", "starting"), ("vm", "booting"), ("vm", "deleted")]
    );
    assert!(evs.iter().all(|e| e.properties.is_null()));
    let stamps: Vec<u128> = evs
        .iter()
        .map(|e| e.secs as u128 * 1_000_000_000 + e.nanos as u128)
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "relative, increasing timestamps: {stamps:?}"
    );
    assert!(stamps[0] < 5_000_000_000, "time since VMM start, not epoch");
    assert_eq!(c.put("vmm.shutdown", None).status, 200);
    v.wait_exit(T).expect("exits");
    events_at_exit(
        &v,
        &["vmm:starting", "vm:booting", "vm:deleted", "vmm:shutdown"],
        3,
    );
}

#[test]
fn cloud_hypervisor_api_socket_can_be_a_passed_listening_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let test = "cloud_hypervisor_api_socket_can_be_a_passed_listening_fd";
    let b = vmm::binary();
    vmm::notice(test, &b.describe());
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("prebound.sock");
    let listener = std::os::unix::net::UnixListener::bind(&api).expect("bind");
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new(&b.path);
    cmd.args(["--api-socket", "fd=3"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: dup2 in the child before exec; it only touches the child's descriptor table.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec set; clear it explicitly then.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(cmd.spawn().expect("spawn"));
    drop(listener);
    let mut c = Client::connect(&api).expect("connect to the pre-bound socket");
    let r = c.get("vmm.ping");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["pid"].as_u64(), Some(child.0.id() as u64));
    assert_eq!(c.put("vmm.shutdown", None).status, 200);
    let st = child.0.wait().expect("wait");
    assert_eq!(st.code(), Some(0));
    assert!(api.exists(), "a passed socket is the caller's to remove");
}

#[test]
fn cloud_hypervisor_fifo_event_monitor_blocks_start_until_read() {
    let test = "cloud_hypervisor_fifo_event_monitor_blocks_start_until_read";
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("events.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap_or_default()).expect("cstring");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let api = dir.path().join("api.sock");
    let v = Spawn::new(test).start_in(dir, api.clone(), fifo.clone());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !api.exists(),
        "no API socket while nobody reads the event FIFO"
    );
    let mut reader = std::fs::File::open(&fifo).expect("open FIFO for reading");
    assert!(
        wait_until(T, || api.exists()),
        "starts once the FIFO has a reader"
    );
    let mut c = v.client();
    assert_eq!(c.put("vm.create", Some("{}")).status, 204);
    assert_eq!(c.put("vm.delete", None).status, 204);
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !text.contains("\"deleted\"") && t0.elapsed() < T {
        use std::io::Read;
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(10)),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(text.contains("\"starting\""), "{text}");
    assert!(text.contains("\"deleted\""), "{text}");
}

// --- HTTP layer --------------------------------------------------------------------------------

#[test]
fn cloud_hypervisor_ping_is_a_get_with_version_fields() {
    let v = Spawn::new("cloud_hypervisor_ping_is_a_get_with_version_fields").start();
    let r = v.client().get("vmm.ping");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Server"), Some("Cloud Hypervisor API"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("Connection"), Some("keep-alive"));
    assert!(
        r.text().starts_with("{\"build_version\":\"v50.0"),
        "{}",
        r.text()
    );
    let j = r.json();
    let keys: Vec<&String> = j.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 4);
    assert_eq!(j["version"], "50.0.0");
    assert_eq!(j["pid"].as_u64(), Some(v.pid() as u64));
    let features: Vec<&str> = j["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(features.contains(&"kvm"), "{features:?}");
}

#[test]
fn cloud_hypervisor_keep_alive_serves_many_requests_on_one_connection() {
    let v =
        Spawn::new("cloud_hypervisor_keep_alive_serves_many_requests_on_one_connection").start();
    let mut c = v.client();
    for _ in 0..25 {
        assert_eq!(c.get("vmm.ping").status, 200);
        assert_eq!(c.get("vm.info").status, 500);
    }
    // Pipelined requests in one write come back in order.
    c.send_raw(
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/nope HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\n\r\n",
    )
    .expect("write");
    assert_eq!(c.read_reply().expect("1").status, 200);
    assert_eq!(c.read_reply().expect("2").status, 404);
    assert_eq!(c.read_reply().expect("3").status, 500);
}

#[test]
fn cloud_hypervisor_wrong_method_is_400() {
    let v = Spawn::new("cloud_hypervisor_wrong_method_is_400").start();
    let mut c = v.client();
    for (method, ep) in [
        ("PUT", "vmm.ping"),
        ("PUT", "vm.info"),
        ("GET", "vm.create"),
        ("PATCH", "vm.create"),
        ("GET", "vm.boot"),
        ("GET", "vm.snapshot"),
        ("PUT", "vm.counters"),
        ("GET", "vmm.shutdown"),
    ] {
        let r = c.request(method, ep, None).expect("request");
        errors_are(&r, 400, &["Bad Request"]);
    }
    // PATCH reaches the action routes' generic handler, which answers without a body.
    let r = c.request("PATCH", "vm.boot", None).expect("PATCH");
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
    // Methods micro_http does not know fail at parse time.
    c.send_raw(b"POST /api/v1/vm.create HTTP/1.1\r\n\r\n")
        .expect("POST");
    let r = c.read_reply().expect("reply");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Invalid HTTP Method"), "{}", r.text());
    assert_eq!(c.get("vmm.ping").status, 200, "connection still usable");
    errors_are(
        &c.get("vm.info"),
        500,
        &[
            "Error from API",
            "The VM info is not available",
            "VM is not created",
        ],
    );
}

#[test]
fn cloud_hypervisor_unknown_path_is_404() {
    let v = Spawn::new("cloud_hypervisor_unknown_path_is_404").start();
    let mut c = v.client();
    errors_are(&c.get("vm.nope"), 404, &["Not Found"]);
    // Not compiled into the release build (guest_debug feature).
    errors_are(
        &c.put(
            "vm.coredump",
            Some("{\"destination_url\":\"file:///tmp/x\"}"),
        ),
        404,
        &["Not Found"],
    );
    c.send_raw(b"GET /vmm.ping HTTP/1.1\r\n\r\n")
        .expect("write");
    errors_are(&c.read_reply().expect("reply"), 404, &["Not Found"]);
}

#[test]
fn cloud_hypervisor_body_on_a_bodyless_action_is_400() {
    let v = Spawn::new("cloud_hypervisor_body_on_a_bodyless_action_is_400").start();
    let mut c = v.client();
    assert_eq!(c.put("vm.create", Some("{}")).status, 204);
    for ep in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.delete",
        "vm.power-button",
    ] {
        errors_are(&c.put(ep, Some("{}")), 400, &["Bad Request"]);
    }
    // None of them reached the VMM: no booting, no deletion.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm_events(&v), ["vmm:starting"]);
    assert_eq!(state(&mut c), "Created");
}

#[test]
fn cloud_hypervisor_chunked_body_is_400_and_creates_nothing() {
    let v = Spawn::new("cloud_hypervisor_chunked_body_is_400_and_creates_nothing").start();
    let mut c = v.client();
    c.send_raw(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .expect("write");
    let r = c.read_reply().expect("reply");
    assert_eq!(r.status, 400, "{}", r.text());
    errors_are(
        &v.client().get("vm.info"),
        500,
        &[
            "Error from API",
            "The VM info is not available",
            "VM is not created",
        ],
    );
}

#[test]
fn cloud_hypervisor_expect_continue_and_payload_limit() {
    let v = Spawn::new("cloud_hypervisor_expect_continue_and_payload_limit").start();
    let mut c = v.client();
    // curl sends Expect: 100-continue for bodies over 1 KiB; vm.create bodies often are.
    let body = json!({"payload": {"kernel": "/k", "cmdline": "x".repeat(3000)}}).to_string();
    c.send_raw(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .expect("head");
    let first = c.read_reply().expect("interim");
    assert_eq!(first.status, 100);
    c.send_raw(body.as_bytes()).expect("body");
    no_content(&c.read_reply().expect("final"));
    let info = c.get("vm.info").json();
    assert_eq!(
        info["config"]["payload"]["cmdline"].as_str().map(str::len),
        Some(3000)
    );
    // 50 KiB is the ceiling.
    let mut c2 = v.client();
    c2.send_raw(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 60000\r\n\r\n")
        .expect("head");
    let r = c2.read_reply().expect("reply");
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("larger than the limit of 51200"),
        "{}",
        r.text()
    );
}

#[test]
fn cloud_hypervisor_header_parse_error_spoils_the_connection() {
    let v = Spawn::new("cloud_hypervisor_header_parse_error_spoils_the_connection").start();
    let mut c = v.client();
    c.send_raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
        .expect("write");
    let r = c.read_reply().expect("reply");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Invalid header"), "{}", r.text());
    // micro_http stays in its header state: later requests on this connection fail too.
    c.send_raw(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .expect("write");
    assert_eq!(c.read_reply().expect("reply").status, 400);
    assert_eq!(
        v.client().get("vmm.ping").status,
        200,
        "a new connection works"
    );
}

// --- VM lifecycle without a guest kernel ------------------------------------------------------

#[test]
fn cloud_hypervisor_actions_without_a_vm() {
    let v = Spawn::new("cloud_hypervisor_actions_without_a_vm").start();
    let mut c = v.client();
    let api = "Error from API";
    errors_are(
        &c.get("vm.info"),
        500,
        &[api, "The VM info is not available", "VM is not created"],
    );
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[api, "The VM could not boot", "VM config is missing"],
    );
    errors_are(
        &c.put("vm.pause", None),
        500,
        &[api, "The VM could not be paused", "VM is not running"],
    );
    errors_are(
        &c.put("vm.resume", None),
        500,
        &[api, "The VM could not resume", "VM is not running"],
    );
    errors_are(
        &c.put("vm.shutdown", None),
        500,
        &[api, "The VM could not shutdown", "VM is not running"],
    );
    errors_are(
        &c.put("vm.reboot", None),
        500,
        &[api, "The VM could not reboot", "VM is not created"],
    );
    errors_are(
        &c.put("vm.power-button", None),
        500,
        &[api, "Error triggering power button", "VM is not running"],
    );
    errors_are(
        &c.get("vm.counters"),
        500,
        &[api, "The VM info is not available", "VM is not running"],
    );
    errors_are(
        &c.put("vm.snapshot", Some("{\"destination_url\":\"file:///tmp\"}")),
        500,
        &[api, "The VM could not be snapshotted", "VM is not running"],
    );
    no_content(&c.put("vm.delete", None));
    // Failed boot and reboot still announce themselves; deleting nothing is silent.
    events_become(&v, &["vmm:starting", "vm:booting", "vm:rebooting"]);
}

#[test]
fn cloud_hypervisor_create_rejects_bad_json_with_400() {
    let v = Spawn::new("cloud_hypervisor_create_rejects_bad_json_with_400").start();
    let mut c = v.client();
    let bad = "Failed to deserialize JSON";
    errors_are(
        &c.put("vm.create", Some("{\"cpus\":{\"boot_vcpus\":1}}")),
        400,
        &[bad, "missing field `max_vcpus` at line 1 column 24"],
    );
    errors_are(
        &c.put("vm.create", Some("{\"a\":")),
        400,
        &[bad, "EOF while parsing a value at line 1 column 5"],
    );
    errors_are(
        &c.put("vm.create", Some("{\"memory\":{\"size\":\"1G\"}}")),
        400,
        &[
            bad,
            "invalid type: string \"1G\", expected u64 at line 1 column 22",
        ],
    );
    errors_are(
        &c.put("vm.create", Some("{\"net\":[{\"tap\":\"t0\",\"mac\":\"zz\"}]}")),
        400,
        &[
            bad,
            "The provided MAC address is invalid: parsing of zz into a MAC address failed at line 1 column 31",
        ],
    );
    let r = c.put("vm.create", Some("{\"serial\":{\"mode\":\"Fil\"}}"));
    assert_eq!(r.status, 400);
    assert!(r.errors()[1].starts_with(
        "unknown variant `Fil`, expected one of `Off`, `Pty`, `Tty`, `File`, `Socket`, `Null`"
    ));
    // PUT without a body: 400 with an empty body.
    let r = c.put("vm.create", None);
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
    errors_are(
        &c.get("vm.info"),
        500,
        &[
            "Error from API",
            "The VM info is not available",
            "VM is not created",
        ],
    );
}

#[test]
fn cloud_hypervisor_create_stores_config_and_validates_nothing() {
    let v = Spawn::new("cloud_hypervisor_create_stores_config_and_validates_nothing").start();
    let mut c = v.client();
    // Unknown fields (v50.1's image_type) are ignored; nothing else is checked yet.
    no_content(&c.put(
        "vm.create",
        Some("{\"disks\":[{\"path\":\"/nonexistent/disk\",\"image_type\":\"Raw\"}]}"),
    ));
    let r = c.get("vm.info");
    assert!(
        r.text()
            .starts_with("{\"config\":{\"cpus\":{\"boot_vcpus\":1,"),
        "{}",
        r.text()
    );
    let info = r.json();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["device_tree"], Value::Null);
    assert_eq!(info["memory_actual_size"], 536870912u64);
    let cfg = &info["config"];
    assert_eq!(cfg["cpus"]["max_vcpus"], 1);
    assert_eq!(cfg["memory"]["size"], 536870912u64);
    assert_eq!(cfg["payload"], Value::Null);
    assert_eq!(cfg["serial"]["mode"], "Null", "serial defaults to Null");
    assert_eq!(cfg["console"]["mode"], "Tty", "console defaults to Tty");
    assert_eq!(cfg["rng"]["src"], "/dev/urandom");
    assert_eq!(cfg["disks"][0]["id"], Value::Null);
    assert!(cfg["disks"][0].get("image_type").is_none());
    errors_are(
        &c.put("vm.create", Some("{}")),
        500,
        &[
            "Error from API",
            "The VM could not be created",
            "VM is already created",
        ],
    );
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Failed to validate config",
            "Payload configuration is not bootable",
            "No bootitem provided: neither firmware nor kernel",
        ],
    );
    assert_eq!(state(&mut c), "Created");
    no_content(&c.put("vm.delete", None));
    no_content(&c.put("vm.delete", None));
    errors_are(
        &c.get("vm.info"),
        500,
        &[
            "Error from API",
            "The VM info is not available",
            "VM is not created",
        ],
    );
    events_become(&v, &["vmm:starting", "vm:booting", "vm:deleted"]);
}

#[test]
fn cloud_hypervisor_boot_validation_errors() {
    let v = Spawn::new("cloud_hypervisor_boot_validation_errors").start();
    let mut c = v.client();
    let cases = [
        (
            json!({"cpus": {"boot_vcpus": 2, "max_vcpus": 1}, "payload": {"kernel": "/k"}}),
            "Max CPUs lower than boot CPUs",
        ),
        (
            json!({"payload": {"kernel": "/k", "firmware": "/f"}}),
            "Specifying a kernel is not supported when a firmware is provided",
        ),
        (
            json!({"payload": {"kernel": "/k"}, "net": [{"tap": "x", "num_queues": 4}]}),
            "Number of vCPUs is insufficient for number of queues",
        ),
    ];
    for (cfg, msg) in cases {
        no_content(&c.put_json("vm.create", &cfg));
        let r = c.put("vm.boot", None);
        assert_eq!(r.status, 500);
        let e = r.errors();
        assert_eq!(
            e[..3],
            [
                "Error from API",
                "The VM could not boot",
                "Failed to validate config"
            ]
        );
        assert!(e.iter().any(|m| m == msg), "{msg:?} in {e:?}");
        no_content(&c.put("vm.delete", None));
    }
}

#[test]
fn cloud_hypervisor_failed_create_still_stores_the_config() {
    let v = Spawn::new("cloud_hypervisor_failed_create_still_stores_the_config").start();
    let mut c = v.client();
    let cfg = json!({"payload": {"kernel": "/k"},
        "serial": {"mode": "File", "file": "/nonexistent-dir/serial.log"}});
    errors_are(
        &c.put_json("vm.create", &cfg),
        500,
        &[
            "Error from API",
            "The VM could not be created",
            "Error creating console devices",
            "Error creating console device",
            "No such file or directory (os error 2)",
        ],
    );
    assert_eq!(state(&mut c), "Created");
    errors_are(
        &c.put("vm.create", Some("{}")),
        500,
        &[
            "Error from API",
            "The VM could not be created",
            "VM is already created",
        ],
    );
    no_content(&c.put("vm.delete", None));
    no_content(&c.put("vm.create", Some("{}")));
}

#[test]
fn cloud_hypervisor_serial_file_is_created_and_truncated_at_create() {
    let v = Spawn::new("cloud_hypervisor_serial_file_is_created_and_truncated_at_create").start();
    let mut c = v.client();
    let serial = v.path("serial.log");
    std::fs::write(&serial, "stale output from an earlier run\n").expect("prefill");
    let fresh = v.path("fresh-serial.log");
    no_content(&c.put_json(
        "vm.create",
        &json!({"payload": {"kernel": "/k"},
            "serial": {"mode": "File", "file": serial},
            "console": {"mode": "File", "file": fresh}}),
    ));
    assert_eq!(
        std::fs::metadata(&serial).expect("serial").len(),
        0,
        "truncated"
    );
    let m = std::fs::metadata(&fresh).expect("console file created at create");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
}

#[test]
fn cloud_hypervisor_pty_serial_reports_its_path() {
    let v = Spawn::new("cloud_hypervisor_pty_serial_reports_its_path").start();
    let mut c = v.client();
    no_content(&c.put_json(
        "vm.create",
        &json!({"payload": {"kernel": "/k"}, "serial": {"mode": "Pty"}, "console": {"mode": "Off"}}),
    ));
    let info = c.get("vm.info").json();
    let path = info["config"]["serial"]["file"]
        .as_str()
        .unwrap_or_default();
    assert!(
        path.starts_with("/dev/pts/"),
        "pty path in vm.info: {path:?}"
    );
    assert!(Path::new(path).exists());
}

#[test]
fn cloud_hypervisor_payload_errors_surface_at_boot() {
    let v = Spawn::new("cloud_hypervisor_payload_errors_surface_at_boot").start();
    let mut c = v.client();
    let base = |kernel: &str| json!({"payload": {"kernel": kernel}, "serial": {"mode": "Null"}, "console": {"mode": "Off"}});
    no_content(&c.put_json("vm.create", &base("/nonexistent/vmlinuz")));
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Cannot open kernel file",
            "No such file or directory (os error 2)",
        ],
    );
    // The VM object exists now (Created): deleting it shuts it down first.
    assert_eq!(state(&mut c), "Created");
    assert!(c.get("vm.info").json()["device_tree"].is_object());
    no_content(&c.put("vm.delete", None));

    let not_a_kernel = v.path("not-a-kernel");
    std::fs::write(&not_a_kernel, "just text\n").expect("write");
    no_content(&c.put_json(
        "vm.create",
        &base(not_a_kernel.to_str().unwrap_or_default()),
    ));
    let r = c.put("vm.boot", None);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.errors()[..3],
        [
            "Error from API",
            "The VM could not boot",
            "Cannot load the kernel into memory"
        ]
    );
    no_content(&c.put("vm.delete", None));

    let missing_initrd = json!({"payload": {"kernel": not_a_kernel, "initramfs": "/nonexistent/initrd"},
        "serial": {"mode": "Null"}, "console": {"mode": "Off"}});
    no_content(&c.put_json("vm.create", &missing_initrd));
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Cannot open initramfs file",
            "No such file or directory (os error 2)",
        ],
    );
    events_become(
        &v,
        &[
            "vmm:starting",
            "vm:booting",
            "vm:shutdown",
            "vm:deleted",
            "vm:booting",
            "vm:shutdown",
            "vm:deleted",
            "vm:booting",
        ],
    );
}

#[test]
fn cloud_hypervisor_disk_open_error_surfaces_at_boot() {
    let v = Spawn::new("cloud_hypervisor_disk_open_error_surfaces_at_boot").start();
    let mut c = v.client();
    no_content(&c.put_json(
        "vm.create",
        &json!({"payload": {"kernel": "/k"}, "disks": [{"path": "/nonexistent/disk.raw"}],
            "serial": {"mode": "Null"}, "console": {"mode": "Off"}}),
    ));
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Error from device manager",
            "Cannot open disk path",
            "No such file or directory (os error 2)",
        ],
    );
    let info = c.get("vm.info").json();
    assert_eq!(info["state"], "Created");
    assert_eq!(
        info["device_tree"],
        Value::Null,
        "no VM object after a device error"
    );
    assert_eq!(
        info["config"]["disks"][0]["id"],
        Value::Null,
        "device ids reach the config only when every device was made"
    );
}

#[test]
fn cloud_hypervisor_a_second_boot_after_a_failed_load_kills_the_vmm() {
    let test = "cloud_hypervisor_a_second_boot_after_a_failed_load_kills_the_vmm";
    let mut v = Spawn::new(test).start();
    let mut c = v.client();
    no_content(&c.put_json(
        "vm.create",
        &json!({"payload": {"kernel": "/nonexistent/vmlinuz"}, "serial": {"mode": "Null"},
            "console": {"mode": "Off"}, "memory": {"size": 64u64 << 20}}),
    ));
    assert_eq!(c.put("vm.boot", None).status, 500);
    // The retry "succeeds" (or the VMM dies before answering), then vCPUs run on empty memory.
    match c.request("PUT", "vm.boot", None) {
        Ok(r) => assert_eq!(r.status, 204, "{}", r.text()),
        Err(e) => vmm::notice(test, &format!("the VMM died before answering: {e}")),
    }
    let st = v.wait_exit(T).expect("the VMM dies");
    assert_eq!(st.code(), None, "killed by a signal, not an exit: {st:?}");
    assert!(v.api.exists(), "a dead VMM leaves its socket");
    assert!(v.stderr_text().contains("seccomp"), "{}", v.stderr_text());
}

#[test]
fn cloud_hypervisor_restore_errors() {
    let v = Spawn::new("cloud_hypervisor_restore_errors").start();
    let mut c = v.client();
    let top = [
        "Error from API",
        "The VM could not be restored",
        "Cannot restore VM",
    ];
    let r = c.put(
        "vm.restore",
        Some("{\"source_url\":\"file:///nonexistent-snapshot\"}"),
    );
    errors_are(
        &r,
        500,
        &[
            top[0],
            top[1],
            top[2],
            "Failed to send migratable component snapshot",
            "Destination is not a directory: \"/nonexistent-snapshot\"",
        ],
    );
    let r = c.put("vm.restore", Some("{\"source_url\":\"/tmp\"}"));
    errors_are(
        &r,
        500,
        &[
            top[0],
            top[1],
            top[2],
            "Failed to send migratable component snapshot",
            "Could not extract path from URL: /tmp",
        ],
    );
    let empty = v.path("empty-snapshot");
    std::fs::create_dir(&empty).expect("mkdir");
    let r = c.put_json(
        "vm.restore",
        &json!({"source_url": format!("file://{}", empty.display())}),
    );
    errors_are(
        &r,
        500,
        &[
            top[0],
            top[1],
            top[2],
            "Failed to receive migratable component snapshot",
            "No such file or directory (os error 2)",
        ],
    );
    errors_are(
        &c.put("vm.restore", Some("{}")),
        400,
        &[
            "Failed to deserialize JSON",
            "missing field `source_url` at line 1 column 2",
        ],
    );
    no_content(&c.put("vm.create", Some("{}")));
    errors_are(
        &c.put("vm.restore", Some("{\"source_url\":\"file:///tmp\"}")),
        500,
        &[
            "Error from API",
            "The VM could not be restored",
            "VM is already created",
        ],
    );
}

#[test]
fn cloud_hypervisor_cold_plug_edits_the_stored_config() {
    let v = Spawn::new("cloud_hypervisor_cold_plug_edits_the_stored_config").start();
    let mut c = v.client();
    errors_are(
        &c.put("vm.add-disk", Some("{\"path\":\"/x\"}")),
        500,
        &[
            "Error from API",
            "The disk could not be added to the VM",
            "VM is not created",
        ],
    );
    no_content(&c.put("vm.create", Some("{\"payload\":{\"kernel\":\"/k\"}}")));
    no_content(&c.put("vm.add-disk", Some("{\"path\":\"/x\",\"id\":\"extra\"}")));
    no_content(&c.put("vm.add-net", Some("{\"tap\":\"t9\",\"id\":\"n9\"}")));
    let cfg = c.get("vm.info").json()["config"].clone();
    assert_eq!(cfg["disks"][0]["id"], "extra");
    assert_eq!(cfg["net"][0]["tap"], "t9");
    no_content(&c.put("vm.remove-device", Some("{\"id\":\"extra\"}")));
    errors_are(
        &c.put("vm.remove-device", Some("{\"id\":\"extra\"}")),
        500,
        &[
            "Error from API",
            "The device could not be removed from the VM",
            "No device with id \"extra\" to remove",
        ],
    );
    no_content(&c.put(
        "vm.resize",
        Some("{\"desired_vcpus\":2,\"desired_ram\":268435456}"),
    ));
    let cfg = c.get("vm.info").json()["config"].clone();
    assert_eq!(cfg["cpus"]["boot_vcpus"], 2);
    assert_eq!(cfg["memory"]["size"], 268435456u64);
    assert_eq!(cfg["disks"].as_array().map(Vec::len), Some(0));
}

// --- with a guest kernel -------------------------------------------------------------------

#[test]
fn cloud_hypervisor_lifecycle_state_machine() {
    let test = "cloud_hypervisor_lifecycle_state_machine";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let mut v = Spawn::new(test).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "")));
    assert_eq!(state(&mut c), "Created");
    no_content(&c.put("vm.boot", None));
    assert_eq!(state(&mut c), "Running");
    let info = c.get("vm.info").json();
    assert_eq!(info["config"]["disks"][0]["id"], "_disk0");
    assert_eq!(
        info["device_tree"]["_disk0"]["parent"],
        "_virtio-pci-_disk0"
    );
    assert_eq!(
        info["device_tree"]["_virtio-pci-_disk0"]["pci_bdf"],
        "0000:00:01.0"
    );
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "invalid VM state transition: Running to Running",
        ],
    );
    errors_are(
        &c.put("vm.resume", None),
        500,
        &[
            "Error from API",
            "The VM could not resume",
            "Cannot resume VM",
            "Failed to resume migratable component",
            "Invalid transition: InvalidStateTransition(Running, Running)",
        ],
    );
    no_content(&c.put("vm.pause", None));
    assert_eq!(state(&mut c), "Paused");
    errors_are(
        &c.put("vm.pause", None),
        500,
        &[
            "Error from API",
            "The VM could not be paused",
            "Cannot pause VM",
            "Failed to pause migratable component",
            "Invalid transition: InvalidStateTransition(Paused, Paused)",
        ],
    );
    // vm.boot on a paused VM resumes it.
    no_content(&c.put("vm.boot", None));
    assert_eq!(state(&mut c), "Running");
    no_content(&c.put("vm.pause", None));
    no_content(&c.put("vm.resume", None));
    let counters = c.get("vm.counters");
    assert_eq!(counters.status, 200);
    assert!(counters.json()["_disk0"]["read_bytes"].is_u64());
    no_content(&c.put("vm.power-button", None));
    no_content(&c.put("vm.shutdown", None));
    let info = c.get("vm.info").json();
    assert_eq!(
        info["state"], "Created",
        "after vm.shutdown the config stays"
    );
    assert_eq!(info["device_tree"], Value::Null);
    errors_are(
        &c.put("vm.shutdown", None),
        500,
        &[
            "Error from API",
            "The VM could not shutdown",
            "VM is not running",
        ],
    );
    no_content(&c.put("vm.boot", None));
    assert_eq!(state(&mut c), "Running");
    no_content(&c.put("vm.delete", None));
    assert_eq!(c.get("vm.info").status, 500);
    let expected = [
        "vmm:starting",
        "vm:booting",
        "vm:booted",
        "vm:booting",
        "vm:resuming",
        "vm:pausing",
        "vm:paused",
        "vm:pausing",
        "vm:booting",
        "vm:resuming",
        "vm:resumed",
        "vm:booted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:shutdown",
        "vm:booting",
        "vm:booted",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    events_become(&v, &expected[..expected.len() - 1]);
    let r = c.put("vmm.shutdown", None);
    assert_eq!(r.status, 200, "vmm.shutdown: {}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(v.wait_exit(T).and_then(|s| s.code()), Some(0));
    events_at_exit(&v, &expected, expected.len() - 1);
}

#[test]
fn cloud_hypervisor_vm_reboot_keeps_running_and_truncates_serial() {
    let test = "cloud_hypervisor_vm_reboot_keeps_running_and_truncates_serial";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let v = Spawn::new(test).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "")));
    no_content(&c.put("vm.boot", None));
    let serial = v.path("serial.log");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&serial)
            .expect("serial");
        f.write_all(b"MARKER-BEFORE-REBOOT\n").expect("write");
    }
    no_content(&c.put("vm.reboot", None));
    assert_eq!(state(&mut c), "Running");
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        !text.contains("MARKER-BEFORE-REBOOT"),
        "reboot truncates the serial file"
    );
    assert!(
        wait_until(T, || vm_events(&v).ends_with(&[
            "vm:rebooting".to_string(),
            "vm:rebooted".to_string()
        ])),
        "{:?}",
        vm_events(&v)
    );
}

#[test]
fn cloud_hypervisor_snapshot_requires_a_paused_vm() {
    let test = "cloud_hypervisor_snapshot_requires_a_paused_vm";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let v = Spawn::new(test).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "")));
    no_content(&c.put("vm.boot", None));
    let dir = v.path("snap");
    std::fs::create_dir(&dir).expect("mkdir");
    let url = json!({"destination_url": format!("file://{}", dir.display())});
    errors_are(
        &c.put_json("vm.snapshot", &url),
        500,
        &[
            "Error from API",
            "The VM could not be snapshotted",
            "Cannot snapshot VM",
            "Failed to snapshot migratable component",
            "Trying to snapshot while VM is running",
        ],
    );
    assert_eq!(
        std::fs::read_dir(&dir).expect("dir").count(),
        0,
        "nothing written"
    );
    assert!(
        wait_until(T, || vm_events(&v).last().map(String::as_str)
            == Some("vm:snapshotting")),
        "{:?}",
        vm_events(&v)
    );
}

#[test]
fn cloud_hypervisor_snapshot_and_restore_or_the_hosts_refusal() {
    let test = "cloud_hypervisor_snapshot_and_restore_or_the_hosts_refusal";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let src = Spawn::new(test).start();
    let mut c = src.client();
    let mut cfg = config(&src, &kernel, "");
    cfg["memory"]["size"] = json!(256u64 << 20);
    no_content(&c.put_json("vm.create", &cfg));
    no_content(&c.put("vm.boot", None));
    no_content(&c.put("vm.pause", None));
    let dir = src.path("snap");
    std::fs::create_dir(&dir).expect("mkdir");
    let url = json!({"destination_url": format!("file://{}", dir.display())});
    let r = c.put_json("vm.snapshot", &url);
    if r.status == 500 {
        // This host's PVM kvm cannot hand out nested vCPU state: the only acceptable failure.
        errors_start(
            &r,
            500,
            &[
                "Error from API",
                "The VM could not be snapshotted",
                "Cannot snapshot VM",
                "Failed to snapshot migratable component",
            ],
            "GetNestedState(Invalid argument (os error 22)",
        );
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0);
        assert_eq!(
            state(&mut c),
            "Paused",
            "the VM survives a refused snapshot"
        );
        vmm::notice(
            test,
            "this host refused vm.snapshot with GetNestedState (PVM); restore not exercised",
        );
        return;
    }
    no_content(&r);
    for f in ["config.json", "state.json"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    assert_eq!(
        std::fs::metadata(dir.join("memory-ranges"))
            .expect("memory-ranges")
            .len(),
        256 << 20,
        "guest RAM in memory-ranges"
    );
    let saved: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("read"))
            .expect("config.json is a VmConfig");
    assert_eq!(saved["memory"]["size"], 256u64 << 20);
    // The directory must be free of an earlier snapshot.
    let again = c.put_json("vm.snapshot", &url);
    assert_eq!(again.status, 500);
    assert_eq!(
        again.errors().last().map(String::as_str),
        Some("File exists (os error 17)")
    );
    // Restore needs a fresh VMM; the source's disk lock must go first.
    no_content(&c.put("vm.delete", None));
    let dst = Spawn::new(test).start();
    let mut d = dst.client();
    let t0 = Instant::now();
    no_content(&d.put_json(
        "vm.restore",
        &json!({"source_url": format!("file://{}", dir.display()), "prefault": false}),
    ));
    vmm::notice(
        test,
        &format!("restore of a 256 MiB VM took {:?}", t0.elapsed()),
    );
    assert_eq!(state(&mut d), "Paused");
    no_content(&d.put("vm.resume", None));
    assert_eq!(state(&mut d), "Running");
    events_become(
        &dst,
        &[
            "vmm:starting",
            "vm:restoring",
            "vm:restored",
            "vm:resuming",
            "vm:resumed",
        ],
    );
    errors_are(
        &d.put_json(
            "vm.restore",
            &json!({"source_url": format!("file://{}", dir.display())}),
        ),
        500,
        &[
            "Error from API",
            "The VM could not be restored",
            "VM is already created",
        ],
    );
}

#[test]
fn cloud_hypervisor_standin_pvm_knob_mimics_this_hosts_snapshot_failure() {
    let test = "cloud_hypervisor_standin_pvm_knob_mimics_this_hosts_snapshot_failure";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let s = Spawn::new(test).env("CHV_STANDIN_PVM", "1");
    if !standin_only(test, &s) {
        return;
    }
    let v = s.start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "standin.exit=3")));
    no_content(&c.put("vm.boot", None));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        state(&mut c),
        "Running",
        "a PVM guest spins instead of exiting"
    );
    assert_eq!(
        std::fs::metadata(v.path("serial.log"))
            .map(|m| m.len())
            .unwrap_or(1),
        0,
        "and prints nothing"
    );
    no_content(&c.put("vm.pause", None));
    let dir = v.path("snap");
    std::fs::create_dir(&dir).expect("mkdir");
    let r = c.put_json(
        "vm.snapshot",
        &json!({"destination_url": format!("file://{}", dir.display())}),
    );
    errors_start(
        &r,
        500,
        &[
            "Error from API",
            "The VM could not be snapshotted",
            "Cannot snapshot VM",
            "Failed to snapshot migratable component",
        ],
        "GetNestedState(Invalid argument (os error 22)",
    );
}

#[test]
fn cloud_hypervisor_disk_lock_keeps_a_second_vmm_off_the_image() {
    let test = "cloud_hypervisor_disk_lock_keeps_a_second_vmm_off_the_image";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let _heavy = vmm::heavy_lock();
    let a = Spawn::new(test).start();
    let b = Spawn::new(test).start();
    let mut ca = a.client();
    let mut cb = b.client();
    let cfg_a = config(&a, &kernel, "");
    let mut cfg_b = config(&b, &kernel, "");
    cfg_b["disks"] = cfg_a["disks"].clone();
    let disk = cfg_a["disks"][0]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    no_content(&ca.put_json("vm.create", &cfg_a));
    no_content(&ca.put("vm.boot", None));
    no_content(&cb.put_json("vm.create", &cfg_b));
    let lock_err = [
        "Error from API".to_string(),
        "The VM could not boot".into(),
        "Error locking disk images: Another instance likely holds a lock".into(),
        "Cannot lock images of all block devices".into(),
        format!("Failed to get Write lock for disk image: {disk}"),
        "The file is already locked".into(),
    ];
    let r = cb.put("vm.boot", None);
    assert_eq!(r.status, 500);
    assert_eq!(r.errors(), lock_err);
    assert_eq!(state(&mut cb), "Created");
    // The lock goes with the VM; the load result was never consumed, so a retry boots.
    no_content(&ca.put("vm.shutdown", None));
    no_content(&cb.put("vm.boot", None));
    assert_eq!(state(&mut cb), "Running");
    no_content(&cb.put("vm.delete", None));

    // Read-only images take a shared lock: many VMMs may use them.
    let mut ro_a = cfg_a.clone();
    ro_a["disks"][0]["readonly"] = json!(true);
    let mut ro_b = cfg_b.clone();
    ro_b["disks"][0]["readonly"] = json!(true);
    no_content(&ca.put("vm.delete", None));
    no_content(&ca.put_json("vm.create", &ro_a));
    no_content(&cb.put_json("vm.create", &ro_b));
    no_content(&ca.put("vm.boot", None));
    no_content(&cb.put("vm.boot", None));
    assert_eq!(state(&mut ca), "Running");
    assert_eq!(state(&mut cb), "Running");
}

#[test]
fn cloud_hypervisor_command_line_payload_boots_at_once() {
    let test = "cloud_hypervisor_command_line_payload_boots_at_once";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = sparse_file(&dir.path().join("disk.raw"), 16);
    let serial = dir.path().join("serial.log");
    let mut v = Spawn::new(test)
        .args([
            "--kernel".to_string(),
            kernel.display().to_string(),
            "--cmdline".into(),
            "console=ttyS0 root=/dev/vda rw".into(),
            "--disk".into(),
            format!("path={}", disk.display()),
            "--cpus".into(),
            "boot=1".into(),
            "--memory".into(),
            "size=128M".into(),
            "--serial".into(),
            format!("file={}", serial.display()),
            "--console".into(),
            "off".into(),
        ])
        .start();
    assert!(
        v.wait_event("vm:booted", T),
        "booted: {:?}",
        v.event_names()
    );
    let mut c = v.client();
    let info = c.get("vm.info").json();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    assert_eq!(info["config"]["serial"]["mode"], "File");
    assert!(serial.exists());
    v.signal(libc::SIGTERM);
    assert_eq!(v.wait_exit(T).and_then(|s| s.code()), Some(0));
    events_at_exit(
        &v,
        &[
            "vmm:starting",
            "vm:booting",
            "vm:booted",
            "vm:shutdown",
            "vm:deleted",
            "vmm:shutdown",
        ],
        3,
    );
}

#[test]
fn cloud_hypervisor_command_line_boot_failure_exits_1() {
    let test = "cloud_hypervisor_command_line_boot_failure_exits_1";
    let mut v = Spawn::new(test)
        .args(["--kernel", "/nonexistent/vmlinuz", "--console", "off"])
        .start_no_wait();
    let st = v.wait_exit(T).expect("gives up");
    assert_eq!(st.code(), Some(1));
    let err = v.stderr_text();
    for needle in [
        "Error: Cloud Hypervisor exited with the following chain of errors:",
        "0: Error booting VM",
        "1: The VM could not boot",
        "2: Cannot open kernel file",
    ] {
        assert!(err.contains(needle), "{needle:?} in stderr:\n{err}");
    }
    assert!(v.api.exists(), "an error exit leaves the socket");
}

#[test]
fn cloud_hypervisor_hotplug_disk_into_a_running_vm() {
    let test = "cloud_hypervisor_hotplug_disk_into_a_running_vm";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let v = Spawn::new(test).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "")));
    no_content(&c.put("vm.boot", None));
    let extra = sparse_file(&v.path("extra.raw"), 4);
    let r = c.put_json("vm.add-disk", &json!({"path": extra}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let id = j["id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("_disk"), "{j}");
    assert!(
        j["bdf"].as_str().is_some_and(|b| b.starts_with("0000:00:")),
        "{j}"
    );
    let info = c.get("vm.info").json();
    assert!(info["device_tree"].get(&id).is_some());
    no_content(&c.put_json("vm.remove-device", &json!({"id": id})));
    errors_are(
        &c.put_json("vm.remove-device", &json!({"id": "nope"})),
        500,
        &[
            "Error from API",
            "The device could not be removed from the VM",
            "Error from device manager",
            "Failed to find device corresponding to the given identifier",
        ],
    );
    errors_are(
        &c.put_json("vm.resize", &json!({"desired_vcpus": 4})),
        500,
        &[
            "Error from API",
            "The VM could not be resized",
            "Error from CPU manager",
            "Requested vCPUs exceed maximum",
        ],
    );
}

// --- networking (own namespace, root) -----------------------------------------------------

fn link(ns: &common::NetNs, tap: &str) -> Option<String> {
    let out = ns.sh(&format!("ip -d link show dev {tap}"));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn net_config(v: &Vmm, kernel: &Path, tap: &str) -> Value {
    let mut cfg = config(v, kernel, "");
    cfg["net"] = json!([{"tap": tap, "mac": "02:c0:ff:ee:00:01"}]);
    cfg
}

#[test]
fn cloud_hypervisor_network_tap_made_by_the_vmm_lives_with_the_vm() {
    let test = "cloud_hypervisor_network_tap_made_by_the_vmm_lives_with_the_vm";
    if !common::require(test, true, &["ip"]) {
        return;
    }
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let ns = common::NetNs::new("tapv");
    let tap = common::unique("tv");
    let v = Spawn::new(test).netns(&ns.name).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &net_config(&v, &kernel, &tap)));
    assert!(link(&ns, &tap).is_none(), "vm.create opens no TAP");
    no_content(&c.put("vm.boot", None));
    let l = link(&ns, &tap).expect("TAP created at boot");
    assert!(l.contains("UP,LOWER_UP"), "up with carrier: {l}");
    assert!(l.contains("vnet_hdr on") && l.contains("pi off"), "{l}");
    assert!(l.contains("persist off"), "non-persistent: {l}");
    let info = c.get("vm.info").json();
    let net = &info["config"]["net"][0];
    assert_eq!(net["id"], "_net1");
    assert_eq!(net["mac"], "02:c0:ff:ee:00:01");
    let host_mac = net["host_mac"].as_str().unwrap_or_default().to_string();
    assert!(
        l.contains(&format!("link/ether {host_mac}")),
        "{host_mac} in {l}"
    );
    no_content(&c.put("vm.shutdown", None));
    assert!(
        wait_until(T, || link(&ns, &tap).is_none()),
        "TAP gone with the VM"
    );
    no_content(&c.put("vm.boot", None));
    let l = link(&ns, &tap).expect("recreated at the next boot");
    assert!(
        l.contains(&format!("link/ether {host_mac}")),
        "same host MAC: {l}"
    );
}

#[test]
fn cloud_hypervisor_network_persistent_tap_is_reused_and_released() {
    let test = "cloud_hypervisor_network_persistent_tap_is_reused_and_released";
    if !common::require(test, true, &["ip"]) {
        return;
    }
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let ns = common::NetNs::new("tapp");
    let tap = common::unique("tp");
    ns.sh_ok(&format!(
        "ip tuntap add dev {tap} mode tap && ip link set {tap} up"
    ));
    assert!(link(&ns, &tap).unwrap_or_default().contains("NO-CARRIER"));
    let v = Spawn::new(test).netns(&ns.name).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &net_config(&v, &kernel, &tap)));
    no_content(&c.put("vm.boot", None));
    let l = link(&ns, &tap).expect("tap");
    assert!(
        l.contains("LOWER_UP") && !l.contains("NO-CARRIER"),
        "carrier while held: {l}"
    );
    assert!(l.contains("persist on") && l.contains("vnet_hdr on"), "{l}");
    assert!(
        v.stderr_text().contains("already exists"),
        "{}",
        v.stderr_text()
    );
    no_content(&c.put("vm.shutdown", None));
    let l = link(&ns, &tap).expect("persistent TAP survives the VM");
    assert!(l.contains("NO-CARRIER"), "released: {l}");
}

#[test]
fn cloud_hypervisor_network_tap_held_by_another_vmm_is_ebusy() {
    let test = "cloud_hypervisor_network_tap_held_by_another_vmm_is_ebusy";
    if !common::require(test, true, &["ip"]) {
        return;
    }
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let _heavy = vmm::heavy_lock();
    let ns = common::NetNs::new("tapb");
    let tap = common::unique("tb");
    let a = Spawn::new(test).netns(&ns.name).start();
    let b = Spawn::new(test).netns(&ns.name).start();
    let mut ca = a.client();
    let mut cb = b.client();
    no_content(&ca.put_json("vm.create", &net_config(&a, &kernel, &tap)));
    no_content(&ca.put("vm.boot", None));
    no_content(&cb.put_json("vm.create", &net_config(&b, &kernel, &tap)));
    errors_are(
        &cb.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Error from device manager",
            "Cannot create virtio-net device",
            "Failed to open taps",
            "Open tap device failed",
            "Unable to configure tap interface",
            "Device or resource busy (os error 16)",
        ],
    );
    let info = cb.get("vm.info").json();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["device_tree"], Value::Null);
}

#[test]
fn cloud_hypervisor_network_multiqueue_tap_is_refused() {
    let test = "cloud_hypervisor_network_multiqueue_tap_is_refused";
    if !common::require(test, true, &["ip"]) {
        return;
    }
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let ns = common::NetNs::new("tapm");
    let tap = common::unique("tm");
    ns.sh_ok(&format!("ip tuntap add dev {tap} mode tap multi_queue"));
    let v = Spawn::new(test).netns(&ns.name).start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &net_config(&v, &kernel, &tap)));
    errors_are(
        &c.put("vm.boot", None),
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Error from device manager",
            "Cannot create virtio-net device",
            "Failed to open taps",
            "Error related to the multiqueue support (no support device side)",
        ],
    );
}

#[test]
fn cloud_hypervisor_network_restore_reopens_the_tap() {
    let test = "cloud_hypervisor_network_restore_reopens_the_tap";
    if !common::require(test, true, &["ip"]) {
        return;
    }
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let ns = common::NetNs::new("tapr");
    let tap = common::unique("tr");
    ns.sh_ok(&format!(
        "ip tuntap add dev {tap} mode tap && ip link set {tap} up"
    ));
    let src = Spawn::new(test).snapshot_capable().netns(&ns.name).start();
    let mut c = src.client();
    no_content(&c.put_json("vm.create", &net_config(&src, &kernel, &tap)));
    no_content(&c.put("vm.boot", None));
    no_content(&c.put("vm.pause", None));
    let dir = src.path("snap");
    std::fs::create_dir(&dir).expect("mkdir");
    let r = c.put_json(
        "vm.snapshot",
        &json!({"destination_url": format!("file://{}", dir.display())}),
    );
    if r.status != 204 {
        assert!(r.text().contains("GetNestedState"), "{}", r.text());
        common::skip(
            test,
            "this host refuses vm.snapshot (PVM: GetNestedState), so there is nothing to restore",
        );
        return;
    }
    let restore = json!({"source_url": format!("file://{}", dir.display())});
    // The source still holds the TAP: the restore fails, and cleans up after itself.
    let dst = Spawn::new(test).snapshot_capable().netns(&ns.name).start();
    let mut d = dst.client();
    let r = d.put_json("vm.restore", &restore);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.errors().last().map(String::as_str),
        Some("Device or resource busy (os error 16)")
    );
    assert_eq!(
        d.get("vm.info").status,
        500,
        "a failed restore leaves no VM"
    );
    no_content(&c.put("vm.delete", None));
    no_content(&d.put_json("vm.restore", &restore));
    assert_eq!(state(&mut d), "Paused");
    let info = d.get("vm.info").json();
    assert_eq!(info["config"]["net"][0]["mac"], "02:c0:ff:ee:00:01");
    no_content(&d.put("vm.resume", None));
    let l = link(&ns, &tap).expect("tap");
    assert!(l.contains("LOWER_UP") && !l.contains("NO-CARRIER"), "{l}");
}

// --- stand-in guest hooks --------------------------------------------------------------------

#[test]
fn cloud_hypervisor_standin_exit_hook_powers_off() {
    let test = "cloud_hypervisor_standin_exit_hook_powers_off";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let s = Spawn::new(test);
    if !standin_only(test, &s) {
        return;
    }
    let mut v = s.start();
    let mut c = v.client();
    no_content(&c.put_json("vm.create", &config(&v, &kernel, "standin.exit=7")));
    no_content(&c.put("vm.boot", None));
    let st = v.wait_exit(T).expect("a guest power-off ends the VMM");
    assert_eq!(st.code(), Some(0));
    assert!(!v.api.exists(), "socket removed");
    let serial = std::fs::read_to_string(v.path("serial.log")).expect("serial");
    assert!(serial.contains("CHVKIT_EXIT=7\r\n"), "{serial}");
    assert!(serial.contains("Run /init as init process"), "{serial}");
    let expected = [
        "vmm:starting",
        "vm:booting",
        "vm:booted",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    events_at_exit(&v, &expected, 3);
    assert!(v
        .events()
        .iter()
        .any(|e| e.source == "virtio-device" && e.properties["id"] == "_disk0"));
}

#[test]
fn cloud_hypervisor_standin_reboot_hook_loops_in_process() {
    let test = "cloud_hypervisor_standin_reboot_hook_loops_in_process";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let s = Spawn::new(test);
    if !standin_only(test, &s) {
        return;
    }
    let mut v = s.start();
    let mut c = v.client();
    no_content(&c.put_json(
        "vm.create",
        &config(&v, &kernel, "standin.reboot standin.delay=50"),
    ));
    no_content(&c.put("vm.boot", None));
    assert!(
        wait_until(T, || v
            .event_names()
            .iter()
            .filter(|e| *e == "vm:rebooted")
            .count()
            >= 3),
        "a boot loop: {:?}",
        v.event_names()
    );
    assert!(
        v.wait_exit(Duration::from_millis(10)).is_none(),
        "VMM keeps running"
    );
    assert_eq!(state(&mut c), "Running");
}

#[test]
fn cloud_hypervisor_standin_panic_hook_needs_pvpanic() {
    let test = "cloud_hypervisor_standin_panic_hook_needs_pvpanic";
    let Some(kernel) = need_kernel(test) else {
        return;
    };
    let s = Spawn::new(test);
    if !standin_only(test, &s) {
        return;
    }
    let v = s.start();
    let mut c = v.client();
    let mut cfg = config(&v, &kernel, "standin.panic");
    cfg["pvpanic"] = json!(true);
    no_content(&c.put_json("vm.create", &cfg));
    no_content(&c.put("vm.boot", None));
    assert!(v.wait_event("guest:panic", T), "{:?}", v.event_names());
    let ev = v.events();
    let panic = ev.iter().find(|e| e.source == "guest").expect("event");
    assert_eq!(panic.properties, json!({"event": "panic"}));
    assert_eq!(
        state(&mut c),
        "Running",
        "no panic=N: the guest hangs, the VM stays"
    );
    no_content(&c.put("vm.delete", None));

    // Without a pvpanic device nobody hears the panic.
    cfg["pvpanic"] = json!(false);
    no_content(&c.put_json("vm.create", &cfg));
    no_content(&c.put("vm.boot", None));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        v.events().iter().filter(|e| e.source == "guest").count(),
        1,
        "no second panic event"
    );
    let serial = std::fs::read_to_string(v.path("serial.log")).unwrap_or_default();
    assert!(serial.contains("Kernel panic"), "{serial}");
}
