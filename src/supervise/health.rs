//! One health probe, run at the edge: a command inside the container, an HTTP GET, or a TCP connect.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::policy::ProbeResult;
use crate::app::{HealthCheck, Probe};
use crate::runtime::Runtime;

/// Runs the check's probe once, bounded by its timeout.
pub async fn probe(runtime: &Arc<dyn Runtime>, id: &str, check: &HealthCheck) -> ProbeResult {
    let timeout = check.timeout;
    let passed = |ok: bool| {
        if ok {
            ProbeResult::Passed
        } else {
            ProbeResult::Failed
        }
    };
    match &check.probe {
        Probe::Exec(args) => {
            let rt = runtime.clone();
            let id = id.to_string();
            let args = args.clone();
            // The runtime kills the command at the timeout (an error); the outer bound only guards against a runtime
            // that hangs.
            let run = tokio::task::spawn_blocking(move || rt.exec(&id, &args, timeout));
            match tokio::time::timeout(timeout.saturating_mul(2), run).await {
                Ok(Ok(Ok(code))) => passed(code == 0),
                Ok(Ok(Err(crate::runtime::RuntimeError::ExecTimeout { .. }))) | Err(_) => {
                    ProbeResult::TimedOut
                }
                _ => ProbeResult::Failed,
            }
        }
        Probe::Tcp { address } => {
            match tokio::time::timeout(timeout, TcpStream::connect(address.as_str())).await {
                Ok(r) => passed(r.is_ok()),
                Err(_) => ProbeResult::TimedOut,
            }
        }
        Probe::Http { url } => match tokio::time::timeout(timeout, http_get(url)).await {
            Ok(r) => passed(r.unwrap_or(false)),
            Err(_) => ProbeResult::TimedOut,
        },
    }
}

/// A plain-HTTP GET answered with 2xx or 3xx. Written by hand: a probe of an app on this host needs one request
/// line and one status line, not a TLS stack, redirects and a connection pool.
async fn http_get(url: &str) -> std::io::Result<bool> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an http:// URL: {url}"),
        )
    };
    let parsed = url::Url::parse(url).map_err(|_| bad())?;
    if parsed.scheme() != "http" {
        return Err(bad());
    }
    let host = parsed.host_str().ok_or_else(bad)?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut stream = TcpStream::connect((host, port)).await?;
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: flotilla-health\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        let n = stream.read(&mut head[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    // "HTTP/1.1 200 OK": the status code is the second word.
    let line = String::from_utf8_lossy(&head[..got]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn serve_once(status: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        format!("http://{addr}/health")
    }

    fn check(probe: Probe) -> HealthCheck {
        let mut c = HealthCheck::new(probe);
        c.timeout = Duration::from_secs(5);
        c
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let rt: Arc<dyn Runtime> = Arc::new(crate::runtime::fake::Recording::default());
        let ok = serve_once("204 No Content").await;
        assert_eq!(
            probe(&rt, "x", &check(Probe::Http { url: ok })).await,
            ProbeResult::Passed
        );
        let bad = serve_once("503 Service Unavailable").await;
        assert_eq!(
            probe(&rt, "x", &check(Probe::Http { url: bad })).await,
            ProbeResult::Failed
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        assert_eq!(
            probe(&rt, "x", &check(Probe::Tcp { address })).await,
            ProbeResult::Passed
        );
        drop(listener);
        // A port nothing listens on (the one just closed) refuses.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert_eq!(
            probe(&rt, "x", &check(Probe::Tcp { address: closed })).await,
            ProbeResult::Failed
        );
        assert_eq!(
            probe(
                &rt,
                "x",
                &check(Probe::Http {
                    url: "https://127.0.0.1/".into()
                })
            )
            .await,
            ProbeResult::Failed
        );
    }
}
