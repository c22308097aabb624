//! The JSON event lines a `vigil` process prints on stdout (`{"event":"<kind>",...}`).

use serde_json::Value;

/// Every event of `kind` among `lines`, in order.
pub fn events_of(lines: &[String], kind: &str) -> Vec<Value> {
    let prefix = format!("{{\"event\":\"{kind}\"");
    lines
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| serde_json::from_str(l).expect("event is JSON"))
        .collect()
}

/// Waits, at most `limit`, for an event line of `kind` containing `needle` on an in-process
/// subscription to the event bus (`vmm_core::events::bus().subscribe()`); returns the line.
/// Panics, naming what it waited for, when none came.
pub fn wait_bus_event(
    rx: &std::sync::mpsc::Receiver<std::sync::Arc<str>>,
    kind: &str,
    needle: &str,
    limit: std::time::Duration,
) -> String {
    let deadline = std::time::Instant::now() + limit;
    let tag = format!("\"event\":\"{kind}\"");
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} event with {needle:?} within {limit:?}"));
        if line.contains(&tag) && line.contains(needle) {
            return line.to_string();
        }
    }
}

/// The `vm_stopped` events among `lines` (one per VM that stopped), in order.
pub fn vm_stopped<'a, I>(lines: I) -> impl Iterator<Item = Value> + 'a
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: 'a,
{
    lines
        .into_iter()
        .filter(|l| l.contains("\"vm_stopped\""))
        .map(|l| serde_json::from_str(l).expect("vm_stopped is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_picked_by_kind() {
        let lines: Vec<String> = [
            "vigil fw-guest: role=switch cpl=3",
            r#"{"event":"socket","op":"connect"}"#,
            r#"{"event":"vm_stopped","outcome":{"name":"fw"}}"#,
            r#"{"event":"vm_stopped","outcome":{"name":"tenant"}}"#,
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(events_of(&lines, "socket").len(), 1);
        let names: Vec<Value> = vm_stopped(lines.iter().map(String::as_str))
            .map(|e| e["outcome"]["name"].clone())
            .collect();
        assert_eq!(names, ["fw", "tenant"]);
    }
}
