//! `status`: one line (or JSON object) per VM: version, run state, PID, last update.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::qmp::{Qmp, QmpError};

fn query(socket: &Path) -> Result<Value, QmpError> {
    let mut qmp = Qmp::connect(socket)?;
    let status = qmp.execute("query-status", Value::Null)?;
    let migrate = qmp.execute("query-migrate", Value::Null)?;
    let x = &migrate["x-cpr"];
    Ok(json!({
        "socket": socket.display().to_string(),
        "version": qmp.version(),
        "status": status["status"],
        "pid": qmp.pid,
        "last-update": migrate["status"],
        "last-update-error": migrate["error-desc"],
        "last-update-from": x["from-version"],
        "last-update-to": x["to-version"],
        "blackout-ns": x["blackout-ns"],
    }))
}

/// Prints the status of every VM; returns whether every VM answered.
pub fn status(sockets: &[PathBuf], as_json: bool) -> bool {
    let rows: Vec<Value> = sockets
        .iter()
        .map(|s| {
            query(s).unwrap_or_else(
                |e| json!({ "socket": s.display().to_string(), "error": e.to_string() }),
            )
        })
        .collect();
    let all_ok = rows.iter().all(|r| r.get("error").is_none());
    if as_json {
        println!("{}", Value::Array(rows));
        return all_ok;
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!(
        "{:<32} {:<16} {:<10} {:>8} {:>12}  LAST-UPDATE",
        "SOCKET", "VERSION", "STATE", "PID", "BLACKOUT"
    );
    for r in &rows {
        if let Some(e) = r.get("error") {
            println!("{:<32} error: {}", text(&r["socket"]), text(e));
            continue;
        }
        let blackout = r["blackout-ns"]
            .as_u64()
            .map(|ns| format!("{:.3} ms", ns as f64 / 1e6))
            .unwrap_or_else(|| "-".into());
        let mut last = text(&r["last-update"]);
        if let Some(err) = r["last-update-error"].as_str() {
            last = format!("{last} ({err})");
        }
        println!(
            "{:<32} {:<16} {:<10} {:>8} {:>12}  {last}",
            text(&r["socket"]),
            text(&r["version"]),
            text(&r["status"]),
            text(&r["pid"]),
            blackout
        );
    }
    all_ok
}
