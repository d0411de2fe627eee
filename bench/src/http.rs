//! A minimal HTTP/1.1 keep-alive client: the generator shares the machine's cores with the
//! platform, so it does as little work per request as it can (one write, usually one read).

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request that takes longer than this is counted as an error and its connection dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Reply {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// The server will close the connection after this answer.
    pub close: bool,
}

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: vec![0; 16 * 1024],
            filled: 0,
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.filled == self.buf.len() {
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.filled += n;
        Ok(())
    }

    async fn ensure(&mut self, upto: usize) -> std::io::Result<()> {
        while self.filled < upto {
            self.fill().await?;
        }
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Sends one complete request (head and body) and reads its answer.
    pub async fn request(&mut self, req: &[u8], want_body: bool) -> std::io::Result<Reply> {
        self.stream.write_all(req).await?;
        let head_end = loop {
            if let Some(p) = find(&self.buf[..self.filled], b"\r\n\r\n") {
                break p + 4;
            }
            self.fill().await?;
        };
        let (status, length, chunked, close) = {
            let head = std::str::from_utf8(&self.buf[..head_end])
                .map_err(|_| bad("answer head is not UTF-8"))?;
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("no status line"))?;
            let (mut length, mut chunked, mut close) = (None, false, false);
            for l in lines {
                let Some((k, v)) = l.split_once(':') else {
                    continue;
                };
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                } else if k.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
            (status, length, chunked, close)
        };
        if chunked {
            let mut body = Vec::new();
            let mut pos = head_end;
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf[pos..self.filled], b"\r\n") {
                        break pos + p;
                    }
                    self.fill().await?;
                };
                let size_text = std::str::from_utf8(&self.buf[pos..line_end])
                    .map_err(|_| bad("bad chunk size"))?;
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size =
                    usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
                pos = line_end + 2;
                if size == 0 {
                    self.ensure(pos + 2).await?;
                    pos += 2;
                    break;
                }
                self.ensure(pos + size + 2).await?;
                if want_body {
                    body.extend_from_slice(&self.buf[pos..pos + size]);
                }
                pos += size + 2;
            }
            self.consume(pos);
            return Ok(Reply {
                status,
                body: want_body.then_some(body),
                close,
            });
        }
        match length {
            Some(n) => {
                self.ensure(head_end + n).await?;
                let body = want_body.then(|| self.buf[head_end..head_end + n].to_vec());
                self.consume(head_end + n);
                Ok(Reply {
                    status,
                    body,
                    close,
                })
            }
            None => {
                // No length: the body runs to the end of the connection.
                while self.fill().await.is_ok() {}
                let body = want_body.then(|| self.buf[head_end..self.filled].to_vec());
                self.filled = 0;
                Ok(Reply {
                    status,
                    body,
                    close: true,
                })
            }
        }
    }
}

/// `Authorization: Bearer …` sent with every request, when the platform checks JWTs.
pub static AUTHORIZATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Appends a complete request to `out`.
pub fn request_bytes(out: &mut Vec<u8>, method: &str, host: &str, path: &str, body: Option<&[u8]>) {
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(token) = AUTHORIZATION.get() {
        let _ = write!(out, "Authorization: Bearer {token}\r\n");
    }
    match body {
        Some(b) => {
            let _ = write!(
                out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            );
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(b"\r\n"),
    }
}

/// One GET on a fresh connection: (status, body).
pub async fn get_once(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut c = tokio::time::timeout(Duration::from_secs(2), Conn::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut req = Vec::new();
    request_bytes(&mut req, "GET", host, path, None);
    let r = tokio::time::timeout(Duration::from_secs(5), c.request(&req, true))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok((r.status, r.body.unwrap_or_default()))
}

/// `http://host:port` → (socket address, Host header value).
pub async fn target(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let host = rest.split('/').next().unwrap_or(rest).to_string();
    let addr = tokio::net::lookup_host(&host)
        .await?
        .next()
        .with_context(|| format!("{url}: no address"))?;
    Ok((addr, host))
}
