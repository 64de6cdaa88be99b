//! The smallest HTTP/1.1 client the Milvus REST API needs: one JSON request per connection
//! (`Connection: close`), Content-Length or chunked replies. Written on std's TcpStream so the
//! Milvus backend adds no dependency (no async runtime, no TLS: plain http on a trusted
//! network, as Milvus's own REST port serves it).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why a request got no HTTP answer (connection refused, timeout, garbled reply): the
/// transport failed, so the caller may retry.
#[derive(Debug)]
pub struct Transport(pub String);

/// `METHOD path` to `addr` ("host:port") with an optional JSON body: (status, body).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), Transport> {
    let t = |e: std::io::Error| Transport(e.to_string());
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| Transport(format!("cannot resolve {addr} ({e})")))?
        .next()
        .ok_or_else(|| Transport(format!("cannot resolve {addr}")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(t)?;
    s.set_read_timeout(Some(timeout)).map_err(t)?;
    s.set_write_timeout(Some(timeout)).map_err(t)?;
    // JSON headers only with a body: Milvus's /healthz answers a JSON Accept differently
    let json = if body.is_some() {
        "Content-Type: application/json\r\nAccept: application/json\r\n"
    } else {
        ""
    };
    let body = body.unwrap_or(&[]);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{json}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(t)?;
    s.write_all(body).map_err(t)?;
    s.flush().map_err(t)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(t)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Transport(format!("not an HTTP reply: {:?}", line.trim())))?;
    let (mut len, mut chunked) = (None, false);
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(t)? == 0 {
            return Err(Transport(
                "connection closed inside the reply's headers".into(),
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).map_err(t)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| Transport("bad chunk size in the reply".into()))?;
            if n == 0 {
                break;
            }
            let start = out.len();
            out.resize(start + n, 0);
            r.read_exact(&mut out[start..]).map_err(t)?;
            line.clear();
            r.read_line(&mut line).map_err(t)?;
        }
    } else if let Some(n) = len {
        out.resize(n, 0);
        r.read_exact(&mut out).map_err(t)?;
    } else {
        r.read_to_end(&mut out).map_err(t)?;
    }
    Ok((status, out))
}
