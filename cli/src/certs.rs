//! `vitals certs`: a small CA for one deployment.
//!
//! Files: `DIR/ca.pem` + `DIR/ca.key` for the CA, `DIR/NAME.pem` +
//! `DIR/NAME.key` for each issued certificate. Keys are written mode 0600.
//! The holder's name is the subject CN; its role is the subject OU
//! (`agent`, `operator` or `collector`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use vitals_common::identity::Role;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, data: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // The mode above applies only to a new file: make sure of it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn write_public(path: &Path, data: &str) -> Result<()> {
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Creates a CA in `dir`; refuses to overwrite one.
pub fn init(dir: &Path, days: i64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} already holds a CA ({CA_CERT}/{CA_KEY}); keep using it, or choose another --dir",
            dir.display()
        );
    }
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Vitals CA");
    dn.push(DnType::OrganizationName, "Vitals");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    params.serial_number = Some(serial());
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok(cert_path)
}

/// What to put in an issued certificate.
pub struct IssueRequest<'a> {
    pub name: &'a str,
    pub role: Role,
    pub dns: &'a [String],
    pub ips: &'a [IpAddr],
    pub days: i64,
    pub not_after: Option<OffsetDateTime>,
}

/// Issues a key + certificate signed by the CA in `dir`; returns (cert, key) paths.
pub fn issue(dir: &Path, req: &IssueRequest<'_>) -> Result<(PathBuf, PathBuf)> {
    if !vitals_common::identity::valid_node_name(req.name) {
        bail!(
            "name {:?} is not usable: use letters, digits, '-', '_' and '.' (a hostname)",
            req.name
        );
    }
    let ca_pem = std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| {
        format!(
            "cannot read the CA certificate {}; create one with `vitals certs init --dir {}`",
            dir.join(CA_CERT).display(),
            dir.display()
        )
    })?;
    let ca_key_pem = std::fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("cannot read the CA key {}", dir.join(CA_KEY).display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("the CA key is not a valid PEM key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("the CA certificate is not valid")?;

    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name);
    dn.push(DnType::OrganizationalUnitName, req.role.as_str());
    dn.push(DnType::OrganizationName, "Vitals");
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    let mut dns: Vec<String> = req.dns.to_vec();
    if dns.is_empty() && req.ips.is_empty() {
        dns.push(req.name.to_string());
    }
    for d in &dns {
        sans.push(SanType::DnsName(
            d.clone()
                .try_into()
                .with_context(|| format!("invalid DNS name {d:?}"))?,
        ));
    }
    for ip in req.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match req.role {
        // An agent also serves its `[net_test]` listener with its own
        // certificate.
        Role::Collector | Role::Agent => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = OffsetDateTime::now_utc();
    let not_after = req.not_after.unwrap_or(now + Duration::days(req.days));
    params.not_before = (now - Duration::hours(1)).min(not_after - Duration::days(1));
    params.not_after = not_after;
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the certificate")?;
    let cert_path = dir.join(format!("{}.pem", req.name));
    let key_path = dir.join(format!("{}.key", req.name));
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok((cert_path, key_path))
}

/// Parses `YYYY-MM-DD` or RFC 3339 into a time.
pub fn parse_date(s: &str) -> Result<OffsetDateTime> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full)
        .with_context(|| format!("{s:?} is not a date (YYYY-MM-DD or RFC 3339)"))?;
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp(secs).context("date out of range")
}

/// `vitals certs show`: the facts an operator needs about one certificate.
pub fn show(path: &Path, json: bool) -> Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let der = vitals_common::identity::first_pem_cert(&pem)
        .with_context(|| format!("{} holds no certificate", path.display()))?;
    let info = vitals_common::identity::cert_info(&der)
        .with_context(|| format!("{} is not a valid certificate", path.display()))?;
    let now = vitals_common::now_ms() / 1000;
    let status = if now > info.not_after_unix {
        "EXPIRED"
    } else if now < info.not_before_unix {
        "not yet valid"
    } else {
        "valid"
    };
    let role = info
        .role
        .map(|r| r.as_str())
        .unwrap_or(if info.is_ca { "ca" } else { "none" });
    if json {
        return Ok(serde_json::json!({
            "file": path.display().to_string(),
            "name": info.name,
            "role": role,
            "subject": info.subject,
            "issuer": info.issuer,
            "dns": info.dns_names,
            "ips": info.ips,
            "not_before": vitals_common::identity::format_unix(info.not_before_unix),
            "not_after": vitals_common::identity::format_unix(info.not_after_unix),
            "status": status,
            "is_ca": info.is_ca,
            "serial": info.serial,
        })
        .to_string());
    }
    let days_left = (info.not_after_unix - now) / 86400;
    Ok(format!(
        "file:       {}\nsubject:    {}\nname:       {}\nrole:       {}\nissuer:     {}\nDNS names:  {}\nIP SANs:    {}\nnot before: {}\nnot after:  {} ({status}, {days_left} days left)\nserial:     {}",
        path.display(),
        info.subject,
        info.name,
        role,
        info.issuer,
        if info.dns_names.is_empty() {
            "-".into()
        } else {
            info.dns_names.join(", ")
        },
        if info.ips.is_empty() {
            "-".into()
        } else {
            info.ips.join(", ")
        },
        vitals_common::identity::format_unix(info.not_before_unix),
        vitals_common::identity::format_unix(info.not_after_unix),
        info.serial,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_roundtrip_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        assert!(
            init(dir.path(), 30).is_err(),
            "a second init must not overwrite the CA"
        );
        let ips = ["127.0.0.1".parse().unwrap()];
        let req = IssueRequest {
            name: "train-01",
            role: Role::Agent,
            dns: &[],
            ips: &ips,
            days: 10,
            not_after: None,
        };
        let (cert, key) = issue(dir.path(), &req).unwrap();
        for k in [key, dir.path().join(CA_KEY)] {
            let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        let pem = std::fs::read(&cert).unwrap();
        let der = vitals_common::identity::first_pem_cert(&pem).unwrap();
        let (name, role) = vitals_common::identity::identity(&der).unwrap();
        assert_eq!((name.as_str(), role), ("train-01", Role::Agent));
        let text = show(&cert, false).unwrap();
        assert!(text.contains("role:       agent"), "{text}");
        assert!(text.contains("127.0.0.1"), "{text}");
        let expired = IssueRequest {
            not_after: Some(parse_date("2020-01-02").unwrap()),
            ..req
        };
        let (old, _) = issue(dir.path(), &expired).unwrap();
        assert!(show(&old, false).unwrap().contains("EXPIRED"));
    }
}
