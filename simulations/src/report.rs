//! The figures of a run: delivery ratio, how sends ended, paths, latency percentiles per path,
//! memory per node, CPU, messages per second; printed as the summary table and written next to
//! `messages.csv`. See `docs/performance.md`, "Simulations".

use std::{collections::BTreeMap, fmt, time::Duration};

use crate::journal::{MessageRecord, Path};

/// Latency percentiles of a set of messages, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Messages measured.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles (nearest rank) of `values` (ms); all zero when empty.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = (q * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Self {
            n: values.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: values[values.len() - 1],
        }
    }
}

/// Sent and delivered counts of one group of messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Sends (including those that returned an error).
    pub sent: usize,
    /// Of which the recipient's node has durably.
    pub delivered: usize,
}

impl Tally {
    /// Delivered / sent (1 when nothing was sent).
    pub fn ratio(&self) -> f64 {
        if self.sent == 0 {
            1.0
        } else {
            self.delivered as f64 / self.sent as f64
        }
    }
}

/// The summary of one run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// Scenario and harness parameters, as `name = value`.
    pub params: Vec<(String, String)>,
    /// Measured messages.
    pub total: Tally,
    /// Measured messages by tag (part of the scenario).
    pub by_tag: BTreeMap<String, Tally>,
    /// How `send` ended, by name.
    pub outcomes: BTreeMap<String, usize>,
    /// Delivered messages by path.
    pub paths: BTreeMap<String, usize>,
    /// Latency of delivered measured messages: all, then per path.
    pub latency: Vec<(String, Percentiles)>,
    /// How long `send_text` took to return.
    pub send_return: Percentiles,
    /// Messages some node received twice.
    pub duplicates: u64,
    /// Seconds spent starting the nodes and forming the DHT.
    pub setup_secs: f64,
    /// Seconds of measured traffic.
    pub traffic_secs: f64,
    /// Seconds of the whole run.
    pub total_secs: f64,
    /// Measured messages sent per second of traffic.
    pub sent_per_sec: f64,
    /// Measured messages delivered per second, from the start of the traffic to the last
    /// delivery.
    pub delivered_per_sec: f64,
    /// Resident memory before any node started (bytes).
    pub rss_before: u64,
    /// Resident memory with every node running, after the DHT formed (bytes).
    pub rss_started: u64,
    /// `(rss_started - rss_before) / nodes` (bytes).
    pub rss_per_node: f64,
    /// Highest resident memory of the process during the run (bytes).
    pub rss_peak: u64,
    /// Open file descriptors with every node running.
    pub fds_started: usize,
    /// CPU seconds the process used during the run.
    pub cpu_secs: f64,
    /// Figures particular to the scenario.
    pub extra: Vec<(String, String)>,
}

/// Tally and percentiles of the measured messages of `records`.
pub fn tally(records: &[MessageRecord], summary: &mut Summary) {
    let measured: Vec<&MessageRecord> = records.iter().filter(|r| r.send.measured).collect();
    summary.total = Tally {
        sent: measured.len(),
        delivered: measured.iter().filter(|r| r.delivered.is_some()).count(),
    };
    summary.by_tag.clear();
    summary.outcomes.clear();
    summary.paths.clear();
    for r in &measured {
        let t = summary.by_tag.entry(r.send.tag.to_owned()).or_default();
        t.sent += 1;
        t.delivered += usize::from(r.delivered.is_some());
        *summary
            .outcomes
            .entry(r.send.result.name().to_owned())
            .or_default() += 1;
        if let Some(p) = r.path {
            *summary.paths.entry(p.name().to_owned()).or_default() += 1;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let latencies = |path: Option<Path>| -> Vec<f64> {
        measured
            .iter()
            .filter(|r| path.is_none() || r.path == path)
            .filter_map(|r| r.latency.map(ms))
            .collect()
    };
    summary.latency = vec![("all".to_owned(), Percentiles::of(latencies(None)))];
    for p in [Path::Direct, Path::Relayed, Path::Mailbox, Path::Group] {
        let l = latencies(Some(p));
        if !l.is_empty() {
            summary
                .latency
                .push((p.name().to_owned(), Percentiles::of(l)));
        }
    }
    summary.send_return = Percentiles::of(
        measured
            .iter()
            .map(|r| ms(r.send.returned.saturating_sub(r.send.sent)))
            .collect(),
    );
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {}: {} nodes, seed {}",
            self.scenario, self.nodes, self.seed
        )?;
        if !self.params.is_empty() {
            let p: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "  {}", p.join(" "))?;
        }
        writeln!(f)?;
        writeln!(f, "| messages | sent | delivered | ratio |")?;
        writeln!(f, "| --- | ---: | ---: | ---: |")?;
        writeln!(
            f,
            "| all measured | {} | {} | {:.3} % |",
            self.total.sent,
            self.total.delivered,
            self.total.ratio() * 100.0
        )?;
        for (tag, t) in &self.by_tag {
            writeln!(
                f,
                "| {tag} | {} | {} | {:.3} % |",
                t.sent,
                t.delivered,
                t.ratio() * 100.0
            )?;
        }
        writeln!(f)?;
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let paths: Vec<String> = self.paths.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(f, "send returned: {}", outcomes.join(", "))?;
        writeln!(f, "delivered by path: {}", paths.join(", "))?;
        writeln!(f, "duplicates shown: {}", self.duplicates)?;
        writeln!(f)?;
        writeln!(f, "| latency (ms) | n | p50 | p90 | p99 | p99.9 | max |")?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, p: &Percentiles| {
            writeln!(
                f,
                "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                p.n, p.p50, p.p90, p.p99, p.p999, p.max
            )
        };
        for (name, p) in &self.latency {
            row(f, name, p)?;
        }
        row(f, "send returned", &self.send_return)?;
        writeln!(f)?;
        writeln!(
            f,
            "time: setup {:.1} s, traffic {:.1} s, whole run {:.1} s; CPU {:.1} s ({:.0} % of one core)",
            self.setup_secs,
            self.traffic_secs,
            self.total_secs,
            self.cpu_secs,
            if self.total_secs > 0.0 {
                self.cpu_secs / self.total_secs * 100.0
            } else {
                0.0
            }
        )?;
        writeln!(
            f,
            "throughput: {:.1} messages/s sent, {:.1} messages/s delivered",
            self.sent_per_sec, self.delivered_per_sec
        )?;
        writeln!(
            f,
            "memory: {:.0} MiB before the nodes, {:.0} MiB with all running ({:.2} MiB per node), peak {:.0} MiB; {} open files",
            mib(self.rss_before as f64),
            mib(self.rss_started as f64),
            mib(self.rss_per_node),
            mib(self.rss_peak as f64),
            self.fds_started
        )?;
        for (k, v) in &self.extra {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=1000).map(f64::from).collect());
        assert_eq!(
            (p.n, p.p50, p.p90, p.p99, p.p999, p.max),
            (1000, 500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.max), (7.0, 7.0));
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
        assert_eq!(
            Tally {
                sent: 0,
                delivered: 0
            }
            .ratio(),
            1.0
        );
        assert_eq!(
            Tally {
                sent: 4,
                delivered: 3
            }
            .ratio(),
            0.75
        );
    }
}
