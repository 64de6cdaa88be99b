//! Where this process sits in a multi-process launch: the variables torchrun sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or, under `srun`, Slurm's
//! (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`). Read once, checked, before any work.
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Rendezvous address (`MASTER_ADDR:MASTER_PORT`), when given.
    pub master: Option<(String, u16)>,
    /// Which launcher set the variables ("torchrun", "slurm" or "none").
    pub source: &'static str,
}

impl Launch {
    /// A single process.
    pub const SINGLE: Launch = Launch {
        rank: 0,
        world: 1,
        local_rank: 0,
        master: None,
        source: "none",
    };

    pub fn from_env() -> Result<Launch> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The launch described by `var` (the environment, or a map in tests). torchrun's
    /// variables win over Slurm's: `srun torchrun …` sets both, and torchrun's are per process.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let num =
            |k: &str| -> Result<Option<usize>> {
                match var(k) {
                    None => Ok(None),
                    Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                        Error::Config(format!("{k}={v:?} is not a non-negative integer"))
                    }),
                }
            };
        let (rank, world, local, source) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = num("RANK")?.ok_or_else(|| {
                Error::Config("WORLD_SIZE is set but RANK is not (launch with torchrun)".into())
            })?;
            (rank, world, num("LOCAL_RANK")?, "torchrun")
        } else if let Some(world) = num("SLURM_STEP_NUM_TASKS")? {
            // srun sets the step's variables; an sbatch / salloc shell has SLURM_NTASKS too
            // but is one process, not a rank
            let rank = num("SLURM_PROCID")?.ok_or_else(|| {
                Error::Config("SLURM_STEP_NUM_TASKS is set but SLURM_PROCID is not".into())
            })?;
            (rank, world, num("SLURM_LOCALID")?, "slurm")
        } else {
            return Ok(Launch::SINGLE);
        };
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} of a world of {world} processes ({source} variables)"
            )));
        }
        let port = |p: String| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| Error::Config(format!("MASTER_PORT={p:?} is not a port number")))
        };
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(a), Some(p)) => Some((a, port(p)?)),
            // under srun without them: the step's first node, a port from the job id (as
            // Lightning does), so `srun ehm-train pretrain …` needs nothing exported
            (addr, p) if source == "slurm" => {
                let host = addr.or_else(|| {
                    var("SLURM_STEP_NODELIST")
                        .or_else(|| var("SLURM_JOB_NODELIST"))
                        .and_then(|l| first_host(&l))
                });
                let p = match p {
                    Some(p) => Some(port(p)?),
                    None => num("SLURM_JOB_ID")?.map(|id| 29500 + (id % 1000) as u16),
                };
                host.zip(p)
            }
            _ => None,
        };
        Ok(Launch {
            rank,
            world,
            local_rank: local.unwrap_or(0),
            master,
            source,
        })
    }
}

/// The first host of a Slurm node list: `gpu[003-008,012],cpu1` → `gpu003`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list
        .char_indices()
        .scan(0i32, |depth, (i, c)| {
            *depth += match c {
                '[' => 1,
                ']' => -1,
                _ => 0,
            };
            Some((i, c, *depth))
        })
        .find(|&(_, c, d)| c == ',' && d == 0)
        .map_or(list.len(), |(i, _, _)| i);
    let entry = &list[..end];
    let host = match (entry.find('['), entry.find(']')) {
        (Some(a), Some(b)) if a < b => {
            let first = entry[a + 1..b].split([',', '-']).next()?;
            format!("{}{}{}", &entry[..a], first, &entry[b + 1..])
        }
        _ => entry.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

/// Set in the processes the built-in launcher starts (they are ranks, not launchers).
pub const LAUNCHED_VAR: &str = "EHM_LAUNCHED";

/// Whether this process was started by `run_local` (its `--nproc` is then its parent's).
pub fn launched_locally() -> bool {
    std::env::var_os(LAUNCHED_VAR).is_some()
}

/// The built-in launcher (`ehm-train pretrain --nproc N …`), for one machine without
/// torchrun: host the rendezvous store as torchrun's agent does, start this same command
/// `nproc` times as ranks 0 … N−1 (each with its share of the cores unless OMP_NUM_THREADS
/// is set), and when one fails stop the others and name it. The store outlives every rank,
/// so a survivor can always tell which rank died.
pub fn run_local(nproc: usize, timeout: std::time::Duration) -> Result<()> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, Stdio};
    let store = super::dist::Store::open("127.0.0.1", 0, true, 0, timeout)
        .map_err(|e| Error::Training(format!("could not start the rendezvous store: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| Error::Other(format!("own path: {e}")))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / nproc).max(1).to_string());
    let mut children = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", store.port().to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env("OMP_NUM_THREADS", &threads)
            .env(
                "RAYON_NUM_THREADS",
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| threads.clone()),
            )
            .env(LAUNCHED_VAR, "1")
            // rank 0 speaks for the job on stdout; every rank's errors reach stderr
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        // a launcher that is killed takes its ranks with it (also one killed between the
        // fork and the prctl: the parent is then no longer this process)
        let launcher = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != launcher {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(Error::Other(format!("could not start rank {rank}: {e}")));
            }
        }
    }
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        stop_all(&mut children);
                        let how = match (status.code(), status.signal()) {
                            (Some(c), _) => format!("failed (exit code {c}; its message is above)"),
                            (None, Some(9)) => "was killed (signal 9, SIGKILL)".to_string(),
                            (None, Some(s)) => format!("was killed by signal {s}"),
                            _ => "stopped".to_string(),
                        };
                        return Err(Error::Training(format!(
                            "rank {rank} of {nproc} {how}; the other ranks were stopped. Re-run the same command to resume from the last checkpoint"
                        )));
                    }
                }
                Err(e) => return Err(Error::Other(format!("waiting for rank {rank}: {e}"))),
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// SIGTERM every rank still running, SIGKILL those still there after 10 s.
fn stop_all(children: &mut [Option<std::process::Child>]) {
    for c in children.iter().flatten() {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for c in children.iter_mut().flatten() {
        while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_nothing() {
        assert_eq!(launch(&[]).unwrap(), Launch::SINGLE);
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.source),
            (3, 4, 1, "torchrun")
        );
        assert_eq!(t.master, Some(("node7".into(), 29500)));
        let s = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.source, s.master),
            (5, 8, 1, "slurm", None)
        );
        // srun with nothing exported: the step's first node, a port from the job id
        let s = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_STEP_NODELIST", "gpu[007-010,012],login1"),
        ])
        .unwrap();
        assert_eq!(s.master, Some(("gpu007".into(), 29956)));
        // exported values win
        let s = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_JOB_ID", "7"),
            ("SLURM_JOB_NODELIST", "a1,a2"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!(s.master, Some(("a1".into(), 4000)));
    }

    #[test]
    fn slurm_node_lists() {
        for (list, first) in [
            ("node1", "node1"),
            ("node[01-04]", "node01"),
            ("gpu-a[3,5-9]-ib,gpu-b1", "gpu-a3-ib"),
            ("x1,x[2-3]", "x1"),
        ] {
            assert_eq!(first_host(list).as_deref(), Some(first), "{list}");
        }
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn inconsistent_launches_are_refused_with_the_variable_named() {
        for (vars, want) in [
            (vec![("WORLD_SIZE", "2")], "RANK is not"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "2")],
                "rank 2 of a world of 2",
            ),
            (
                vec![("WORLD_SIZE", "two"), ("RANK", "0")],
                "WORLD_SIZE=\"two\"",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "x"),
                ],
                "MASTER_PORT",
            ),
        ] {
            let e = launch(&vars).unwrap_err().to_string();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
    }
}
