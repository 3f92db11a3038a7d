//! Tests of the workflow file's parsing.

use super::*;

fn parse_str(s: &str) -> Result<Plan, Problems> {
    parse("wf.toml", Arc::new(s.to_string()), "wf")
}

#[test]
fn parses_tasks_and_before() {
    let plan = parse_str(
        r#"
[[task]]
id = "a"
run = "echo a"
before = ["b"]

[[task]]
id = "b"
argv = ["echo", "b"]
timeout = "10s"
retries = 2
"#,
    )
    .expect("valid");
    assert_eq!(plan.tasks.len(), 2);
    assert_eq!(plan.tasks[1].needs, ["a"]);
    assert_eq!(
        plan.tasks[1].timeout,
        Some(std::time::Duration::from_secs(10))
    );
}

#[test]
fn unknown_field_is_placed_with_a_suggestion() {
    let err = parse_str("[[task]]\nid = \"a\"\nrun = \"x\"\nneeds = []\nretires = 2\n")
        .expect_err("error");
    let out = err.render(false);
    assert!(out.contains("wf.toml:5:1"), "{out}");
    assert!(out.contains("did you mean `retries`?"), "{out}");
}

#[test]
fn collects_every_problem() {
    let err = parse_str(
        "[[task]]\nid = \"a\"\n\n[[task]]\nid = \"b\"\nrun = \"x\"\ntimeout = \"soon\"\nready = { http = \"h\" }\n",
    )
    .expect_err("error");
    // No command; a bad timeout; `h` is no http URL; `ready` without `service`.
    assert_eq!(err.len(), 4, "{}", err.render(false));
}

#[test]
fn probe_addresses_are_checked_and_placeholders_count_as_hosts() {
    assert!(check_http("http://${host:node0}:8000/health").is_ok());
    assert!(check_http("https://example.org/").is_ok());
    for bad in ["::::", "h", "ftp://x/", "http://", "127.0.0.1:8000"] {
        assert!(check_http(bad).is_err(), "{bad}");
    }
    assert!(check_tcp("${host:node1}:50052").is_ok());
    for bad in ["::::", ":80", "h:0", "h", "h:99999"] {
        assert!(check_tcp(bad).is_err(), "{bad}");
    }
}
