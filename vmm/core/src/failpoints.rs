//! Failpoints: named places where a test makes the VMM panic or fail on purpose, to prove that
//! a bug in one request, one device or one vCPU stays there (the request gets a 500, the VM
//! stops) and never takes the host down.
//!
//! Owns: the failpoint registry, read once from `VIGIL_FAILPOINTS` when the process first
//! reaches a failpoint (tests may [`arm`] more in-process). Must not: cost more than one atomic load at a disabled failpoint (they
//! sit on the vCPU exit path and the device loop), or fire unless configured.
//!
//! Configuration: `VIGIL_FAILPOINTS="name[@scope]=action;..."`, `action` being `panic` or
//! `error`. A failpoint fires where its name matches and its scope (the thread's name for VM
//! failpoints, the endpoint for `api.request`) starts with `scope` (any scope when none is
//! given). The places:
//!
//! | name            | where                                                | scope                |
//! |-----------------|------------------------------------------------------|----------------------|
//! | `api.request`   | the REST API's router, before the endpoint           | endpoint (`vm.list`) |
//! | `vcpu.exit`     | a vCPU's run loop, after each exit                   | `<vm>-vcpu<n>`       |
//! | `device.net`    | a virtio-net device thread, at start and per wake-up | `<vm>-net<n>`        |
//! | `verdict.push`  | delivering an allowed call's verdicts                | `<vm>-vcpu<n>`       |
//!
//! Built only with the `failpoints` cargo feature (on by default, so that the release binary
//! the end-to-end tests drive has them; `--no-default-features` compiles every failpoint to
//! nothing). Written here rather than taken from the `fail` crate: that one is configured per
//! process or through a global lock, has no notion of a per-VM scope, and pulls `rand`; this
//! is ~100 lines.

/// What a configured failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Panic at the failpoint (`failpoint: <name> (<scope>)`).
    Panic,
    /// The site returns its own error.
    Error,
}

#[cfg(feature = "failpoints")]
mod imp {
    use super::Action;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Once, RwLock};

    struct Entry {
        name: String,
        scope: Option<String>,
        action: Action,
    }

    /// 0: not read yet, 1: none configured, 2: some configured.
    static STATE: AtomicU8 = AtomicU8::new(0);
    static ENTRIES: RwLock<Vec<Entry>> = RwLock::new(Vec::new());
    static FROM_ENV: Once = Once::new();

    fn parse(text: &str) -> Vec<Entry> {
        let mut entries = Vec::new();
        for item in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((target, action)) = item.split_once('=') else {
                log::warn!("VIGIL_FAILPOINTS: {item:?} has no `=action`; ignored");
                continue;
            };
            let action = match action.trim() {
                "panic" => Action::Panic,
                "error" => Action::Error,
                other => {
                    log::warn!("VIGIL_FAILPOINTS: unknown action {other:?}; ignored");
                    continue;
                }
            };
            let (name, scope) = match target.trim().split_once('@') {
                Some((name, scope)) => (name, Some(scope.to_string())),
                None => (target.trim(), None),
            };
            entries.push(Entry {
                name: name.to_string(),
                scope,
                action,
            });
        }
        entries
    }

    fn add(entries: Vec<Entry>, from: &str) {
        let mut all = ENTRIES.write().unwrap_or_else(|p| p.into_inner());
        if !entries.is_empty() {
            log::warn!("failpoints armed: {} ({from})", entries.len());
        }
        all.extend(entries);
        STATE.store(if all.is_empty() { 1 } else { 2 }, Ordering::Release);
    }

    fn load_env() {
        FROM_ENV.call_once(|| {
            let entries = std::env::var("VIGIL_FAILPOINTS")
                .map(|text| parse(&text))
                .unwrap_or_default();
            add(entries, "VIGIL_FAILPOINTS");
        });
    }

    pub fn arm(text: &str) {
        load_env();
        add(parse(text), "armed in-process");
    }

    #[inline]
    pub fn check(name: &str, scope: &str) -> Option<Action> {
        match STATE.load(Ordering::Relaxed) {
            1 => None,
            _ => check_slow(name, scope),
        }
    }

    #[inline]
    pub fn check_thread(name: &str) -> Option<Action> {
        match STATE.load(Ordering::Relaxed) {
            1 => None,
            _ => check_slow(name, std::thread::current().name().unwrap_or("")),
        }
    }

    #[cold]
    fn check_slow(name: &str, scope: &str) -> Option<Action> {
        load_env();
        let action = ENTRIES
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| e.name == name && e.scope.as_deref().is_none_or(|s| scope.starts_with(s)))
            .map(|e| e.action)?;
        log::error!("failpoint {name} fires ({action:?}, scope {scope:?})");
        if action == Action::Panic {
            panic!("failpoint {name} ({scope})");
        }
        Some(action)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn entries_parse_with_and_without_a_scope() {
            let entries = parse(" vcpu.exit@t2=panic; api.request=error;bad;x=maybe ");
            assert_eq!(entries.len(), 2);
            assert_eq!(entries[0].name, "vcpu.exit");
            assert_eq!(entries[0].scope.as_deref(), Some("t2"));
            assert_eq!(entries[0].action, Action::Panic);
            assert_eq!(entries[1].name, "api.request");
            assert_eq!(entries[1].scope, None);
            assert_eq!(entries[1].action, Action::Error);
        }
    }
}

/// Whether failpoint `name` fires here: panics for `panic`, `Some(Action::Error)` for `error`,
/// `None` (one atomic load) when it is not configured for `scope`.
#[cfg(feature = "failpoints")]
#[inline]
pub fn check(name: &str, scope: &str) -> Option<Action> {
    imp::check(name, scope)
}

/// [`check`] with the current thread's name as the scope: VM threads are named after their VM
/// (`<vm>-vcpu<n>`, `<vm>-net<n>`), so `name@<vm>-` picks one VM.
#[cfg(feature = "failpoints")]
#[inline]
pub fn check_thread(name: &str) -> Option<Action> {
    imp::check_thread(name)
}

/// Arms more failpoints in this process (same syntax as `VIGIL_FAILPOINTS`, added to it): for
/// tests that cannot set the variable before the process first reaches a failpoint (unit tests
/// share one process). Scope them to a thread name of the test's own.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn arm(text: &str) {
    imp::arm(text)
}

/// Failpoints are compiled out: nothing to arm.
#[cfg(not(feature = "failpoints"))]
#[doc(hidden)]
pub fn arm(_text: &str) {}

/// Failpoints are compiled out: never fires.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_name: &str, _scope: &str) -> Option<Action> {
    None
}

/// Failpoints are compiled out: never fires.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check_thread(_name: &str) -> Option<Action> {
    None
}
