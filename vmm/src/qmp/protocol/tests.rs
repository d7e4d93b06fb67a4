//! Unit tests for the QMP protocol layer.  Expected strings are QEMU's.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use super::hmp::{self, HmpAction, HmpRender};
use super::json::format_g;
use super::shell::parse_argv;
use super::*;

// --- helpers -----------------------------------------------------------------

fn feed_all(s: &mut JsonStreamer, input: &[u8]) -> Vec<Result<Value, QmpError>> {
    s.feed(input)
}

fn err_desc(r: &Result<Value, QmpError>) -> &str {
    match r {
        Err(e) => &e.desc,
        Ok(v) => panic!("expected error, got {v}"),
    }
}

/// Parse `text` (one JSON request) in command mode.
fn req(text: &str) -> Result<Request, Response> {
    parse_negotiated(text, true)
}

fn parse_negotiated(text: &str, negotiated: bool) -> Result<Request, Response> {
    let mut s = JsonStreamer::new();
    let mut out = s.feed(text.as_bytes());
    out.extend(s.feed(b"\n"));
    assert_eq!(out.len(), 1, "{text}");
    let v = out.remove(0).expect("valid JSON");
    parse_request(v, negotiated)
}

/// The error reply for `text`, as (class, desc, id).
fn rejected(text: &str) -> (ErrorClass, String, Option<Value>) {
    match req(text) {
        Err(Response::Error { id, error }) => (error.class, error.desc, id),
        other => panic!("expected an error for {text}, got {other:?}"),
    }
}

fn desc(text: &str) -> String {
    rejected(text).1
}

fn command(text: &str) -> Command {
    match req(text) {
        Ok(r) => r.command,
        Err(e) => panic!("{text} rejected: {e:?}"),
    }
}

// --- framer ------------------------------------------------------------------

#[test]
fn framer_one_object() {
    let mut s = JsonStreamer::new();
    let out = feed_all(&mut s, br#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(out, vec![Ok(json!({"execute": "qmp_capabilities"}))]);
}

#[test]
fn framer_several_objects_in_one_read() {
    let mut s = JsonStreamer::new();
    let out = s.feed(b"{\"a\":1}{\"b\":2}\r\n{\"c\":[1,{\"d\":null}]}  ");
    assert_eq!(
        out,
        vec![
            Ok(json!({"a": 1})),
            Ok(json!({"b": 2})),
            Ok(json!({"c": [1, {"d": null}]}))
        ]
    );
}

#[test]
fn framer_byte_by_byte_and_across_lines() {
    let input = b"{\n  \"execute\":\n \"migrate\",\n \"arguments\": {\"uri\": \"unix:/tmp/m\"},\n \"id\": 7\n}\n";
    let mut s = JsonStreamer::new();
    let mut out = Vec::new();
    for b in input.iter() {
        out.extend(s.feed(std::slice::from_ref(b)));
    }
    assert_eq!(
        out,
        vec![Ok(
            json!({"execute": "migrate", "arguments": {"uri": "unix:/tmp/m"}, "id": 7})
        )]
    );
    assert!(!s.is_mid_message());
}

#[test]
fn framer_split_inside_string_and_escape() {
    let mut s = JsonStreamer::new();
    assert!(s.feed(b"{\"a\": \"x\\").is_empty());
    assert!(s.is_mid_message());
    assert!(s.feed(b"\"y").is_empty());
    assert_eq!(s.feed(b"\"}"), vec![Ok(json!({"a": "x\"y"}))]);
}

#[test]
fn framer_braces_inside_strings_do_not_count() {
    let mut s = JsonStreamer::new();
    assert_eq!(s.feed(br#"{"a": "}]{["}"#), vec![Ok(json!({"a": "}]{["}))]);
}

#[test]
fn framer_scalars_at_top_level() {
    let mut s = JsonStreamer::new();
    assert_eq!(s.feed(b"\"str\""), vec![Ok(json!("str"))]);
    // A number needs a delimiter to end, as in QEMU's lexer.
    assert!(s.feed(b"123").is_empty());
    assert_eq!(s.feed(b" "), vec![Ok(json!(123))]);
    assert_eq!(s.feed(b"true\n"), vec![Ok(json!(true))]);
    assert_eq!(s.feed(b"[1, 2.5]"), vec![Ok(json!([1, 2.5]))]);
}

#[test]
fn framer_numbers() {
    let mut s = JsonStreamer::new();
    let out =
        s.feed(b"[-1, 0, -0, 18446744073709551615, 18446744073709551616, 1.5, 1e3, 1E+2, 1e999]");
    let v = out[0].as_ref().unwrap();
    assert_eq!(v[0], json!(-1));
    assert_eq!(v[1], json!(0));
    assert_eq!(v[2].as_i64(), Some(0));
    assert_eq!(v[3].as_u64(), Some(u64::MAX));
    assert!(v[4].is_f64());
    assert_eq!(v[5], json!(1.5));
    assert!(v[6].is_f64());
    assert!(v[7].is_f64());
    assert_eq!(v[8].as_f64(), Some(f64::MAX));
}

#[test]
fn framer_qemu_string_extensions() {
    let mut s = JsonStreamer::new();
    let out = s.feed(br#"{'execute': 'a\'b"c', "x": "\u00e9\ud83d\ude00\/\b\f\n\r\t"}"#);
    assert_eq!(
        out,
        vec![Ok(
            json!({"execute": "a'b\"c", "x": "é😀/\u{8}\u{c}\n\r\t"})
        )]
    );
}

#[test]
fn framer_garbage_keyword() {
    let mut s = JsonStreamer::new();
    let out = s.feed(b"foo\n{\"a\":1}");
    assert_eq!(err_desc(&out[0]), "JSON parse error, invalid keyword 'foo'");
    assert_eq!(out[1], Ok(json!({"a": 1})));
    assert_eq!(out.len(), 2);
}

#[test]
fn framer_stray_closing_brace() {
    let mut s = JsonStreamer::new();
    let out = s.feed(b"}{\"a\":1}");
    assert_eq!(out.len(), 2);
    assert_eq!(err_desc(&out[0]), "JSON parse error, expecting value");
    assert_eq!(out[1], Ok(json!({"a": 1})));
}

#[test]
fn framer_stray_character_and_recovery() {
    let mut s = JsonStreamer::new();
    // The lexer skips the rest of "XYZ" up to the '{'.
    let out = s.feed(b"XYZ{\"execute\":\"stop\"}");
    assert_eq!(out.len(), 2);
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray 'X'");
    assert_eq!(out[1], Ok(json!({"execute": "stop"})));
}

#[test]
fn framer_lexical_error_inside_object_drops_it() {
    let mut s = JsonStreamer::new();
    // As in QEMU: the stray error discards the object, then the '}' left
    // over is a fresh (bad) message.
    let out = s.feed(b"{\"execute\": @}\n{\"execute\":\"cont\"}");
    assert_eq!(out.len(), 3);
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray '@'");
    assert_eq!(err_desc(&out[1]), "JSON parse error, expecting value");
    assert_eq!(out[2], Ok(json!({"execute": "cont"})));
}

#[test]
fn framer_control_character_resets_parser() {
    // The QMP spec's way to resynchronise: send a control character.
    let mut s = JsonStreamer::new();
    let out = s.feed(b"{\"execute\": \"sto\x01{\"execute\":\"cont\"}");
    assert_eq!(out.len(), 2);
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\"sto\u{1}'");
    assert_eq!(out[1], Ok(json!({"execute": "cont"})));
    // 0xFF works too (it is never valid UTF-8).
    let out = s.feed(b"[1, \xff{\"a\":2}");
    assert_eq!(out.len(), 2);
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray '\u{fffd}'");
    assert_eq!(out[1], Ok(json!({"a": 2})));
}

#[test]
fn framer_nul_byte_is_reported_like_a_c_string() {
    let mut s = JsonStreamer::new();
    let out = s.feed(b"\0{}");
    assert_eq!(out.len(), 2);
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray ''");
    assert_eq!(out[1], Ok(json!({})));
}

#[test]
fn framer_grammar_errors() {
    let cases: &[(&[u8], &str)] = &[
        (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
        (b"{\"a\": }", "JSON parse error, expecting value"),
        (b"{\"a\": 1,}", "JSON parse error, expecting value"),
        (
            b"{\"a\": 1 \"b\": 2}",
            "JSON parse error, expected separator in dict",
        ),
        (b"[1 2]", "JSON parse error, expected separator in list"),
        (b"[1,]", "JSON parse error, expecting value"),
        (b"{1: 2}", "JSON parse error, key is not a string in object"),
        (b"{nope: 2}", "JSON parse error, invalid keyword 'nope'"),
        (b"{\"a\": 1, \"a\": 2}", "JSON parse error, duplicate key"),
        (b"[1}", "JSON parse error, expected separator in list"),
        (
            b"{\"a\": \"\\x\"}",
            "JSON parse error, invalid escape sequence in string",
        ),
        (
            b"{\"a\": \"\\ud800\"}",
            "JSON parse error, \\ud800 is not a valid Unicode character",
        ),
        (
            b"{\"a\": \"\\u12G4\"}",
            "JSON parse error, \\u12G4 is not a valid Unicode character",
        ),
        (
            b"{\"a\": \"\xc3\x28\"}",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
        (
            b"{\"a\": \"\xef\xbf\xbf\"}",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
    ];
    for (input, expected) in cases {
        let mut s = JsonStreamer::new();
        let out = s.feed(input);
        assert_eq!(out.len(), 1, "{}", String::from_utf8_lossy(input));
        assert_eq!(
            err_desc(&out[0]),
            *expected,
            "{}",
            String::from_utf8_lossy(input)
        );
        // And the streamer is usable afterwards.
        assert_eq!(s.feed(b"{}"), vec![Ok(json!({}))]);
    }
}

#[test]
fn framer_bad_numbers_are_lexical_errors() {
    let mut s = JsonStreamer::new();
    let out = s.feed(b"[01]");
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray '01'");
    let mut s = JsonStreamer::new();
    let out = s.feed(b"-x");
    assert_eq!(err_desc(&out[0]), "JSON parse error, stray '-x'");
}

#[test]
fn framer_size_limit_one_error_then_resync() {
    let mut s = JsonStreamer::with_limits(64, MAX_NESTING_DEPTH);
    let big = format!(
        "{{\"execute\": \"x\", \"arguments\": {{\"pad\": \"{}\", \"n\": [1, {{}}]}}}}",
        "a".repeat(500)
    );
    let mut input = big.into_bytes();
    input.extend_from_slice(b"\n{\"execute\": \"stop\"}");
    let mut out = Vec::new();
    for chunk in input.chunks(7) {
        out.extend(s.feed(chunk));
    }
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(err_desc(&out[0]), "JSON token size limit exceeded");
    assert_eq!(out[1], Ok(json!({"execute": "stop"})));
}

#[test]
fn framer_default_size_limit_is_one_mib() {
    let mut s = JsonStreamer::new();
    let ok = format!("{{\"a\": \"{}\"}}", "b".repeat(MAX_MESSAGE_SIZE - 16));
    assert!(s.feed(ok.as_bytes())[0].is_ok());
    // A huge top-level string: one error, no buffering, then recovery.
    let mut out = s.feed(b"\"");
    let chunk = vec![b'c'; 64 * 1024];
    for _ in 0..20 {
        out.extend(s.feed(&chunk));
    }
    out.extend(s.feed(b"\" {\"execute\": \"cont\"}"));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(err_desc(&out[0]), "JSON token size limit exceeded");
    assert_eq!(out[1], Ok(json!({"execute": "cont"})));
    assert!(
        s.token_capacity() < 1024,
        "discarded bytes must not be buffered"
    );
}

#[test]
fn framer_nesting_limit() {
    let mut s = JsonStreamer::new();
    let deep_ok = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
    let out = s.feed(deep_ok.as_bytes());
    assert!(out[0].is_ok());
    let too_deep = format!("{}{}", "[".repeat(1025), "]".repeat(1025));
    let mut out = s.feed(too_deep.as_bytes());
    out.extend(s.feed(b"{\"execute\": \"stop\"}"));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(err_desc(&out[0]), "JSON nesting depth limit exceeded");
    assert_eq!(out[1], Ok(json!({"execute": "stop"})));
}

#[test]
fn framer_never_panics_on_noise() {
    // A small xorshift generator keeps this deterministic.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let alphabet = b"{}[]:,\"'\\ \n\tabcdefnrtu0123456789.-+eE\x00\x01\x7f\x80\xc3\xa9\xfe\xff";
    for round in 0..200 {
        let mut s = JsonStreamer::with_limits(256, 8);
        let mut buf = Vec::new();
        for _ in 0..(round * 7 + 13) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(alphabet[(x % alphabet.len() as u64) as usize]);
        }
        for chunk in buf.chunks(5) {
            let _ = s.feed(chunk);
        }
        s.reset();
        assert_eq!(s.feed(b"{}"), vec![Ok(json!({}))]);
    }
}

// --- writer --------------------------------------------------------------------

#[test]
fn writer_uses_qemu_spacing_and_crlf() {
    let line = to_line(&json!({"a": [1, 2], "b": {}, "c": []}));
    assert_eq!(line, "{\"a\": [1, 2], \"b\": {}, \"c\": []}\r\n");
}

#[test]
fn writer_escapes_like_qemu() {
    let line = to_line(&json!("é😀\u{1}\u{7f}/\"\\\n"));
    assert_eq!(
        line,
        "\"\\u00E9\\uD83D\\uDE00\\u0001\\u007F/\\\"\\\\\\n\"\r\n"
    );
}

#[test]
fn writer_doubles_are_percent_17g() {
    assert_eq!(format_g(0.1, 17), "0.10000000000000001");
    assert_eq!(format_g(80.1, 17), "80.099999999999994");
    assert_eq!(format_g(0.5, 17), "0.5");
    assert_eq!(format_g(100.0, 17), "100");
    assert_eq!(format_g(1e20, 17), "1e+20");
    assert_eq!(format_g(1.5e-5, 17), "1.5e-05");
    assert_eq!(format_g(1e-5, 17), "1.0000000000000001e-05");
    assert_eq!(format_g(5e-324, 17), "4.9406564584124654e-324");
    assert_eq!(format_g(123456789012345678.0, 17), "1.2345678901234568e+17");
    assert_eq!(format_g(999.9, 17), "999.89999999999998");
    assert_eq!(format_g(-2.25, 17), "-2.25");
    assert_eq!(format_g(0.0, 17), "0");
    assert_eq!(format_g(4.0, 3), "4");
    assert_eq!(format_g(0.9765625, 3), "0.977");
    assert_eq!(format_g(999.9, 3), "1e+03");
    assert_eq!(
        to_line(&json!({"mbps": 0.1})),
        "{\"mbps\": 0.10000000000000001}\r\n"
    );
}

// --- greeting, replies, events -----------------------------------------------

#[test]
fn greeting_shape() {
    let g = Greeting::new(VersionInfo::new(10, 2, 0, ""));
    assert_eq!(
        g.to_line(),
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\r\n"
    );
}

#[test]
fn reply_shapes() {
    assert_eq!(
        Response::empty(Some(json!(1))).to_line(),
        "{\"return\": {}, \"id\": 1}\r\n"
    );
    assert_eq!(Response::empty(None).to_line(), "{\"return\": {}}\r\n");
    assert_eq!(
        Response::ok(Some(json!("x")), &StatusInfo::from_state(RunState::Running)).to_line(),
        "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": \"x\"}\r\n"
    );
    assert_eq!(
        Response::error(Some(json!({"k": [1]})), QmpError::generic("boom")).to_line(),
        "{\"id\": {\"k\": [1]}, \"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}}\r\n"
    );
    assert_eq!(
        Response::from_result(None, Err::<Value, _>(QmpError::command_not_found("nope"))).to_line(),
        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\r\n"
    );
    assert_eq!(
        Response::from_result(None, Ok(json!("VM status: running\r\n"))).to_line(),
        "{\"return\": \"VM status: running\\r\\n\"}\r\n"
    );
}

#[test]
fn event_shapes() {
    let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    assert_eq!(
        Event::new(&EventKind::Stop, at).to_line(),
        "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"STOP\"}\r\n"
    );
    assert_eq!(
        Event::new(&EventKind::Resume, at).to_line(),
        "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"RESUME\"}\r\n"
    );
    assert_eq!(
        Event::new(&EventKind::shutdown(ShutdownCause::HostQmpQuit), at).to_line(),
        "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n"
    );
    let shutdown = Event::new(&EventKind::shutdown(ShutdownCause::GuestShutdown), at);
    assert_eq!(
        shutdown.data,
        Some(json!({"guest": true, "reason": "guest-shutdown"}))
    );
    let reset = Event::new(&EventKind::reset(ShutdownCause::HostQmpSystemReset), at);
    assert_eq!(reset.event, "RESET");
    assert_eq!(
        reset.data,
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"}))
    );
    let reset = Event::new(&EventKind::reset(ShutdownCause::GuestReset), at);
    assert_eq!(
        reset.data,
        Some(json!({"guest": true, "reason": "guest-reset"}))
    );
    let sig = Event::new(&EventKind::shutdown(ShutdownCause::HostSignal), at);
    assert_eq!(
        sig.data,
        Some(json!({"guest": false, "reason": "host-signal"}))
    );
    let mig = Event::new(
        &EventKind::Migration {
            status: MigrationStatus::Completed,
        },
        at,
    );
    assert_eq!(
        mig.to_line(),
        "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"completed\"}}\r\n"
    );
    let pass = Event::new(&EventKind::MigrationPass { pass: 3 }, at);
    assert_eq!(pass.data, Some(json!({"pass": 3})));
    let custom = Event::new(
        &EventKind::Other {
            name: "POWERDOWN".into(),
            data: None,
        },
        at,
    );
    assert_eq!(custom.data, None);
}

#[test]
fn timestamp_before_epoch_truncates_like_c() {
    let t = UNIX_EPOCH - Duration::from_micros(1_500_000);
    let ts = Timestamp::from_system_time(t);
    assert_eq!((ts.seconds, ts.microseconds), (-1, -500_000));
}

// --- request envelope ----------------------------------------------------------

#[test]
fn envelope_errors() {
    let (class, d, id) = rejected("[1, 2]");
    assert_eq!(
        (class, d.as_str(), id),
        (
            ErrorClass::GenericError,
            "QMP input must be a JSON object",
            None
        )
    );
    assert_eq!(desc("\"str\""), "QMP input must be a JSON object");
    let (_, d, id) = rejected(r#"{"id": 5}"#);
    assert_eq!(
        (d.as_str(), id),
        ("QMP input lacks member 'execute'", Some(json!(5)))
    );
    assert_eq!(
        desc(r#"{"execute": 1}"#),
        "QMP input member 'execute' must be a string"
    );
    assert_eq!(
        desc(r#"{"execute": "stop", "arguments": []}"#),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(
        desc(r#"{"execute": "stop", "foo": 1}"#),
        "QMP input member 'foo' is unexpected"
    );
    // No OOB capability: exec-oob is just an unknown member.
    assert_eq!(
        desc(r#"{"exec-oob": "stop"}"#),
        "QMP input member 'exec-oob' is unexpected"
    );
}

#[test]
fn id_is_echoed_verbatim() {
    for id in [
        json!(1),
        json!("libvirt-3"),
        json!({"a": [null]}),
        json!(null),
        json!(1.5),
    ] {
        let text = format!(r#"{{"execute": "nope", "id": {id}}}"#);
        assert_eq!(rejected(&text).2, Some(id.clone()));
        let text = format!(r#"{{"execute": "stop", "id": {id}}}"#);
        assert_eq!(req(&text).map(|r| r.id), Ok(Some(id)));
    }
}

#[test]
fn unknown_command() {
    let (class, d, _) = rejected(r#"{"execute": "foo"}"#);
    assert_eq!(class, ErrorClass::CommandNotFound);
    assert_eq!(d, "The command foo has not been found");
}

#[test]
fn negotiation() {
    let mut session = Session::new();
    let mut s = JsonStreamer::new();
    let mut run = |text: &str| {
        let mut out = s.feed(text.as_bytes());
        assert_eq!(out.len(), 1);
        session.handle(out.remove(0))
    };
    // Any command before negotiation, known or not.
    for cmd in ["query-status", "foo"] {
        match run(&format!(r#"{{"execute": "{cmd}", "id": 1}}"#)) {
            Action::Reply(Response::Error { id, error }) => {
                assert_eq!(id, Some(json!(1)));
                assert_eq!(error.class, ErrorClass::CommandNotFound);
                assert_eq!(
                    error.desc,
                    "Expecting capabilities negotiation with 'qmp_capabilities'"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Envelope errors are not rewritten.
    match run(r#"{"execute": "query-status", "bogus": 1}"#) {
        Action::Reply(Response::Error { error, .. }) => {
            assert_eq!(error.desc, "QMP input member 'bogus' is unexpected");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        run(r#"{"execute": "qmp_capabilities", "id": "n"}"#),
        Action::Reply(Response::empty(Some(json!("n"))))
    );
    match run(r#"{"execute": "qmp_capabilities"}"#) {
        Action::Reply(Response::Error { error, .. }) => {
            assert_eq!(error.class, ErrorClass::CommandNotFound);
            assert_eq!(
                error.desc,
                "Capabilities negotiation is already complete, command ignored"
            );
        }
        other => panic!("{other:?}"),
    }
    match run(r#"{"execute": "query-status", "id": 2}"#) {
        Action::Execute(r) => {
            assert_eq!(r.command, Command::QueryStatus);
            assert_eq!(r.id, Some(json!(2)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn parse_errors_reply_without_id() {
    let mut session = Session::new();
    let action = session.handle(Err(QmpError::generic("JSON parse error, stray 'X'")));
    assert_eq!(
        action,
        Action::Reply(Response::error(
            None,
            QmpError::generic("JSON parse error, stray 'X'")
        ))
    );
}

#[test]
fn qmp_capabilities_arguments() {
    let caps = |args: &str| {
        let text = format!(r#"{{"execute": "qmp_capabilities", "arguments": {args}}}"#);
        match parse_negotiated(&text, false) {
            Ok(r) => Ok(r.command),
            Err(Response::Error { error, .. }) => Err(error.desc),
            Err(other) => panic!("{other:?}"),
        }
    };
    assert_eq!(
        caps(r#"{"enable": []}"#),
        Ok(Command::QmpCapabilities(QmpCapabilitiesArgs {
            enable: Some(vec![])
        }))
    );
    assert_eq!(
        caps(r#"{"enable": ["oob"]}"#),
        Err("Capability oob not available".into())
    );
    assert_eq!(
        caps(r#"{"enable": ["oob", "oob"]}"#),
        Err("Capability oob, oob not available".into())
    );
    // Enum values inside lists are reported under the name "null".
    assert_eq!(
        caps(r#"{"enable": ["foo"]}"#),
        Err("Parameter 'null' does not accept value 'foo'".into())
    );
    assert_eq!(
        caps(r#"{"enable": "oob"}"#),
        Err("Invalid parameter type for 'enable', expected: array".into())
    );
    assert_eq!(
        caps(r#"{"enable": [1]}"#),
        Err("Invalid parameter type for 'enable[0]', expected: string".into())
    );
    assert_eq!(
        caps(r#"{"x": 1}"#),
        Err("Parameter 'x' is unexpected".into())
    );
}

// --- argument validation per command -----------------------------------------

#[test]
fn argless_commands_reject_arguments() {
    for (name, cmd) in [
        ("query-status", Command::QueryStatus),
        ("stop", Command::Stop),
        ("cont", Command::Cont),
        ("quit", Command::Quit),
        ("system_reset", Command::SystemReset),
        ("query-cpus-fast", Command::QueryCpusFast),
        ("query-version", Command::QueryVersion),
        ("query-commands", Command::QueryCommands),
        ("query-migrate-parameters", Command::QueryMigrateParameters),
        ("query-migrate", Command::QueryMigrate),
        ("migrate_cancel", Command::MigrateCancel),
    ] {
        assert_eq!(command(&format!(r#"{{"execute": "{name}"}}"#)), cmd);
        assert_eq!(
            command(&format!(r#"{{"execute": "{name}", "arguments": {{}}}}"#)),
            cmd
        );
        assert_eq!(cmd.name(), name);
        assert_eq!(
            desc(&format!(
                r#"{{"execute": "{name}", "arguments": {{"foo": 1}}}}"#
            )),
            "Parameter 'foo' is unexpected"
        );
    }
}

#[test]
fn pmemsave_arguments() {
    let pm = |args: &str| format!(r#"{{"execute": "pmemsave", "arguments": {args}}}"#);
    assert_eq!(
        command(&pm(r#"{"val": 4096, "size": 100, "filename": "/tmp/m"}"#)),
        Command::Pmemsave(PmemsaveArgs {
            val: 4096,
            size: 100,
            filename: "/tmp/m".into()
        })
    );
    assert_eq!(
        desc(&pm(r#"{"val": 0, "size": 1}"#)),
        "Parameter 'filename' is missing"
    );
    assert_eq!(
        desc(&pm(r#"{"size": 1, "filename": "f"}"#)),
        "Parameter 'val' is missing"
    );
    assert_eq!(
        desc(&pm(r#"{"val": 0, "size": 1, "filename": 3}"#)),
        "Invalid parameter type for 'filename', expected: string"
    );
    assert_eq!(
        desc(&pm(r#"{"val": 1.5, "size": 1, "filename": "f"}"#)),
        "Invalid parameter type for 'val', expected: integer"
    );
    assert_eq!(
        desc(&pm(r#"{"val": "1", "size": 1, "filename": "f"}"#)),
        "Invalid parameter type for 'val', expected: integer"
    );
    assert_eq!(
        desc(&pm(
            r#"{"val": 18446744073709551615, "size": 1, "filename": "f"}"#
        )),
        "Invalid parameter type for 'val', expected: integer"
    );
    assert_eq!(
        desc(&pm(r#"{"val": 0, "size": 1, "filename": "f", "foo": 2}"#)),
        "Parameter 'foo' is unexpected"
    );
    // QEMU's pmemsave has no cpu-index (memsave does).
    assert_eq!(
        desc(&pm(
            r#"{"val": 0, "size": 1, "filename": "f", "cpu-index": 0}"#
        )),
        "Parameter 'cpu-index' is unexpected"
    );
    assert_eq!(
        desc(&pm(r#"{"val": 0, "size": -1, "filename": "f"}"#)),
        "Parameter 'size' expects a non-negative value"
    );
    assert_eq!(
        desc(&pm(r#"{"val": -4096, "size": 1, "filename": "f"}"#)),
        "Parameter 'val' expects a non-negative value"
    );
}

#[test]
fn human_monitor_command_arguments() {
    let hmc =
        |args: &str| format!(r#"{{"execute": "human-monitor-command", "arguments": {args}}}"#);
    assert_eq!(
        command(&hmc(r#"{"command-line": "info status", "cpu-index": 1}"#)),
        Command::HumanMonitor(HumanMonitorCommandArgs {
            command_line: "info status".into(),
            cpu_index: Some(1)
        })
    );
    assert_eq!(desc(&hmc("{}")), "Parameter 'command-line' is missing");
    // Optional members present as null are type errors, as in QEMU.
    assert_eq!(
        desc(&hmc(r#"{"command-line": "x", "cpu-index": null}"#)),
        "Invalid parameter type for 'cpu-index', expected: integer"
    );
    assert_eq!(
        QmpError::invalid_cpu_index().desc,
        "Parameter 'cpu-index' expects a CPU number"
    );
}

#[test]
fn migrate_set_parameters_arguments() {
    let msp =
        |args: &str| format!(r#"{{"execute": "migrate-set-parameters", "arguments": {args}}}"#);
    let Command::MigrateSetParameters(p) = command(&msp(
        r#"{"mode": "cpr-exec", "cpr-exec-command": ["vmm", "--incoming", "a b"],
            "downtime-limit": 300, "tls-creds": null, "tls-hostname": "h",
            "multifd-channels": 255, "max-bandwidth": 1048576, "zero-page-detection": "none"}"#,
    )) else {
        panic!()
    };
    assert_eq!(p.mode, Some(MigMode::CprExec));
    assert_eq!(
        p.cpr_exec_command,
        Some(vec!["vmm".into(), "--incoming".into(), "a b".into()])
    );
    assert_eq!(p.downtime_limit, Some(300));
    assert_eq!(p.tls_creds, Some(StrOrNull::Null));
    assert_eq!(p.tls_hostname, Some(StrOrNull::Str("h".into())));
    assert_eq!(p.multifd_channels, Some(255));
    assert_eq!(p.zero_page_detection, Some(ZeroPageDetection::Off));
    for mode in ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"] {
        assert!(req(&msp(&format!(r#"{{"mode": "{mode}"}}"#))).is_ok());
    }
    assert_eq!(
        desc(&msp(r#"{"mode": "foo"}"#)),
        "Parameter 'mode' does not accept value 'foo'"
    );
    assert_eq!(
        desc(&msp(r#"{"mode": 1}"#)),
        "Invalid parameter type for 'mode', expected: string"
    );
    assert_eq!(
        desc(&msp(r#"{"cpr-exec-command": "vmm"}"#)),
        "Invalid parameter type for 'cpr-exec-command', expected: array"
    );
    assert_eq!(
        desc(&msp(r#"{"cpr-exec-command": ["vmm", 1]}"#)),
        "Invalid parameter type for 'cpr-exec-command[1]', expected: string"
    );
    assert_eq!(
        desc(&msp(r#"{"multifd-channels": 256}"#)),
        "Parameter 'multifd-channels' expects uint8_t"
    );
    assert_eq!(
        desc(&msp(r#"{"downtime-limit": "300"}"#)),
        "Parameter 'downtime-limit' expects uint64"
    );
    assert_eq!(
        desc(&msp(r#"{"max-bandwidth": 1.5}"#)),
        "Parameter 'max-bandwidth' expects uint64"
    );
    assert_eq!(
        desc(&msp(r#"{"tls-creds": 1}"#)),
        "Invalid parameter type for 'tls-creds', expected: StrOrNull"
    );
    assert_eq!(
        desc(&msp(r#"{"x-checkpoint-delay": 1}"#)),
        "Parameter 'x-checkpoint-delay' is unexpected"
    );
    // QEMU wraps negative uint64 input instead of refusing it.
    let Command::MigrateSetParameters(p) = command(&msp(r#"{"downtime-limit": -1}"#)) else {
        panic!()
    };
    assert_eq!(p.downtime_limit, Some(u64::MAX));
}

#[test]
fn migration_parameters_apply_and_defaults() {
    let mut params = MigrationParameters::qemu_defaults();
    params.apply(&MigrateSetParameters {
        mode: Some(MigMode::CprTransfer),
        tls_creds: Some(StrOrNull::Null),
        tls_authz: Some(StrOrNull::Str("z".into())),
        cpr_exec_command: Some(vec!["a".into()]),
        ..Default::default()
    });
    assert_eq!(params.mode, Some(MigMode::CprTransfer));
    assert_eq!(params.tls_creds.as_deref(), Some(""));
    assert_eq!(params.tls_authz.as_deref(), Some("z"));
    assert_eq!(params.downtime_limit, Some(300));
    let v = serde_json::to_value(&params).unwrap();
    assert_eq!(v["mode"], json!("cpr-transfer"));
    assert_eq!(v["cpr-exec-command"], json!(["a"]));
    assert_eq!(v["multifd-compression"], json!("none"));
    let empty = serde_json::to_value(MigrationParameters::default()).unwrap();
    assert_eq!(empty, json!({}));
}

fn migrate(args: &str) -> String {
    format!(r#"{{"execute": "migrate", "arguments": {args}}}"#)
}

#[test]
fn migrate_arguments_schema() {
    let Command::Migrate(m) = command(&migrate(
        r#"{"channels": [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/mig"}},
            {"channel-type": "cpr", "addr": {"transport": "file", "filename": "/tmp/cpr", "offset": 4096}}
        ], "detach": true, "resume": false}"#,
    )) else {
        panic!()
    };
    let chans = m.channels.clone().unwrap();
    assert_eq!(
        chans[0].addr,
        MigrationAddress::Socket(SocketAddress::Unix(UnixSocketAddress {
            path: "/tmp/mig".into(),
            is_abstract: None,
            tight: None
        }))
    );
    assert_eq!(
        chans[1].addr,
        MigrationAddress::File(FileMigrationArgs {
            filename: "/tmp/cpr".into(),
            offset: 4096
        })
    );
    assert_eq!(m.detach, Some(true));
    // Round trip through serde keeps QEMU's wire shape.
    assert_eq!(
        serde_json::to_value(&chans[0]).unwrap(),
        json!({"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/mig"}})
    );

    let cases = [
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"type": "unix", "path": "/p"}}]}"#,
            "Parameter 'channels[0].addr.transport' is missing",
        ),
        (
            r#"{"channels": [{"channel-type": "side", "addr": {}}]}"#,
            "Parameter 'channel-type' does not accept value 'side'",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix"}}]}"#,
            "Parameter 'channels[0].addr.path' is missing",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/p", "foo": 1}}]}"#,
            "Parameter 'channels[0].addr.foo' is unexpected",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "carrier-pigeon"}}]}"#,
            "Parameter 'transport' does not accept value 'carrier-pigeon'",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": "/f"}}]}"#,
            "Parameter 'channels[0].addr.offset' is missing",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": "/f", "offset": "0"}}]}"#,
            "Parameter 'channels[0].addr.offset' expects uint64",
        ),
        (
            r#"{"channels": ["unix:/p"]}"#,
            "Invalid parameter type for 'channels[0]', expected: object",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "1", "to": 70000}}]}"#,
            "Parameter 'to' expects uint16_t",
        ),
        (
            r#"{"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": [1]}}]}"#,
            "Invalid parameter type for 'channels[0].addr.args[0]', expected: string",
        ),
        (
            r#"{"uri": 5}"#,
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            r#"{"uri": "x", "detach": "yes"}"#,
            "Invalid parameter type for 'detach', expected: boolean",
        ),
        (
            r#"{"uri": "x", "blk": true}"#,
            "Parameter 'blk' is unexpected",
        ),
    ];
    for (args, expected) in cases {
        assert_eq!(desc(&migrate(args)), expected, "{args}");
    }
}

#[test]
fn migrate_uri_channels_rules() {
    let targets = |args: &str| match command(&migrate(args)) {
        Command::Migrate(m) => m.targets().map_err(|e| e.desc),
        _ => panic!(),
    };
    assert_eq!(
        targets("{}"),
        Err("need either 'uri' or 'channels' argument".into())
    );
    assert_eq!(
        targets(r#"{"channels": []}"#),
        Err("need either 'uri' or 'channels' argument".into())
    );
    let main = r#"{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/m"}}"#;
    let cpr =
        r#"{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/c"}}"#;
    assert_eq!(
        targets(&format!(r#"{{"uri": "unix:/m", "channels": [{main}]}}"#)),
        Err("need either 'uri' or 'channels' argument".into())
    );
    assert_eq!(
        targets(&format!(r#"{{"channels": [{main}, {main}]}}"#)),
        Err("Channel list has more than one main entry".into())
    );
    assert_eq!(
        targets(&format!(r#"{{"channels": [{cpr}]}}"#)),
        Err("Channel list has no main entry".into())
    );
    let t = targets(&format!(r#"{{"channels": [{cpr}, {main}]}}"#)).unwrap();
    assert!(
        matches!(t.main, MigrationAddress::Socket(SocketAddress::Unix(ref u)) if u.path == "/m")
    );
    assert!(
        matches!(t.cpr, Some(MigrationAddress::Socket(SocketAddress::Unix(ref u))) if u.path == "/c")
    );
    let t = targets(r#"{"uri": "file:/tmp/f,offset=0x1000"}"#).unwrap();
    assert_eq!(
        t.main,
        MigrationAddress::File(FileMigrationArgs {
            filename: "/tmp/f".into(),
            offset: 4096
        })
    );
    assert_eq!(t.cpr, None);
    assert_eq!(
        targets(r#"{"uri": "carrier:pigeon"}"#),
        Err("unknown migration protocol: carrier:pigeon".into())
    );
}

#[test]
fn migration_uri_forms() {
    let p = |s: &str| parse_migration_uri(s).map_err(|e| e.desc);
    assert!(
        matches!(p("tcp:127.0.0.1:4444"), Ok(MigrationAddress::Socket(SocketAddress::Inet(ref i))) if i.host == "127.0.0.1" && i.port == "4444")
    );
    assert!(
        matches!(p("tcp:[::1]:4444"), Ok(MigrationAddress::Socket(SocketAddress::Inet(ref i))) if i.host == "::1")
    );
    assert!(
        matches!(p("fd:mig"), Ok(MigrationAddress::Socket(SocketAddress::Fd(ref f))) if f.str == "mig")
    );
    assert!(matches!(
        p("vsock:3:1234"),
        Ok(MigrationAddress::Socket(SocketAddress::Vsock(_)))
    ));
    assert_eq!(
        p("exec:cat > /tmp/x"),
        Ok(MigrationAddress::Exec(MigrationExecCommand {
            args: vec!["/bin/sh".into(), "-c".into(), "cat > /tmp/x".into()]
        }))
    );
    assert_eq!(
        p("file:/f"),
        Ok(MigrationAddress::File(FileMigrationArgs {
            filename: "/f".into(),
            offset: 0
        }))
    );
    assert_eq!(p("unix:"), Err("invalid Unix socket address".into()));
    assert_eq!(
        p("tcp:nohost"),
        Err("error parsing address 'nohost'".into())
    );
    assert_eq!(
        p("file:/f,offset=zz"),
        Err("file URI has bad offset zz: Invalid argument".into())
    );
}

#[test]
fn migrate_incoming_arguments() {
    let mi = |args: &str| format!(r#"{{"execute": "migrate-incoming", "arguments": {args}}}"#);
    let address = |args: &str| match command(&mi(args)) {
        Command::MigrateIncoming(m) => m.address().map_err(|e| e.desc),
        _ => panic!(),
    };
    assert!(matches!(
        address(r#"{"uri": "unix:/tmp/in", "exit-on-error": false}"#),
        Ok(MigrationAddress::Socket(SocketAddress::Unix(_)))
    ));
    let ch =
        r#"{"channel-type": "main", "addr": {"transport": "file", "filename": "/f", "offset": 0}}"#;
    assert!(address(&format!(r#"{{"channels": [{ch}]}}"#)).is_ok());
    assert_eq!(
        address(&format!(r#"{{"channels": [{ch}, {ch}]}}"#)),
        Err("Channel list must have only one entry, for type 'main'".into())
    );
    assert_eq!(
        address("{}"),
        Err("need either 'uri' or 'channels' argument".into())
    );
    assert_eq!(
        desc(&mi(r#"{"uri": "x", "exit-on-error": 0}"#)),
        "Invalid parameter type for 'exit-on-error', expected: boolean"
    );
}

#[test]
fn command_table_is_consistent() {
    let names: Vec<_> = query_commands().into_iter().map(|c| c.name).collect();
    assert_eq!(names.len(), COMMANDS.len());
    for spec in COMMANDS {
        assert_eq!(find_command(spec.name).map(|s| s.name), Some(spec.name));
    }
    for name in [
        "qmp_capabilities",
        "query-status",
        "stop",
        "cont",
        "quit",
        "system_reset",
        "query-cpus-fast",
        "pmemsave",
        "human-monitor-command",
        "query-version",
        "query-commands",
        "migrate-set-parameters",
        "query-migrate-parameters",
        "migrate",
        "query-migrate",
        "migrate-incoming",
        "migrate_cancel",
    ] {
        assert!(names.iter().any(|n| n == name), "{name}");
    }
    // Every accepted migrate-set-parameters member is a QEMU parameter and
    // deserialises into the typed struct.
    for m in commands::MIGRATE_SET_PARAMETERS {
        assert!(
            commands::QEMU_MIGRATION_PARAMETERS.contains(&m.name),
            "{}",
            m.name
        );
    }
}

#[test]
fn result_shapes() {
    let cpu = CpuInfoFast {
        thread_id: 4242,
        props: Some(CpuInstanceProperties {
            socket_id: Some(0),
            core_id: Some(1),
            thread_id: Some(0),
            ..Default::default()
        }),
        qom_path: "/machine/unattached/device[1]".into(),
        cpu_index: 1,
        target: TARGET_X86_64.into(),
    };
    assert_eq!(
        serde_json::to_value(&cpu).unwrap(),
        json!({"thread-id": 4242, "props": {"socket-id": 0, "core-id": 1, "thread-id": 0},
               "qom-path": "/machine/unattached/device[1]", "cpu-index": 1, "target": "x86_64"})
    );
    assert_eq!(
        serde_json::to_value(StatusInfo::from_state(RunState::Postmigrate)).unwrap(),
        json!({"status": "postmigrate", "running": false})
    );
    assert_eq!(
        serde_json::to_value(VersionInfo::new(10, 2, 1, "pkg")).unwrap(),
        json!({"qemu": {"micro": 1, "minor": 2, "major": 10}, "package": "pkg"})
    );
    assert_eq!(
        serde_json::to_value(MigrationInfo::default()).unwrap(),
        json!({})
    );
    let info = MigrationInfo {
        status: Some(MigrationStatus::Failed),
        error_desc: Some("boom".into()),
        total_time: Some(10),
        ram: Some(MigrationStats {
            transferred: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let v = serde_json::to_value(&info).unwrap();
    assert_eq!(v["status"], json!("failed"));
    assert_eq!(v["error-desc"], json!("boom"));
    assert_eq!(v["total-time"], json!(10));
    assert_eq!(v["ram"]["normal-bytes"], json!(0));
    assert_eq!(
        serde_json::to_value(query_commands()[0].clone()).unwrap(),
        json!({"name": "qmp_capabilities"})
    );
}

// --- HMP -------------------------------------------------------------------------

fn hmp_reply(line: &str) -> String {
    match hmp::parse(line, None) {
        HmpAction::Reply(s) => s,
        other => panic!("{line}: expected a reply, got {other:?}"),
    }
}

fn hmp_run(line: &str) -> (Command, HmpRender) {
    match hmp::parse(line, None) {
        HmpAction::Run { command, render } => (command, render),
        other => panic!("{line}: expected a command, got {other:?}"),
    }
}

#[test]
fn hmp_info_status_text() {
    let (cmd, render) = hmp_run("info status");
    assert_eq!(cmd, Command::QueryStatus);
    let r = |state| {
        render.render(&Ok(
            serde_json::to_value(StatusInfo::from_state(state)).unwrap()
        ))
    };
    assert_eq!(r(RunState::Running), "VM status: running\r\n");
    assert_eq!(r(RunState::Paused), "VM status: paused\r\n");
    assert_eq!(
        r(RunState::Postmigrate),
        "VM status: paused (postmigrate)\r\n"
    );
    assert_eq!(r(RunState::Inmigrate), "VM status: paused (inmigrate)\r\n");
    assert_eq!(r(RunState::Shutdown), "VM status: paused (shutdown)\r\n");
}

#[test]
fn hmp_simple_commands_and_aliases() {
    assert_eq!(hmp_run("stop"), (Command::Stop, HmpRender::Nothing));
    assert_eq!(hmp_run("s"), (Command::Stop, HmpRender::Nothing));
    assert_eq!(hmp_run("cont"), (Command::Cont, HmpRender::ErrorsOnly));
    assert_eq!(hmp_run("  c  "), (Command::Cont, HmpRender::ErrorsOnly));
    assert_eq!(hmp_run("quit"), (Command::Quit, HmpRender::Nothing));
    assert_eq!(hmp_run("q"), (Command::Quit, HmpRender::Nothing));
    assert_eq!(
        hmp_run("system_reset"),
        (Command::SystemReset, HmpRender::Nothing)
    );
    assert_eq!(
        hmp_run("migrate_cancel"),
        (Command::MigrateCancel, HmpRender::Nothing)
    );
    assert_eq!(hmp_run("info version").0, Command::QueryVersion);
    assert_eq!(hmp_run("info migrate").0, Command::QueryMigrate);
    assert_eq!(
        hmp_run("info migrate -a").1,
        HmpRender::InfoMigrate { all: true }
    );
    assert_eq!(
        hmp_run("info migrate_parameters").0,
        Command::QueryMigrateParameters
    );
    // Failures print "Error: ...", except where QEMU ignores them.
    let err = Err(QmpError::generic(
        "Resetting the Virtual Machine is required",
    ));
    assert_eq!(
        HmpRender::ErrorsOnly.render(&err),
        "Error: Resetting the Virtual Machine is required\r\n"
    );
    assert_eq!(HmpRender::Nothing.render(&err), "");
    assert_eq!(HmpRender::ErrorsOnly.render(&Ok(json!({}))), "");
    assert_eq!(
        hmp::error_text(&QmpError::generic("x\ny")),
        "Error: x\r\ny\r\n"
    );
}

#[test]
fn hmp_unknown_and_usage_errors() {
    assert_eq!(hmp_reply("foo"), "unknown command: 'foo'\r\n");
    assert_eq!(hmp_reply("foo bar baz"), "unknown command: 'foo'\r\n");
    assert_eq!(hmp_reply("info foo"), "unknown command: 'info foo'\r\n");
    assert_eq!(hmp_reply(""), "");
    assert_eq!(hmp_reply("   "), "");
    assert_eq!(
        hmp_reply("stop now"),
        "stop|s: extraneous characters at the end of line\r\nTry \"help stop\" for more information\r\n"
    );
    assert_eq!(
        hmp_reply("info status x"),
        "status: extraneous characters at the end of line\r\nTry \"help info status\" for more information\r\n"
    );
    assert_eq!(
        hmp_reply("migrate"),
        "migrate: string expected\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        hmp_reply("migrate -x unix:/p"),
        "migrate: unsupported option -x\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        hmp_reply("migrate \"unix:/p"),
        "migrate: string expected\r\nTry \"help migrate\" for more information\r\n"
    );
    assert_eq!(
        hmp_reply("migrate carrier:pigeon"),
        "Error: unknown migration protocol: carrier:pigeon\r\n"
    );
}

#[test]
fn hmp_help() {
    let all = hmp_reply("help");
    assert!(all.starts_with("help|? [cmd] -- show the help\r\n"));
    assert!(all.contains("cont|c  -- resume emulation\r\n"));
    assert_eq!(hmp_reply("help stop"), "stop|s  -- stop emulation\r\n");
    assert_eq!(
        hmp_reply("? info status"),
        "info status  -- show the current VM status (running|paused)\r\n"
    );
    assert_eq!(hmp_reply("help nope"), "unknown command: 'nope'\r\n");
    let info = hmp_reply("info");
    assert!(info.contains("info cpus  -- show infos for each CPU\r\n"));
}

#[test]
fn hmp_migrate() {
    let (cmd, render) = hmp_run("migrate -d unix:/tmp/mig.sock");
    assert_eq!(render, HmpRender::Migrate { detach: true });
    let Command::Migrate(m) = cmd else { panic!() };
    assert_eq!(m.uri, None);
    let t = m.targets().unwrap();
    assert!(
        matches!(t.main, MigrationAddress::Socket(SocketAddress::Unix(ref u)) if u.path == "/tmp/mig.sock")
    );
    assert_eq!(render.render(&Ok(json!({}))), "");
    let (cmd, render) = hmp_run("migrate \"file:/tmp/with space\"");
    assert_eq!(render, HmpRender::Migrate { detach: false });
    let Command::Migrate(m) = cmd else { panic!() };
    assert_eq!(m.resume, Some(false));
    assert!(
        matches!(m.targets().unwrap().main, MigrationAddress::File(ref f) if f.filename == "/tmp/with space")
    );
    assert_eq!(
        render.render(&Ok(json!({}))),
        "terminal does not allow synchronous migration, continuing detached\r\n"
    );
    // QEMU's option parser: a later option in the wrong order is taken as the URI.
    assert_eq!(
        hmp_reply("migrate -r -d unix:/p"),
        "migrate: extraneous characters at the end of line\r\nTry \"help migrate\" for more information\r\n"
    );
    let (cmd, _) = hmp_run("migrate_incoming unix:/tmp/in");
    let Command::MigrateIncoming(mi) = cmd else {
        panic!()
    };
    assert_eq!(mi.exit_on_error, Some(false));
    assert!(mi.address().is_ok());
}

#[test]
fn hmp_migrate_set_parameter() {
    let set = |line: &str| match hmp::parse(line, None) {
        HmpAction::Run {
            command: Command::MigrateSetParameters(p),
            render,
        } => {
            assert_eq!(render, HmpRender::ErrorsOnly);
            Ok(p)
        }
        HmpAction::Reply(s) => Err(s),
        other => panic!("{other:?}"),
    };
    let p = set("migrate_set_parameter mode cpr-exec").unwrap();
    assert_eq!(p.mode, Some(MigMode::CprExec));
    let p = set(r#"migrate_set_parameter cpr-exec-command /usr/bin/vmm --incoming 'file:/tmp/a b' "x\"y" c\ d"#)
        .unwrap();
    assert_eq!(
        p.cpr_exec_command,
        Some(vec![
            "/usr/bin/vmm".to_string(),
            "--incoming".into(),
            "file:/tmp/a b".into(),
            "x\"y".into(),
            "c d".into()
        ])
    );
    assert_eq!(
        set("migrate_set_parameter cpr-exec-command vmm \"unterminated"),
        Err("Error: Text ended before matching quote was found for \". (The text was “vmm \"unterminated”)\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter cpr-exec-command"),
        Err("migrate_set_parameter: string expected\r\nTry \"help migrate_set_parameter\" for more information\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter mode bogus"),
        Err("Error: Parameter 'mode' does not accept value 'bogus'\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter nosuch 1"),
        Err("Error: invalid parameter value: nosuch\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter x-checkpoint-delay 1"),
        Err("Error: Parameter 'x-checkpoint-delay' is unexpected\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter downtime-limit 0x10")
            .unwrap()
            .downtime_limit,
        Some(16)
    );
    assert_eq!(
        set("migrate_set_parameter max-bandwidth 2")
            .unwrap()
            .max_bandwidth,
        Some(2 << 20)
    );
    assert_eq!(
        set("migrate_set_parameter xbzrle-cache-size 1M")
            .unwrap()
            .xbzrle_cache_size,
        Some(1 << 20)
    );
    assert_eq!(
        set("migrate_set_parameter direct-io on").unwrap().direct_io,
        Some(true)
    );
    assert_eq!(
        set("migrate_set_parameter direct-io maybe"),
        Err("Error: Parameter 'direct-io' expects 'on' or 'off'\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter multifd-channels 300"),
        Err("Error: Parameter 'multifd-channels' expects uint8_t\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter max-bandwidth lots"),
        Err("Error: Invalid size lots\r\n".into())
    );
    assert_eq!(
        set("migrate_set_parameter tls-creds tls0")
            .unwrap()
            .tls_creds,
        Some(StrOrNull::Str("tls0".into()))
    );
}

#[test]
fn hmp_info_renderers() {
    let cpus = vec![
        CpuInfoFast {
            thread_id: 100,
            props: None,
            qom_path: "/machine/unattached/device[0]".into(),
            cpu_index: 0,
            target: TARGET_X86_64.into(),
        },
        CpuInfoFast {
            thread_id: 101,
            props: None,
            qom_path: "/machine/unattached/device[1]".into(),
            cpu_index: 1,
            target: TARGET_X86_64.into(),
        },
    ];
    let v = serde_json::to_value(&cpus).unwrap();
    let (cmd, render) = hmp_run("info cpus");
    assert_eq!(cmd, Command::QueryCpusFast);
    assert_eq!(
        render.render(&Ok(v.clone())),
        "* CPU #0: thread_id=100\r\n  CPU #1: thread_id=101\r\n"
    );
    let HmpAction::Run { render, .. } = hmp::parse("info cpus", Some(1)) else {
        panic!()
    };
    assert_eq!(
        render.render(&Ok(v)),
        "  CPU #0: thread_id=100\r\n* CPU #1: thread_id=101\r\n"
    );

    let (_, render) = hmp_run("info version");
    let v = serde_json::to_value(VersionInfo::new(10, 2, 0, "")).unwrap();
    assert_eq!(render.render(&Ok(v)), "10.2.0\r\n");

    let (_, render) = hmp_run("info migrate");
    assert_eq!(render.render(&Ok(json!({}))), "");
    let info = MigrationInfo {
        status: Some(MigrationStatus::Completed),
        total_time: Some(1234),
        setup_time: Some(5),
        downtime: Some(40),
        ram: Some(MigrationStats {
            transferred: 4096,
            total: 1 << 30,
            page_size: 4096,
            mbps: 1.5,
            normal: 1,
            duplicate: 262143,
            dirty_sync_count: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let text = render.render(&Ok(serde_json::to_value(&info).unwrap()));
    assert_eq!(
        text,
        "Status: \t\tcompleted\r\n\
         Time (ms): \t\ttotal=1234, setup=5, down=40\r\n\
         RAM info:\r\n  Throughput (Mbps): \t1.50\r\n\
         \x20 Sizes: \t\tpagesize=4 KiB, total=1 GiB\r\n\
         \x20 Transfers: \t\ttransferred=4 KiB, remain=0 B\r\n\
         \x20   Channels: \t\tprecopy=0 B, multifd=0 B, postcopy=0 B\r\n\
         \x20   Page Types: \tnormal=1, zero=262143\r\n\
         \x20 Page Rates (pps): \ttransfer=0\r\n\
         \x20 Others: \t\tdirty_syncs=2\r\n"
    );
    let failed = MigrationInfo {
        status: Some(MigrationStatus::Failed),
        error_desc: Some("Connection refused".into()),
        ..Default::default()
    };
    assert_eq!(
        render.render(&Ok(serde_json::to_value(&failed).unwrap())),
        "Status: \t\tfailed (Connection refused)\r\n"
    );

    let (_, render) = hmp_run("info migrate_parameters");
    let mut params = MigrationParameters::qemu_defaults();
    params.cpr_exec_command = Some(vec!["vmm".into(), "-x".into()]);
    let text = render.render(&Ok(serde_json::to_value(&params).unwrap()));
    assert!(text.starts_with("announce-initial: 50 ms\r\n"), "{text}");
    assert!(text.contains("tls-creds: ''\r\n"));
    assert!(text.contains("downtime-limit: 300 ms\r\n"));
    assert!(text.contains("mode: normal\r\n"));
    assert!(text.ends_with("cpr-exec-command: vmm -x\r\n"));
}

// --- shell splitting ---------------------------------------------------------

#[test]
fn shell_split_like_glib() {
    let ok = |s: &str| parse_argv(s).unwrap();
    assert_eq!(ok("a b  c"), ["a", "b", "c"]);
    assert_eq!(ok("  a\tb\n c "), ["a", "b", "c"]);
    assert_eq!(ok(r#"'a b' "c d""#), ["a b", "c d"]);
    assert_eq!(ok(r#"a\ b"#), ["a b"]);
    assert_eq!(ok(r#""a\"b""#), ["a\"b"]);
    assert_eq!(ok(r#""a\nb""#), ["a\\nb"]);
    assert_eq!(ok(r#""\$HOME \`x\` \\""#), ["$HOME `x` \\"]);
    assert_eq!(ok(r#"'it'\''s'"#), ["it's"]);
    assert_eq!(ok(r#"'\n'"#), ["\\n"]);
    assert_eq!(ok(r#"x"y z"w"#), ["xy zw"]);
    assert_eq!(ok("a#b c"), ["a#b", "c"]);
    assert_eq!(ok("a #comment here\nb"), ["a", "b"]);
    assert_eq!(ok("\"\""), [""]);
    assert_eq!(ok("a\\\nb"), ["ab"]);
    assert_eq!(ok("$VAR *.c ~"), ["$VAR", "*.c", "~"]);
}

#[test]
fn shell_split_errors() {
    // The typed errors carry GLib's texts.
    let argv_text = |line: &str| parse_argv(line).map_err(|e| e.to_string());
    assert_eq!(
        argv_text(""),
        Err("Text was empty (or contained only whitespace)".into())
    );
    assert_eq!(
        argv_text("  \t "),
        Err("Text was empty (or contained only whitespace)".into())
    );
    assert_eq!(
        argv_text("a 'b"),
        Err("Text ended before matching quote was found for '. (The text was “a 'b”)".into())
    );
    assert_eq!(
        argv_text("a \"b\\\""),
        Err("Text ended before matching quote was found for \". (The text was “a \"b\\\"”)".into())
    );
    assert_eq!(
        argv_text("abc\\"),
        Err("Text ended just after a “\\” character. (The text was “abc\\”)".into())
    );
    assert_eq!(
        argv_text("# only a comment"),
        Err("Text was empty (or contained only whitespace)".into())
    );
}

// --- operator surface: the commands management software calls first --------

#[test]
fn postcopy_resume_is_refused_not_ignored() {
    assert_eq!(
        hmp_reply("migrate -r file:/tmp/x"),
        "Error: Cannot resume if there is no paused migration\r\n"
    );
    assert_eq!(
        hmp_reply("migrate -d -r file:/tmp/x"),
        "Error: Cannot resume if there is no paused migration\r\n"
    );
    assert_eq!(
        desc(r#"{"execute":"migrate","arguments":{"uri":"file:/tmp/x","resume":true}}"#),
        "Cannot resume if there is no paused migration"
    );
    // The address is checked first, as in QEMU.
    assert_eq!(
        desc(r#"{"execute":"migrate","arguments":{"uri":"bogus:x","resume":true}}"#),
        "unknown migration protocol: bogus:x"
    );
    assert!(matches!(
        command(r#"{"execute":"migrate","arguments":{"uri":"file:/tmp/x","resume":false}}"#),
        Command::Migrate(_)
    ));
}

#[test]
fn new_query_commands_parse() {
    for (name, expect) in [
        ("query-name", Command::QueryName),
        ("query-kvm", Command::QueryKvm),
        ("query-block", Command::QueryBlock),
        ("query-events", Command::QueryEvents),
        ("query-chardev", Command::QueryChardev),
        (
            "query-migrate-capabilities",
            Command::QueryMigrateCapabilities,
        ),
        ("system_powerdown", Command::SystemPowerdown),
        ("query-qmp-schema", Command::QueryQmpSchema),
        ("x-query-cpr-command-line", Command::QueryCprCommandLine),
    ] {
        let c = command(&format!(r#"{{"execute":"{name}"}}"#));
        assert_eq!(c, expect);
        assert_eq!(c.name(), name);
    }
    assert_eq!(
        command(r#"{"execute":"x-query-registers","arguments":{"cpu-index":1}}"#),
        Command::QueryRegisters(QueryRegistersArgs { cpu_index: Some(1) })
    );
}

fn schema_entity<'a>(schema: &'a [Value], name: &str) -> &'a Value {
    schema
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no schema entity {name}"))
}

#[test]
fn qmp_schema_describes_every_command_and_event() {
    let schema = query_qmp_schema();
    // Every name is unique and every type a command or event refers to is defined.
    let names: Vec<&str> = schema.iter().filter_map(|e| e["name"].as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate schema names");
    let defined = |t: &Value| names.contains(&t.as_str().unwrap_or("<none>"));
    for e in &schema {
        match e["meta-type"].as_str() {
            Some("command") => {
                assert!(defined(&e["arg-type"]) && defined(&e["ret-type"]), "{e}")
            }
            Some("event") => assert!(defined(&e["arg-type"]), "{e}"),
            Some("object") => {
                for m in e["members"].as_array().unwrap() {
                    assert!(defined(&m["type"]), "{e}");
                }
                for v in e["variants"].as_array().into_iter().flatten() {
                    assert!(defined(&v["type"]), "{e}");
                }
            }
            Some("array") => assert!(defined(&e["element-type"]), "{e}"),
            Some("alternate") => {
                for m in e["members"].as_array().unwrap() {
                    assert!(defined(&m["type"]), "{e}");
                }
            }
            Some("enum") => assert!(e["values"].is_array(), "{e}"),
            Some("builtin") => assert!(e["json-type"].is_string(), "{e}"),
            other => panic!("unknown meta-type {other:?} in {e}"),
        }
    }
    for spec in COMMANDS {
        schema_entity(&schema, spec.name);
    }
    for ev in EVENTS {
        assert_eq!(schema_entity(&schema, ev.name)["meta-type"], "event");
    }
    // What libvirt looks for: migrate-set-parameters' members, by name, with their types.
    let msp = schema_entity(&schema, "migrate-set-parameters");
    let args = schema_entity(&schema, msp["arg-type"].as_str().unwrap());
    let members = args["members"].as_array().unwrap();
    assert_eq!(members.len(), commands::MIGRATE_SET_PARAMETERS.len());
    let cmd = members
        .iter()
        .find(|m| m["name"] == "cpr-exec-command")
        .expect("cpr-exec-command");
    assert_eq!(cmd["default"], Value::Null);
    let list = schema_entity(&schema, cmd["type"].as_str().unwrap());
    assert_eq!(list["meta-type"], "array");
    assert_eq!(list["element-type"], "str");
    let mode = members.iter().find(|m| m["name"] == "mode").unwrap();
    let mode = schema_entity(&schema, mode["type"].as_str().unwrap());
    assert_eq!(
        mode["values"],
        json!(["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"])
    );
    // A mandatory member has no "default"; argument-less commands share the empty object.
    let pmemsave = schema_entity(&schema, "pmemsave");
    let pm_args = schema_entity(&schema, pmemsave["arg-type"].as_str().unwrap());
    assert!(pm_args["members"][0].get("default").is_none());
    let stop = schema_entity(&schema, "stop");
    assert_eq!(stop["arg-type"], stop["ret-type"]);
    assert_eq!(
        schema_entity(&schema, stop["arg-type"].as_str().unwrap())["members"],
        json!([])
    );
    assert_eq!(schema_entity(&schema, "int")["json-type"], "int");
    // The schema's own command is in it, and nothing is there that is not implemented.
    schema_entity(&schema, "query-qmp-schema");
    let commands = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .count();
    assert_eq!(commands, COMMANDS.len());
}

fn ret_of(name: &str) -> &'static schema::Ty {
    find_command(name).unwrap().ret
}

/// Every result the monitor builds matches the type the schema announces for it.
#[test]
fn results_match_their_schema() {
    let check = |name: &str, v: Value| {
        if let Err(e) = schema::check_value(ret_of(name), &v) {
            panic!("{name}: {e}: {v}");
        }
    };
    check("stop", json!({}));
    check(
        "x-query-cpr-command-line",
        serde_json::to_value(CprCommandLine {
            argv: vec!["vmm".into(), "-m".into(), "64M".into()],
            qmp_socket: Some("/run/vm1.qmp".into()),
        })
        .unwrap(),
    );
    check(
        "query-status",
        serde_json::to_value(StatusInfo::from_state(RunState::Running)).unwrap(),
    );
    check(
        "query-version",
        serde_json::to_value(VersionInfo::new(10, 2, 0, " (cpr-vmm)")).unwrap(),
    );
    check(
        "query-commands",
        serde_json::to_value(query_commands()).unwrap(),
    );
    check(
        "query-cpus-fast",
        serde_json::to_value(vec![CpuInfoFast {
            thread_id: 7,
            props: Some(CpuInstanceProperties {
                socket_id: Some(0),
                core_id: Some(0),
                ..Default::default()
            }),
            qom_path: "/machine/unattached/device[0]".into(),
            cpu_index: 0,
            target: TARGET_X86_64.into(),
        }])
        .unwrap(),
    );
    check(
        "query-migrate-parameters",
        serde_json::to_value(MigrationParameters::qemu_defaults()).unwrap(),
    );
    check(
        "query-migrate",
        serde_json::to_value(MigrationInfo {
            status: Some(MigrationStatus::Completed),
            ram: Some(MigrationStats::default()),
            total_time: Some(5),
            downtime: Some(1),
            setup_time: Some(0),
            error_desc: Some("x".into()),
            x_cpr: Some(CprUpdateInfo {
                phases: vec![CprPhase {
                    name: "exec".into(),
                    ns: 3,
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap(),
    );
    check("query-migrate", json!({}));
    check(
        "query-name",
        serde_json::to_value(NameInfo {
            name: Some("vm1".into()),
        })
        .unwrap(),
    );
    check("query-name", json!({}));
    check("query-block", json!([]));
    check(
        "query-block",
        serde_json::to_value(vec![BlockInfo::raw_disk("d0", "/d.img", false, 1 << 20)]).unwrap(),
    );
    check(
        "query-kvm",
        serde_json::to_value(KvmInfo {
            enabled: true,
            present: true,
        })
        .unwrap(),
    );
    check(
        "query-events",
        serde_json::to_value(query_events()).unwrap(),
    );
    check(
        "query-chardev",
        serde_json::to_value(vec![ChardevInfo {
            label: "serial0".into(),
            filename: "stdio".into(),
            frontend_open: true,
        }])
        .unwrap(),
    );
    check(
        "query-migrate-capabilities",
        serde_json::to_value(migrate_capabilities()).unwrap(),
    );
    check("query-qmp-schema", Value::Array(query_qmp_schema()));
    check(
        "x-query-registers",
        serde_json::to_value(HumanReadableText {
            human_readable_text: "RAX=0\r\n".into(),
        })
        .unwrap(),
    );
    check("human-monitor-command", json!("text"));
    // A member the schema does not announce is caught.
    assert!(
        schema::check_value(
            ret_of("query-kvm"),
            &json!({"enabled": true, "present": true, "x": 1})
        )
        .is_err()
    );
}

/// Every event the VMM sends is announced, with data matching its schema.
#[test]
fn events_match_their_schema() {
    for kind in [
        EventKind::shutdown(ShutdownCause::HostQmpQuit),
        EventKind::reset(ShutdownCause::GuestReset),
        EventKind::Stop,
        EventKind::Resume,
        EventKind::Migration {
            status: MigrationStatus::Completed,
        },
    ] {
        let ev = EVENTS
            .iter()
            .find(|e| e.name == kind.name())
            .unwrap_or_else(|| panic!("{} not in EVENTS", kind.name()));
        let data = kind.data().unwrap_or_else(|| json!({}));
        let data = data.as_object().unwrap();
        assert!(schema::check_args(ev.data, data).is_ok(), "{}", kind.name());
    }
    let names: Vec<String> = query_events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["SHUTDOWN", "RESET", "STOP", "RESUME", "MIGRATION"]);
}

#[test]
fn migrate_capabilities_are_qemus_with_only_events_on() {
    let caps = migrate_capabilities();
    assert_eq!(caps.len(), 22);
    assert_eq!(caps[0].capability, "xbzrle");
    let on: Vec<&str> = caps
        .iter()
        .filter(|c| c.state)
        .map(|c| c.capability.as_str())
        .collect();
    assert_eq!(on, ["events"]);
}

#[test]
fn hmp_info_name_kvm_registers_and_pmemsave() {
    let (cmd, render) = hmp_run("info name");
    assert_eq!(cmd, Command::QueryName);
    assert_eq!(render.render(&Ok(json!({"name": "vm1"}))), "vm1\r\n");
    assert_eq!(render.render(&Ok(json!({}))), "");
    let (cmd, render) = hmp_run("info kvm");
    assert_eq!(cmd, Command::QueryKvm);
    assert_eq!(
        render.render(&Ok(json!({"enabled": true, "present": true}))),
        "kvm support: enabled\r\n"
    );
    let (cmd, render) = hmp_run("info registers");
    assert_eq!(
        cmd,
        Command::QueryRegisters(QueryRegistersArgs { cpu_index: Some(0) })
    );
    assert_eq!(
        render.render(&Ok(json!({"human-readable-text": "RAX=0\n"}))),
        "RAX=0\r\n"
    );
    let (cmd, _) = hmp_run("info registers -a");
    assert_eq!(
        cmd,
        Command::QueryRegisters(QueryRegistersArgs { cpu_index: None })
    );
    let (cmd, _) = hmp_run("info registers 1");
    assert_eq!(
        cmd,
        Command::QueryRegisters(QueryRegistersArgs { cpu_index: Some(1) })
    );
    match hmp::parse("info registers", Some(1)) {
        HmpAction::Run { command, .. } => assert_eq!(
            command,
            Command::QueryRegisters(QueryRegistersArgs { cpu_index: Some(1) })
        ),
        other => panic!("{other:?}"),
    }
    let (cmd, render) = hmp_run("pmemsave 0x100000 4096 /tmp/dump");
    assert_eq!(
        cmd,
        Command::Pmemsave(PmemsaveArgs {
            val: 0x100000,
            size: 4096,
            filename: "/tmp/dump".into(),
        })
    );
    assert_eq!(render, HmpRender::ErrorsOnly);
    assert_eq!(
        hmp_reply("pmemsave 0 -1 /tmp/d"),
        "Error: Parameter 'size' expects a non-negative value\r\n"
    );
    assert!(hmp_reply("pmemsave zero 4 /tmp/d").contains("invalid char in expression"));
    assert!(hmp_reply("pmemsave 0 4").contains("pmemsave: string expected"));
    assert!(hmp_reply("help info").contains("info registers [-a|vcpu] -- show the cpu registers"));
}

#[test]
fn ineffective_migration_parameters_are_refused_unless_unchanged() {
    let params = MigrationParameters::qemu_defaults();
    let set = |text: &str| match command(text) {
        Command::MigrateSetParameters(p) => params.check_effective(&p),
        other => panic!("{other:?}"),
    };
    for text in [
        r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1000}}"#,
        r#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":8}}"#,
        r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls0"}}"#,
        r#"{"execute":"migrate-set-parameters","arguments":{"mode":"cpr-exec","downtime-limit":10}}"#,
    ] {
        let e = set(text).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        assert!(
            e.desc.contains("is not supported by this VMM"),
            "{}",
            e.desc
        );
    }
    assert!(
        set(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1000}}"#)
            .unwrap_err()
            .desc
            .starts_with("Parameter 'max-bandwidth' ")
    );
    for text in [
        r#"{"execute":"migrate-set-parameters","arguments":{"mode":"cpr-exec","cpr-exec-command":["a"]}}"#,
        r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":134217728,"multifd-channels":2}}"#,
        r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":null}}"#,
    ] {
        assert!(set(text).is_ok(), "{text}");
    }
}

#[test]
fn protocol_errors_are_typed_and_keep_qemus_texts() {
    use super::json::ParseError;
    use super::schema::{ArgError, Ty, check_args, check_value, req};
    use super::shell::ShellError;
    static MEMBERS: &[schema::Member] = &[req("filename", Ty::Str)];
    let args = json!({}).as_object().unwrap().clone();
    let e = check_args(MEMBERS, &args).unwrap_err();
    assert_eq!(e, ArgError::Missing("filename".into()));
    assert_eq!(e.to_string(), "Parameter 'filename' is missing");
    assert!(matches!(
        check_value(&Ty::Bool, &json!(1)),
        Err(ArgError::InvalidType {
            expected: "boolean",
            ..
        })
    ));
    assert_eq!(parse_argv(""), Err(ShellError::Empty));
    assert_eq!(
        ParseError::Keyword("nul".into()).to_string(),
        "invalid keyword 'nul'"
    );
    let mut s = JsonStreamer::new();
    let out = s.feed(b"{\"a\": nul}\n");
    assert_eq!(err_desc(&out[0]), "JSON parse error, invalid keyword 'nul'");
}
