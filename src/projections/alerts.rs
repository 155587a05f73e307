//! The five alert rules of the old monitor script, all of them working this time. Pure:
//! the server evaluates them on its read model, `contimg monitor` on a status it fetched.

use serde::{Deserialize, Serialize};

/// Thresholds, as the old script's `--alert-thresholds` JSON file spelled them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AlertThresholds {
    pub min_success_rate: f64,
    pub max_failed: u64,
    pub max_failures_1h: u64,
    pub max_stuck_staging_hours: f64,
    pub max_attempts_exceeded: u64,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            min_success_rate: 95.0,
            max_failed: 10,
            max_failures_1h: 5,
            max_stuck_staging_hours: 24.0,
            max_attempts_exceeded: 0,
        }
    }
}

/// The figures the rules look at.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertInputs {
    pub success_rate_percent: f64,
    pub failed_publishes: u64,
    pub recent_failures_1h: u64,
    /// Age of the oldest product in staging, in hours.
    pub oldest_staging_hours: Option<f64>,
    pub max_attempts_exceeded: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Alert {
    #[schema(value_type = String)]
    pub name: &'static str,
    #[schema(value_type = String)]
    pub severity: &'static str,
    pub message: String,
    pub value: f64,
    pub threshold: f64,
}

pub fn evaluate(i: &AlertInputs, t: &AlertThresholds) -> Vec<Alert> {
    let mut out = Vec::new();
    if i.success_rate_percent < t.min_success_rate {
        out.push(Alert {
            name: "low_success_rate",
            severity: "warning",
            message: format!(
                "publish success rate {:.2}% is below {:.2}%",
                i.success_rate_percent, t.min_success_rate
            ),
            value: i.success_rate_percent,
            threshold: t.min_success_rate,
        });
    }
    if i.failed_publishes > t.max_failed {
        out.push(Alert {
            name: "too_many_failed",
            severity: "warning",
            message: format!(
                "{} failed publishes (more than {})",
                i.failed_publishes, t.max_failed
            ),
            value: i.failed_publishes as f64,
            threshold: t.max_failed as f64,
        });
    }
    if i.recent_failures_1h > t.max_failures_1h {
        out.push(Alert {
            name: "failure_burst",
            severity: "critical",
            message: format!(
                "{} publish failures in the last hour (more than {})",
                i.recent_failures_1h, t.max_failures_1h
            ),
            value: i.recent_failures_1h as f64,
            threshold: t.max_failures_1h as f64,
        });
    }
    if let Some(h) = i.oldest_staging_hours
        && h > t.max_stuck_staging_hours
    {
        out.push(Alert {
            name: "stuck_in_staging",
            severity: "warning",
            message: format!(
                "a product has been in staging for {h:.1} h (more than {} h)",
                t.max_stuck_staging_hours
            ),
            value: h,
            threshold: t.max_stuck_staging_hours,
        });
    }
    if i.max_attempts_exceeded > t.max_attempts_exceeded {
        out.push(Alert {
            name: "max_attempts_exceeded",
            severity: "critical",
            message: format!(
                "{} products exhausted their publish attempts and need an operator",
                i.max_attempts_exceeded
            ),
            value: i.max_attempts_exceeded as f64,
            threshold: t.max_attempts_exceeded as f64,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> AlertInputs {
        AlertInputs {
            success_rate_percent: 100.0,
            failed_publishes: 0,
            recent_failures_1h: 0,
            oldest_staging_hours: Some(1.0),
            max_attempts_exceeded: 0,
        }
    }

    #[test]
    fn each_rule_fires_alone_past_its_threshold() {
        let t = AlertThresholds::default();
        assert!(evaluate(&quiet(), &t).is_empty());
        type Change = fn(&mut AlertInputs);
        let cases: [(Change, &str); 5] = [
            (|i| i.success_rate_percent = 94.99, "low_success_rate"),
            (|i| i.failed_publishes = 11, "too_many_failed"),
            (|i| i.recent_failures_1h = 6, "failure_burst"),
            (|i| i.oldest_staging_hours = Some(24.5), "stuck_in_staging"),
            (|i| i.max_attempts_exceeded = 1, "max_attempts_exceeded"),
        ];
        for (change, name) in cases {
            let mut i = quiet();
            change(&mut i);
            let names: Vec<_> = evaluate(&i, &t).iter().map(|a| a.name).collect();
            assert_eq!(names, vec![name]);
        }
        // At the threshold exactly, nothing fires.
        let mut i = quiet();
        i.failed_publishes = 10;
        i.recent_failures_1h = 5;
        i.success_rate_percent = 95.0;
        assert!(evaluate(&i, &t).is_empty());
    }
}
