//! One round's results → loss, mean and jitter (pure).

/// What one method (ICMP or TCP) saw in one round: the round trip of each
/// probe sent, in sending order; `None` = lost (no answer in time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodRound {
    pub rtts: Vec<Option<f64>>,
}

/// A round of one method summed up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub sent: u64,
    pub lost: u64,
    /// lost / sent.
    pub loss_ratio: f64,
    /// Mean round trip of the answered probes (None: none answered).
    pub mean: Option<f64>,
    /// Mean absolute difference between the round trips of consecutive
    /// answered probes (the IP packet delay variation of RFC 3393 averaged
    /// over the round); None with fewer than two answers.
    pub jitter: Option<f64>,
}

impl MethodRound {
    /// None when nothing was sent.
    pub fn summary(&self) -> Option<Summary> {
        let sent = self.rtts.len() as u64;
        if sent == 0 {
            return None;
        }
        let answered: Vec<f64> = self.rtts.iter().flatten().copied().collect();
        let lost = sent - answered.len() as u64;
        let mean =
            (!answered.is_empty()).then(|| answered.iter().sum::<f64>() / answered.len() as f64);
        let jitter = (answered.len() >= 2).then(|| {
            let d: f64 = answered.windows(2).map(|w| (w[1] - w[0]).abs()).sum();
            d / (answered.len() - 1) as f64
        });
        Some(Summary {
            sent,
            lost,
            loss_ratio: lost as f64 / sent as f64,
            mean,
            jitter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rtts: &[Option<f64>], expected: Option<(u64, u64, Option<f64>, Option<f64>)>) {
        let got = MethodRound {
            rtts: rtts.to_vec(),
        }
        .summary()
        .map(|s| {
            assert!((s.loss_ratio - s.lost as f64 / s.sent as f64).abs() < 1e-12);
            (
                s.sent,
                s.lost,
                s.mean.map(|m| (m * 1e6).round() / 1e6),
                s.jitter.map(|j| (j * 1e6).round() / 1e6),
            )
        });
        assert_eq!(got, expected, "{rtts:?}");
    }

    #[test]
    fn loss_mean_and_jitter() {
        check(&[], None);
        check(&[None, None], Some((2, 2, None, None)));
        check(&[Some(0.001)], Some((1, 0, Some(0.001), None)));
        // Differences 0.002, 0.004 (the lost one skipped), 0.001.
        check(
            &[Some(0.001), Some(0.003), None, Some(0.007), Some(0.006)],
            Some((5, 1, Some(0.00425), Some(0.002333))),
        );
        // Constant round trips: no jitter, whatever was lost.
        check(
            &[Some(0.01), None, None, Some(0.01), None],
            Some((5, 3, Some(0.01), Some(0.0))),
        );
        let r = MethodRound {
            rtts: [vec![None; 20], vec![Some(0.0005); 80]].concat(),
        }
        .summary()
        .unwrap();
        assert_eq!(r.loss_ratio, 0.2);
    }
}
