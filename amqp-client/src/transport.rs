//! Opening the byte stream: DNS, TCP, and TLS (tokio-rustls) for `amqps://`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::error::Error;
#[cfg(feature = "tls")]
use tls::*;

/// A plain or TLS stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resolves the host and connects to the first address that accepts.
pub(crate) async fn connect(config: &Config) -> Result<Stream, Error> {
    let address = config.address();
    let addrs: Vec<_> = tokio::net::lookup_host((config.host.as_str(), config.port))
        .await
        .map_err(|e| Error::Dns {
            address: address.clone(),
            source: Arc::new(e),
        })?
        .collect();
    let mut last_error = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let tcp = match tcp {
        Some(tcp) => tcp,
        None => {
            let source = last_error
                .unwrap_or_else(|| std::io::Error::other("the host resolved to no address"));
            return Err(Error::Connect {
                address,
                source: Arc::new(source),
            });
        }
    };
    // Frames are batched by the I/O task; Nagle would only add latency.
    let _ = tcp.set_nodelay(true);
    match &config.tls {
        None => Ok(Stream::Tcp(tcp)),
        #[cfg(not(feature = "tls"))]
        Some(_) => Err(Error::TlsNotCompiled { address }),
        #[cfg(feature = "tls")]
        Some(tls) => {
            let tls_error = |reason: String| Error::Tls {
                address: address.clone(),
                reason,
            };
            let client_config = match &tls.client_config {
                Some(ready) => ready.0.clone(),
                None => Arc::new(client_config(tls).map_err(tls_error)?),
            };
            let connector = TlsConnector::from(client_config);
            let name = tls
                .server_name
                .clone()
                .unwrap_or_else(|| config.host.clone());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| tls_error(format!("`{name}` is not a valid server name: {e}")))?;
            let stream = connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            Ok(Stream::Tls(Box::new(stream)))
        }
    }
}

/// The TLS half: rustls configuration from [`TlsConfig`] (feature `tls`).
#[cfg(feature = "tls")]
mod tls {
    use std::sync::Arc;
    pub(super) use tokio_rustls::client::TlsStream;
    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    pub(super) use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
    use tokio_rustls::rustls::{
        self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    };
    pub(super) use tokio_rustls::TlsConnector;

    use crate::config::TlsConfig;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    pub(super) fn client_config(tls: &TlsConfig) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if tls.dangerous_accept_invalid_certs {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
        } else {
            builder.with_root_certificates(roots(tls)?)
        };
        let (chain, key) = match (&tls.client_cert_pem, &tls.client_cert) {
            (None, None) => return Ok(builder.with_no_client_auth()),
            (Some((cert_pem, key_pem)), _) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("bad client certificate PEM: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| format!("bad client key PEM: {e}"))?;
                (chain, key)
            }
            (None, Some((cert_path, key_path))) => {
                let chain = CertificateDer::pem_file_iter(cert_path)
                    .map_err(|e| {
                        format!(
                            "cannot read client certificate {}: {e}",
                            cert_path.display()
                        )
                    })?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("bad client certificate {}: {e}", cert_path.display()))?;
                let key = PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|e| format!("cannot read client key {}: {e}", key_path.display()))?;
                (chain, key)
            }
        };
        if chain.is_empty() {
            return Err("the client certificate PEM holds no certificate".to_owned());
        }
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("client certificate rejected: {e}"))
    }

    /// The roots to trust: the CA file and PEM given, else the system's.
    fn roots(tls: &TlsConfig) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = &tls.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            let before = roots.len();
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
            }
            if roots.len() == before {
                return Err(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        if let Some(pem) = &tls.ca_pem {
            let before = roots.len();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("bad certificate in the CA PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA certificate in the CA PEM: {e}"))?;
            }
            if roots.len() == before {
                return Err("the CA PEM holds no certificate".to_owned());
            }
        }
        if tls.ca_file.is_some() || tls.ca_pem.is_some() {
            return Ok(roots);
        }
        let native = rustls_native_certs::load_native_certs();
        let mut refused = Vec::new();
        for cert in native.certs {
            if let Err(e) = roots.add(cert) {
                refused.push(e.to_string());
            }
        }
        let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
        if roots.is_empty() {
            let mut reason = "no system root certificate could be loaded".to_owned();
            for error in errors.iter().chain(&refused) {
                reason.push_str("; ");
                reason.push_str(error);
            }
            reason.push_str(" (give a CA file or PEM)");
            return Err(reason);
        }
        if !errors.is_empty() || !refused.is_empty() {
            // Some roots loaded: connect with them, but say what was skipped.
            tracing::warn!(
                loaded = roots.len(),
                ?errors,
                ?refused,
                "some system root certificates could not be loaded"
            );
        }
        Ok(roots)
    }

    /// The verifier behind `dangerous_accept_invalid_certs`: checks signatures
    /// (so the handshake is well-formed) but trusts any certificate.
    #[derive(Debug)]
    struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

/// The read side of a [`Stream`].
#[derive(Debug)]
pub(crate) enum Reader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    #[cfg(feature = "tls")]
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write side of a [`Stream`].
#[derive(Debug)]
pub(crate) enum Writer {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    #[cfg(feature = "tls")]
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl Stream {
    /// Splits the stream so that reading and writing can wait at once. TCP
    /// splits for free; TLS shares one session behind tokio's lock.
    pub(crate) fn into_split(self) -> (Reader, Writer) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Reader::Tcp(r), Writer::Tcp(w))
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Reader::Tls(r), Writer::Tls(w))
            }
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Reader::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Writer::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Writer::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Writer::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Writer::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Writer::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Writer::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "tls")]
    #[test]
    fn in_memory_pem_that_holds_no_certificate_is_an_error() {
        use crate::config::TlsConfig;
        let error = tls::client_config(&TlsConfig::default().with_ca_pem(b"not a PEM".to_vec()))
            .expect_err("no certificate");
        assert!(error.contains("CA PEM holds no certificate"), "{error}");
        let error = tls::client_config(
            &TlsConfig {
                dangerous_accept_invalid_certs: true,
                ..Default::default()
            }
            .with_client_cert_pem(b"nothing".to_vec(), b"nothing".to_vec()),
        )
        .expect_err("no client certificate");
        assert!(error.contains("client"), "{error}");
    }

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn amqps_without_the_tls_feature_is_a_typed_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let config: Config = format!("amqps://127.0.0.1:{port}/%2f")
            .parse()
            .expect("a valid URL");
        match connect(&config).await {
            Err(Error::TlsNotCompiled { address }) => assert!(address.contains(&port.to_string())),
            other => panic!("expected TlsNotCompiled, got {other:?}"),
        }
    }
}
