use std::io::Write;
use std::process::{Command, Stdio};

/// The admin subcommands work against the same data dir the server uses.
#[test]
fn create_user_and_enrollment_token_from_the_command_line() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let binary = env!("CARGO_BIN_EXE_control-plane");
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(binary)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir.path())
            .env_remove("DATABASE_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("binary exits")
    };

    let created = run(
        &[
            "create-user",
            "--email",
            "Root@Example.com",
            "--role",
            "admin",
            "--password-stdin",
        ],
        "s3cret-password\n",
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(
        String::from_utf8_lossy(&created.stdout).starts_with("created admin user root@example.com")
    );

    let again = run(
        &[
            "create-user",
            "--email",
            "root@example.com",
            "--password-stdin",
        ],
        "another-password\n",
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let weak = run(
        &[
            "create-user",
            "--email",
            "x@example.com",
            "--password-stdin",
        ],
        "short\n",
    );
    assert!(!weak.status.success());

    let bad_role = run(
        &[
            "create-user",
            "--email",
            "y@example.com",
            "--role",
            "god",
            "--password-stdin",
        ],
        "",
    );
    assert!(String::from_utf8_lossy(&bad_role.stderr).contains("unknown role \"god\""));

    let token = run(&["create-enrollment-token", "--expires-in", "2h"], "");
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let printed = String::from_utf8_lossy(&token.stdout);
    assert!(
        printed.trim().starts_with("lce_") && printed.trim().len() == 68,
        "{printed}"
    );
    assert!(
        data_dir.path().join("control-plane.db").exists(),
        "SQLite lives in the data dir"
    );

    let bad_duration = run(&["create-enrollment-token", "--expires-in", "soon"], "");
    assert!(!bad_duration.status.success());
}
