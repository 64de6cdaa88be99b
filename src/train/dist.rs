//! Data parallelism on PyTorch's own distributed engine, c10d: the TCPStore for rendezvous and
//! the Gloo process group for all-reduce and broadcast (the objects DDP uses, from the
//! libtorch_cpu.so tch loads; bound through the small C++ shim `c10d.cpp`, see build.rs), or on
//! GPUs the NCCL process group from the optional plugin `c10d_nccl.cpp` (dlopened; built by
//! tools/build_nccl_plugin.sh).
//!
//! Faults: every collective is bounded by the timeout. When one fails, this rank finds out
//! which rank is to blame from the store before it stops: each rank bumps a heartbeat counter
//! twice a second (a dead process stops bumping it) and a counter per collective entered (a
//! live but hung rank falls behind).
use super::launch::Launch;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

const HEARTBEAT: Duration = Duration::from_millis(500);
/// Rank 0's own work (monitors, checkpoints) may take this many `--dist-timeout`s.
const RANK0_WORK_FACTOR: u32 = 6;

#[cfg(ehm_c10d)]
mod ffi {
    use std::os::raw::{c_char, c_int};
    #[repr(C)]
    pub struct RawStore {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub struct RawPg {
        _p: [u8; 0],
    }
    extern "C" {
        pub fn ehm_store_open(
            host: *const c_char,
            port: u16,
            is_server: c_int,
            workers: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            n: usize,
        ) -> *mut RawStore;
        pub fn ehm_store_port(s: *const RawStore) -> c_int;
        pub fn ehm_store_add(
            s: *mut RawStore,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn ehm_store_free(s: *mut RawStore);
        pub fn ehm_pg_new(
            s: *mut RawStore,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            n: usize,
        ) -> *mut RawPg;
        pub fn ehm_pg_all_reduce_sum(
            p: *mut RawPg,
            t: *mut torch_sys::C_tensor,
            timeout_ms: i64,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn ehm_pg_broadcast(
            p: *mut RawPg,
            t: *mut torch_sys::C_tensor,
            root: c_int,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn ehm_pg_free(p: *mut RawPg);
    }
}

/// Stand-ins when build.rs could not compile the shim (no Gloo headers): every call fails
/// with the reason, so one process trains as usual and a multi-process launch is refused.
#[cfg(not(ehm_c10d))]
mod ffi {
    use std::os::raw::{c_char, c_int};
    pub struct RawStore;
    pub struct RawPg;
    const WHY: &[u8] = b"this ehm-train was built without the c10d shim (run tools/setup.sh gloo, then rebuild), so it cannot train on more than one process\0";
    unsafe fn fail(err: *mut c_char, n: usize) {
        let len = WHY.len().min(n);
        std::ptr::copy_nonoverlapping(WHY.as_ptr() as *const c_char, err, len);
        *err.add(len.saturating_sub(1)) = 0;
    }
    pub unsafe fn ehm_store_open(
        _: *const c_char,
        _: u16,
        _: c_int,
        _: c_int,
        _: i64,
        err: *mut c_char,
        n: usize,
    ) -> *mut RawStore {
        fail(err, n);
        std::ptr::null_mut()
    }
    pub unsafe fn ehm_store_port(_: *const RawStore) -> c_int {
        0
    }
    pub unsafe fn ehm_store_add(
        _: *mut RawStore,
        _: *const c_char,
        _: i64,
        _: *mut i64,
        err: *mut c_char,
        n: usize,
    ) -> c_int {
        fail(err, n);
        -1
    }
    pub unsafe fn ehm_store_free(_: *mut RawStore) {}
    pub unsafe fn ehm_pg_new(
        _: *mut RawStore,
        _: c_int,
        _: c_int,
        _: i64,
        err: *mut c_char,
        n: usize,
    ) -> *mut RawPg {
        fail(err, n);
        std::ptr::null_mut()
    }
    pub unsafe fn ehm_pg_all_reduce_sum(
        _: *mut RawPg,
        _: *mut torch_sys::C_tensor,
        _: i64,
        err: *mut c_char,
        n: usize,
    ) -> c_int {
        fail(err, n);
        -1
    }
    pub unsafe fn ehm_pg_broadcast(
        _: *mut RawPg,
        _: *mut torch_sys::C_tensor,
        _: c_int,
        err: *mut c_char,
        n: usize,
    ) -> c_int {
        fail(err, n);
        -1
    }
    pub unsafe fn ehm_pg_free(_: *mut RawPg) {}
}

/// Call a shim function with an error buffer; its message on failure.
fn call<T>(
    f: impl FnOnce(*mut std::os::raw::c_char, usize) -> T,
    failed: impl Fn(&T) -> bool,
) -> std::result::Result<T, String> {
    let mut buf = vec![0u8; 1024];
    let r = f(buf.as_mut_ptr() as *mut _, buf.len());
    if failed(&r) {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Err(String::from_utf8_lossy(&buf[..end]).into_owned())
    } else {
        Ok(r)
    }
}

/// Which c10d engine carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DistBackend {
    /// Gloo (CPU; on GPUs the tensors are staged through host memory)
    Gloo,
    /// NCCL (GPUs; needs the plugin built by tools/build_nccl_plugin.sh)
    Nccl,
}

/// Where the NCCL plugin is looked for: `$EHM_NCCL_PLUGIN`, else next to this executable.
pub fn nccl_plugin_path() -> Option<std::path::PathBuf> {
    std::env::var_os("EHM_NCCL_PLUGIN")
        .map(Into::into)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let p = exe.with_file_name("libehm_nccl.so");
            // test binaries live one folder below (target/release/deps)
            Some(if p.exists() {
                p
            } else {
                exe.parent()?.with_file_name("libehm_nccl.so")
            })
        })
        .filter(|p| p.exists())
}

type NcclNew = unsafe extern "C" fn(
    *mut ffi::RawStore,
    std::os::raw::c_int,
    std::os::raw::c_int,
    i64,
    std::os::raw::c_int,
    *mut std::os::raw::c_char,
    usize,
) -> *mut ffi::RawPg;

/// The plugin's group constructor (the library stays loaded for the process's life).
fn nccl_constructor() -> std::result::Result<NcclNew, String> {
    let path = nccl_plugin_path().ok_or(
        "the NCCL plugin (libehm_nccl.so) was not found next to ehm-train or at $EHM_NCCL_PLUGIN: build it with tools/build_nccl_plugin.sh, or use --dist-backend gloo",
    )?;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "a NUL in the plugin path")?;
    let last_error = || unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".to_string()
        } else {
            std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    };
    // SAFETY: dlopen/dlsym with valid C strings; the symbol has the type c10d_nccl.cpp gives it.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            return Err(format!(
                "{}: {} (the plugin needs a CUDA PyTorch 2.11 loaded)",
                path.display(),
                last_error()
            ));
        }
        let f = libc::dlsym(h, c"ehm_pg_nccl_new".as_ptr());
        if f.is_null() {
            return Err(format!("{}: {}", path.display(), last_error()));
        }
        Ok(std::mem::transmute::<*mut libc::c_void, NcclNew>(f))
    }
}

/// A c10d TCPStore: a server (the launcher's, or rank 0's) or a client of one.
pub struct Store {
    raw: *mut ffi::RawStore,
}

// TCPStore serialises its operations behind its own mutex.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Host (`server`, port 0 = any free port) or join the store at `host:port`. A server
    /// given `workers` > 0 waits for that many processes to join (torch's rank-0 store).
    pub fn open(
        host: &str,
        port: u16,
        server: bool,
        workers: usize,
        timeout: Duration,
    ) -> std::result::Result<Store, String> {
        let h = std::ffi::CString::new(host).map_err(|_| "a NUL in the host name")?;
        let raw = call(
            |e, n| unsafe {
                ffi::ehm_store_open(
                    h.as_ptr(),
                    port,
                    server as i32,
                    workers as i32,
                    timeout.as_millis() as i64,
                    e,
                    n,
                )
            },
            |p| p.is_null(),
        )?;
        Ok(Store { raw })
    }

    pub fn port(&self) -> u16 {
        unsafe { ffi::ehm_store_port(self.raw) as u16 }
    }

    /// Add `delta` to the counter `key` (0 reads it); its new value.
    pub fn add(&self, key: &str, delta: i64) -> std::result::Result<i64, String> {
        let k = std::ffi::CString::new(key).map_err(|_| "a NUL in a store key")?;
        let mut v = 0i64;
        call(
            |e, n| unsafe { ffi::ehm_store_add(self.raw, k.as_ptr(), delta, &mut v, e, n) },
            |&r| r != 0,
        )?;
        Ok(v)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { ffi::ehm_store_free(self.raw) }
    }
}

/// This process's seat in a data-parallel job: the Gloo process group of all ranks.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    timeout: Duration,
    store: Arc<Store>,
    /// Where the store lives, for messages ("rank 0" or the agent's address).
    store_owner: String,
    prefix: String,
    pg: *mut ffi::RawPg,
    /// Where the collectives' tensors must live: the CPU for Gloo, this rank's GPU for NCCL.
    device: Device,
    /// Collectives this rank has entered (mirrored in the store for fault reports).
    calls: AtomicU64,
    /// The optimizer step being synchronised, for messages.
    pub step: AtomicU64,
    stop_beat: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

// ProcessGroupGloo is thread-safe; the trainer uses it from one thread anyway.
unsafe impl Send for Dist {}
unsafe impl Sync for Dist {}

/// Whether torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`).
fn agent_store(var: &dyn Fn(&str) -> Option<String>) -> bool {
    var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

impl Dist {
    /// Join the job `launch` describes: connect to the store (rank 0 hosts it unless
    /// torchrun's agent does) and form the Gloo group. Fails with a one-line message.
    pub fn connect(
        launch: &Launch,
        timeout: Duration,
        backend: DistBackend,
        device: Device,
    ) -> Result<Dist> {
        Self::connect_with(launch, timeout, &|k| std::env::var(k).ok(), backend, device)
    }

    pub fn connect_with(
        launch: &Launch,
        timeout: Duration,
        var: &dyn Fn(&str) -> Option<String>,
        backend: DistBackend,
        device: Device,
    ) -> Result<Dist> {
        let gpu = match (backend, device) {
            (DistBackend::Nccl, Device::Cuda(i)) => Some(i),
            (DistBackend::Nccl, _) => {
                return Err(Error::Config(format!(
                    "rank {} of {}: --dist-backend nccl needs GPUs, and this rank computes on the CPU (use gloo)",
                    launch.rank, launch.world
                )))
            }
            _ => None,
        };
        let nccl = match gpu {
            Some(_) => Some(nccl_constructor().map_err(|e| {
                Error::Config(format!("rank {} of {}: {e}", launch.rank, launch.world))
            })?),
            None => None,
        };
        let (host, port) = launch.master.clone().ok_or_else(|| {
            Error::Config(format!(
                "rank {} of {}: MASTER_ADDR and MASTER_PORT are not set (torchrun sets them; under srun they come from SLURM_STEP_NODELIST and SLURM_JOB_ID, or export them)",
                launch.rank, launch.world
            ))
        })?;
        let agent = agent_store(var);
        let server = !agent && launch.rank == 0;
        let store_owner = if agent {
            format!("the launcher at {host}:{port}")
        } else {
            "rank 0".to_string()
        };
        let fail = |what: &str, e: String| {
            Error::Training(format!(
                "rank {} of {}: {what} ({}:{}): {e}",
                launch.rank, launch.world, host, port
            ))
        };
        let store = Store::open(&host, port, server, launch.world, timeout)
            .map_err(|e| fail("could not reach the rendezvous store", e))?;
        // A torchrun restart reuses the agent's store: keep each attempt's keys apart.
        let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        let prefix = format!("ehm/attempt_{attempt}");
        let (rank, world, ms) = (
            launch.rank as i32,
            launch.world as i32,
            timeout.as_millis() as i64,
        );
        let pg = match (nccl, gpu) {
            (Some(new), Some(i)) => call(
                |e, n| unsafe { new(store.raw, rank, world, ms, i as i32, e, n) },
                |p| p.is_null(),
            )
            .map_err(|e| fail("could not form the NCCL process group", e))?,
            _ => call(
                |e, n| unsafe { ffi::ehm_pg_new(store.raw, rank, world, ms, e, n) },
                |p| p.is_null(),
            )
            .map_err(|e| fail("could not form the Gloo process group", e))?,
        };
        let store = Arc::new(store);
        let stop_beat = Arc::new(AtomicBool::new(false));
        let beat = {
            let (store, stop, key) = (
                store.clone(),
                stop_beat.clone(),
                format!("{prefix}/alive/{}", launch.rank),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // a store that went away is reported by the collectives, not here
                    let _ = store.add(&key, 1);
                    std::thread::sleep(HEARTBEAT);
                }
            })
        };
        Ok(Dist {
            rank: launch.rank,
            world: launch.world,
            timeout,
            store,
            store_owner,
            prefix,
            pg,
            device: gpu.map_or(Device::Cpu, Device::Cuda),
            calls: AtomicU64::new(0),
            step: AtomicU64::new(0),
            stop_beat,
            beat: Some(beat),
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Run one collective on `t` where the engine needs it (Gloo: the host, so a GPU tensor
    /// is staged through it; NCCL: this rank's GPU); a failure becomes a report naming the
    /// rank to blame.
    fn collective(
        &self,
        t: &mut Tensor,
        what: &str,
        op: impl Fn(*mut torch_sys::C_tensor, *mut std::os::raw::c_char, usize) -> i32,
    ) -> Result<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self
            .store
            .add(&format!("{}/calls/{}", self.prefix, self.rank), 1);
        let in_place = t.device() == self.device && t.is_contiguous();
        let mut buf = if in_place {
            t.shallow_clone()
        } else {
            t.to_device(self.device).contiguous()
        };
        if let Err(e) = call(|e, len| op(buf.as_mut_ptr(), e, len), |&r| r != 0) {
            return Err(self.blame(what, n, &e));
        }
        if !in_place {
            tch::no_grad(|| t.copy_(&buf));
        }
        Ok(())
    }

    /// In place: the mean of `t` over the ranks.
    pub fn all_reduce_mean(&self, t: &mut Tensor) -> Result<()> {
        self.all_reduce_mean_within(t, None)
    }

    /// `all_reduce_mean` waiting up to `timeout` (instead of the group's) for the others.
    fn all_reduce_mean_within(&self, t: &mut Tensor, timeout: Option<Duration>) -> Result<()> {
        let ms = timeout.map_or(0, |d| d.as_millis() as i64);
        self.collective(t, "all-reduce", |p, e, n| unsafe {
            ffi::ehm_pg_all_reduce_sum(self.pg, p, ms, e, n)
        })?;
        tch::no_grad(|| *t /= self.world as f64);
        Ok(())
    }

    /// In place: every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.collective(t, "broadcast", |p, e, n| unsafe {
            ffi::ehm_pg_broadcast(self.pg, p, root as i32, e, n)
        })
    }

    /// Wait for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.barrier_within(None)
    }

    /// A barrier (an all-reduce of one value) waiting up to `timeout`, or the group's.
    fn barrier_within(&self, timeout: Option<Duration>) -> Result<()> {
        let mut t = Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        self.all_reduce_mean_within(&mut t, timeout)
    }

    /// How long the others wait for rank 0's own work (monitors, checkpoint writes).
    pub fn rank0_work_timeout(&self) -> Duration {
        self.timeout * RANK0_WORK_FACTOR
    }

    /// Wait for every rank after work only rank 0 does (kNN and hierarchy monitors, the
    /// checkpoint, the mask picture): the others wait here up to `rank0_work_timeout`, not
    /// in the next step's all-reduce with the per-step timeout.
    /// Rank 0 itself arrives after its work and waits for the others as usual.
    pub fn wait_for_rank0(&self) -> Result<()> {
        self.barrier_within((self.rank != 0).then(|| self.rank0_work_timeout()))
    }

    /// Every rank's `t` (the same shape on each) joined along dim 0 in rank order, on every
    /// rank (one broadcast per rank: cheap for the small tensors it is used for).
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.world);
        for root in 0..self.world {
            let mut part = if root == self.rank {
                t.to_device(Device::Cpu).contiguous().copy()
            } else {
                Tensor::zeros(t.size(), (t.kind(), Device::Cpu))
            };
            self.broadcast(&mut part, root)?;
            parts.push(part);
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// Rank 0's `value` on every rank (a u64 through a broadcast).
    pub fn agree(&self, value: u64) -> Result<u64> {
        let mut t = Tensor::from_slice(&[value as i64]);
        self.broadcast(&mut t, 0)?;
        Ok(t.int64_value(&[0]) as u64)
    }

    /// A failed collective (the `n`-th) as a one-line report: which rank stopped responding
    /// (its heartbeat stands still), or which is alive but behind (hung), or the store gone.
    fn blame(&self, what: &str, n: u64, err: &str) -> Error {
        let step = self.step.load(Ordering::Relaxed);
        let read = |kind: &str| -> std::result::Result<Vec<i64>, String> {
            (0..self.world)
                .map(|r| self.store.add(&format!("{}/{kind}/{r}", self.prefix), 0))
                .collect()
        };
        let who = (|| -> std::result::Result<String, String> {
            let before = read("alive")?;
            std::thread::sleep(HEARTBEAT * 3);
            let after = read("alive")?;
            let dead: Vec<String> = (0..self.world)
                .filter(|&r| r != self.rank && after[r] == before[r])
                .map(|r| r.to_string())
                .collect();
            if !dead.is_empty() {
                return Ok(format!(
                    "rank {} stopped responding (no heartbeat: its process died, froze or lost the network)",
                    dead.join(", rank ")
                ));
            }
            let calls = read("calls")?;
            let behind: Vec<String> = (0..self.world)
                .filter(|&r| r != self.rank && (calls[r] as u64) < n)
                .map(|r| format!("rank {r} (at collective {} of {n})", calls[r]))
                .collect();
            if !behind.is_empty() {
                return Ok(format!(
                    "{} is alive but did not arrive within the {} s timeout (hung?)",
                    behind.join(", "),
                    self.timeout.as_secs()
                ));
            }
            Err(String::new())
        })();
        let who = match who {
            Ok(w) => w,
            Err(e) if !e.is_empty() => format!(
                "the rendezvous store on {} is gone (that process died?)",
                self.store_owner
            ),
            Err(_) => "no rank is to blame by heartbeat".to_string(),
        };
        Error::Training(format!(
            "rank {} of {}: the {what} of step {step} failed: {who}; the job stops (re-run the same command to resume from the last checkpoint) [c10d: {err}]",
            self.rank, self.world
        ))
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        // the heartbeat thread stops at its next beat; not joined, so a store that no longer
        // answers cannot hold up the exit
        self.stop_beat.store(true, Ordering::Relaxed);
        drop(self.beat.take());
        unsafe { ffi::ehm_pg_free(self.pg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `world` ranks as threads of this process, joined through a launcher-style store.
    fn ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(Dist) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        ranks_within(world, Duration::from_secs(5), f)
    }

    fn ranks_within<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(Dist) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let server = Store::open("127.0.0.1", 0, true, 0, Duration::from_secs(20)).unwrap();
        let port = server.port();
        let f = Arc::new(f);
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let launch = Launch {
                        rank,
                        world,
                        local_rank: rank,
                        master: Some(("127.0.0.1".into(), port)),
                        source: "test",
                    };
                    let agent =
                        |k: &str| (k == "TORCHELASTIC_USE_AGENT_STORE").then(|| "True".to_string());
                    f(
                        Dist::connect_with(
                            &launch,
                            timeout,
                            &agent,
                            DistBackend::Gloo,
                            Device::Cpu,
                        )
                        .unwrap(),
                    )
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        drop(server);
        out
    }

    #[test]
    fn ranks_average_broadcast_and_agree() {
        let got = ranks(3, |d| {
            let mut t = Tensor::from_slice(&[d.rank as f32 + 1.0, 10.0 * d.rank as f32]);
            d.all_reduce_mean(&mut t).unwrap();
            let mut b = Tensor::from_slice(&[d.rank as f32; 4]);
            d.broadcast(&mut b, 2).unwrap();
            let agreed = d.agree(7 + d.rank as u64).unwrap();
            (
                Vec::<f32>::try_from(&t).unwrap(),
                Vec::<f32>::try_from(&b).unwrap(),
                agreed,
            )
        });
        for (mean, bcast, agreed) in got {
            assert_eq!(mean, vec![2.0, 10.0]);
            assert_eq!(bcast, vec![2.0; 4]);
            assert_eq!(agreed, 7);
        }
    }

    #[test]
    fn rank_0s_own_work_gets_the_longer_wait() {
        // the group's timeout is 1 s; rank 0 works 2 s before joining: the plain barrier
        // gives up, the wait for rank 0 (6 × 1 s) does not
        let got = ranks_within(2, Duration::from_secs(1), |d| {
            let slow = || {
                if d.rank == 0 {
                    std::thread::sleep(Duration::from_secs(2));
                }
            };
            slow();
            let long = d.wait_for_rank0().is_ok();
            slow();
            let short = d.barrier().is_ok();
            (long, short)
        });
        assert!(got[0].0 && got[1].0, "{got:?}");
        assert!(!got[1].1, "rank 1 should have given up: {got:?}");
    }

    #[test]
    fn a_rank_that_leaves_is_named_by_the_one_left_waiting() {
        let got = ranks(2, |d| {
            let mut t = Tensor::ones([8], (tch::Kind::Float, Device::Cpu));
            d.all_reduce_mean(&mut t).unwrap();
            if d.rank == 1 {
                drop(d); // closes its connections and stops its heartbeat
                return None;
            }
            d.step.store(41, Ordering::Relaxed);
            let t0 = std::time::Instant::now();
            let err = d.all_reduce_mean(&mut t).unwrap_err().to_string();
            Some((err, t0.elapsed()))
        });
        let (err, took) = got[0].clone().unwrap();
        assert!(
            err.contains("rank 0 of 2")
                && err.contains("step 41")
                && err.contains("rank 1 stopped responding"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        assert!(took < Duration::from_secs(15), "{took:?}");
    }
}
