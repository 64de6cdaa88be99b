//! Data-parallel pretraining on CPU (Gloo over loopback): ranks launched as torchrun launches
//! them and by the built-in `--nproc`, checked against one process with the same global batch;
//! a rank killed with -9 stops the job with its name, and the re-run resumes.
mod common;
use common::{json_out, losses, pretrain_cmd, relative_diff, weights, write_cifar, write_model};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cmd<S: AsRef<std::ffi::OsStr>>(model: &Path, data: &Path, out: &Path, extra: &[S]) -> Command {
    let mut c = pretrain_cmd(model, data, out);
    c.args(["--knn-every", "-1", "--workers", "1"]).args(extra);
    c
}

/// A folder with the synthetic CIFAR set and the micro model; the run folder in it.
fn micro_run() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let out = d.path().join("run");
    (d, model, out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `c` as rank `rank` of `world`, with the variables torchrun sets (rank 0 hosts the store).
fn as_rank(mut c: Command, rank: usize, world: usize, port: u16) -> Command {
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1");
    c
}

/// Run `world` torchrun-style ranks of `extra` to the end; rank 0's output.
fn torchrun_style(
    model: &Path,
    data: &Path,
    out: &Path,
    world: usize,
    extra: &[String],
) -> serde_json::Value {
    let port = free_port();
    let mut ranks: Vec<Child> = (0..world)
        .map(|r| {
            as_rank(cmd(model, data, out, extra), r, world, port)
                .stdout(if r == 0 {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let rest: Vec<Child> = ranks.drain(1..).collect();
    let first = ranks.pop().unwrap().wait_with_output().unwrap();
    for r in rest {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty(), "only rank 0 reports");
    }
    json_out(&first)
}

/// Steps of the loss lines in metrics.jsonl.
fn loss_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["loss"].as_f64()?;
            v["step"].as_u64()
        })
        .collect()
}

fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}");
    for (s, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{what}: loss at step {} is {x} vs {y}",
            s + 1
        );
    }
    let d = relative_diff(
        &weights(&a.join("checkpoint.safetensors")),
        &weights(&b.join("checkpoint.safetensors")),
    );
    assert!(d <= 1e-5, "{what}: weights differ by {d:e}");
}

#[test]
fn two_ranks_of_b_are_one_process_of_2b() {
    // DDP's promise: the ranks' averaged gradients are the whole batch's gradient, their masks
    // the whole batch's rows, so the run is the one-process run up to float rounding. A rank
    // that drew its masks as image 0.. of its own batch (not of the global one) fails at step 1.
    let d = tempfile::tempdir().unwrap();
    write_cifar(d.path());
    let model = write_model(d.path());
    let base = ["--epochs", "2", "--log-every", "1", "--save-every", "7"];
    for masking in ["ehm", "random"] {
        let run = |name: &str, extra: &[&str]| {
            let out = d.path().join(format!("{masking}_{name}"));
            let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
            args.extend(["--masking", masking].iter().map(|s| s.to_string()));
            args.extend(extra.iter().map(|s| s.to_string()));
            (out, args)
        };
        let (whole, args) = run("b32", &["--batch-size", "32"]);
        let s = json_out(&cmd(&model, d.path(), &whole, &args).output().unwrap());
        assert_eq!(s["steps"], 20);

        // the built-in launcher: 2 ranks × 16
        let (two, args) = run("2x16", &["--batch-size", "16", "--nproc", "2"]);
        let s = json_out(&cmd(&model, d.path(), &two, &args).output().unwrap());
        assert_eq!(s["steps"], 20, "{masking}: optimizer steps of the job");
        assert_eq!(s["images"], 320);
        assert_eq!(
            (s["processes"].as_u64(), s["batch"].as_u64()),
            (Some(2), Some(32))
        );
        assert_same_run(&whole, &two, &format!("{masking}: 2 ranks × 16 vs 32"));
        // rank 0 alone writes: one metrics line per step, no second writer
        assert_eq!(loss_steps(&two), (1..=20).collect::<Vec<_>>());

        if masking == "ehm" {
            // torchrun's way (rank 0 hosts the store), with accumulation: 2 ranks × 8 × 2
            let (acc, args) = run("2x8x2", &["--batch-size", "8", "--accum-steps", "2"]);
            let s = torchrun_style(&model, d.path(), &acc, 2, &args);
            assert_eq!(s["steps"], 20);
            assert_same_run(&whole, &acc, "ehm: 2 ranks × 8 × 2 accumulation vs 32");

            // teeth: one process of 16 is another run
            let (half, args) = run("b16", &["--batch-size", "16", "--blr", "2e-3"]);
            json_out(&cmd(&model, d.path(), &half, &args).output().unwrap());
            let other = relative_diff(
                &weights(&whole.join("checkpoint.safetensors")),
                &weights(&half.join("checkpoint.safetensors")),
            );
            assert!(
                other > 1e-3,
                "batch 16 alone is {other:e} from 32: no teeth"
            );

            // a 2-process run resumed by one process would change the batch: refused
            let (_, args) = run("2x16", &["--batch-size", "16"]);
            let o = cmd(&model, d.path(), &two, &args).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success());
            assert!(
                err.contains("trained by 2 process(es), this launch has 1"),
                "{err}"
            );
        }
    }
}

/// The running processes whose parent is `pid`, with their RANK.
fn ranks_of(pid: u32) -> Vec<(u32, String)> {
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    kids.split_whitespace()
        .filter_map(|k| {
            let k: u32 = k.parse().ok()?;
            let env = std::fs::read(format!("/proc/{k}/environ")).ok()?;
            let rank = env
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"RANK="))
                .map(|r| String::from_utf8_lossy(r).into_owned())?;
            Some((k, rank))
        })
        .collect()
}

fn wait_for(path: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for `c` at most `limit`; its output.
fn wait_output(c: Child, limit: Duration) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let pid = c.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(c.wait_with_output().unwrap()));
    match rx.recv_timeout(limit) {
        Ok(o) => (o, t0.elapsed()),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("process {pid} still running after {limit:?}");
        }
    }
}

#[test]
fn kill_9_of_a_rank_stops_the_job_and_the_rerun_resumes() {
    let (d, model, out) = micro_run();
    let args = [
        "--epochs",
        "16",
        "--batch-size",
        "16",
        "--save-every",
        "5",
        "--log-every",
        "1",
        "--nproc",
        "2",
        "--dist-timeout",
        "60",
    ];
    let job = cmd(&model, d.path(), &out, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&out.join("resume.safetensors"), Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(150));
    let ranks = ranks_of(job.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let (victim, _) = ranks.iter().find(|(_, r)| r == "1").unwrap();
    let (survivor, _) = ranks.iter().find(|(_, r)| r == "0").unwrap();
    unsafe { libc::kill(*victim as i32, libc::SIGKILL) };
    // well inside the 60 s timeout: a dead peer's socket closes at once
    let (o, took) = wait_output(job, Duration::from_secs(40));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1 of 2 was killed (signal 9, SIGKILL); the other ranks were stopped"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        !Path::new(&format!("/proc/{survivor}")).exists()
            || std::fs::read_to_string(format!("/proc/{survivor}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "rank 0 still runs"
    );
    // the same command resumes from rank 0's last checkpoint and ends at the same step
    let s = json_out(&cmd(&model, d.path(), &out, &args).output().unwrap());
    let resumed = s["resumed_from"].as_u64().expect("the re-run must resume");
    assert!(resumed >= 5 && resumed.is_multiple_of(5), "{resumed}");
    assert_eq!(s["steps"], 160);
    assert_eq!(loss_steps(&out), (1..=160).collect::<Vec<_>>());
    // and it is the run that was never interrupted (the resume file holds every rank's
    // pending masks, and each rank takes its rows back)
    let whole = d.path().join("uninterrupted");
    json_out(&cmd(&model, d.path(), &whole, &args).output().unwrap());
    assert_eq!(
        weights(&whole.join("checkpoint.safetensors")),
        weights(&out.join("checkpoint.safetensors")),
        "the resumed run differs from the uninterrupted one"
    );
    // rank 0's files only: nothing per rank in the run folder
    for f in std::fs::read_dir(&out).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains("rank"), "{name}");
    }
}

/// Two torchrun-style ranks (rank 0 hosts the store, no launcher watching) of a long run with
/// `--dist-timeout TIMEOUT`, once its first checkpoint exists: (folder, rank 0, rank 1).
fn two_ranks_past_a_checkpoint(timeout: &str) -> (tempfile::TempDir, Child, Child) {
    let (d, model, out) = micro_run();
    let args = [
        "--epochs",
        "40",
        "--batch-size",
        "16",
        "--save-every",
        "5",
        "--dist-timeout",
        timeout,
    ];
    let port = free_port();
    let spawn = |r: usize| {
        as_rank(cmd(&model, d.path(), &out, &args), r, 2, port)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (zero, one) = (spawn(0), spawn(1));
    wait_for(&out.join("resume.safetensors"), Duration::from_secs(300));
    (d, zero, one)
}

#[test]
fn under_torchrun_the_survivor_of_a_kill_names_the_dead_rank() {
    // no launcher to watch the ranks: rank 0 itself must notice, say who, and exit
    let (_d, zero, mut one) = two_ranks_past_a_checkpoint("60");
    one.kill().unwrap();
    one.wait().unwrap();
    let (o, took) = wait_output(zero, Duration::from_secs(40));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rank 0 of 2: the all-reduce of step")
            && err.contains("rank 1 stopped responding (no heartbeat")
            && err.contains("re-run the same command to resume"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn a_hung_rank_ends_the_job_within_the_timeout() {
    // rank 1 frozen (SIGSTOP) mid-run: its sockets stay open, so only the timeout can end the
    // wait; rank 0 must give up after --dist-timeout and say which rank it waited for
    let (_d, zero, mut one) = two_ranks_past_a_checkpoint("5");
    unsafe { libc::kill(one.id() as i32, libc::SIGSTOP) };
    let (o, took) = wait_output(zero, Duration::from_secs(60));
    one.kill().unwrap();
    one.wait().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rank 0 of 2") && err.contains("rank 1 stopped responding"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // the 5 s timeout, plus the look at the heartbeats
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

#[test]
fn nccl_on_the_cpu_is_refused_by_every_rank_in_one_line() {
    let (d, model, out) = micro_run();
    let args = [
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--nproc",
        "2",
        "--dist-backend",
        "nccl",
    ];
    let o = cmd(&model, d.path(), &out, &args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(
            "--dist-backend nccl needs GPUs, and this rank computes on the CPU (use gloo)"
        ),
        "{err}"
    );
    assert!(err.contains("of 2 failed"), "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
}
