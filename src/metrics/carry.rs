//! Counters carried across a reload, so that every counter stays monotonic.
//!
//! The process a reload replaces sends the values of its counters and histograms (as
//! they were exported, carried values included); the new process adds them to its own
//! at every scrape. `rate()` and `increase()` then see one continuous series, not a
//! reset per reload, and a series of the old process that the new one no longer has
//! (a worker index beyond the new `--workers`) stays exported with its final value.
//! Gauges are not carried: the new process measures them itself.

use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};

use crate::handover::wire::{Reader, WireError, Writer};

const COUNTER: u8 = 0;
const HISTOGRAM: u8 = 1;

/// Encodes the counters and histograms of `families`.
pub fn snapshot(families: &[MetricFamily]) -> Vec<u8> {
    let mut w = Writer::default();
    let carried: Vec<&MetricFamily> = families
        .iter()
        .filter(|f| {
            matches!(
                f.get_field_type(),
                MetricType::COUNTER | MetricType::HISTOGRAM
            )
        })
        .collect();
    w.u32(carried.len() as u32);
    for f in carried {
        let histogram = f.get_field_type() == MetricType::HISTOGRAM;
        w.str(f.name())
            .str(f.help())
            .u8(if histogram { HISTOGRAM } else { COUNTER });
        w.u32(f.get_metric().len() as u32);
        for m in f.get_metric() {
            w.u32(m.get_label().len() as u32);
            for l in m.get_label() {
                w.str(l.name()).str(l.value());
            }
            if histogram {
                let h = m.get_histogram();
                w.u64(h.get_sample_count()).f64(h.get_sample_sum());
                w.u32(h.get_bucket().len() as u32);
                for b in h.get_bucket() {
                    w.f64(b.upper_bound()).u64(b.cumulative_count());
                }
            } else {
                w.f64(m.get_counter().get_value());
            }
        }
    }
    w.buf
}

/// Decodes what [`snapshot`] wrote.
pub fn restore(bytes: &[u8]) -> Result<Vec<MetricFamily>, WireError> {
    let mut r = Reader::new(bytes);
    let n = r.u32()?;
    let mut families = Vec::new();
    for _ in 0..n {
        let mut f = MetricFamily::default();
        f.set_name(r.str()?.to_string());
        f.set_help(r.str()?.to_string());
        let histogram = match r.u8()? {
            COUNTER => false,
            HISTOGRAM => true,
            _ => return Err(WireError("unknown metric type")),
        };
        f.set_field_type(if histogram {
            MetricType::HISTOGRAM
        } else {
            MetricType::COUNTER
        });
        let metrics = r.u32()?;
        for _ in 0..metrics {
            let labels = r.u32()?;
            let mut pairs = Vec::new();
            for _ in 0..labels {
                let mut l = LabelPair::default();
                l.set_name(r.str()?.to_string());
                l.set_value(r.str()?.to_string());
                pairs.push(l);
            }
            let mut m = Metric::from_label(pairs);
            if histogram {
                let mut h = Histogram::default();
                h.set_sample_count(r.u64()?);
                h.set_sample_sum(r.f64()?);
                let buckets = r.u32()?;
                let mut bs = Vec::new();
                for _ in 0..buckets {
                    let mut b = Bucket::default();
                    b.set_upper_bound(r.f64()?);
                    b.set_cumulative_count(r.u64()?);
                    bs.push(b);
                }
                h.set_bucket(bs);
                m.set_histogram(h);
            } else {
                let mut c = Counter::default();
                c.set_value(r.f64()?);
                m.set_counter(c);
            }
            f.mut_metric().push(m);
        }
        families.push(f);
    }
    Ok(families)
}

/// Adds `carried` into `gathered`: a series both have is summed, a carried series the
/// process no longer has is exported as carried.
pub fn merge(gathered: &mut Vec<MetricFamily>, carried: &[MetricFamily]) {
    for cf in carried {
        let Some(gf) = gathered.iter_mut().find(|g| g.name() == cf.name()) else {
            gathered.push(cf.clone());
            continue;
        };
        if gf.get_field_type() != cf.get_field_type() {
            continue;
        }
        for cm in cf.get_metric() {
            let metrics = gf.mut_metric();
            match metrics.iter_mut().find(|m| m.get_label() == cm.get_label()) {
                Some(gm) => add(gm, cm, cf.get_field_type()),
                None => metrics.push(cm.clone()),
            }
        }
    }
}

fn add(into: &mut Metric, from: &Metric, kind: MetricType) {
    if kind == MetricType::COUNTER {
        let mut c = Counter::default();
        c.set_value(into.get_counter().get_value() + from.get_counter().get_value());
        into.set_counter(c);
        return;
    }
    let (a, b) = (into.get_histogram(), from.get_histogram());
    let same_buckets = a.get_bucket().len() == b.get_bucket().len()
        && a.get_bucket()
            .iter()
            .zip(b.get_bucket())
            .all(|(x, y)| x.upper_bound() == y.upper_bound());
    if !same_buckets {
        return;
    }
    let mut h = Histogram::default();
    h.set_sample_count(a.get_sample_count() + b.get_sample_count());
    h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
    h.set_bucket(
        a.get_bucket()
            .iter()
            .zip(b.get_bucket())
            .map(|(x, y)| {
                let mut bk = Bucket::default();
                bk.set_upper_bound(x.upper_bound());
                bk.set_cumulative_count(x.cumulative_count() + y.cumulative_count());
                bk
            })
            .collect(),
    );
    into.set_histogram(h);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

    fn registry(count: u64, observe: f64) -> Registry {
        let r = Registry::new();
        let c = IntCounterVec::new(Opts::new("t_total", "help"), &["worker"]).unwrap();
        let h = HistogramVec::new(HistogramOpts::new("t_seconds", "help"), &["worker"]).unwrap();
        r.register(Box::new(c.clone())).unwrap();
        r.register(Box::new(h.clone())).unwrap();
        c.with_label_values(&["0"]).inc_by(count);
        h.with_label_values(&["0"]).observe(observe);
        r
    }

    #[test]
    fn carried_counters_and_histograms_add_to_the_new_ones() {
        let old = registry(5, 0.2);
        let mut old_families = old.gather();
        // The old process had a worker the new one lacks.
        let extra = IntCounterVec::new(Opts::new("t_total", "help"), &["worker"]).unwrap();
        extra.with_label_values(&["7"]).inc_by(3);
        merge(
            &mut old_families,
            &prometheus::core::Collector::collect(&extra),
        );
        let carried = restore(&snapshot(&old_families)).unwrap();

        let new = registry(2, 0.3);
        let mut gathered = new.gather();
        merge(&mut gathered, &carried);
        let text = {
            let mut out = Vec::new();
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &gathered, &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(text.contains("t_total{worker=\"0\"} 7\n"), "{text}");
        assert!(text.contains("t_total{worker=\"7\"} 3\n"), "{text}");
        assert!(text.contains("t_seconds_count{worker=\"0\"} 2\n"), "{text}");
        assert!(text.contains("t_seconds_sum{worker=\"0\"} 0.5\n"), "{text}");
        assert!(
            text.contains("t_seconds_bucket{worker=\"0\",le=\"0.25\"} 1\n"),
            "{text}"
        );
        assert!(restore(&snapshot(&old_families)[..10]).is_err());
    }
}
