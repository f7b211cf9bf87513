//! TLS to PostgreSQL: libpq's sslmodes, through rustls with the ring provider (no OpenSSL, so the server
//! cross-compiles like the rest of the crate).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::dburl::{PgUrl, SslMode};
use super::postgres::PgError;

/// The TLS client for `url`'s sslmode, as libpq reads it (see [`super::dburl`]).
pub(super) fn tls_config(url: &PgUrl) -> Result<rustls::ClientConfig, PgError> {
    let bad = |reason: String| PgError::Tls {
        url: url.redacted.clone(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &url.ssl_root_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| bad(format!("cannot read sslrootcert {}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert
                    .map_err(|e| bad(format!("sslrootcert {} is not PEM: {e}", path.display())))?;
                roots.add(cert).map_err(|e| {
                    bad(format!(
                        "a certificate in sslrootcert {} is no trust anchor: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(bad(format!(
                    "sslrootcert {} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => {
            roots.add_parsable_certificates(crate::registry::tls::system_roots());
        }
    }
    let check = match (url.ssl_mode, &url.ssl_root_cert) {
        (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => Check::Nothing,
        (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, _) => Check::Chain,
        (SslMode::VerifyFull, _) => Check::ChainAndName,
    };
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let builder = match (check, webpki) {
        (Check::ChainAndName, Ok(v)) => builder.with_webpki_verifier(v),
        (Check::Nothing, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                chain: None,
                algorithms: provider.signature_verification_algorithms,
            })),
        (Check::Chain, Ok(v)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                chain: Some(v),
                algorithms: provider.signature_verification_algorithms,
            })),
        (_, Err(e)) => {
            return Err(bad(format!(
                "no trusted roots to check the server's certificate with ({e}); give sslrootcert=FILE"
            )));
        }
    };
    Ok(builder.with_no_client_auth())
}

#[derive(Clone, Copy)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// libpq's `require` (no check) and `verify-ca` (the chain, not the name). The handshake's signatures are checked
/// all the same: the connection is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain before the name, so a name error means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
