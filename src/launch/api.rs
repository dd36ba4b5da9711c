//! A small HTTP/1.1 client for Cloud Hypervisor's REST API on its Unix socket.
//!
//! What v50 actually does on the wire (facts §2), which shapes this client: keep-alive
//! connections; `Content-Length` on every request (chunked bodies get 400) and `0` on body-less
//! actions (any body there, even `{}`, gets 400); 200 with a body or 204 without; every
//! wrong-state or device error is 500 with a JSON array of strings, outermost cause first. One
//! VMM thread serves every request, so a long snapshot blocks `vmm.ping`: calls get 1 s
//! timeouts (as Kata's), except snapshot and restore, and create and boot (see
//! [`BOOT_TIMEOUT`]). Nothing here retries: a failed `vm.boot` must never be
//! sent again (a second boot after a failed one ran vCPUs on empty memory).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Default per-call timeout (Kata uses the same).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// `vm.create` and `vm.boot` allocate guest memory and load the kernel: with 32 guests spinning
/// on 2 cores (measured here with the real VMM) a boot took over a second. A boot that times out
/// cannot be retried anyway, so it gets more room than the 1 s of everything else.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshot and restore copy guest memory: their time grows with RAM.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to the VMM API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action}: no answer from the VMM within {}ms", timeout.as_millis())]
    Timeout { action: String, timeout: Duration },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("{action}: malformed HTTP response: {detail}")]
    Protocol { action: String, detail: String },
    /// The VMM refused: `chain` is its error body, outermost cause first.
    #[error("{action} failed (HTTP {status}): {}", chain.join(": "))]
    Vmm {
        action: String,
        status: u16,
        chain: Vec<String>,
    },
}

impl ApiError {
    /// The VMM's own message chain, when it answered with one.
    pub fn chain(&self) -> Option<&[String]> {
        match self {
            ApiError::Vmm { chain, .. } => Some(chain),
            _ => None,
        }
    }
}

/// `vmm.ping`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Ping {
    #[serde(default)]
    pub build_version: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub features: Vec<String>,
}

fn io_error(action: &str, timeout: Duration, source: io::Error) -> ApiError {
    if matches!(
        source.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        ApiError::Timeout {
            action: action.to_string(),
            timeout,
        }
    } else {
        ApiError::Io {
            action: action.to_string(),
            source,
        }
    }
}

/// A connection to one VMM's API socket.
pub struct Client {
    path: PathBuf,
    stream: Option<UnixStream>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_path_buf(),
            stream: None,
            buf: Vec::new(),
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    fn connect(&mut self) -> Result<&mut UnixStream, ApiError> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.path).map_err(|source| ApiError::Connect {
                path: self.path.clone(),
                source,
            })?;
            self.stream = Some(s);
            self.buf.clear();
        }
        // Just set above when it was None.
        self.stream.as_mut().ok_or_else(|| ApiError::Connect {
            path: self.path.clone(),
            source: io::Error::other("no connection"),
        })
    }

    /// One request/response exchange. Returns (status, body).
    pub fn call(
        &mut self,
        method: &str,
        action: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let deadline = Instant::now() + timeout;
        let r = self
            .write_request(method, action, body, timeout)
            .and_then(|()| self.read_response(action, deadline, timeout));
        if r.is_err() {
            // A timed-out or broken exchange leaves the stream in an unknown place.
            self.stream = None;
        }
        let (status, body) = r?;
        if status >= 300 {
            let chain = serde_json::from_slice::<Vec<String>>(&body).unwrap_or_else(|_| {
                let text = String::from_utf8_lossy(&body).trim().to_string();
                if text.is_empty() {
                    vec![format!("HTTP {status} with no body")]
                } else {
                    vec![text]
                }
            });
            return Err(ApiError::Vmm {
                action: action.to_string(),
                status,
                chain: chain.into_iter().map(strip_backtrace).collect(),
            });
        }
        Ok((status, body))
    }

    fn write_request(
        &mut self,
        method: &str,
        action: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let body = body.unwrap_or(&[]);
        let mut req = format!(
            "{method} /api/v1/{action} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(body);
        let stream = self.connect()?;
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.write_all(&msg))
            .map_err(|e| io_error(action, timeout, e))
    }

    fn read_response(
        &mut self,
        action: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = loop {
            // Parse what we have.
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(hlen)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut clen: Option<usize> = None;
                    let mut chunked = false;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            clen = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = true;
                        }
                    }
                    if chunked {
                        break Err(ApiError::Protocol {
                            action: action.to_string(),
                            detail: "chunked responses are not expected from the VMM".into(),
                        });
                    }
                    // micro-http omits Content-Length on body-less answers.
                    let clen = clen.unwrap_or(0);
                    if buf.len() >= hlen + clen {
                        let body = buf[hlen..hlen + clen].to_vec();
                        buf.drain(..hlen + clen);
                        break Ok((status, body));
                    }
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    break Err(ApiError::Protocol {
                        action: action.to_string(),
                        detail: e.to_string(),
                    })
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ApiError::Timeout {
                    action: action.to_string(),
                    timeout,
                });
            }
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => {
                    break Err(ApiError::Protocol {
                        action: action.to_string(),
                        detail: "connection lost".into(),
                    })
                }
            };
            if let Err(e) = stream.set_read_timeout(Some(left)) {
                break Err(io_error(action, timeout, e));
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => {
                    break Err(ApiError::Io {
                        action: action.to_string(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the VMM closed the connection (did it exit?)",
                        ),
                    })
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(io_error(action, timeout, e)),
            }
        };
        self.buf = buf;
        result
    }

    fn put_empty(&mut self, action: &str) -> Result<(), ApiError> {
        self.call("PUT", action, None, CALL_TIMEOUT).map(|_| ())
    }

    fn put_json(
        &mut self,
        action: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Vec<u8>, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Protocol {
            action: action.to_string(),
            detail: e.to_string(),
        })?;
        self.call("PUT", action, Some(&bytes), timeout).map(|r| r.1)
    }

    pub fn ping(&mut self) -> Result<Ping, ApiError> {
        self.ping_within(CALL_TIMEOUT)
    }

    /// `vmm.ping` with room for a VMM that is still starting (its socket was bound for it).
    pub fn ping_within(&mut self, timeout: Duration) -> Result<Ping, ApiError> {
        let (_, body) = self.call("GET", "vmm.ping", None, timeout)?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Protocol {
            action: "vmm.ping".into(),
            detail: e.to_string(),
        })
    }

    /// `vm.create`; its [`BOOT_TIMEOUT`] also covers a VMM still starting (launch sends it as
    /// the first request to the pre-bound socket).
    pub fn create(&mut self, config: &serde_json::Value) -> Result<(), ApiError> {
        self.put_json("vm.create", config, BOOT_TIMEOUT).map(|_| ())
    }

    pub fn boot(&mut self) -> Result<(), ApiError> {
        self.call("PUT", "vm.boot", None, BOOT_TIMEOUT).map(|_| ())
    }

    pub fn pause(&mut self) -> Result<(), ApiError> {
        self.put_empty("vm.pause")
    }

    pub fn resume(&mut self) -> Result<(), ApiError> {
        self.put_empty("vm.resume")
    }

    pub fn shutdown(&mut self) -> Result<(), ApiError> {
        self.put_empty("vm.shutdown")
    }

    pub fn delete(&mut self) -> Result<(), ApiError> {
        self.put_empty("vm.delete")
    }

    pub fn power_button(&mut self) -> Result<(), ApiError> {
        self.put_empty("vm.power-button")
    }

    pub fn vmm_shutdown(&mut self) -> Result<(), ApiError> {
        self.put_empty("vmm.shutdown")
    }

    /// `vm.info` as raw JSON (its schema grows between releases).
    pub fn info(&mut self) -> Result<serde_json::Value, ApiError> {
        let (_, body) = self.call("GET", "vm.info", None, CALL_TIMEOUT)?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Protocol {
            action: "vm.info".into(),
            detail: e.to_string(),
        })
    }

    /// The VM state from `vm.info` (`Created`, `Running`, `Paused`, `Shutdown`).
    pub fn state(&mut self) -> Result<String, ApiError> {
        let info = self.info()?;
        Ok(info
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown")
            .to_string())
    }

    pub fn snapshot(&mut self, dir: &Path) -> Result<(), ApiError> {
        let body = serde_json::json!({ "destination_url": file_url(dir) });
        self.put_json("vm.snapshot", &body, LONG_TIMEOUT)
            .map(|_| ())
    }

    pub fn restore(&mut self, dir: &Path) -> Result<(), ApiError> {
        let body = serde_json::json!({ "source_url": file_url(dir), "prefault": false });
        self.put_json("vm.restore", &body, LONG_TIMEOUT).map(|_| ())
    }
}

/// Some v50 messages embed an anyhow backtrace ("...\n\nStack backtrace:\n   0: <unknown>...");
/// it names no frames in a release build and buries the cause, so it is cut.
fn strip_backtrace(m: String) -> String {
    match m.find("\n\nStack backtrace:") {
        Some(i) => {
            let mut s = m[..i].trim_end().to_string();
            // The backtrace sat inside the message's last parenthesis.
            let opens = s.matches('(').count();
            let closes = s.matches(')').count();
            for _ in closes..opens {
                s.push(')');
            }
            s
        }
        None => m,
    }
}

/// `file://` + absolute path, as snapshot and restore want it.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted server: for each connection, reads requests and answers with canned replies,
    /// recording what it received.
    fn serve(
        replies: Vec<String>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api.sock");
        let l = UnixListener::bind(&p).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            for reply in replies {
                // Read one request: headers + Content-Length body.
                loop {
                    let mut hs = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut hs);
                    if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                        let cl: usize = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                            .expect("client always sends Content-Length");
                        if buf.len() >= n + cl {
                            seen.push(String::from_utf8_lossy(&buf[..n + cl]).into_owned());
                            buf.drain(..n + cl);
                            break;
                        }
                    }
                    let mut c = [0u8; 1024];
                    let k = s.read(&mut c).unwrap();
                    if k == 0 {
                        return seen;
                    }
                    buf.extend_from_slice(&c[..k]);
                }
                if reply.is_empty() {
                    // Say nothing, keep the connection open: the client must time out.
                    std::thread::sleep(Duration::from_millis(1500));
                } else {
                    s.write_all(reply.as_bytes()).unwrap();
                }
            }
            seen
        });
        (d, p, h)
    }

    #[test]
    fn keep_alive_content_length_and_error_chain() {
        let ok = r#"{"build_version":"v50.0","version":"50.0.0"}"#;
        let err = r#"["Error from API","The VM could not boot","invalid VM state transition: Running to Running"]"#;
        let (_d, p, h) = serve(vec![
            format!("HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{ok}", ok.len()),
            "HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n".to_string(),
            format!("HTTP/1.1 500 \r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{err}", err.len()),
        ]);
        let mut c = Client::new(&p);
        assert_eq!(c.ping().unwrap().build_version, "v50.0");
        c.create(&serde_json::json!({"payload":{}})).unwrap();
        let e = c.boot().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("vm.boot failed (HTTP 500): Error from API: The VM could not boot: invalid VM state transition"), "{msg}");
        assert_eq!(e.chain().unwrap().len(), 3);
        let seen = h.join().unwrap();
        assert_eq!(seen.len(), 3, "one connection carried all three");
        assert!(seen[0].starts_with("GET /api/v1/vmm.ping HTTP/1.1\r\n"));
        assert!(seen[0].contains("Content-Length: 0\r\n"));
        assert!(
            seen[1].starts_with("PUT /api/v1/vm.create") && seen[1].ends_with("{\"payload\":{}}")
        );
        assert!(
            seen[2].starts_with("PUT /api/v1/vm.boot")
                && seen[2].ends_with("Content-Length: 0\r\n\r\n")
        );
    }

    #[test]
    fn timeout_is_bounded_and_named() {
        let (_d, p, _h) = serve(vec![String::new()]);
        let mut c = Client::new(&p);
        let t0 = Instant::now();
        let e = c
            .call("GET", "vm.info", None, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, ApiError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("vm.info"));
    }

    #[test]
    fn backtraces_are_cut_from_messages() {
        let m = "Could not get vCPU state GetNestedState(Invalid argument (os error 22)\n\nStack backtrace:\n   0: <unknown>\n   1: <unknown>)".to_string();
        assert_eq!(
            strip_backtrace(m),
            "Could not get vCPU state GetNestedState(Invalid argument (os error 22))"
        );
        assert_eq!(strip_backtrace("plain".into()), "plain");
    }

    #[test]
    fn missing_socket_names_path() {
        let e = Client::new(Path::new("/nonexistent/api.sock"))
            .ping()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/api.sock"), "{e}");
    }
}
