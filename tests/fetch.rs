//! `cvx::apply::fetch` against a real loopback HTTP server with fault modes, and local files.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cvx::apply::fetch::{self, FetchError, FetchOptions, Fetched, NoProgress, Progress};
use cvx::hash::Sha256;
use support::server::{Fault, RequestLog, Server};

fn sha(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish()
}

/// Deterministic, non-repeating-looking bytes.
fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251) as u8) ^ seed)
        .collect()
}

fn opts() -> FetchOptions {
    FetchOptions {
        backoff: Duration::from_millis(10),
        read_timeout: Duration::from_secs(10),
        ..FetchOptions::default()
    }
}

async fn get(
    url: &str,
    expected: &str,
    dir: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, FetchError> {
    let client = fetch::client(opts).unwrap();
    fetch::fetch(&client, url, expected, dir, opts, &NoProgress).await
}

/// The file names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn assert_only_part(dir: &Path, sha: &str) {
    assert_eq!(listing(dir), vec![format!("{sha}.part")]);
}

fn get_request(range: Option<String>, if_range: Option<String>) -> RequestLog {
    RequestLog {
        method: "GET".into(),
        range,
        if_range,
    }
}

/// Leave what an interrupted earlier run would have left.
fn leave_partial(
    dir: &Path,
    sha: &str,
    bytes: &[u8],
    url: &str,
    validator: Option<&str>,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let part = dir.join(format!("{sha}.part"));
    std::fs::write(&part, bytes).unwrap();
    let sidecar = serde_json::json!({ "url": url, "validator": validator });
    std::fs::write(dir.join(format!("{sha}.part.json")), sidecar.to_string()).unwrap();
    part
}

#[derive(Default)]
struct Recorder {
    started: Mutex<Vec<(String, Option<u64>, u64)>>,
    advanced: AtomicU64,
    finished: AtomicUsize,
}

impl Progress for Recorder {
    fn started(&self, url: &str, total: Option<u64>, resumed_from: u64) {
        self.started
            .lock()
            .unwrap()
            .push((url.to_owned(), total, resumed_from));
    }
    fn advanced(&self, bytes: u64) {
        self.advanced.fetch_add(bytes, Ordering::SeqCst);
    }
    fn finished(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn plain_download() {
    let server = Server::start();
    let data = body(300_000, 1);
    server.add("/node", data.clone(), Fault::None);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial"); // created on demand
    let (opts, progress) = (opts(), Recorder::default());
    let client = fetch::client(&opts).unwrap();

    let got = fetch::fetch(
        &client,
        &server.url("/node"),
        &sha(&data),
        &partial,
        &opts,
        &progress,
    )
    .await
    .unwrap();

    assert_eq!(got.path, partial.join(format!("{}.part", sha(&data))));
    assert_eq!((got.size, got.resumed, got.attempts), (300_000, false, 1));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_only_part(&partial, &sha(&data));
    assert_eq!(server.requests("/node"), vec![get_request(None, None)]);
    assert_eq!(
        *progress.started.lock().unwrap(),
        vec![(server.url("/node"), Some(300_000), 0)]
    );
    assert_eq!(progress.advanced.load(Ordering::SeqCst), 300_000);
    assert_eq!(progress.finished.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropped_mid_body_resumes_with_range() {
    let server = Server::start();
    let data = body(500_000, 2);
    server.add("/node", data.clone(), Fault::DropAfter(123_456));
    let dir = tempfile::tempdir().unwrap();
    let progress = Recorder::default();
    let opts = opts();
    let client = fetch::client(&opts).unwrap();

    let got = fetch::fetch(
        &client,
        &server.url("/node"),
        &sha(&data),
        dir.path(),
        &opts,
        &progress,
    )
    .await
    .unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (500_000, true, 2));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_only_part(dir.path(), &sha(&data));
    let etag = server.etag("/node");
    assert_eq!(
        server.requests("/node"),
        vec![
            get_request(None, None),
            get_request(Some("bytes=123456-".into()), etag),
        ]
    );
    let started = progress.started.lock().unwrap().clone();
    assert_eq!(started.len(), 2);
    assert_eq!(started[1].1, Some(500_000));
    assert_eq!(started[1].2, 123_456);
    assert_eq!(progress.advanced.load(Ordering::SeqCst), 500_000);
    assert_eq!(progress.finished.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn partial_from_an_earlier_run_is_resumed() {
    let server = Server::start();
    let data = body(200_000, 3);
    server.add("/node", data.clone(), Fault::None);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    let etag = server.etag("/node").unwrap();
    leave_partial(dir.path(), &sha(&data), &data[..80_000], &url, Some(&etag));

    let got = get(&url, &sha(&data), dir.path(), &opts()).await.unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (200_000, true, 1));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_only_part(dir.path(), &sha(&data));
    assert_eq!(
        server.requests("/node"),
        vec![get_request(Some("bytes=80000-".into()), Some(etag))]
    );
}

#[tokio::test]
async fn partial_without_a_validator_is_resumed_by_range_alone() {
    let server = Server::start();
    let data = body(50_000, 4);
    server.add("/node", data.clone(), Fault::None);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    leave_partial(dir.path(), &sha(&data), &data[..10_000], &url, None);

    let got = get(&url, &sha(&data), dir.path(), &opts()).await.unwrap();

    assert!(got.resumed);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(
        server.requests("/node"),
        vec![get_request(Some("bytes=10000-".into()), None)]
    );
}

#[tokio::test]
async fn partial_of_a_file_changed_upstream_starts_over() {
    let server = Server::start();
    let old = body(60_000, 5);
    let new = body(70_000, 6);
    // The partial holds the start of the old file under the new pin (the manifest was bumped).
    server.add("/node", old.clone(), Fault::None);
    let old_etag = server.etag("/node").unwrap();
    server.add("/node", new.clone(), Fault::None);
    assert_ne!(server.etag("/node").unwrap(), old_etag);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    leave_partial(
        dir.path(),
        &sha(&new),
        &old[..30_000],
        &url,
        Some(&old_etag),
    );

    let got = get(&url, &sha(&new), dir.path(), &opts()).await.unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (70_000, false, 1));
    assert_eq!(std::fs::read(&got.path).unwrap(), new);
    assert_only_part(dir.path(), &sha(&new));
    // If-Range did not match, so the server sent the whole new file in the same response.
    assert_eq!(
        server.requests("/node"),
        vec![get_request(Some("bytes=30000-".into()), Some(old_etag))]
    );
}

#[tokio::test]
async fn partial_from_another_url_starts_over() {
    let server = Server::start();
    let data = body(40_000, 7);
    server.add("/node", data.clone(), Fault::None);
    let dir = tempfile::tempdir().unwrap();
    leave_partial(
        dir.path(),
        &sha(&data),
        &data[..5_000],
        "https://elsewhere.example/node",
        Some("\"x\""),
    );

    let got = get(&server.url("/node"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();

    assert!(!got.resumed);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.requests("/node"), vec![get_request(None, None)]);
}

#[tokio::test]
async fn range_ignored_restarts_and_succeeds() {
    let server = Server::start();
    let data = body(90_000, 8);
    server.add("/node", data.clone(), Fault::IgnoreRange);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    let etag = server.etag("/node").unwrap();
    leave_partial(dir.path(), &sha(&data), &data[..20_000], &url, Some(&etag));

    let got = get(&url, &sha(&data), dir.path(), &opts()).await.unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (90_000, false, 1));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_only_part(dir.path(), &sha(&data));
    assert_eq!(
        server.requests("/node"),
        vec![get_request(Some("bytes=20000-".into()), Some(etag))]
    );
}

#[tokio::test]
async fn complete_partial_with_sidecar_is_verified_after_416() {
    let server = Server::start();
    let data = body(10_000, 9);
    server.add("/node", data.clone(), Fault::None);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    leave_partial(
        dir.path(),
        &sha(&data),
        &data,
        &url,
        server.etag("/node").as_deref(),
    );

    let got = get(&url, &sha(&data), dir.path(), &opts()).await.unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (10_000, true, 1));
    assert_only_part(dir.path(), &sha(&data));
    assert_eq!(server.hits("/node"), 1);
}

#[tokio::test]
async fn overlong_partial_after_416_starts_over() {
    let server = Server::start();
    let data = body(10_000, 10);
    server.add("/node", data.clone(), Fault::None);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    let mut junk = data.clone();
    junk.extend_from_slice(b"trailing junk");
    leave_partial(
        dir.path(),
        &sha(&data),
        &junk,
        &url,
        server.etag("/node").as_deref(),
    );

    let got = get(&url, &sha(&data), dir.path(), &opts()).await.unwrap();

    assert!(!got.resumed);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    let requests = server.requests("/node");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].range.as_deref(), Some("bytes=10013-"));
    assert_eq!(requests[1], get_request(None, None));
}

#[tokio::test]
async fn verified_file_left_unmoved_is_not_fetched_again() {
    let server = Server::start();
    let data = body(10_000, 11);
    server.add("/node", data.clone(), Fault::None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{}.part", sha(&data))), &data).unwrap();

    let got = get(&server.url("/node"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();

    assert_eq!((got.size, got.resumed, got.attempts), (10_000, true, 0));
    assert_eq!(server.hits("/node"), 0);
}

#[tokio::test]
async fn server_errors_are_retried() {
    let server = Server::start();
    let data = body(20_000, 12);
    server.add("/node", data.clone(), Fault::FailTimes(503, 2));
    let dir = tempfile::tempdir().unwrap();

    let got = get(&server.url("/node"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();

    assert_eq!(got.attempts, 3);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!(server.hits("/node"), 3);
}

#[tokio::test]
async fn retries_are_bounded() {
    let server = Server::start();
    server.add("/node", body(100, 13), Fault::Status(502));
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        retries: 2,
        ..opts()
    };

    let err = get(&server.url("/node"), &sha(b"x"), dir.path(), &opts)
        .await
        .unwrap_err();

    assert!(matches!(err, FetchError::Status { .. }), "{err:?}");
    assert!(err.to_string().contains("502"), "{err}");
    assert_eq!(server.hits("/node"), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = Server::start();
    server.add("/node", body(100, 14), Fault::Status(404));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/node");

    let err = get(&url, &sha(b"x"), dir.path(), &opts())
        .await
        .unwrap_err();

    let msg = err.to_string();
    assert!(matches!(err, FetchError::Status { .. }), "{err:?}");
    assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
    assert_eq!(server.hits("/node"), 1);
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn unknown_path_is_a_404() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let err = get(&server.url("/missing"), &sha(b"x"), dir.path(), &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404 Not Found"), "{err}");
    assert_eq!(server.hits("/missing"), 1);
}

#[tokio::test]
async fn wrong_bytes_are_a_checksum_mismatch_and_leave_nothing() {
    let server = Server::start();
    let data = body(30_000, 15);
    server.add("/node", data.clone(), Fault::None);
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    let pinned = sha(b"what the manifest expected");

    let err = get(&url, &pinned, dir.path(), &opts()).await.unwrap_err();

    match &err {
        FetchError::ChecksumMismatch {
            url: u,
            expected,
            actual,
        } => {
            assert_eq!(u, &url);
            assert_eq!(expected, &pinned);
            assert_eq!(actual, &sha(&data));
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&url) && msg.contains(&pinned) && msg.contains(&sha(&data)),
        "{msg}"
    );
    assert!(msg.contains("hint:"), "{msg}");
    assert_eq!(server.hits("/node"), 1, "a mismatch is not retried");
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn uppercase_pin_is_accepted_and_bad_pin_refused() {
    let server = Server::start();
    let data = body(1_000, 16);
    server.add("/node", data.clone(), Fault::None);
    let dir = tempfile::tempdir().unwrap();

    let got = get(
        &server.url("/node"),
        &sha(&data).to_uppercase(),
        dir.path(),
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(got.path, dir.path().join(format!("{}.part", sha(&data))));

    let err = get(
        &server.url("/node"),
        "../../etc/passwd",
        dir.path(),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::InvalidChecksum { .. }), "{err:?}");
}

#[tokio::test]
async fn size_cap_by_content_length() {
    let server = Server::start();
    let data = body(5_000, 17);
    server.add("/node", data.clone(), Fault::None);
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        max_size: 4_999,
        ..opts()
    };

    let err = get(&server.url("/node"), &sha(&data), dir.path(), &opts)
        .await
        .unwrap_err();

    assert!(
        matches!(
            err,
            FetchError::TooLarge {
                size: 5_000,
                max: 4_999,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.hits("/node"), 1);
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn size_cap_while_streaming() {
    let server = Server::start();
    let data = body(500_000, 18);
    server.add("/node", data.clone(), Fault::NoLength);
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        max_size: 100_000,
        ..opts()
    };

    let err = get(&server.url("/node"), &sha(&data), dir.path(), &opts)
        .await
        .unwrap_err();

    assert!(
        matches!(err, FetchError::TooLarge { max: 100_000, .. }),
        "{err:?}"
    );
    assert_eq!(server.hits("/node"), 1);
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn body_without_length_is_fine_under_the_cap() {
    let server = Server::start();
    let data = body(100_000, 19);
    server.add("/node", data.clone(), Fault::NoLength);
    let dir = tempfile::tempdir().unwrap();

    let got = get(&server.url("/node"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();

    assert_eq!(std::fs::read(&got.path).unwrap(), data);
}

#[tokio::test]
async fn http_to_http_redirect_is_followed() {
    let server = Server::start();
    let data = body(10_000, 20);
    server.add("/real", data.clone(), Fault::None);
    server.add("/alias", Vec::new(), Fault::Redirect(server.url("/real")));
    let dir = tempfile::tempdir().unwrap();

    let got = get(&server.url("/alias"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();

    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_eq!((server.hits("/alias"), server.hits("/real")), (1, 1));
}

#[tokio::test]
async fn redirect_loop_fails_without_retries() {
    let server = Server::start();
    server.add("/loop", Vec::new(), Fault::Redirect("/loop".into()));
    let dir = tempfile::tempdir().unwrap();

    let err = get(&server.url("/loop"), &sha(b"x"), dir.path(), &opts())
        .await
        .unwrap_err();

    assert!(matches!(err, FetchError::Request { .. }), "{err:?}");
    // The original request and ten redirects, once: no retry.
    assert_eq!(server.hits("/loop"), 11);
}

#[tokio::test]
async fn slow_but_steady_is_fine() {
    let server = Server::start();
    let data = body(8_000, 21);
    server.add(
        "/node",
        data.clone(),
        Fault::Slow {
            chunk: 1_000,
            delay: Duration::from_millis(5),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        read_timeout: Duration::from_secs(5),
        ..opts()
    };

    let got = get(&server.url("/node"), &sha(&data), dir.path(), &opts)
        .await
        .unwrap();

    assert_eq!(std::fs::read(&got.path).unwrap(), data);
}

#[tokio::test]
async fn stalled_body_times_out_and_is_retried() {
    let server = Server::start();
    let data = body(8_000, 22);
    server.add(
        "/node",
        data.clone(),
        Fault::Slow {
            chunk: 1_000,
            delay: Duration::from_secs(2),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        read_timeout: Duration::from_millis(200),
        retries: 1,
        ..opts()
    };

    let err = get(&server.url("/node"), &sha(&data), dir.path(), &opts)
        .await
        .unwrap_err();

    assert!(
        matches!(err, FetchError::Body { received: 0, .. }),
        "{err:?}"
    );
    assert_eq!(server.hits("/node"), 2);
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    let addr = {
        let server = Server::start();
        server.addr()
    }; // dropped: nothing listens there any more
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/node");
    let opts = FetchOptions {
        retries: 2,
        ..opts()
    };

    let err = get(&url, &sha(b"x"), dir.path(), &opts).await.unwrap_err();

    assert!(matches!(err, FetchError::Request { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn local_path_and_file_url() {
    let dir = tempfile::tempdir().unwrap();
    let data = body(3_000_000, 23);
    let src = dir.path().join("mirror").join("osmosisd");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, &data).unwrap();
    let partial = dir.path().join("partial");

    let by_path = get(src.to_str().unwrap(), &sha(&data), &partial, &opts())
        .await
        .unwrap();
    assert_eq!(
        (by_path.size, by_path.resumed, by_path.attempts),
        (3_000_000, false, 1)
    );
    assert_eq!(std::fs::read(&by_path.path).unwrap(), data);
    std::fs::remove_file(&by_path.path).unwrap();

    let file_url = url::Url::from_file_path(&src).unwrap().to_string();
    let by_url = get(&file_url, &sha(&data), &partial, &opts())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&by_url.path).unwrap(), data);
    assert_only_part(&partial, &sha(&data));
}

#[tokio::test]
async fn local_file_checks() {
    let dir = tempfile::tempdir().unwrap();
    let data = body(10_000, 24);
    let src = dir.path().join("osmosisd");
    std::fs::write(&src, &data).unwrap();
    let partial = dir.path().join("partial");
    let src = src.to_str().unwrap();

    let err = get(src, &sha(b"other"), &partial, &opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(listing(&partial), Vec::<String>::new());

    let small = FetchOptions {
        max_size: 9_999,
        ..opts()
    };
    let err = get(src, &sha(&data), &partial, &small).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err:?}");
    assert_eq!(listing(&partial), Vec::<String>::new());

    let missing = dir.path().join("nope");
    let err = get(missing.to_str().unwrap(), &sha(&data), &partial, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn invalid_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for source in [
        "relative/osmosisd",
        "ftp://example.com/osmosisd",
        "file://host/x",
    ] {
        let err = get(source, &sha(b"x"), dir.path(), &opts())
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::InvalidSource { .. }),
            "{source}: {err:?}"
        );
    }
}

#[test]
fn server_answers_head_and_ranges() {
    use std::io::{Read, Write};
    let server = Server::start();
    server.add("/f", b"0123456789".to_vec(), Fault::None);
    let ask = |head: &str| {
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let head = ask("HEAD /f HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Length: 10\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let range = ask("GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=4-\r\n\r\n");
    assert!(range.starts_with("HTTP/1.1 206 "), "{range}");
    assert!(
        range.contains("Content-Range: bytes 4-9/10\r\n") && range.ends_with("\r\n\r\n456789"),
        "{range}"
    );
    let past = ask("GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=10-\r\n\r\n");
    assert!(
        past.starts_with("HTTP/1.1 416 ") && past.contains("Content-Range: bytes */10\r\n"),
        "{past}"
    );
    let stale = ask("GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=4-\r\nIf-Range: \"old\"\r\n\r\n");
    assert!(
        stale.starts_with("HTTP/1.1 200 ") && stale.ends_with("0123456789"),
        "{stale}"
    );
    assert_eq!(server.hits("/f"), 4);
}

#[tokio::test]
async fn interrupted_run_keeps_its_bytes_for_the_next() {
    let server = Server::start();
    let data = body(100_000, 25);
    server.add("/node", data.clone(), Fault::DropAfter(40_000));
    let url = server.url("/node");
    let dir = tempfile::tempdir().unwrap();
    let once = FetchOptions {
        retries: 0,
        ..opts()
    };

    let err = get(&url, &sha(&data), dir.path(), &once).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Body {
                received: 40_000,
                ..
            }
        ),
        "{err:?}"
    );
    let s = sha(&data);
    assert_eq!(
        listing(dir.path()),
        vec![format!("{s}.part"), format!("{s}.part.json")]
    );

    let got = get(&url, &s, dir.path(), &once).await.unwrap();
    assert_eq!((got.resumed, got.attempts), (true, 1));
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert_only_part(dir.path(), &s);
    assert_eq!(
        server.requests("/node")[1].range.as_deref(),
        Some("bytes=40000-")
    );
}

#[tokio::test]
async fn request_timeouts_and_throttling_are_retried() {
    let server = Server::start();
    let data = body(5_000, 21);
    let other = body(5_000, 25);
    server.add("/timeout", data.clone(), Fault::FailTimes(408, 1));
    server.add("/busy", other.clone(), Fault::FailTimes(429, 2));
    let dir = tempfile::tempdir().unwrap();

    let got = get(&server.url("/timeout"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();
    assert_eq!((got.attempts, server.hits("/timeout")), (2, 2));
    let got = get(&server.url("/busy"), &sha(&other), dir.path(), &opts())
        .await
        .unwrap();
    assert_eq!((got.attempts, server.hits("/busy")), (3, 3));
}

#[tokio::test]
async fn retry_after_is_honoured_by_downloads_digests_and_reads() {
    let server = Server::start();
    let data = body(5_000, 22);
    let later = |status| Fault::RetryAfter {
        status,
        times: 1,
        seconds: 1,
    };
    server.add("/download", data.clone(), later(429));
    server.add("/digest", data.clone(), later(503));
    server.add("/read", data.clone(), later(429));
    let dir = tempfile::tempdir().unwrap();
    let client = fetch::client(&opts()).unwrap();

    // The backoff alone would wait 10 ms; the server asked for a second.
    let start = std::time::Instant::now();
    let got = get(&server.url("/download"), &sha(&data), dir.path(), &opts())
        .await
        .unwrap();
    assert_eq!(got.attempts, 2);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    let start = std::time::Instant::now();
    let digest = fetch::digest(&client, &server.url("/digest"), &opts())
        .await
        .unwrap();
    assert_eq!(digest.sha256, sha(&data));
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    let start = std::time::Instant::now();
    let read = fetch::read(&client, &server.url("/read"), 1 << 20, &opts())
        .await
        .unwrap();
    assert_eq!(read, data);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.hits("/read"), 2);
}

#[tokio::test]
async fn reads_are_capped() {
    let server = Server::start();
    server.add("/big", body(10_000, 23), Fault::None);
    server.add("/unannounced", body(10_000, 24), Fault::NoLength);
    let client = fetch::client(&opts()).unwrap();
    for path in ["/big", "/unannounced"] {
        let err = fetch::read(&client, &server.url(path), 4_096, &opts())
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { max: 4_096, .. }),
            "{path}: {err:?}"
        );
    }
    let err = fetch::read(&client, "/dev/zero", 4_096, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err:?}");
}

/// A local source that never ends (a device) stops at the cap instead of hashing forever.
#[tokio::test]
async fn a_local_digest_stops_at_the_size_cap() {
    let client = fetch::client(&opts()).unwrap();
    let opts = FetchOptions {
        max_size: 1 << 20,
        ..opts()
    };
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        fetch::digest(&client, "file:///dev/zero", &opts),
    )
    .await
    .expect("hashing /dev/zero must stop at the cap")
    .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { max, .. } if max == 1 << 20),
        "{err:?}"
    );
}
