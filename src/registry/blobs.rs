//! Blobs: small ones into memory, large ones into a partial file that survives a cut connection or a crash and
//! resumes with `Range`, every byte hashed on its way in.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::client::{BlobSpec, Endpoint, RegistryClient};
use super::reference::Repository;
use super::transport::{Fault, check_status, next_chunk};
use super::{At, RegistryError, Step};
use crate::digest::Verifier;

/// A partial blob file and the hash of what it holds so far.
pub(super) struct Partial<'a> {
    pub(super) file: tokio::fs::File,
    pub(super) path: &'a Path,
    pub(super) verifier: Verifier,
}

impl Partial<'_> {
    pub(super) async fn restart(&mut self, at: &At, blob: &BlobSpec) -> Result<(), Fault> {
        self.file
            .set_len(0)
            .await
            .map_err(io_fault(at, self.path))?;
        self.verifier = Verifier::new(blob.digest.algorithm());
        Ok(())
    }
}

pub(super) fn io_fault(at: &At, path: &Path) -> impl Fn(std::io::Error) -> Fault {
    let at = at.clone();
    let path = path.to_path_buf();
    move |source| {
        Fault::fatal(RegistryError::Io {
            at: Box::new(at.clone()),
            path: path.clone(),
            source,
        })
    }
}

/// Flushes and fsyncs the file, then checks the digest of everything it holds.
pub(super) async fn finish_blob(
    at: &At,
    blob: &BlobSpec,
    partial: &mut Partial<'_>,
) -> Result<(), Fault> {
    let io = io_fault(at, partial.path);
    partial.file.flush().await.map_err(&io)?;
    partial.file.sync_all().await.map_err(&io)?;
    let actual = partial.verifier.clone().finish();
    if actual != blob.digest {
        return Err(Fault::fatal(RegistryError::DigestMismatch {
            at: Box::new(at.clone()),
            expected: blob.digest.clone(),
            actual,
        }));
    }
    Ok(())
}

impl RegistryClient {
    pub(super) async fn small_blob_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        blob: &BlobSpec,
    ) -> Result<Vec<u8>, Fault> {
        let url = self.url(ep, at, &format!("blobs/{}", blob.digest))?;
        let mut resp = self.send(ep, at, url, HeaderMap::new(), false).await?;
        check_status(at, &resp, self.inner.clock.now())?;
        let mut bytes = Vec::new();
        let mut v = Verifier::new(blob.digest.algorithm());
        while let Some(chunk) =
            next_chunk(&mut resp, at, &ep.base, self.inner.options.read_timeout).await?
        {
            if bytes.len() as u64 + chunk.len() as u64 > blob.size {
                return Err(Fault::fatal(RegistryError::SizeMismatch {
                    at: Box::new(at.clone()),
                    expected: blob.size,
                    got: "more".into(),
                }));
            }
            v.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != blob.size {
            return Err(Fault::fatal(RegistryError::SizeMismatch {
                at: Box::new(at.clone()),
                expected: blob.size,
                got: bytes.len().to_string(),
            }));
        }
        let actual = v.finish();
        if actual != blob.digest {
            return Err(Fault::fatal(RegistryError::DigestMismatch {
                at: Box::new(at.clone()),
                expected: blob.digest.clone(),
                actual,
            }));
        }
        Ok(bytes)
    }

    pub(super) async fn fetch_blob_from(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        blob: &BlobSpec,
        path: &Path,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(Verifier, u64), RegistryError> {
        let at = self.at(repo, Step::Blob(blob.digest.clone()));
        let mut partial = self
            .open_partial(&at, blob, path)
            .await
            .map_err(|f| f.error)?;
        let resumed_at = partial.verifier.len();
        progress(resumed_at, blob.size);
        let policy = self.inner.options.retry;
        let attempts = policy.attempts.max(1);
        let mut failed = 0u32;
        loop {
            let before = partial.verifier.len();
            let mut r = Ok(());
            if before < blob.size {
                r = self
                    .blob_attempt(ep, &at, blob, &mut partial, progress)
                    .await;
            }
            if r.is_ok() {
                r = finish_blob(&at, blob, &mut partial).await;
            }
            match r {
                Ok(()) => {
                    let fetched = partial.verifier.len().saturating_sub(resumed_at);
                    return Ok((partial.verifier.clone(), fetched));
                }
                Err(Fault {
                    error,
                    retry: Some(after),
                }) => {
                    // An attempt that moved the download forward is not held against it: on a flaky link every
                    // try gets further, and the total stays bounded by the blob's size.
                    if partial.verifier.len() <= before {
                        failed += 1;
                    }
                    if failed >= attempts {
                        return Err(error);
                    }
                    let d = policy.delay(failed.max(1), after, self.inner.clock.random());
                    tracing::info!(
                        "{error}; resuming at byte {} in {d:?}",
                        partial.verifier.len()
                    );
                    self.inner.clock.sleep(d).await;
                }
                Err(Fault { error, retry: None }) => {
                    if matches!(
                        error,
                        RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. }
                    ) {
                        drop(partial);
                        if let Err(e) = tokio::fs::remove_file(path).await {
                            tracing::warn!("cannot remove {}: {e}", path.display());
                        }
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Opens (or creates) the partial file and hashes what it already holds: bytes another process wrote are
    /// hashed again rather than trusted. A file that is too long, or complete but wrong, starts over.
    pub(super) async fn open_partial<'a>(
        &self,
        at: &At,
        blob: &BlobSpec,
        path: &'a Path,
    ) -> Result<Partial<'a>, Fault> {
        let io = io_fault(at, path);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .await
            .map_err(&io)?;
        let mut partial = Partial {
            file,
            path,
            verifier: Verifier::new(blob.digest.algorithm()),
        };
        let existing = partial.file.metadata().await.map_err(&io)?.len();
        if existing > blob.size {
            partial.restart(at, blob).await?;
        } else if existing > 0 {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = partial.file.read(&mut buf).await.map_err(&io)?;
                let Some(read) = buf.get(..n).filter(|r| !r.is_empty()) else {
                    break;
                };
                partial.verifier.update(read);
            }
            if existing == blob.size && partial.verifier.clone().finish() != blob.digest {
                partial.restart(at, blob).await?;
            }
            tracing::debug!(
                bytes = partial.verifier.len(),
                "resuming partial blob {}",
                blob.digest
            );
        }
        Ok(partial)
    }

    pub(super) async fn blob_attempt(
        &self,
        ep: &Endpoint,
        at: &At,
        blob: &BlobSpec,
        partial: &mut Partial<'_>,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<(), Fault> {
        let io = io_fault(at, partial.path);
        let offset = partial.verifier.len();
        let url = self.url(ep, at, &format!("blobs/{}", blob.digest))?;
        let mut headers = HeaderMap::new();
        if offset > 0 {
            // The value is ASCII digits: it always converts.
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(header::RANGE, v);
            }
        }
        let mut resp = self.send(ep, at, url, headers, false).await?;
        let restarting = |reason: &str| {
            tracing::info!("{at}: {reason}; downloading {} from the start", blob.digest);
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    restarting("the registry answered a different range than asked");
                    partial.restart(at, blob).await?;
                    return Err(Fault::retry(
                        RegistryError::Malformed {
                            at: Box::new(at.clone()),
                            reason: format!("asked for bytes {offset}- and got a different range"),
                        },
                        Some(Duration::ZERO),
                    ));
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                restarting("the registry refused the range");
                partial.restart(at, blob).await?;
                return Err(Fault::retry(
                    RegistryError::Status {
                        at: Box::new(at.clone()),
                        status: 416,
                        detail: " (range not satisfiable)".into(),
                    },
                    Some(Duration::ZERO),
                ));
            }
            StatusCode::PARTIAL_CONTENT => {
                return Err(Fault::fatal(RegistryError::Malformed {
                    at: Box::new(at.clone()),
                    reason: "answered 206 to a request without a range".into(),
                }));
            }
            StatusCode::OK => {
                if offset > 0 {
                    restarting("the registry ignored the range");
                    partial.restart(at, blob).await?;
                }
            }
            _ => check_status(at, &resp, self.inner.clock.now())?,
        }
        let from = partial.verifier.len();
        partial
            .file
            .seek(std::io::SeekFrom::Start(from))
            .await
            .map_err(&io)?;
        progress(from, blob.size);
        loop {
            let chunk =
                match next_chunk(&mut resp, at, &ep.base, self.inner.options.read_timeout).await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(f) => {
                        partial.file.flush().await.map_err(&io)?;
                        return Err(f);
                    }
                };
            let room = blob.size - partial.verifier.len();
            if chunk.len() as u64 > room {
                return Err(Fault::fatal(RegistryError::SizeMismatch {
                    at: Box::new(at.clone()),
                    expected: blob.size,
                    got: "more (the download was cut at the stated size)".into(),
                }));
            }
            partial.file.write_all(&chunk).await.map_err(&io)?;
            partial.verifier.update(&chunk);
            progress(partial.verifier.len(), blob.size);
            if let Some(bucket) = &self.inner.bucket {
                let wait = bucket.take(chunk.len() as u64, self.inner.clock.instant());
                if !wait.is_zero() {
                    self.inner.clock.sleep(wait).await;
                }
            }
        }
        if partial.verifier.len() != blob.size {
            return Err(Fault::fatal(RegistryError::SizeMismatch {
                at: Box::new(at.clone()),
                expected: blob.size,
                got: partial.verifier.len().to_string(),
            }));
        }
        Ok(())
    }
}

/// `bytes N-M/T` → N.
pub(super) fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }
}
