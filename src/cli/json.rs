//! What the command line prints for scripts (`--format json`): `ls`, `status` and
//! `validate`. Each document's shape is fixed by a JSON Schema in `docs/schemas/`, and the
//! tests check real outputs against it; a field is only ever added, never renamed.

use std::path::Path;

use serde_json::{json, Value};

use crate::session::Listed;

/// Pretty JSON with a closing newline.
pub fn text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// `ls --format json`: an array, one object per state dir.
pub fn list_json(listed: &[Listed]) -> String {
    let items: Vec<Value> = listed
        .iter()
        .map(|l| {
            json!({
                "name": l.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
                "state_dir": path(&l.dir),
                "file": l.file.as_deref().map(path),
                "state": l.state.as_ref().ok().map(|s| s.as_str()),
                "error": l.state.as_ref().err(),
                "endpoint": l.endpoint,
            })
        })
        .collect();
    text(&Value::Array(items))
}
