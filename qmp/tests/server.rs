//! The monitor server over real unix sockets, with a fake command set and a
//! thread playing the VMM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, FakeCommands, Harness};
use qmp::{ListenAddr, QmpServer, ServerConfig, ServerError};
use serde_json::{json, Map, Value};

const NOT_FOUND_PROBE: &str = r#"{"execute":"no-such-cmd"}"#;

#[test]
fn greeting_is_exact() {
    let h = Harness::start(1);
    let mut c = Client::connect(&h.paths[0]);
    assert_eq!(
        c.line(),
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"skiff-test\"}, \"capabilities\": [\"oob\"]}}"
    );
    c.expect_silence(100);
}

#[test]
fn negotiation_mode_rules() {
    let h = Harness::start(1);
    let mut c = h.connect(0);
    c.send(r#"{"execute":"query-version","id":1}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}"
    );
    c.send(r#"{"execute":"qmp_capabilities","arguments":{"oob":true}}"#);
    assert_eq!(
        c.line(),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'oob' is unexpected\"}}"
    );
    c.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["cap-does-not-exist"]}}"#);
    assert!(c
        .line()
        .contains("does not accept value 'cap-does-not-exist'"));
    c.send(r#"{"exec-oob":"migrate-pause"}"#);
    assert!(c
        .line()
        .contains("QMP input member 'exec-oob' is unexpected"));
    // Events are not delivered during negotiation, nor later.
    h.server.emit_event("STOP", None);
    c.send(r#"{"execute":"qmp_capabilities","id":"n"}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": \"n\"}");
    c.send(r#"{"execute":"qmp_capabilities","id":"again"}"#);
    assert_eq!(
        c.line(),
        "{\"id\": \"again\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}"
    );
    c.send(r#"{"execute":"query-name","id":"cookie#1"}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": \"cookie#1\"}");
    c.expect_silence(100);
}

#[test]
fn malformed_battery_before_and_after_negotiation() {
    let h = Harness::start(1);
    let mut c = h.connect(0);
    let battery: &[&[u8]] = &[
        b"{]\n",
        b"{\xFF",
        b"{\x01",
        b"{'bad \xFF",
        b"{'execute': 'nonexistent', 'id':'\n",
        b"%%p",
        b"null\n",
        b"{}",
        b"{'execute': true}",
        b"{'execute': 'no-such-cmd', 'arguments': []}",
        b"{'execute': 'no-such-cmd', 'extra': true}",
    ];
    for round in 0..2 {
        for input in battery {
            c.send_bytes(input);
            let m = c.msg();
            assert_eq!(m["error"]["class"], "GenericError", "input {input:?}: {m}");
            c.send(NOT_FOUND_PROBE);
            let m = c.msg();
            assert_eq!(
                m["error"]["class"], "CommandNotFound",
                "probe after {input:?}"
            );
        }
        if round == 0 {
            c.send(r#"{"execute":"qmp_capabilities"}"#);
            assert_eq!(c.line(), "{\"return\": {}}");
        }
    }
    c.expect_silence(100);
}

#[test]
fn byte_at_a_time_and_whitespace() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    for b in br#"{"execute":"echo","arguments":{"s":"\u00e9\ud83d\ude00"},"id":7}"#.iter() {
        c.send_bytes(&[*b]);
    }
    assert_eq!(
        c.line(),
        "{\"return\": {\"s\": \"\\u00E9\\uD83D\\uDE00\"}, \"id\": 7}"
    );
    c.send(" \n \r\n\t ");
    c.expect_silence(100);
    c.send("{'execute':'echo','arguments':{'it\\'s':'x'}}");
    assert_eq!(c.line(), "{\"return\": {\"it's\": \"x\"}}");
}

#[test]
fn ids_of_every_type_are_echoed() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    for id in [
        json!("s"),
        json!(1),
        json!(-2.5),
        json!(true),
        json!(null),
        json!([1, "a"]),
        json!({"b": 1, "a": {"y": 2, "x": 1}}),
    ] {
        let req = json!({"execute": "query-name", "id": id});
        c.send(&req.to_string());
        let m = c.msg();
        assert_eq!(m["id"], id);
        assert!(m.get("return").is_some());
    }
    c.send(r#"{"execute":"query-name"}"#);
    assert_eq!(c.line(), "{\"return\": {}}");
    c.send(r#"{"execute":"fail","id":{"b":1,"a":2}}"#);
    assert_eq!(
        c.line(),
        "{\"id\": {\"a\": 2, \"b\": 1}, \"error\": {\"class\": \"GenericError\", \"desc\": \"it failed\"}}"
    );
}

#[test]
fn pipelined_commands_answered_in_order() {
    for oob in [false, true] {
        let h = Harness::start(1);
        let mut c = h.negotiated(0, oob);
        let mut batch = String::new();
        for i in 0..20 {
            if i % 5 == 4 {
                batch.push_str(&format!(r#"{{"id":{i}}}"#));
            } else {
                batch.push_str(&format!(
                    r#"{{"execute":"echo","arguments":{{"n":{i}}},"id":{i}}}"#
                ));
            }
        }
        c.send(&batch);
        for i in 0..20 {
            let m = c.msg();
            assert_eq!(m["id"], json!(i), "oob={oob}: {m}");
        }
        c.expect_silence(100);
    }
}

#[test]
fn oob_overtakes_blocked_in_band_command() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    c.send(r#"{"execute":"block","id":"ib-blocks-1"}"#);
    h.wait_block_started();
    c.send(r#"{"execute":"query-name","id":"ib-quick-1"}"#);
    c.send(r#"{"exec-oob":"migrate-pause","id":"oob-1"}"#);
    assert_eq!(
        c.line(),
        "{\"id\": \"oob-1\", \"error\": {\"class\": \"GenericError\", \"desc\": \"migrate-pause is currently only supported during postcopy-active state\"}}"
    );
    // The 2.12 form is accepted as a synonym of exec-oob.
    c.send(r#"{"execute":"migrate-pause","control":{"run-oob":true},"id":"oob-2"}"#);
    assert_eq!(c.msg()["id"], "oob-2");
    // Validation errors on the OOB path are immediate too.
    c.send(r#"{"exec-oob":"query-name","id":"oob-3"}"#);
    assert_eq!(
        c.line(),
        "{\"id\": \"oob-3\", \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-name does not support OOB\"}}"
    );
    // A malformed in-band request keeps its place behind the blocked one.
    c.send(r#"{"id":"err-2"}"#);
    c.expect_silence(200);
    h.release.send(()).unwrap();
    assert_eq!(c.msg()["id"], "ib-blocks-1");
    assert_eq!(c.msg()["id"], "ib-quick-1");
    assert_eq!(
        c.line(),
        "{\"id\": \"err-2\", \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}"
    );
}

#[test]
fn without_oob_input_waits_for_the_running_command() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"block","id":1}"#);
    h.wait_block_started();
    // Not read while the command runs: even the exec-oob error waits.
    c.send(r#"{"exec-oob":"migrate-pause","id":2}{"execute":"query-name","id":3}"#);
    c.expect_silence(200);
    h.release.send(()).unwrap();
    assert_eq!(c.msg()["id"], 1);
    let m = c.msg();
    assert_eq!(m["id"], 2);
    assert_eq!(
        m["error"]["desc"],
        "QMP input member 'exec-oob' is unexpected"
    );
    assert_eq!(c.msg()["id"], 3);
}

fn queue_depth_case(queued: usize) -> (bool, Client, Harness) {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    c.send(r#"{"execute":"block","id":"b"}"#);
    h.wait_block_started();
    let mut batch = String::new();
    for i in 0..queued {
        batch.push_str(&format!(r#"{{"execute":"query-name","id":{i}}}"#));
    }
    batch.push_str(r#"{"exec-oob":"migrate-pause","id":"oob"}"#);
    c.send(&batch);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    let answered = std::io::Read::read(&mut c.stream.try_clone().unwrap(), &mut buf).is_ok();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (answered, c, h)
}

#[test]
fn seven_queued_still_reads_oob() {
    let (answered, _c, h) = queue_depth_case(7);
    assert!(answered, "with 7 queued the OOB command must still be read");
    h.release.send(()).unwrap();
}

#[test]
fn eight_queued_suspends_reading() {
    let (answered, mut c, h) = queue_depth_case(8);
    assert!(!answered, "with 8 queued the monitor must stop reading");
    h.release.send(()).unwrap();
    // Everything is answered once the queue drains; the OOB reply comes
    // after the blocked command's, somewhere among the queued ones.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(c.msg()["id"].clone());
    }
    assert_eq!(ids[0], "b");
    let in_band: Vec<_> = ids.iter().filter(|id| id.is_number()).cloned().collect();
    assert_eq!(in_band, (0..8).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(ids.contains(&json!("oob")));
}

#[test]
fn two_monitors_at_once() {
    let h = Harness::start(2);
    let mut a = h.negotiated(0, false);
    let mut b = h.negotiated(1, true);
    a.send(r#"{"execute":"echo","arguments":{"who":"a"},"id":"a1"}"#);
    b.send(r#"{"execute":"echo","arguments":{"who":"b"},"id":"b1"}"#);
    assert_eq!(a.line(), "{\"return\": {\"who\": \"a\"}, \"id\": \"a1\"}");
    assert_eq!(b.line(), "{\"return\": {\"who\": \"b\"}, \"id\": \"b1\"}");
    // A blocked command on one monitor does not stop OOB on the other.
    a.send(r#"{"execute":"block","id":"a2"}"#);
    h.wait_block_started();
    b.send(r#"{"exec-oob":"migrate-pause","id":"b2"}"#);
    assert_eq!(b.msg()["id"], "b2");
    b.send(r#"{"execute":"query-name","id":"b3"}"#);
    b.expect_silence(150);
    h.release.send(()).unwrap();
    assert_eq!(a.msg()["id"], "a2");
    assert_eq!(b.msg()["id"], "b3");
    h.server.emit_event("RESUME", None);
    for c in [&mut a, &mut b] {
        let m = c.msg();
        assert_eq!(m["event"], "RESUME");
        assert!(m.get("data").is_none());
    }
}

#[test]
fn reconnect_gets_fresh_greeting_and_negotiation() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    c.send(r#"{"execute":"query-name","id":1}"#);
    assert_eq!(c.msg()["id"], 1);
    drop(c);
    let mut c = h.connect(0);
    c.send(r#"{"execute":"query-name","id":2}"#);
    assert_eq!(c.msg()["error"]["class"], "CommandNotFound");
    // A half-sent request from the previous client left no parser state.
    c.send("{\"execute\":");
    drop(c);
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"query-name","id":3}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 3}");
}

#[test]
fn second_client_waits_for_the_first() {
    let h = Harness::start(1);
    let a = h.connect(0);
    let mut b = Client::connect(&h.paths[0]);
    b.expect_silence(200);
    drop(a);
    assert!(b.line().starts_with("{\"QMP\""));
}

#[test]
fn disconnect_mid_command_discards_queue() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    c.send(r#"{"execute":"block","id":1}"#);
    h.wait_block_started();
    c.send(r#"{"execute":"echo","id":2}{"execute":"echo","id":3}{"execute":"query-name","id":4}"#);
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    h.release.send(()).unwrap();
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"query-name","id":5}"#);
    assert_eq!(c.line(), "{\"return\": {}, \"id\": 5}");
    assert_eq!(*h.executed.lock().unwrap(), vec!["block", "query-name"]);
}

#[test]
fn reconnect_while_old_command_runs() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"block","id":1}"#);
    h.wait_block_started();
    drop(c);
    let mut c = h.connect(0);
    c.send(r#"{"execute":"qmp_capabilities"}"#);
    // The old command still runs; its reply must not reach the new client.
    c.expect_silence(150);
    h.release.send(()).unwrap();
    assert_eq!(c.line(), "{\"return\": {}}");
    c.expect_silence(100);
}

#[test]
fn events_only_to_negotiated_monitors() {
    let h = Harness::start(2);
    let mut a = h.negotiated(0, false);
    let mut b = h.connect(1);
    let mut data = Map::new();
    data.insert("guest".into(), json!(false));
    data.insert("reason".into(), json!("host-qmp-quit"));
    h.server.emit_event("SHUTDOWN", Some(data));
    let line = a.line();
    let m: Value = serde_json::from_str(&line).unwrap();
    assert!(line.starts_with("{\"timestamp\": {\"seconds\": "));
    assert!(line.ends_with(
        "\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}"
    ));
    assert!(m["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    b.expect_silence(150);
    b.send(r#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(b.line(), "{\"return\": {}}");
    b.expect_silence(100);
}

#[test]
fn garbage_and_huge_input_do_not_wedge() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    // Deterministic pseudo-random bytes.
    let mut x: u32 = 12345;
    let garbage: Vec<u8> = (0..200_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let writer = {
        let mut s = c.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = s.write_all(&garbage);
            let _ = s.write_all(
                b"\x01\n]]]]}}}}\n{\"execute\":\"query-name\",\"id\":\"after-garbage\"}",
            );
        })
    };
    let mut seen = false;
    for _ in 0..200_000 {
        let m = c.msg();
        if m["id"] == "after-garbage" {
            assert_eq!(m["return"], json!({}));
            seen = true;
            break;
        }
    }
    writer.join().unwrap();
    assert!(seen);
    // Deep nesting is refused, then the session goes on.
    let mut deep = "[".repeat(2000).into_bytes();
    deep.extend_from_slice(b"\x01\n");
    c.send_bytes(&deep);
    assert_eq!(
        c.msg()["error"]["desc"],
        "JSON nesting depth limit exceeded"
    );
    let mut errs = 0;
    c.send(r#"{"execute":"query-name","id":"after-deep"}"#);
    loop {
        let m = c.msg();
        if m["id"] == "after-deep" {
            break;
        }
        errs += 1;
    }
    // The 975 '[' after the limit start a new value, which the control
    // character then rejects as a stray byte.
    assert_eq!(errs, 1);
}

#[test]
fn client_that_never_reads_does_not_block_others() {
    let h = Harness::start(2);
    let mut lazy = h.negotiated(0, true);
    let mut busy = h.negotiated(1, true);
    // Many requests whose replies the lazy client never reads.
    let req = r#"{"execute":"echo","arguments":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#.repeat(2000);
    let writer = {
        let mut s = lazy.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(req.as_bytes());
        })
    };
    for i in 0..50 {
        busy.send(&format!(r#"{{"execute":"query-name","id":{i}}}"#));
        assert_eq!(busy.msg()["id"], i);
        h.server.emit_event("RTC_CHANGE", None);
        assert_eq!(busy.msg()["event"], "RTC_CHANGE");
    }
    writer.join().unwrap();
    // The lazy client still gets its replies (among the events) when it reads.
    let found = (0..100).any(|_| lazy.line().starts_with("{\"return\": {\"pad\""));
    assert!(found);
}

#[test]
fn run_next_with_nothing_queued() {
    let server = QmpServer::start(
        ServerConfig {
            addrs: vec![ListenAddr::Unix(common::sock_path("idle"))],
            version: common::version(),
        },
        Arc::new(FakeCommands),
    )
    .unwrap();
    assert!(!server.run_next(&mut |_, _, _| unreachable!()));
    server.shutdown();
    server.shutdown();
}

#[test]
fn socket_files() {
    let path = common::sock_path("files");
    let config = || ServerConfig {
        addrs: vec![ListenAddr::Unix(path.clone())],
        version: common::version(),
    };
    // A stale socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = QmpServer::start(config(), Arc::new(FakeCommands)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live server is not replaced.
    match QmpServer::start(config(), Arc::new(FakeCommands)) {
        Err(ServerError::InUse(p)) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    server.shutdown();
    assert!(!path.exists());
    // Something that is not a socket is left alone.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        QmpServer::start(config(), Arc::new(FakeCommands)),
        Err(ServerError::NotASocket(_))
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        QmpServer::start(
            ServerConfig {
                addrs: vec![],
                version: common::version()
            },
            Arc::new(FakeCommands)
        ),
        Err(ServerError::NoAddress)
    ));
}

#[test]
fn tcp_monitor() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: ListenAddr = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let server = QmpServer::start(
        ServerConfig {
            addrs: vec![addr],
            version: common::version(),
        },
        Arc::new(FakeCommands),
    )
    .unwrap();
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\"") && line.ends_with("\r\n"));
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    server.shutdown();
}

use common::fd_passing::{peer_closed, probe_pair};

/// Sends `text` with `fd` attached and returns the reply line.
fn send_fd(c: &mut Client, text: &str, fd: &impl std::os::fd::AsRawFd) -> String {
    common::fd_passing::send_with_fds(&c.stream, text.as_bytes(), &[fd.as_raw_fd()]).unwrap();
    c.line()
}

#[test]
fn getfd_takes_the_descriptor_sent_with_it_and_closefd_closes_it() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    let (r, w) = probe_pair();
    let getfd = r#"{"execute":"getfd","arguments":{"fdname":"a"}}"#;
    assert_eq!(send_fd(&mut c, getfd, &r), r#"{"return": {}}"#);
    drop(r);
    assert!(!peer_closed(&w), "the monitor keeps the descriptor");
    c.send(r#"{"execute":"closefd","arguments":{"fdname":"a"}}"#);
    assert_eq!(c.line(), r#"{"return": {}}"#);
    assert!(peer_closed(&w));
    c.send(getfd);
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}"#
    );
}

#[test]
fn a_descriptor_sent_with_a_lone_space_goes_to_the_next_command() {
    // qemu.qmp's send_fd_scm: one space byte carries the descriptor, the command follows.
    let h = Harness::start(1);
    let mut c = h.negotiated(0, false);
    let (r, w) = probe_pair();
    common::fd_passing::send_with_fds(&c.stream, b" ", &[std::os::fd::AsRawFd::as_raw_fd(&r)])
        .unwrap();
    drop(r);
    c.expect_silence(100);
    c.send(r#"{"execute":"getfd","arguments":{"fdname":"sp"}}"#);
    assert_eq!(c.line(), r#"{"return": {}}"#);
    assert!(!peer_closed(&w));
    // Named descriptors belong to the monitor: they survive a reconnection, as in QEMU.
    drop(c);
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"closefd","arguments":{"fdname":"sp"}}"#);
    assert_eq!(c.line(), r#"{"return": {}}"#);
    assert!(peer_closed(&w));
}

#[test]
fn descriptors_no_command_takes_are_closed() {
    let h = Harness::start(1);
    let mut c = h.negotiated(0, true);
    // With a command that does not take descriptors, queued behind others in one read.
    let (r, w) = probe_pair();
    let reply = send_fd(
        &mut c,
        r#"{"execute":"echo","arguments":{"n":1}}{"execute":"query-name"}"#,
        &r,
    );
    drop(r);
    assert_eq!(reply, r#"{"return": {"n": 1}}"#);
    assert_eq!(c.line(), r#"{"return": {}}"#);
    assert!(peer_closed(&w), "query-name's descriptor was closed");
    c.send(r#"{"execute":"getfd","arguments":{"fdname":"late"}}"#);
    assert!(c
        .line()
        .contains("No file descriptor supplied via SCM_RIGHTS"));
    // With a request that fails validation, and with an out-of-band one.
    for text in [
        r#"{"execute":"getfd","arguments":{"fdname":"x"},"extra":1}"#,
        r#"{"exec-oob":"migrate-pause"}"#,
        r#"{"execute":"getfd","arguments":{"fdname":"9x"}}"#,
    ] {
        let (r, w) = probe_pair();
        let reply = send_fd(&mut c, text, &r);
        drop(r);
        assert!(reply.contains("\"error\""), "{text}: {reply}");
        assert!(peer_closed(&w), "{text}");
    }
    // And when the client leaves before its command runs.
    let (r, w) = probe_pair();
    c.send(r#"{"execute":"block"}"#);
    h.wait_block_started();
    common::fd_passing::send_with_fds(
        &c.stream,
        br#"{"execute":"getfd","arguments":{"fdname":"gone"}}"#,
        &[std::os::fd::AsRawFd::as_raw_fd(&r)],
    )
    .unwrap();
    drop(r);
    drop(c);
    h.release.send(()).unwrap();
    // Whether the getfd was dropped with the connection or ran before the monitor saw the
    // client go, nothing stays open once its name is closed.
    let mut c = h.negotiated(0, false);
    c.send(r#"{"execute":"closefd","arguments":{"fdname":"gone"}}"#);
    c.line();
    assert!(peer_closed(&w), "descriptor leaked");
}

#[test]
fn out_of_band_commands_take_their_own_monitors_descriptors() {
    // As QEMU's out-of-band migrate-recover with fd:NAME (monitor_cur()'s list).
    let h = Harness::start(2);
    let mut a = h.negotiated(0, true);
    let mut b = h.negotiated(1, true);
    let (r, w) = probe_pair();
    let getfd = r#"{"execute":"getfd","arguments":{"fdname":"x"}}"#;
    assert_eq!(send_fd(&mut a, getfd, &r), r#"{"return": {}}"#);
    drop(r);
    // Monitor 0's in-band command blocks; out-of-band ones are answered meanwhile.
    a.send(r#"{"execute":"block","id":"blocked"}"#);
    h.wait_block_started();
    let take =
        |id: &str| format!(r#"{{"exec-oob":"take-fd","arguments":{{"fdname":"x"}},"id":"{id}"}}"#);
    b.send(&take("other"));
    assert_eq!(
        b.line(),
        r#"{"id": "other", "error": {"class": "GenericError", "desc": "File descriptor named 'x' has not been found"}}"#
    );
    assert!(!peer_closed(&w), "another monitor's command took it");
    a.send(&take("own"));
    assert_eq!(a.line(), r#"{"return": {}, "id": "own"}"#);
    assert!(
        peer_closed(&w),
        "the out-of-band command did not get the descriptor"
    );
    h.release.send(()).unwrap();
    assert_eq!(a.msg()["id"], "blocked");
    // Sent in-band, the same handler gets the same table.
    let (r, w) = probe_pair();
    assert_eq!(send_fd(&mut a, getfd, &r), r#"{"return": {}}"#);
    drop(r);
    a.send(r#"{"execute":"take-fd","arguments":{"fdname":"x"}}"#);
    assert_eq!(a.line(), r#"{"return": {}}"#);
    assert!(peer_closed(&w));
}
