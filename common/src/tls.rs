//! TLS settings shared by every Vitals process: PEM files in, tonic configs out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The three files a Vitals process needs for mutual TLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signs every certificate of this deployment.
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM, mode 0600).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
}

/// Loaded PEM material.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub files: TlsFiles,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    /// Resolves relative paths against `base` (the directory of the config file).
    pub fn relative_to(&self, base: &Path) -> TlsFiles {
        TlsFiles {
            ca: base.join(&self.ca),
            cert: base.join(&self.cert),
            key: base.join(&self.key),
        }
    }

    /// Reads and sanity-checks the three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read("CA certificate", &self.ca)?;
        let cert_pem = read("certificate", &self.cert)?;
        let key_pem = read("private key", &self.key)?;
        for (path, pem) in [(&self.ca, &ca_pem), (&self.cert, &cert_pem)] {
            crate::identity::first_pem_cert(pem).map_err(|e| TlsError::Bad {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            return Err(TlsError::Bad {
                path: self.key.clone(),
                message: "no PEM private key found".into(),
            });
        }
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            files: self.clone(),
        })
    }
}

impl TlsMaterial {
    /// Client side: verify the server against the CA and `server_name`, and
    /// present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }

    /// Server side as a rustls config, for a listener whose certificates can
    /// be swapped while it runs: our certificate chain and key, client
    /// certificates required and verified against the CA, HTTP/2 only.
    /// Fails on a key that does not parse or does not match the certificate.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |path: &Path, message: String| TlsError::Bad {
            path: path.to_path_buf(),
            message,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| bad(&self.files.ca, e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| bad(&self.files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(&self.files.ca, e.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&self.files.cert, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| bad(&self.files.key, e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&self.files.cert, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                bad(
                    &self.files.key,
                    format!("does not go with {}: {e}", self.files.cert.display()),
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// One line about our certificate for logs: name, serial, expiry.
    pub fn describe(&self) -> String {
        match crate::identity::first_pem_cert(&self.cert_pem)
            .ok()
            .and_then(|der| crate::identity::cert_info(&der).ok())
        {
            Some(info) => format!(
                "{} (serial {}, not after {})",
                info.name,
                info.serial,
                crate::identity::format_unix(info.not_after_unix)
            ),
            None => "unreadable certificate".into(),
        }
    }

    /// Which of the three files differ from `other` (path or content).
    pub fn changed_files(&self, other: &TlsMaterial) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.files.ca != other.files.ca || self.ca_pem != other.ca_pem {
            out.push("tls.ca");
        }
        if self.files.cert != other.files.cert || self.cert_pem != other.cert_pem {
            out.push("tls.cert");
        }
        if self.files.key != other.files.key || self.key_pem != other.key_pem {
            out.push("tls.key");
        }
        out
    }

    /// The (name, role) our own certificate carries.
    pub fn own_identity(&self) -> Result<(String, crate::identity::Role), TlsError> {
        let bad = |message: String| TlsError::Bad {
            path: self.files.cert.clone(),
            message,
        };
        let der =
            crate::identity::first_pem_cert(&self.cert_pem).map_err(|e| bad(e.to_string()))?;
        crate::identity::identity(&der).map_err(|e| bad(e.to_string()))
    }
}

/// The host part of a URL like `https://host:7443`, for certificate checks.
pub fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_string);
    }
    let host = authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority);
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_urls() {
        assert_eq!(
            host_of("https://127.0.0.1:7443").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            host_of("https://collector.example").as_deref(),
            Some("collector.example")
        );
        assert_eq!(host_of("https://[::1]:7443/").as_deref(), Some("::1"));
        assert_eq!(host_of("https://:7443"), None);
    }
}
