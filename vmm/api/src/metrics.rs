//! The host's `metrics` endpoint: its counters in Prometheus text format.
//!
//! Owns: the metric names, help texts and labels. Must not: change any counter.

use vmm_host::Host;

fn metric(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, f64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The host's counters in Prometheus text format (version 0.0.4).
pub fn metrics_text(host: &Host) -> String {
    let mut out = String::new();
    let vms = host.list();
    let mut by_state = std::collections::BTreeMap::new();
    for vm in &vms {
        *by_state
            .entry(format!("{:?}", vm.state).to_lowercase())
            .or_insert(0.0) += 1.0;
    }
    metric(
        &mut out,
        "vigil_vms",
        "Tenant VMs on this host by state.",
        "gauge",
        &by_state
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n))
            .collect::<Vec<_>>(),
    );
    metric(
        &mut out,
        "vigil_vm_calls_undelivered_total",
        "Allowed calls denied because their verdicts did not reach the firewall tiers, by VM.",
        "counter",
        &host
            .undelivered_calls()
            .into_iter()
            .map(|(vm, n)| (format!("{{vm=\"{vm}\"}}"), n as f64))
            .collect::<Vec<_>>(),
    );
    let status = host.switch_status();
    for (name, help, kind, value) in [
        (
            "vigil_switch_open",
            "1 while a switch micro-VM runs holding every attachment and verdict (ports open).",
            "gauge",
            f64::from(u8::from(status.open)),
        ),
        (
            "vigil_switch_restarts_total",
            "Times the supervisor restarted the switch micro-VM.",
            "counter",
            status.restarts as f64,
        ),
        (
            "vigil_switch_book_verdicts",
            "Verdicts the host would give a restarted switch.",
            "gauge",
            status.verdicts as f64,
        ),
    ] {
        metric(&mut out, name, help, kind, &[(String::new(), value)]);
    }
    if let Some(c) = host.switch_counters() {
        for (name, help, value) in [
            (
                "vigil_switch_forwarded_total",
                "Frames the switch tier forwarded.",
                c.forwarded,
            ),
            (
                "vigil_switch_verdicts_applied_total",
                "Verdict and control records the switch applied.",
                c.verdicts_applied,
            ),
            (
                "vigil_switch_verdicts_rejected_total",
                "Verdict records the switch rejected.",
                c.verdicts_rejected,
            ),
            (
                "vigil_switch_flows_created_total",
                "Flows the switch opened.",
                c.flows_created,
            ),
            (
                "vigil_switch_flows_adopted_total",
                "Established flows the switch took over from a migrated tenant.",
                c.flows_adopted,
            ),
            (
                "vigil_switch_flows_revoked_total",
                "Flows the switch closed because their verdict or tenant went away.",
                c.flows_revoked,
            ),
        ] {
            metric(
                &mut out,
                name,
                help,
                "counter",
                &[(String::new(), value as f64)],
            );
        }
        metric(
            &mut out,
            "vigil_switch_flows_active",
            "Conntrack entries in use in the switch.",
            "gauge",
            &[(String::new(), c.flows_active as f64)],
        );
        metric(
            &mut out,
            "vigil_switch_dropped_total",
            "Frames the switch dropped, by reason.",
            "counter",
            &c.drops
                .iter()
                .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
                .collect::<Vec<_>>(),
        );
    }
    if let Some((sent, errors)) = host.edge_counters() {
        metric(
            &mut out,
            "vigil_edge_records_sent_total",
            "Verdict records signed and sent to the edge.",
            "counter",
            &[(String::new(), sent as f64)],
        );
        metric(
            &mut out,
            "vigil_edge_send_errors_total",
            "Batches for the edge refused because its link's window of unacknowledged datagrams was full.",
            "counter",
            &[(String::new(), errors as f64)],
        );
    }
    if let Some(refused) = host.uplink_refused() {
        metric(
            &mut out,
            "vigil_uplink_refused_total",
            "VXLAN datagrams the switch's uplink refused: not from its edge.",
            "counter",
            &[(String::new(), refused as f64)],
        );
    }
    if let Some(link) = host.edge_link_stats() {
        for (name, help, kind, value) in [
            (
                "vigil_edge_retransmits_total",
                "Verdict datagrams sent to the edge again for want of an acknowledgement.",
                "counter",
                link.retransmits as f64,
            ),
            (
                "vigil_edge_acked_datagrams_total",
                "Verdict datagrams the edge acknowledged (applied).",
                "counter",
                link.acked_datagrams as f64,
            ),
            (
                "vigil_edge_unacked_datagrams",
                "Verdict datagrams waiting for the edge's acknowledgement.",
                "gauge",
                link.outstanding as f64,
            ),
            (
                "vigil_edge_unreachable",
                "1 while the edge is overdue with its acknowledgements.",
                "gauge",
                f64::from(u8::from(link.unreachable)),
            ),
            (
                "vigil_edge_restarts_total",
                "Times the edge answered with a new boot id (it restarted).",
                "counter",
                link.edge_restarts as f64,
            ),
            (
                "vigil_edge_refused_records_total",
                "Verdict records the edge's tables refused (their calls were denied, or taken back).",
                "counter",
                link.refused_records as f64,
            ),
            (
                "vigil_edge_revoked_records_total",
                "Of those, verdicts whose calls had gone on (the edge's room was wrong); taken back at the switch.",
                "counter",
                link.revoked_records as f64,
            ),
        ] {
            metric(&mut out, name, help, kind, &[(String::new(), value)]);
        }
    }
    let times = host.reconfig_times();
    metric(
        &mut out,
        "vigil_reconfig_last_ms",
        "Milliseconds from the last reconfiguration to the switch tier applying it.",
        "gauge",
        &[
            ("create", times.create_ms),
            ("delete", times.delete_ms),
            ("policy", times.policy_ms),
        ]
        .into_iter()
        .filter_map(|(a, v)| v.map(|v| (format!("{{action=\"{a}\"}}"), v)))
        .collect::<Vec<_>>(),
    );
    let bus = vmm_core::events::bus();
    metric(
        &mut out,
        "vigil_events_total",
        "Events published on this host.",
        "counter",
        &[(
            String::new(),
            bus.published.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    out
}
