//! The TLS configuration registries are reached with: rustls with the ring provider (no aws-lc, no openssl, so it
//! cross-compiles for 32-bit ARM), the system's roots plus the CA bundles the configuration names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

use super::RegistryError;

/// The system store's certificates; loaded once per client because reading it is slow on an SD card.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    let result = rustls_native_certs::load_native_certs();
    for e in &result.errors {
        tracing::warn!("skipping part of the system certificate store: {e}");
    }
    result.certs
}

/// Reads every certificate in a PEM bundle; a bundle with none is an error, since trusting nothing new was surely
/// not what the user meant.
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, RegistryError> {
    let bad = |reason: String| RegistryError::CaBundle {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("it holds no PEM certificate".to_string()));
    }
    Ok(certs)
}

/// A client configuration trusting `system` plus the certificates in `bundles`.
pub fn client_config(
    system: &[CertificateDer<'static>],
    bundles: &[PathBuf],
) -> Result<rustls::ClientConfig, RegistryError> {
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(system.iter().cloned());
    if ignored > 0 {
        tracing::debug!(ignored, "system certificates rustls cannot use");
    }
    for path in bundles {
        for cert in read_bundle(path)? {
            roots.add(cert).map_err(|e| RegistryError::CaBundle {
                path: path.clone(),
                reason: format!("a certificate in it is not usable as a trust anchor: {e}"),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::CaBundle {
            path: bundles.first().cloned().unwrap_or_default(),
            reason: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bundles_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = client_config(&[], std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello\n").unwrap();
        let err = client_config(&[], &[empty]).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
