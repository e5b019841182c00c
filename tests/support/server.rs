//! A real HTTP/1.1 server on 127.0.0.1 with fault modes, for integration tests (std only).
//!
//! One thread per connection, `Connection: close` on every response. It serves registered paths
//! with an `ETag`, answers `HEAD`, honours `Range: bytes=N-` / `bytes=N-M` (206 with
//! `Content-Range`, 416 past the end) and `If-Range`, and logs every request per path.
//!
//! ```ignore
//! let server = Server::start();
//! server.add("/bin", body.clone(), Fault::DropAfter(1000));
//! fetch(&client, &server.url("/bin"), ...).await?;
//! assert_eq!(server.requests("/bin")[1].range.as_deref(), Some("bytes=1000-"));
//! ```
#![allow(dead_code)] // each test binary uses a different part of it

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How a path misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Serve it properly.
    None,
    /// On the first request to the path only: announce the full length, send this many body
    /// bytes, then close the connection.
    DropAfter(usize),
    /// Answer every request with 200 and the whole body, whatever `Range` says.
    IgnoreRange,
    /// Answer the first `times` requests with this status, then serve properly.
    FailTimes(u16, usize),
    /// Answer the first `times` requests with `status` and `Retry-After: seconds`, then serve
    /// properly.
    RetryAfter {
        status: u16,
        times: usize,
        seconds: u64,
    },
    /// Always answer with this status.
    Status(u16),
    /// Send the body `chunk` bytes at a time, pausing `delay` before each piece.
    Slow { chunk: usize, delay: Duration },
    /// Answer 302 with this `Location`.
    Redirect(String),
    /// Send no `Content-Length`: the body ends when the connection closes.
    NoLength,
}

/// What the server saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

struct Resource {
    body: Arc<Vec<u8>>,
    fault: Fault,
    etag: String,
}

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
    log: HashMap<String, Vec<RequestLog>>,
}

/// The server; it stops accepting when dropped.
pub struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    thread::spawn(move || {
                        // A client that goes away mid-response is not the server's problem.
                        let _ = handle(stream, &state);
                    });
                }
            })
        };
        Server {
            addr,
            state,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Serve `body` at `path` (replacing what was there: a new body gets a new ETag).
    pub fn add(&self, path: &str, body: Vec<u8>, fault: Fault) {
        let etag = etag(&body);
        self.lock().resources.insert(
            path.to_owned(),
            Resource {
                body: Arc::new(body),
                fault,
                etag,
            },
        );
    }

    /// The ETag the server sends for `path`.
    pub fn etag(&self, path: &str) -> Option<String> {
        self.lock().resources.get(path).map(|r| r.etag.clone())
    }

    /// Requests received for `path` (any method, registered or not).
    pub fn hits(&self, path: &str) -> usize {
        self.lock().log.get(path).map_or(0, Vec::len)
    }

    pub fn requests(&self, path: &str) -> Vec<RequestLog> {
        self.lock().log.get(path).cloned().unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor blocked in accept().
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A strong ETag derived from the content (FNV-1a and length).
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in body {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}-{:x}\"", body.len())
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Read the request line and headers (the requests we serve carry no body).
fn read_request(stream: &TcpStream) -> std::io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let method = method.to_owned();
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if headers.len() > 100 {
            return Ok(None);
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Ok(Some(Request {
        method,
        path,
        headers,
    }))
}

/// `bytes=N-` or `bytes=N-M` against a body of `len` bytes: Ok(start..end) or Err(()) when not
/// satisfiable; None when the header is absent or in a form we do not serve (multi-range, suffix).
fn parse_range(value: Option<&str>, len: usize) -> Option<Result<(usize, usize), ()>> {
    let spec = value?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start: usize = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => len,
        n => n.parse::<usize>().ok()?.saturating_add(1).min(len),
    };
    if start >= len || end <= start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let Some(request) = read_request(&stream)? else {
        return Ok(());
    };
    let range = request.header("range").map(str::to_owned);
    let if_range = request.header("if-range").map(str::to_owned);

    // Log the request and take what is needed to answer it, then let go of the lock.
    let (resource, hits) = {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let log = state.log.entry(request.path.clone()).or_default();
        log.push(RequestLog {
            method: request.method.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
        });
        let hits = log.len();
        let resource = state
            .resources
            .get(&request.path)
            .map(|r| (Arc::clone(&r.body), r.fault.clone(), r.etag.clone()));
        (resource, hits)
    };
    let mut out = Response {
        stream: &stream,
        head_only: request.method == "HEAD",
    };
    let Some((body, fault, etag)) = resource else {
        return out.simple(404, &[]);
    };
    if request.method != "GET" && request.method != "HEAD" {
        return out.simple(405, &[]);
    }
    match &fault {
        Fault::Status(status) => return out.simple(*status, &[]),
        Fault::FailTimes(status, times) if hits <= *times => return out.simple(*status, &[]),
        Fault::RetryAfter {
            status,
            times,
            seconds,
        } if hits <= *times => {
            return out.simple(*status, &[("Retry-After", seconds.to_string())]);
        }
        Fault::Redirect(location) => return out.simple(302, &[("Location", location.clone())]),
        _ => {}
    }

    let honour_range = fault != Fault::IgnoreRange && if_range.as_deref().is_none_or(|v| v == etag);
    let range = if honour_range {
        parse_range(range.as_deref(), body.len())
    } else {
        None
    };
    let (status, start, end) = match range {
        None => (200, 0, body.len()),
        Some(Ok((start, end))) => (206, start, end),
        Some(Err(())) => {
            return out.simple(416, &[("Content-Range", format!("bytes */{}", body.len()))]);
        }
    };

    let mut headers = vec![
        ("ETag", etag),
        ("Accept-Ranges", "bytes".to_owned()),
        ("Content-Type", "application/octet-stream".to_owned()),
    ];
    if fault != Fault::NoLength {
        headers.push(("Content-Length", (end - start).to_string()));
    }
    if status == 206 {
        headers.push((
            "Content-Range",
            format!("bytes {start}-{}/{}", end - 1, body.len()),
        ));
    }
    out.head(status, &headers)?;
    if out.head_only {
        return out.close();
    }
    let body = &body[start..end];
    match fault {
        Fault::DropAfter(n) if hits == 1 => {
            out.stream.write_all(&body[..n.min(body.len())])?;
        }
        Fault::Slow { chunk, delay } => {
            for piece in body.chunks(chunk.max(1)) {
                thread::sleep(delay);
                out.stream.write_all(piece)?;
                out.stream.flush()?;
            }
        }
        _ => out.stream.write_all(body)?,
    }
    out.close()
}

struct Response<'a> {
    stream: &'a TcpStream,
    head_only: bool,
}

impl Response<'_> {
    fn head(&mut self, status: u16, headers: &[(&str, String)]) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
            reason(status)
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())
    }

    /// A status with a one-line text body.
    fn simple(&mut self, status: u16, headers: &[(&str, String)]) -> std::io::Result<()> {
        let body = format!("{status} {}\n", reason(status));
        let mut all = headers.to_vec();
        all.push(("Content-Length", body.len().to_string()));
        all.push(("Content-Type", "text/plain".to_owned()));
        self.head(status, &all)?;
        if !self.head_only {
            self.stream.write_all(body.as_bytes())?;
        }
        self.close()
    }

    fn close(&mut self) -> std::io::Result<()> {
        self.stream.flush()?;
        self.stream.shutdown(Shutdown::Write)
    }
}
