//! Who a certificate says its holder is.
//!
//! A Vitals certificate names its holder in the subject's common name (CN)
//! and its role in the subject's organizational unit (OU): `agent`,
//! `operator` or `collector`. The collector trusts nothing else: the node an
//! agent writes for is the CN of the certificate it presented.

use std::fmt;

use x509_parser::prelude::*;

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Streams samples for the node named by the certificate.
    Agent,
    /// Reads data through the query API.
    Operator,
    /// Serves agents and operators.
    Collector,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Agent, Role::Operator, Role::Collector];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Collector => "collector",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected agent, operator or collector"))
    }
}

/// The identity and details read from one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub name: String,
    pub role: Option<Role>,
    pub issuer: String,
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<String>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub is_ca: bool,
    pub serial: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate has no common name (CN)")]
    NoName,
    #[error("certificate has no Vitals role (OU must be agent, operator or collector)")]
    NoRole,
    #[error("no certificate found in PEM data")]
    NoPem,
}

/// A certificate time (Unix seconds) as RFC 3339, e.g. `2027-01-31T12:00:00Z`.
pub fn format_unix(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        )
        .to_string(),
        Err(_) => secs.to_string(),
    }
}

/// Reads the details of a DER-encoded certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    let role = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(|ou| ou.parse::<Role>().ok());
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(ip_to_string(b)),
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        name,
        role,
        issuer: cert.issuer().to_string(),
        subject: subject.to_string(),
        dns_names,
        ips,
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
        serial: cert.raw_serial_as_string(),
    })
}

fn ip_to_string(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => format!("{b:02x?}"),
    }
}

/// The (name, role) a peer certificate proves.
pub fn identity(der: &[u8]) -> Result<(String, Role), IdentityError> {
    let info = cert_info(der)?;
    if info.name.is_empty() {
        return Err(IdentityError::NoName);
    }
    let role = info.role.ok_or(IdentityError::NoRole)?;
    Ok((info.name, role))
}

/// The first certificate of a PEM file, as DER.
pub fn first_pem_cert(pem: &[u8]) -> Result<Vec<u8>, IdentityError> {
    for item in Pem::iter_from_buffer(pem) {
        let item = item.map_err(|e| IdentityError::Parse(e.to_string()))?;
        if item.label == "CERTIFICATE" {
            return Ok(item.contents);
        }
    }
    Err(IdentityError::NoPem)
}

/// Whether a node name is acceptable: what a hostname may hold.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The (name, role) proven by a gRPC peer's client certificate (the first
/// of its chain): `UNAUTHENTICATED` without one or with one that names
/// nothing usable. Every mutual-TLS service (collector and agent) checks
/// callers with it.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<(String, Role), tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let first = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    identity(first.as_ref())
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate not usable: {e}")))
}
