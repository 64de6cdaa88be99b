//! Where this process sits in a multi-process launch: the variables torchrun sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or, under `srun`, Slurm's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`). Read once, checked, before any work.
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
        } else if let Some(world) = num("SLURM_NTASKS")? {
            let rank = num("SLURM_PROCID")?.ok_or_else(|| {
                Error::Config("SLURM_NTASKS is set but SLURM_PROCID is not".into())
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
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(a), Some(p)) => Some((
                a,
                p.trim().parse::<u16>().map_err(|_| {
                    Error::Config(format!("MASTER_PORT={p:?} is not a port number"))
                })?,
            )),
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
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.source),
            (3, 4, 1, "torchrun")
        );
        assert_eq!(t.master, Some(("node7".into(), 29500)));
        let s = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.source, s.master),
            (5, 8, 1, "slurm", None)
        );
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
