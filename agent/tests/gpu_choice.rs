//! `agent run --gpu`: a setting that cannot hold stops the agent at start, naming why,
//! before it enrolls or claims anything.

use std::process::{Command, Output};

fn run_agent(arguments: &[&str], visible_devices: Option<&str>) -> Output {
    let work_dir = tempfile::tempdir().expect("temporary work dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agent"));
    command
        .arg("run")
        .args(arguments)
        // Nothing listens here: an agent that got past its checks would fail to enroll.
        .args(["--control-plane", "http://127.0.0.1:9", "--work-dir"])
        .arg(work_dir.path())
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("AGENT_GPU");
    if let Some(listed) = visible_devices {
        command.env("CUDA_VISIBLE_DEVICES", listed);
    }
    command.output().expect("the agent binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_gpu_the_host_lacks_is_refused_at_start() {
    let output = run_agent(&["--gpu", "999", "--enrollment-token", "x"], None);
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    // Without a driver (CI) or with one, the reason is about the GPU, not the enrollment.
    assert!(
        message.contains("gpu = 999: this host has no NVIDIA driver")
            || message.contains("gpu = 999: no such GPU here"),
        "{message}"
    );
}

#[test]
fn a_gpu_other_than_the_environment_names_is_refused() {
    let output = run_agent(&["--gpu", "GPU-5f2c"], Some("0,1"));
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("gpu = \"GPU-5f2c\" and CUDA_VISIBLE_DEVICES=\"0,1\""),
        "{message}"
    );
}

#[test]
fn a_gpu_that_is_neither_index_nor_uuid_is_refused() {
    let output = run_agent(&["--gpu", "first"], None);
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    assert!(
        message.contains("\"first\" is neither a GPU index"),
        "{message}"
    );
}
