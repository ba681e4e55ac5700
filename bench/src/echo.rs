//! The baseline: a bare QUIC request/response echo with tally's TLS configuration, frame
//! format and sizes (64 bytes in, 128 out), one bidirectional stream per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tally_protocol::frame::{encode_frame, parse_header, HEADER_LEN};
use tally_protocol::keys::SecretKey;

/// A running echo server; dropped, it stops.
pub struct Echo {
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// Starts the echo server on loopback.
pub fn start() -> anyhow::Result<Echo> {
    let key = SecretKey::from_seed([77; 32]);
    let config = tally_daemon::tls::server_config(&key, Duration::from_secs(15), None)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let endpoint = quinn::Endpoint::new(
        tally_daemon::tls::endpoint_config(&key),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut header = [0u8; HEADER_LEN];
                        if recv.read_exact(&mut header).await.is_err() {
                            return;
                        }
                        let Ok(h) = parse_header(&header, 65536) else {
                            return;
                        };
                        let mut payload = vec![0u8; h.payload_len];
                        if recv.read_exact(&mut payload).await.is_err() {
                            return;
                        }
                        let reply = encode_frame(1, &[0x5a; 122]);
                        if send.write_all(&reply).await.is_ok() {
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    Ok(Echo { addr, endpoint })
}

/// Runs the echo server in this process, prints `listening on ADDR`, and serves until
/// stdin closes: the scale group's baseline process.
pub fn serve_until_stdin_closes() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let echo = {
        let _guard = runtime.enter();
        start()?
    };
    println!("listening on {}", echo.addr);
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(echo);
    Ok(())
}

/// One client connection to the echo server.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(tally_client::quic_client_config()?);
    let conn = endpoint.connect(addr, "tally")?.await?;
    Ok((endpoint, conn))
}

/// One echo request: 64 bytes out, 128 back.
pub async fn request(conn: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(1, &[0xa5; 58])).await?;
    send.finish()?;
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let h = parse_header(&header, 65536)?;
    let mut payload = vec![0u8; h.payload_len];
    recv.read_exact(&mut payload).await?;
    Ok(())
}
