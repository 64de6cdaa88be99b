//! A local Milvus standalone server (the binary `tools/setup.sh milvus` unpacks from the PyPI
//! package `milvus` 2.3.5) on loopback with free ports, its data in one folder: for the tests,
//! the benchmark and users who want to try the backend without a cluster. `start` waits until
//! the server answers its health check; `stop` (and dropping the handle) ends it.
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server's files: `bin/milvus`, its libraries, `milvus.yaml.template`, `glog.conf`.
pub fn install_dir() -> PathBuf {
    crate::files::cache_dir().join("milvus")
}

/// The config keys that are ports (the template's `{{ name(int): default }}` placeholders).
const PORTS: [&str; 10] = [
    "etcd_port",
    "proxy_port",
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
];

pub struct MilvusServer {
    child: Option<Child>,
    dir: PathBuf,
    /// The port of the proxy (REST and gRPC).
    pub port: u16,
    /// The health-check (metrics) port.
    health_port: u16,
    ports: Vec<u16>,
    _tmp: Option<tempfile::TempDir>,
}

/// Free loopback ports, held until all are chosen so none is chosen twice.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Other(format!("milvus server: no free loopback port ({e})")))?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect())
}

impl MilvusServer {
    /// Start a server with its data in a fresh temporary folder.
    pub fn start() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("ehm-milvus-")
            .tempdir()
            .map_err(|e| Error::Other(format!("milvus server: no temporary folder ({e})")))?;
        let mut s = Self::start_in(tmp.path(), None)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Start a server with its data in `dir` (kept: a later start in the same folder sees the
    /// same collections), on `ports` from an earlier start or fresh ones.
    pub fn start_in(dir: &Path, ports: Option<&[u16]>) -> Result<Self> {
        let inst = install_dir();
        let exe = inst.join("bin/milvus");
        if !exe.exists() {
            return Err(Error::MissingData(format!(
                "{}: no Milvus server here; run tools/setup.sh milvus",
                exe.display()
            )));
        }
        let ports = match ports {
            Some(p) if p.len() == PORTS.len() + 3 => p.to_vec(),
            _ => free_ports(PORTS.len() + 3)?,
        };
        let (health_port, peer_port) = (ports[PORTS.len()], ports[PORTS.len() + 1]);
        for sub in ["configs", "logs", "data", "run"] {
            std::fs::create_dir_all(dir.join(sub)).at(dir.join(sub))?;
        }
        // the server runs in `dir` and reads every path of its config from there
        let dir = &std::fs::canonicalize(dir).at(dir)?;
        let tpl_path = inst.join("milvus.yaml.template");
        let tpl = std::fs::read_to_string(&tpl_path).at(&tpl_path)?;
        let d = |s: &str| dir.join(s).display().to_string();
        let mut values: Vec<(&str, String)> = PORTS
            .iter()
            .zip(&ports)
            .map(|(k, p)| (*k, p.to_string()))
            .collect();
        values.extend([
            ("etcd_log_path", d("logs/etcd.log")),
            ("etcd_data_dir", d("data/etcd.data")),
            ("local_storage_dir", d("data")),
            ("rocksmq_data_dir", d("data/rocksmq")),
            ("system_log_path", d("logs")),
        ]);
        let mut yaml = fill_template(&tpl, &values);
        // the embedded etcd listens on 2379/2380 unless given its own config: give it the
        // ports chosen here, so that several servers (parallel tests) can run on one machine
        let etcd_port = ports[0];
        let etcd_cfg = format!(
            "name: default\ndata-dir: {}\nlisten-client-urls: http://127.0.0.1:{etcd_port}\nadvertise-client-urls: http://127.0.0.1:{etcd_port}\nlisten-peer-urls: http://127.0.0.1:{peer_port}\ninitial-advertise-peer-urls: http://127.0.0.1:{peer_port}\ninitial-cluster: default=http://127.0.0.1:{peer_port}\n",
            d("data/etcd.data")
        );
        std::fs::write(dir.join("configs/etcd.yaml"), etcd_cfg).at(dir.join("configs/etcd.yaml"))?;
        yaml = yaml.replacen(
            "  use:\n    embed: true",
            &format!(
                "  config:\n    path: {}\n  use:\n    embed: true",
                d("configs/etcd.yaml")
            ),
            1,
        );
        std::fs::write(dir.join("configs/milvus.yaml"), yaml).at(dir.join("configs/milvus.yaml"))?;
        let glog = inst.join("glog.conf");
        std::fs::copy(&glog, dir.join("configs/glog.conf")).at(&glog)?;
        let log = |n: &str| {
            std::fs::File::create(dir.join("logs").join(n)).map_err(|e| Error::io(dir.join(n), e))
        };
        let child = Command::new(&exe)
            .args(["run", "standalone"])
            .current_dir(dir)
            .env("DEPLOY_MODE", "STANDALONE")
            .env("METRICS_PORT", health_port.to_string())
            .env("MILVUS_RUN_DIR", dir.join("run"))
            .env("LD_LIBRARY_PATH", inst.join("bin"))
            .stdin(Stdio::null())
            .stdout(log("milvus-stdout.log")?)
            .stderr(log("milvus-stderr.log")?)
            .spawn()
            .map_err(|e| Error::Other(format!("{}: cannot start ({e})", exe.display())))?;
        let mut s = MilvusServer {
            child: Some(child),
            dir: dir.to_path_buf(),
            port: ports[1],
            health_port,
            ports,
            _tmp: None,
        };
        s.wait_healthy(Duration::from_secs(120))?;
        Ok(s)
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let addr = format!("127.0.0.1:{}", self.health_port);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(Error::Other(format!(
                    "milvus server exited during start-up ({st}); see {}",
                    self.dir.join("logs/milvus-stderr.log").display()
                )));
            }
            if let Ok((200, body)) =
                super::http::request(&addr, "GET", "/healthz", None, Duration::from_secs(2))
            {
                if body.starts_with(b"OK") {
                    // the proxy's port answers shortly after the health check
                    let proxy = format!("127.0.0.1:{}", self.port);
                    if std::net::TcpStream::connect(&proxy).is_ok() {
                        return Ok(());
                    }
                }
            }
            if t0.elapsed() > limit {
                self.stop();
                return Err(Error::Other(format!(
                    "milvus server not healthy after {} s; see {}",
                    limit.as_secs(),
                    self.dir.join("logs/milvus-stderr.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `milvus://127.0.0.1:PORT/COLLECTION`.
    pub fn uri(&self, collection: &str) -> String {
        format!("milvus://127.0.0.1:{}/{collection}", self.port)
    }

    /// The folder of its config, logs and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports it listens on (to restart it with `start_in(dir, Some(ports))`).
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// End the server: SIGTERM, then SIGKILL if it has not exited within 3 s (2.3.5's
    /// graceful stop can hang).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// End the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MilvusServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Replace the template's `{{ name }}`, `{{ name(type): default }}` placeholders: by `values`
/// where named there, else by the default (empty if none).
fn fill_template(tpl: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(tpl.len());
    let mut rest = tpl;
    while let Some(a) = rest.find("{{") {
        let Some(b) = rest[a..].find("}}") else {
            break;
        };
        out.push_str(&rest[..a]);
        let inner = rest[a + 2..a + b].trim();
        let name: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        match values.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => out.push_str(inner.split_once(':').map_or("", |(_, d)| d.trim())),
        }
        rest = &rest[a + b + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_placeholders_take_values_or_defaults() {
        let t = "a: {{ proxy_port(int): 19530 }}\nb: {{ x: info }}\nc: {{ d }}\n";
        let s = super::fill_template(t, &[("proxy_port", "7".into())]);
        assert_eq!(s, "a: 7\nb: info\nc: \n");
    }
}
