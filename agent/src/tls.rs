//! TLS toward the controller, for an Edge API behind https (the public Edge
//! API is `https://…/edge/v1`; the guide's own controller is plain http on
//! 9000, which needs none of this).
//!
//! Trust: Mozilla's root certificates built into the agent (webpki-roots),
//! plus the image's CA bundle when it has one, plus `AIWARE_CONTROLLER_CA`
//! for a controller whose certificate comes from a private CA: PEM text, or
//! the absolute path of a PEM file (e.g. one written by `write_files`).
//! Certificates are always verified; there is no switch to turn that off.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;

/// Where Debian's ca-certificates puts the bundle (absent from most images).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The certificates of `AIWARE_CONTROLLER_CA`: PEM text, or a file path.
pub fn controller_ca(
    value: &str,
    written: &[crate::userdata::WriteFile],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let (text, whence) = pem_value(value, "CA", written)?;
    let certs = parse_pem(&text).map_err(|e| format!("{whence} is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{whence} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    Ok(certs)
}

/// A setting that holds PEM: the text itself, or the absolute path of a
/// file. A path the same launch's `write_files` writes is read from there:
/// settings are checked before the files are written at a first boot.
/// Returns the bytes and where they came from, for messages (never the
/// bytes themselves: keys).
pub fn pem_value(
    value: &str,
    what: &str,
    written: &[crate::userdata::WriteFile],
) -> Result<(Vec<u8>, String), String> {
    let v = value.trim();
    if let Some(f) = written.iter().rev().find(|f| f.path == v && !f.append) {
        return Ok((f.content.clone(), format!("write_files' {v}")));
    }
    if v.starts_with('/') && !v.contains('\n') {
        let t = std::fs::read(v).map_err(|e| format!("cannot read the {what} file {v}: {e}"))?;
        Ok((t, format!("the file {v}")))
    } else {
        Ok((v.as_bytes().to_vec(), "the value".to_string()))
    }
}

/// `true` when `text` has a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn holds_private_key(text: &[u8]) -> bool {
    rustls_pki_types::PrivateKeyDer::from_pem_slice(text).is_ok()
}

pub(crate) fn parse_pem(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{e:?}"))
}

/// A client configuration trusting the built-in roots, the image's bundle
/// and `extra` (from `AIWARE_CONTROLLER_CA`).
pub fn client_config(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Ok(bundle) = std::fs::read(SYSTEM_BUNDLE) {
        // Entries the verifier cannot use are skipped, as every TLS client does.
        let _ = roots.add_parsable_certificates(parse_pem(&bundle).unwrap_or_default());
    }
    for (i, c) in extra.iter().enumerate() {
        roots
            .add(c.clone())
            .map_err(|e| format!("AIWARE_CONTROLLER_CA certificate {}: {e}", i + 1))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_from_text_or_file_and_clear_errors() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = ca.pem();
        assert_eq!(controller_ca(&pem, &[]).unwrap().len(), 1);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ca.pem");
        std::fs::write(&f, format!("{pem}{pem}")).unwrap();
        assert_eq!(controller_ca(f.to_str().unwrap(), &[]).unwrap().len(), 2);
        let e = controller_ca("/nonexistent/ca.pem", &[]).unwrap_err();
        assert!(
            e.contains("cannot read the CA file /nonexistent/ca.pem"),
            "{e}"
        );
        let e = controller_ca("hello", &[]).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let broken = pem.replace("-----END CERTIFICATE-----", "");
        assert!(controller_ca(&broken, &[]).is_err());
        assert!(client_config(&controller_ca(&pem, &[]).unwrap()).is_ok());
    }
}
