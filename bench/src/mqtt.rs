//! MQTT (3.1.1, QoS 1), enough to publish from simulated devices.

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub struct Url {
    pub host: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

pub fn parse(url: &str) -> anyhow::Result<Url> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .context("--mqtt-url must look like mqtt://user:password@host:port")?;
    let (creds, host) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let (user, password) = match creds.map(|c| c.split_once(':')) {
        Some(Some((u, p))) => (Some(u.to_string()), Some(p.to_string())),
        Some(None) => (creds.map(str::to_string), None),
        None => (None, None),
    };
    Ok(Url {
        host: host.trim_end_matches('/').to_string(),
        user,
        password,
    })
}

pub async fn connect(u: &Url, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(&u.host).await?;
    s.set_nodelay(true)?;
    let mut var = Vec::new();
    string(&mut var, b"MQTT");
    var.push(4);
    let mut flags = 0x02; // clean session
    if u.user.is_some() {
        flags |= 0x80;
    }
    if u.password.is_some() {
        flags |= 0x40;
    }
    var.push(flags);
    var.extend_from_slice(&60u16.to_be_bytes());
    string(&mut var, client_id.as_bytes());
    if let Some(user) = &u.user {
        string(&mut var, user.as_bytes());
    }
    if let Some(p) = &u.password {
        string(&mut var, p.as_bytes());
    }
    let mut pkt = vec![0x10];
    remaining_length(&mut pkt, var.len());
    pkt.extend_from_slice(&var);
    s.write_all(&pkt).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("MQTT CONNACK refused (code {})", ack[3]);
    }
    Ok(s)
}

/// Publishes with QoS 1 and waits for the PUBACK.
pub async fn publish(
    s: &mut TcpStream,
    topic: &str,
    id: u16,
    payload: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    buf.clear();
    buf.push(0x32);
    remaining_length(buf, 2 + topic.len() + 2 + payload.len());
    string(buf, topic.as_bytes());
    buf.extend_from_slice(&id.to_be_bytes());
    buf.extend_from_slice(payload);
    s.write_all(buf).await?;
    loop {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        let mut rest = vec![0u8; head[1] as usize];
        s.read_exact(&mut rest).await?;
        if head[0] == 0x40 && rest.len() == 2 && u16::from_be_bytes([rest[0], rest[1]]) == id {
            return Ok(());
        }
    }
}
