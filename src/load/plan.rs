//! `--rate`: the open loop's plan and the exact schedule it gives.
//!
//! - `R`: a constant rate.
//! - `FROM:TO`: a linear ramp from FROM to TO requests/s over the run's duration.
//! - `R1,R2,... --step DURATION`: each rate held for one step; the run lasts the steps.
//!
//! Request `k` (from 0) falls due at the moment the integral of the rate since the start
//! reaches `k`. For a ramp that is the root of a quadratic, solved in closed form, so
//! the schedule is exact however long the run and never steps the rate in increments.

use std::time::Duration;

/// What `--rate` (and `--step`) asked for, in requests per second in total.
#[derive(Debug, Clone, PartialEq)]
pub enum RatePlan {
    Constant(f64),
    /// Linear from `from` at the start to `to` at the end of the run.
    Ramp {
        from: f64,
        to: f64,
    },
    /// `rates[i]` held during `[i * step, (i + 1) * step)`.
    Steps {
        rates: Vec<f64>,
        step: Duration,
    },
}

impl RatePlan {
    /// Parses `--rate` with `--step`, naming the flag that is wrong.
    pub fn parse(rate: &str, step: Option<Duration>) -> Result<RatePlan, String> {
        let malformed = || {
            format!(
                "invalid --rate '{rate}': expected R, FROM:TO (a ramp) or R1,R2,... with \
                 --step (requests per second, each above zero)"
            )
        };
        let number = |s: &str| -> Result<f64, String> {
            let r: f64 = s.trim().parse().map_err(|_| malformed())?;
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "invalid --rate '{rate}': every rate must be a positive number of \
                     requests per second ('{}' is not)",
                    s.trim()
                ));
            }
            Ok(r)
        };
        let plan = if rate.contains(',') {
            if rate.contains(':') {
                return Err(malformed());
            }
            let rates = rate.split(',').map(number).collect::<Result<Vec<_>, _>>()?;
            let Some(step) = step else {
                return Err(format!(
                    "--rate '{rate}' is a list of rates; it needs --step DURATION (how long \
                     each rate is held), e.g. --step 10s"
                ));
            };
            if step.is_zero() {
                return Err("--step must be greater than zero".into());
            }
            RatePlan::Steps { rates, step }
        } else if let Some((from, to)) = rate.split_once(':') {
            RatePlan::Ramp {
                from: number(from)?,
                to: number(to)?,
            }
        } else {
            RatePlan::Constant(number(rate)?)
        };
        if step.is_some() && !matches!(plan, RatePlan::Steps { .. }) {
            return Err(format!(
                "--step needs a list of rates (--rate R1,R2,...); --rate '{rate}' is not one"
            ));
        }
        Ok(plan)
    }

    /// Checks the rates of a plan built in code (parsing checks them already).
    pub fn validate(&self) -> Result<(), String> {
        let ok = |r: f64| r.is_finite() && r > 0.0;
        let good = match self {
            RatePlan::Constant(r) => ok(*r),
            RatePlan::Ramp { from, to } => ok(*from) && ok(*to),
            RatePlan::Steps { rates, step } => {
                !rates.is_empty() && rates.iter().all(|&r| ok(r)) && !step.is_zero()
            }
        };
        if good {
            Ok(())
        } else {
            Err("--rate must be a positive number of requests per second".into())
        }
    }

    /// Every rate the plan names (a ramp passes through all between its two).
    pub fn rates(&self) -> Vec<f64> {
        match self {
            RatePlan::Constant(r) => vec![*r],
            RatePlan::Ramp { from, to } => vec![*from, *to],
            RatePlan::Steps { rates, .. } => rates.clone(),
        }
    }

    /// The same plan at `share` of the rate: one thread's part of it.
    pub fn scaled(&self, share: f64) -> RatePlan {
        match self {
            RatePlan::Constant(r) => RatePlan::Constant(r * share),
            RatePlan::Ramp { from, to } => RatePlan::Ramp {
                from: from * share,
                to: to * share,
            },
            RatePlan::Steps { rates, step } => RatePlan::Steps {
                rates: rates.iter().map(|r| r * share).collect(),
                step: *step,
            },
        }
    }

    /// Steps: their rates and length; None for other plans.
    pub fn steps(&self) -> Option<(&[f64], Duration)> {
        match self {
            RatePlan::Steps { rates, step } => Some((rates, *step)),
            _ => None,
        }
    }

    /// The run's length a step plan implies (steps x step).
    pub fn implied_duration(&self) -> Option<Duration> {
        self.steps()
            .map(|(rates, step)| step.saturating_mul(rates.len() as u32))
    }

    /// Requests the plan puts due over `duration`, divided by it.
    pub fn mean_rate(&self, duration: Duration) -> f64 {
        let d = duration.as_secs_f64().max(1e-9);
        Schedule::new(self, duration).integral(d) / d
    }

    /// As the flag was written: `5000`, `1000:20000`, `1000,5000 --step 10s`.
    pub fn describe(&self) -> String {
        match self {
            RatePlan::Constant(r) => format!("{r}"),
            RatePlan::Ramp { from, to } => format!("{from}:{to}"),
            RatePlan::Steps { rates, step } => {
                let list: Vec<String> = rates.iter().map(|r| format!("{r}")).collect();
                format!("{} --step {:?}", list.join(","), step)
            }
        }
    }
}

/// One thread's schedule: when request `k` falls due, and in which step.
#[derive(Debug, Clone)]
pub struct Schedule {
    plan: RatePlan,
    /// The run's length in seconds (a ramp spans it).
    duration: f64,
    /// Steps: requests due before step `i` starts, for `i` in `0..=steps`.
    before_step: Vec<f64>,
}

impl Schedule {
    pub fn new(plan: &RatePlan, duration: Duration) -> Schedule {
        let mut before_step = vec![0.0];
        if let RatePlan::Steps { rates, step } = plan {
            let mut total = 0.0;
            for r in rates {
                total += r * step.as_secs_f64();
                before_step.push(total);
            }
        }
        Schedule {
            plan: plan.clone(),
            duration: duration.as_secs_f64(),
            before_step,
        }
    }

    /// Seconds from the start at which request `k` (from 0) falls due, and its step (0
    /// for plans without steps).
    pub fn due(&self, k: u64) -> (f64, u32) {
        let k = k as f64;
        match &self.plan {
            RatePlan::Constant(r) => (k / r, 0),
            RatePlan::Ramp { from: a, to: b } => {
                let d = self.duration;
                let at_end = (a + b) / 2.0 * d;
                if k >= at_end {
                    // Past the ramp (only when asked beyond the run): hold its last rate.
                    return (d + (k - at_end) / b, 0);
                }
                // a t + c t^2 = k with c = (b - a) / 2d; this form of the root is exact
                // for c = 0 and does not cancel when c is small.
                let c = (b - a) / (2.0 * d);
                let disc = (a * a + 4.0 * c * k).max(0.0);
                (2.0 * k / (a + disc.sqrt()), 0)
            }
            RatePlan::Steps { rates, step } => {
                let s = step.as_secs_f64();
                let last = rates.len() - 1;
                // The step whose range of request numbers holds k; past the last, it holds.
                let i = self.before_step[1..].partition_point(|&n| n <= k).min(last);
                (
                    i as f64 * s + (k - self.before_step[i]) / rates[i],
                    i as u32,
                )
            }
        }
    }

    /// Requests due in `[0, t)` seconds, as a real number: the integral of the rate.
    pub fn integral(&self, t: f64) -> f64 {
        match &self.plan {
            RatePlan::Constant(r) => r * t,
            RatePlan::Ramp { from: a, to: b } => {
                let d = self.duration;
                let ramp = t.min(d);
                a * ramp + (b - a) * ramp * ramp / (2.0 * d) + b * (t - d).max(0.0)
            }
            RatePlan::Steps { rates, step } => {
                let s = step.as_secs_f64();
                let i = ((t / s).floor() as usize).min(rates.len() - 1);
                self.before_step[i] + rates[i] * (t - i as f64 * s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn parses_each_form_and_names_the_flag_when_wrong() {
        assert_eq!(
            RatePlan::parse("5000", None),
            Ok(RatePlan::Constant(5000.0))
        );
        assert_eq!(
            RatePlan::parse("1000:20000", None),
            Ok(RatePlan::Ramp {
                from: 1000.0,
                to: 20000.0
            })
        );
        assert_eq!(
            RatePlan::parse("1000, 5000,10000", secs(10)),
            Ok(RatePlan::Steps {
                rates: vec![1000.0, 5000.0, 10000.0],
                step: Duration::from_secs(10)
            })
        );
        for (rate, step, says) in [
            ("0", None, "positive"),
            ("-5", None, "positive"),
            ("100:0", None, "positive"),
            ("100,0", secs(1), "positive"),
            ("inf", None, "positive"),
            ("NaN", None, "positive"),
            ("abc", None, "invalid --rate"),
            ("", None, "invalid --rate"),
            ("100:", None, "invalid --rate"),
            ("1:2:3", None, "invalid --rate"),
            ("100,", secs(1), "invalid --rate"),
            ("1,2:3", secs(1), "invalid --rate"),
            ("100,200", None, "needs --step"),
            ("100", secs(1), "--step needs a list"),
            ("100:200", secs(1), "--step needs a list"),
            ("100,200", Some(Duration::ZERO), "--step must be greater"),
        ] {
            let e = RatePlan::parse(rate, step).unwrap_err();
            assert!(e.contains(says), "{rate} {step:?}: {e}");
        }
    }

    #[test]
    fn a_constant_rate_is_due_every_interval() {
        let s = Schedule::new(&RatePlan::Constant(200.0), Duration::from_secs(1));
        assert_eq!(s.due(0), (0.0, 0));
        assert_eq!(s.due(100), (0.5, 0));
    }

    #[test]
    fn a_ramp_puts_request_k_where_the_integral_reaches_k() {
        let d = Duration::from_secs(4);
        for plan in [
            RatePlan::Ramp {
                from: 200.0,
                to: 1000.0,
            },
            RatePlan::Ramp {
                from: 1000.0,
                to: 200.0,
            },
            RatePlan::Ramp {
                from: 300.0,
                to: 300.0,
            },
        ] {
            let s = Schedule::new(&plan, d);
            // (FROM + TO) / 2 x 4 s requests in all: 2400 for the first two.
            let all = s.integral(4.0);
            assert!([2400.0, 1200.0].contains(&all), "{all}");
            for k in [0u64, 1, 299, 300, 1199] {
                let (t, step) = s.due(k);
                assert_eq!(step, 0);
                assert!(
                    (s.integral(t) - k as f64).abs() < 1e-6,
                    "{plan:?} k={k} t={t}"
                );
            }
            // Beyond the run it holds the last rate.
            let (t, _) = s.due(all as u64 + 30);
            assert!((t - 4.0 - 30.0 / s.due_rate_at_end()).abs() < 1e-9);
        }
        // Up: 300 requests in the first second, 500, 700, 900.
        let s = Schedule::new(
            &RatePlan::Ramp {
                from: 200.0,
                to: 1000.0,
            },
            d,
        );
        let per_second: Vec<f64> = (0..4)
            .map(|i| s.integral(i as f64 + 1.0) - s.integral(i as f64))
            .collect();
        assert_eq!(per_second, vec![300.0, 500.0, 700.0, 900.0]);
    }

    #[test]
    fn steps_hold_each_rate_and_number_their_requests() {
        let plan = RatePlan::parse("200,600", secs(1)).unwrap();
        assert_eq!(plan.implied_duration(), secs(2));
        let s = Schedule::new(&plan, Duration::from_secs(2));
        assert_eq!(s.due(0), (0.0, 0));
        assert_eq!(s.due(199), (0.995, 0));
        assert_eq!(s.due(200), (1.0, 1));
        assert_eq!(s.due(500), (1.5, 1));
        // Request 800 is due at the end: not in the run.
        assert_eq!(s.due(800), (2.0, 1));
        assert_eq!(s.integral(1.5), 500.0);
        assert_eq!(plan.mean_rate(Duration::from_secs(2)), 400.0);
        assert_eq!(plan.describe(), "200,600 --step 1s");
    }

    impl Schedule {
        fn due_rate_at_end(&self) -> f64 {
            match self.plan {
                RatePlan::Ramp { to, .. } => to,
                _ => unreachable!(),
            }
        }
    }
}
