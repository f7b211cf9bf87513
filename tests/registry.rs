//! The registry client against Debian's `docker-registry`, skopeo-pushed multi-arch busybox images, and test
//! servers that misbehave on purpose.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::registry::*;
use flotilla::clock::FakeClock;
use flotilla::config::{Config, RegistryConfig};
use flotilla::digest::{Digest, Verifier};
use flotilla::registry::{
    BlobSpec, ClientOptions, ManifestContent, ManifestKind, Reference, RegistryClient,
    RegistryError, Repository, RetryPolicy,
};

/// Fetches a blob into `partial` with no progress reporting.
async fn fetch_quietly(
    client: &RegistryClient,
    repo: &Repository,
    digest: Digest,
    size: u64,
    partial: &Path,
) -> Result<(Verifier, u64), RegistryError> {
    client
        .fetch_blob(repo, &BlobSpec { digest, size }, partial, &|_, _| {})
        .await
}

fn client_with(
    config: &Config,
    insecure: &[String],
    tweak: impl FnOnce(&mut ClientOptions),
) -> (RegistryClient, Arc<FakeClock>) {
    let mut options = ClientOptions::from_config(config, insecure);
    options.retry = RetryPolicy {
        attempts: 3,
        ..RetryPolicy::default()
    };
    tweak(&mut options);
    let clock = FakeClock::new(0.0);
    let client = RegistryClient::with_options(config, options, clock.clone()).expect("client");
    (client, clock)
}

fn client(insecure: &[String]) -> (RegistryClient, Arc<FakeClock>) {
    client_with(&Config::default(), insecure, |_| {})
}

fn repo(s: &str) -> Repository {
    s.parse::<Reference>()
        .expect("reference")
        .repository()
        .clone()
}

fn file_digest(p: &Path) -> Digest {
    Digest::sha256_of(&std::fs::read(p).expect("read fetched blob"))
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A plain registry holding the four-platform busybox image as OCI (`flotilla/busybox:multi`) and as a Docker
/// manifest list (`flotilla/busybox-docker:multi`).
fn pushed_registry(dir: &Path) -> Option<(Registry, WrittenLayout)> {
    registry_prerequisites()?;
    let reg = Registry::start(&dir.join("registry"), RegistryOptions::default());
    let layout = OciLayoutBuilder::new(&dir.join("layout"));
    let written = layout.write("multi", &busybox_images()?);
    skopeo_copy(
        layout.dir(),
        "multi",
        &reg.host(),
        "flotilla/busybox",
        "multi",
        None,
        None,
    );
    skopeo_copy(
        layout.dir(),
        "multi",
        &reg.host(),
        "flotilla/busybox-docker",
        "multi",
        Some("v2s2"),
        None,
    );
    Some((reg, written))
}

#[tokio::test]
async fn fetches_oci_index_docker_list_manifests_and_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    let (client, _) = client(&[reg.host()]);

    let r: Reference = format!("{}/flotilla/busybox:multi", reg.host())
        .parse()
        .unwrap();
    let index = client.fetch_manifest(&r).await.unwrap();
    assert_eq!(index.kind, ManifestKind::OciIndex);
    assert_eq!(
        index.digest, written.index,
        "skopeo keeps an OCI index byte for byte"
    );
    let ManifestContent::Index(ix) = &index.content else {
        panic!("not an index")
    };
    assert_eq!(ix.manifests().len(), 4);

    // Pinned by digest, the same bytes come back verified.
    let pinned = client
        .fetch_manifest(&r.with_digest(written.index.clone()))
        .await
        .unwrap();
    assert_eq!(pinned.bytes, index.bytes);

    for img in &written.images {
        let m = client
            .fetch_manifest(&r.with_digest(img.manifest.clone()))
            .await
            .unwrap();
        assert_eq!(m.kind, ManifestKind::OciManifest, "{}", img.platform);
        let config = client
            .fetch_blob_bytes(
                r.repository(),
                &BlobSpec {
                    digest: img.config.clone(),
                    size: img.config_size,
                },
                1 << 20,
            )
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&config).contains(&img.diff_id.to_string()));
        let partial = dir.path().join(format!("{}.partial", img.layer.hex()));
        let seen = Mutex::new(Vec::new());
        let progress = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
        client
            .fetch_blob(
                r.repository(),
                &BlobSpec {
                    digest: img.layer.clone(),
                    size: img.layer_size,
                },
                &partial,
                &progress,
            )
            .await
            .unwrap();
        assert_eq!(file_digest(&partial), img.layer);
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&(img.layer_size, img.layer_size))
        );
    }

    // The same image as a Docker manifest list of schema-2 manifests; layers keep their digests.
    let d: Reference = format!("{}/flotilla/busybox-docker:multi", reg.host())
        .parse()
        .unwrap();
    let list = client.fetch_manifest(&d).await.unwrap();
    assert_eq!(list.kind, ManifestKind::DockerManifestList);
    let ManifestContent::Index(ix) = &list.content else {
        panic!("not a list")
    };
    assert_eq!(ix.manifests().len(), 4);
    for entry in ix.manifests() {
        let digest: Digest = entry.digest().to_string().parse().unwrap();
        let m = client.fetch_manifest(&d.with_digest(digest)).await.unwrap();
        assert_eq!(m.kind, ManifestKind::DockerManifest);
        let ManifestContent::Image(im) = &m.content else {
            panic!("not a manifest")
        };
        let layer = &im.layers()[0];
        let spec = BlobSpec {
            digest: layer.digest().to_string().parse().unwrap(),
            size: layer.size(),
        };
        assert!(written.images.iter().any(|i| i.layer == spec.digest));
        let partial = dir.path().join("docker.partial");
        client
            .fetch_blob(d.repository(), &spec, &partial, &|_, _| {})
            .await
            .unwrap();
        assert_eq!(file_digest(&partial), spec.digest);
        std::fs::remove_file(&partial).unwrap();
    }

    // distribution 2.8 has no referrers API and nothing is tagged sha256-<hex>: an empty list, not an error.
    assert!(
        client
            .fetch_referrers(r.repository(), &written.index, None)
            .await
            .unwrap()
            .is_empty()
    );
    let missing = client
        .fetch_manifest(
            &format!("{}/flotilla/busybox:nope", reg.host())
                .parse()
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
}

#[tokio::test]
async fn corrupted_blob_is_refused_and_the_partial_removed() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    let img = &written.images[1];
    let data = reg.blob_data_path(&img.layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let (client, _) = client(&[reg.host()]);
    let partial = dir.path().join("layer.partial");
    let err = fetch_quietly(
        &client,
        &repo(&format!("{}/flotilla/busybox", reg.host())),
        img.layer.clone(),
        img.layer_size,
        &partial,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&reg.host())
            && text.contains("flotilla/busybox")
            && text.contains(&img.layer.to_string()),
        "{text}"
    );
    assert!(!partial.exists(), "the corrupt partial must be gone");
}

#[tokio::test]
async fn cut_connection_resumes_with_range_and_fetches_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    let img = &written.images[0];
    let cut = img.layer_size / 2;
    let proxy = CutProxy::start(reg.addr(), cut).await;
    let (client, _) = client(&[proxy.host()]);
    let partial = dir.path().join("layer.partial");
    fetch_quietly(
        &client,
        &repo(&format!("{}/flotilla/busybox", proxy.host())),
        img.layer.clone(),
        img.layer_size,
        &partial,
    )
    .await
    .unwrap();
    assert_eq!(file_digest(&partial), img.layer);

    let conns = proxy.connections();
    assert_eq!(conns.len(), 2, "one cut connection, one resume");
    let (first_req, first_relayed) = (&conns[0].request, conns[0].to_client);
    assert_eq!(first_relayed, cut);
    assert!(
        !String::from_utf8_lossy(first_req)
            .to_ascii_lowercase()
            .contains("range:")
    );
    let (second_req, second_relayed) = (&conns[1].request, conns[1].to_client);
    let second_req = String::from_utf8_lossy(second_req).to_ascii_lowercase();
    let start: u64 = second_req
        .split("range: bytes=")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Range in the resume: {second_req}"));
    // The first connection's bytes minus its response head are what the file had; the resume asks for the rest.
    assert!(start > 0 && start < cut, "resumed at {start}");
    let head = 1024;
    assert!(
        second_relayed <= img.layer_size - start + head,
        "re-downloaded {second_relayed} for {} missing",
        img.layer_size - start
    );
}

#[tokio::test]
async fn partial_left_by_another_process_is_rehashed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    let img = &written.images[2];
    let proxy = CutProxy::start(reg.addr(), u64::MAX).await;
    let blob = std::fs::read(reg.blob_data_path(&img.layer)).unwrap();
    let have = blob.len() / 3;
    let partial = dir.path().join("layer.partial");
    std::fs::write(&partial, &blob[..have]).unwrap();
    let (client, _) = client(&[proxy.host()]);
    fetch_quietly(
        &client,
        &repo(&format!("{}/flotilla/busybox", proxy.host())),
        img.layer.clone(),
        img.layer_size,
        &partial,
    )
    .await
    .unwrap();
    assert_eq!(file_digest(&partial), img.layer);
    let conns = proxy.connections();
    assert_eq!(conns.len(), 1);
    assert!(
        String::from_utf8_lossy(&conns[0].request)
            .to_ascii_lowercase()
            .contains(&format!("range: bytes={have}-"))
    );
    assert!(conns[0].to_client < img.layer_size - have as u64 + 1024);
}

#[tokio::test]
async fn bearer_token_flow_against_a_gated_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    use base64::Engine as _;
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let issuer = HttpServer::start(move |req| {
        let ok = req.header("authorization") == Some(good.as_str());
        async move {
            if ok {
                Response::new(200)
                    .header("Content-Type", "application/json")
                    .body(r#"{"token":"tok-1","expires_in":300}"#)
            } else {
                Response::new(401).body("bad credentials")
            }
        }
    })
    .await;
    let realm = issuer.url("/token");
    let upstream = reg.addr();
    let gate = HttpServer::start(move |req| {
        let realm = realm.clone();
        async move {
            if req.header("authorization") == Some("Bearer tok-1") {
                forward(upstream, &req).await
            } else {
                Response::new(401).header(
                    "WWW-Authenticate",
                    &format!(r#"Bearer realm="{realm}",service="flotilla-test",scope="repository:flotilla/busybox:pull""#),
                )
            }
        }
    })
    .await;
    let config = |password: &str| Config {
        registries: vec![RegistryConfig {
            host: gate.host(),
            username: Some("alice".into()),
            password: Some(password.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (client, _) = client_with(&config("s3cret"), &[gate.host()], |_| {});
    let r: Reference = format!("{}/flotilla/busybox:multi", gate.host())
        .parse()
        .unwrap();
    let index = client.fetch_manifest(&r).await.unwrap();
    assert_eq!(index.digest, written.index);
    let img = &written.images[3];
    let partial = dir.path().join("gated.partial");
    fetch_quietly(
        &client,
        r.repository(),
        img.layer.clone(),
        img.layer_size,
        &partial,
    )
    .await
    .unwrap();
    assert_eq!(file_digest(&partial), img.layer);
    // One token for the repository, reused for the blob: cached until expiry.
    let token_requests = issuer.requests();
    assert_eq!(token_requests.len(), 1);
    assert!(
        token_requests[0].path.contains("service=flotilla-test"),
        "{}",
        token_requests[0].path
    );
    assert!(
        token_requests[0]
            .path
            .contains("scope=repository%3Aflotilla%2Fbusybox%3Apull"),
        "{}",
        token_requests[0].path
    );

    let (wrong, _) = client_with(&config("wrong"), &[gate.host()], |_| {});
    let err = wrong.fetch_manifest(&r).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("401 from {}", gate.host())) && err.contains("check the credentials"),
        "{err}"
    );
    assert!(
        !err.contains("wrong"),
        "the password must not appear: {err}"
    );
}

#[tokio::test]
async fn basic_auth_over_tls_with_the_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    if registry_prerequisites().is_none() || require("htpasswd", tool("htpasswd")).is_none() {
        return;
    }
    let ca = TestCa::generate(dir.path());
    let reg = Registry::start(
        &dir.path().join("tls"),
        RegistryOptions {
            tls: Some(&ca),
            users: vec![("bob", "hunter2")],
        },
    );
    let layout = OciLayoutBuilder::new(&dir.path().join("layout"));
    let written = layout.write("v1", &busybox_images().unwrap()[..2]);
    skopeo_copy(
        layout.dir(),
        "v1",
        &reg.host(),
        "secure/app",
        "v1",
        None,
        Some(("bob", "hunter2")),
    );

    let entry = |ca_bundle: Option<&Path>, password: &str| Config {
        registries: vec![RegistryConfig {
            host: reg.host(),
            ca_bundle: ca_bundle.map(Path::to_path_buf),
            username: Some("bob".into()),
            password: Some(password.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r: Reference = format!("{}/secure/app:v1", reg.host()).parse().unwrap();
    let (client, _) = client_with(&entry(Some(&ca.ca_pem), "hunter2"), &[], |_| {});
    let index = client.fetch_manifest(&r).await.unwrap();
    assert_eq!(index.digest, written.index);
    let img = &written.images[1];
    let partial = dir.path().join("tls.partial");
    fetch_quietly(
        &client,
        r.repository(),
        img.layer.clone(),
        img.layer_size,
        &partial,
    )
    .await
    .unwrap();
    assert_eq!(file_digest(&partial), img.layer);

    // The CA given globally works too.
    let global = Config {
        ca_bundle: Some(ca.ca_pem.clone()),
        ..entry(None, "hunter2")
    };
    let (client, _) = client_with(&global, &[], |_| {});
    client.fetch_manifest(&r).await.unwrap();

    let (wrong, _) = client_with(&entry(Some(&ca.ca_pem), "nope"), &[], |_| {});
    let err = wrong.fetch_manifest(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");

    // Without the CA the server is not trusted, and that is what the error says.
    let (untrusted, _) = client_with(&entry(None, "hunter2"), &[], |o| o.retry.attempts = 1);
    let err = untrusted.fetch_manifest(&r).await.unwrap_err().to_string();
    assert!(
        err.contains(&reg.host()) && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

async fn manifest_server(
    status: u16,
    content_type: &'static str,
    body: &'static [u8],
) -> HttpServer {
    HttpServer::start(move |_| async move {
        Response::new(status)
            .header("Content-Type", content_type)
            .body(body)
    })
    .await
}

async fn fetch_err(server: &HttpServer, tweak: impl FnOnce(&mut ClientOptions)) -> RegistryError {
    let (client, _) = client_with(&Config::default(), &[server.host()], tweak);
    let r: Reference = format!("{}/app:latest", server.host()).parse().unwrap();
    client.fetch_manifest(&r).await.unwrap_err()
}

#[tokio::test]
async fn hostile_manifest_answers_are_refused_clearly() {
    let html = manifest_server(
        200,
        "text/html; charset=utf-8",
        b"<html><body>Welcome to the captive portal</body></html>",
    )
    .await;
    let err = fetch_err(&html, |_| {}).await;
    let text = err.to_string();
    assert!(
        matches!(err, RegistryError::UnsupportedMediaType { .. })
            && text.contains("HTML")
            && text.contains(&html.host()),
        "{text}"
    );

    let s1 = manifest_server(
        200,
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        br#"{"schemaVersion":1}"#,
    )
    .await;
    let text = fetch_err(&s1, |_| {}).await.to_string();
    assert!(
        text.contains(
            "schema 1 manifests are deprecated; push the image again with a current tool"
        ),
        "{text}"
    );

    let odd = manifest_server(200, "application/vnd.example.thing+json", b"{}").await;
    let text = fetch_err(&odd, |_| {}).await.to_string();
    assert!(
        text.contains("application/vnd.example.thing+json"),
        "{text}"
    );

    let junk = manifest_server(200, OCI_INDEX, b"{\"manifests\": [").await;
    let err = fetch_err(&junk, |_| {}).await;
    assert!(
        matches!(err, RegistryError::Malformed { .. })
            && err.to_string().contains("fetching manifest latest"),
        "{err}"
    );

    // Oversize without a Content-Length: the cap holds while reading.
    let big = HttpServer::start(|_| async {
        Response::new(200)
            .header("Content-Type", OCI_INDEX)
            .body(vec![b' '; 5 * 1024 * 1024])
            .chunked()
    })
    .await;
    let err = fetch_err(&big, |_| {}).await;
    assert!(
        matches!(err, RegistryError::ManifestTooLarge { .. }),
        "{err}"
    );

    let looping =
        HttpServer::start(|req| async move { Response::new(302).header("Location", &req.path) })
            .await;
    let err = fetch_err(&looping, |_| {}).await;
    assert!(
        matches!(err, RegistryError::TooManyRedirects { .. }),
        "{err}"
    );
    assert_eq!(
        looping.requests().len(),
        6,
        "the first request and five redirects"
    );

    // Pinned by digest, other bytes are refused.
    let other = manifest_server(200, OCI_INDEX, br#"{"schemaVersion":2,"manifests":[]}"#).await;
    let (client, _) = client(&[other.host()]);
    let r: Reference = format!("{}/app@{}", other.host(), Digest::sha256_of(b"x"))
        .parse()
        .unwrap();
    let err = client.fetch_manifest(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");

    // 5xx is retried the configured number of times, then reported.
    let failing = manifest_server(503, "text/plain", b"down").await;
    let err = fetch_err(&failing, |o| o.retry.attempts = 4).await;
    assert!(
        matches!(err, RegistryError::Status { status: 503, .. }),
        "{err}"
    );
    assert_eq!(failing.requests().len(), 4);
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let server = HttpServer::start(move |_| {
        let n = {
            let mut g = c.lock().unwrap();
            *g += 1;
            *g
        };
        async move {
            if n == 1 {
                Response::new(429).header("Retry-After", "7")
            } else {
                Response::new(200)
                    .header("Content-Type", OCI_INDEX)
                    .body(r#"{"schemaVersion":2,"manifests":[]}"#)
            }
        }
    })
    .await;
    let (client, clock) = client(&[server.host()]);
    let r: Reference = format!("{}/app:latest", server.host()).parse().unwrap();
    client.fetch_manifest(&r).await.unwrap();
    assert_eq!(clock.slept(), [Duration::from_secs(7)]);

    // A Retry-After of an hour is capped, not obeyed.
    let slow =
        HttpServer::start(|_| async { Response::new(429).header("Retry-After", "3600") }).await;
    let (client, clock) = client_with(&Config::default(), &[slow.host()], |o| o.retry.attempts = 2);
    let err = client
        .fetch_manifest(&format!("{}/app:latest", slow.host()).parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("429"), "{err}");
    assert_eq!(clock.slept(), [RetryPolicy::default().max_retry_after]);
}

#[tokio::test]
async fn hanging_token_endpoint_fails_in_bounded_time_naming_it() {
    let hanging = HttpServer::start(|_| async { Response::hang() }).await;
    let realm = hanging.url("/token");
    let registry = HttpServer::start(move |_| {
        let realm = realm.clone();
        async move {
            Response::new(401).header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="{realm}",service="s""#),
            )
        }
    })
    .await;
    let r: Reference = format!("{}/app:latest", registry.host()).parse().unwrap();
    let (client, _) = client_with(&Config::default(), &[registry.host()], |o| {
        o.read_timeout = Duration::from_secs(1);
        o.request_timeout = Duration::from_secs(2);
        o.retry.attempts = 2;
    });
    let err = tokio::time::timeout(Duration::from_secs(60), client.fetch_manifest(&r))
        .await
        .expect("the client must give up on its own")
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{text}");
    assert!(
        text.contains(&format!("token endpoint http://{}", hanging.host()))
            && text.contains(&registry.host()),
        "{text}"
    );
}

#[tokio::test]
async fn redirect_to_blob_storage_gets_no_authorization() {
    let blob = b"layer bytes served by a CDN".to_vec();
    let digest = Digest::sha256_of(&blob);
    let served = blob.clone();
    let storage = HttpServer::start(move |_| {
        let b = served.clone();
        async move {
            Response::new(200)
                .header("Content-Type", "application/octet-stream")
                .body(b)
        }
    })
    .await;
    let location = storage.url("/bucket/data?sig=abc");
    let registry = HttpServer::start(move |req| {
        let location = location.clone();
        async move {
            match req.header("authorization") {
                Some(_) => Response::new(307).header("Location", &location),
                None => Response::new(401).header("WWW-Authenticate", r#"Basic realm="r""#),
            }
        }
    })
    .await;
    let config = Config {
        registries: vec![RegistryConfig {
            host: registry.host(),
            username: Some("carol".into()),
            password: Some("topsecret".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (client, _) = client_with(&config, &[registry.host()], |_| {});
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("cdn.partial");
    fetch_quietly(
        &client,
        &repo(&format!("{}/app", registry.host())),
        digest.clone(),
        blob.len() as u64,
        &partial,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), blob);
    let reg_requests = registry.requests();
    assert!(
        reg_requests
            .last()
            .unwrap()
            .header("authorization")
            .unwrap()
            .starts_with("Basic ")
    );
    let storage_requests = storage.requests();
    assert_eq!(storage_requests.len(), 1);
    assert_eq!(
        storage_requests[0].header("authorization"),
        None,
        "credentials leaked to blob storage"
    );
}

#[tokio::test]
async fn blobs_of_the_wrong_size_are_refused_and_removed() {
    let blob = b"0123456789".to_vec();
    let digest = Digest::sha256_of(&blob);
    let body = blob.clone();
    let server = HttpServer::start(move |_| {
        let b = body.clone();
        async move { Response::new(200).body(b) }
    })
    .await;
    let (client, _) = client(&[server.host()]);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("p");
    let r = repo(&format!("{}/app", server.host()));
    // The descriptor says 4 bytes: the fifth byte is already too many.
    let err = fetch_quietly(&client, &r, digest.clone(), 4, &partial)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
    assert!(!partial.exists());
    let err = client
        .fetch_blob(&r, &BlobSpec { digest, size: 20 }, &partial, &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::SizeMismatch { .. }) && err.to_string().contains("sent 10"),
        "{err}"
    );
    assert!(!partial.exists());
}

#[tokio::test]
async fn mirrors_are_tried_in_order_before_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let Some((reg, written)) = pushed_registry(dir.path()) else {
        return;
    };
    let broken_mirror = manifest_server(500, "text/plain", b"broken").await;
    let good_mirror = CutProxy::start(reg.addr(), u64::MAX).await;
    let origin = manifest_server(500, "text/plain", b"origin must not be asked").await;
    let config = Config {
        registries: vec![RegistryConfig {
            host: origin.host(),
            mirrors: vec![broken_mirror.host(), good_mirror.host()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let (client, _) = client_with(
        &config,
        &[origin.host(), broken_mirror.host(), good_mirror.host()],
        |o| o.retry.attempts = 2,
    );
    let r: Reference = format!("{}/flotilla/busybox:multi", origin.host())
        .parse()
        .unwrap();
    let index = client.fetch_manifest(&r).await.unwrap();
    assert_eq!(index.digest, written.index);
    assert_eq!(
        broken_mirror.requests().len(),
        2,
        "the first mirror is tried (and retried) first"
    );
    assert!(!good_mirror.connections().is_empty());
    assert!(origin.requests().is_empty());
}

#[tokio::test]
async fn referrers_fall_back_to_the_tag_schema() {
    let sig_manifest = Digest::sha256_of(b"sig");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{sig_manifest}","size":3,"artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json"}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{sig_manifest}","size":3,"artifactType":"application/spdx+json"}}]}}"#
    );
    let subject = Digest::sha256_of(b"image");
    let tag_path = format!("/v2/app/manifests/sha256-{}", subject.hex());
    let server = HttpServer::start(move |req| {
        let index = index.clone();
        let tag_path = tag_path.clone();
        async move {
            if req.path == tag_path {
                Response::new(200)
                    .header("Content-Type", OCI_INDEX)
                    .body(index)
            } else {
                Response::new(404)
            }
        }
    })
    .await;
    let (client, _) = client(&[server.host()]);
    let r = repo(&format!("{}/app", server.host()));
    let all = client.fetch_referrers(&r, &subject, None).await.unwrap();
    assert_eq!(all.len(), 2);
    let sigs = client
        .fetch_referrers(
            &r,
            &subject,
            Some("application/vnd.dev.cosign.artifact.sig.v1+json"),
        )
        .await
        .unwrap();
    assert_eq!(sigs.len(), 1);
    assert!(
        server
            .requests()
            .iter()
            .any(|q| q.path.starts_with("/v2/app/referrers/sha256:"))
    );
}

#[tokio::test]
async fn stale_partials_start_over_when_they_cannot_be_resumed() {
    let blob = b"the real layer bytes".to_vec();
    let digest = Digest::sha256_of(&blob);
    let body = blob.clone();
    // This server ignores Range and always answers 200 with the whole blob.
    let server = HttpServer::start(move |_| {
        let b = body.clone();
        async move { Response::new(200).body(b) }
    })
    .await;
    let (client, _) = client(&[server.host()]);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("p");
    let r = repo(&format!("{}/app", server.host()));
    let spec = BlobSpec {
        digest,
        size: blob.len() as u64,
    };

    // Complete in length but wrong: downloaded again, not refused.
    std::fs::write(&partial, vec![b'x'; blob.len()]).unwrap();
    client
        .fetch_blob(&r, &spec, &partial, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), blob);
    assert_eq!(server.requests().len(), 1);

    // Half there, and the 200 to the Range request means "from the start".
    std::fs::write(&partial, &blob[..5]).unwrap();
    client
        .fetch_blob(&r, &spec, &partial, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), blob);
    assert_eq!(server.requests()[1].header("range"), Some("bytes=5-"));
}
