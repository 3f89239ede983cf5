//! The query commands, human and --json, for a running job and for a job
//! that exists only as checkpoints.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use ckpt_e2e::{json_of, require, text, Env, Prereq, Started};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn ok(env: &Env, args: &[&str]) -> std::process::Output {
    let out = env.ckpt(args);
    assert!(
        out.status.success(),
        "`ckpt-job {}` failed:\n{}",
        args.join(" "),
        text(&out.stderr)
    );
    out
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// inspect --json of one epoch: the manifest, with every file's size
/// matching the file on disk.
fn check_inspect(env: &Env, name: &str, target: &str, epoch: u64, mode: &str) -> Value {
    let v = json_of(&ok(env, &["inspect", "--json", target]));
    assert_eq!(v["job"], name, "{v}");
    assert_eq!(v["epoch"], epoch, "{v}");
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(v["mac"], "verified", "{v}");
    let files = v["nodes"][0]["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no file list: {v}"));
    assert!(files.len() >= 2, "{v}");
    let dir = env.epoch_dir(name, epoch);
    for f in files {
        let fname = f["name"].as_str().unwrap();
        let size = f["size"].as_u64().unwrap();
        let blake3 = f["blake3"].as_str().unwrap();
        assert!(is_hex64(blake3), "bad blake3 {blake3:?}");
        assert_eq!(
            fs::metadata(dir.join(fname)).unwrap().len(),
            size,
            "size of {fname}"
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f["name"].as_str().unwrap().ends_with(".meta.pack")),
        "{v}"
    );
    assert!(
        files
            .iter()
            .any(|f| f["name"].as_str().unwrap().contains(".pages-")),
        "{v}"
    );

    let human = text(&ok(env, &["inspect", target]).stdout);
    assert!(
        human.contains(&format!("job {name} epoch {epoch}")),
        "{human}"
    );
    for f in files {
        let fname = f["name"].as_str().unwrap();
        let line = human
            .lines()
            .find(|l| l.contains(fname))
            .unwrap_or_else(|| panic!("inspect does not list {fname}:\n{human}"));
        assert!(
            line.contains(&f["blake3"].as_str().unwrap()[..16]),
            "no digest on: {line}"
        );
    }

    let vj = json_of(&ok(env, &["verify", "--json", target]));
    assert_eq!(vj["ok"], true, "{vj}");
    assert_eq!(vj["epoch"], epoch, "{vj}");
    assert_eq!(vj["files"], files.len(), "{vj}");
    let total: u64 = files.iter().map(|f| f["size"].as_u64().unwrap()).sum();
    assert_eq!(vj["bytes"], total, "{vj}");
    let human = text(&ok(env, &["verify", target]).stdout);
    assert!(human.contains(&format!("{name}@{epoch}: OK")), "{human}");
    v
}

#[test]
fn query_commands_human_and_json() {
    if !require(
        "query_commands_human_and_json",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let name = "cli-job";
    let Started {
        mut job, expected, ..
    } = env.start_workload(name, "threads", "30", &[]);
    job.wait_for("step 3 ", T);

    // Running, no checkpoint yet.
    let v = json_of(&ok(&env, &["status", "--json", name]));
    assert_eq!(v["name"], name);
    assert_eq!(v["state"], "running");
    assert_eq!(v["last_epoch"], 0);
    assert_eq!(v["checkpoints_committed"], 0);
    let pid = v["pid"].as_i64().unwrap();
    assert!(
        pid > 1 && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "{v}"
    );
    assert!(
        v["command"].as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .ends_with("threads"),
        "{v}"
    );

    // checkpoint --json (continue mode).
    let c = json_of(&ok(&env, &["checkpoint", "--json", name]));
    assert_eq!(c["job"], name, "{c}");
    assert_eq!(c["epoch"], 1, "{c}");
    assert_eq!(c["stopped"], false, "{c}");
    assert_eq!(c["path"], env.epoch_dir(name, 1).to_str().unwrap(), "{c}");
    assert!(c["image_bytes"].as_u64().unwrap() > 0, "{c}");
    // Human checkpoint output.
    let h = text(&ok(&env, &["checkpoint", name]).stdout);
    assert!(
        h.contains(&format!("{name}: epoch 2 committed"))
            && h.contains(env.epoch_dir(name, 2).to_str().unwrap()),
        "{h}"
    );

    // Running job, with checkpoints.
    let l = json_of(&ok(&env, &["list", "--json"]));
    let entry = l
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("job not listed: {l}"));
    assert_eq!(entry["state"], "running", "{l}");
    assert_eq!(entry["last_epoch"], 2, "{l}");
    assert_eq!(entry["pid"], pid, "{l}");
    let h = text(&ok(&env, &["list"]).stdout);
    let line = h
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("list:\n{h}"));
    assert!(
        line.contains("running") && line.contains(&pid.to_string()),
        "{line}"
    );
    let v = json_of(&ok(&env, &["status", "--json", name]));
    assert_eq!(v["last_epoch"], 2, "{v}");
    assert_eq!(v["checkpoints_committed"], 2, "{v}");
    let h = text(&ok(&env, &["status", name]).stdout);
    assert!(
        h.contains(name) && h.contains("running") && h.contains("2 committed"),
        "{h}"
    );
    check_inspect(&env, name, name, 2, "continue");
    check_inspect(&env, name, &format!("{name}@1"), 1, "continue");

    // Stop it: a job that exists only as checkpoints.
    let c = json_of(&ok(&env, &["checkpoint", "--stop", "--json", name]));
    assert_eq!(c["epoch"], 3, "{c}");
    assert_eq!(c["stopped"], true, "{c}");
    let first = job.wait(T);
    assert_eq!(first.code(), 75, "{}", first.stderr);

    let l = json_of(&ok(&env, &["list", "--json"]));
    let entry = l
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("job not listed: {l}"));
    assert_eq!(entry["state"], "checkpointed", "{l}");
    assert_eq!(entry["last_epoch"], 3, "{l}");
    let h = text(&ok(&env, &["list"]).stdout);
    let line = h
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("list:\n{h}"));
    assert!(
        line.contains("checkpointed") && line.contains('3'),
        "{line}"
    );
    let v = json_of(&ok(&env, &["status", "--json", name]));
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["state"], "not running", "{v}");
    assert_eq!(v["last_epoch"], 3, "{v}");
    let epochs: Vec<(u64, bool)> = v["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().unwrap(),
                e["committed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(epochs, vec![(1, true), (2, true), (3, true)], "{v}");
    let h = text(&ok(&env, &["status", name]).stdout);
    assert!(
        h.contains("not running") && h.contains("ckpt-job restart") && h.contains("(epoch 3)"),
        "{h}"
    );
    check_inspect(&env, name, name, 3, "stop");
    check_inspect(&env, name, &format!("{name}@2"), 2, "continue");

    // Bad targets are refused.
    for t in [format!("{name}@x"), format!("{name}@9")] {
        let out = env.ckpt(&["inspect", &t]);
        assert!(!out.status.success(), "inspect {t} succeeded");
        let out = env.ckpt(&["verify", &t]);
        assert!(!out.status.success(), "verify {t} succeeded");
    }

    // And the stopped job still comes back.
    let second = env.restart(name, &[]).wait(T);
    assert_eq!(second.code(), 0, "{}", second.stderr);
    assert_eq!(first.stdout + &second.stdout, expected);
}
