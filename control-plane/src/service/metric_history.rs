//! Reading a job's metric history: the API's stream (every n-th step, or a min/max
//! downsample of one series for charts) and the dashboard's fixed-cost sample.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use super::job::visible_job;
use super::{AppState, CurrentUser, ServiceError, ServiceResult};
use crate::db::metrics::{self, MetricPoint};
use crate::db::DbError;
use crate::domain::FieldError;

/// Most points one history request returns.
pub const MAX_POINTS: i64 = 100_000;

/// What a history request asks for.
#[derive(Debug, Default)]
pub struct HistoryQuery {
    /// Points to return, default 100 (not with `max_points`).
    pub limit: Option<i64>,
    /// Every n-th step and the last, default 1 (not with `max_points`).
    pub interval: Option<i64>,
    /// A downsample for charts: at most this many points, the minimum and maximum of
    /// `series` in each step bucket, the series' first and last point always kept.
    pub max_points: Option<i64>,
    /// The series `max_points` keeps the extremes of; default `training_loss`.
    pub series: Option<Series>,
}

/// A metric series of the history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    #[default]
    TrainingLoss,
    ValidationLoss,
    LearningRate,
    GradNorm,
    TokensPerSecond,
    GpuUtilization,
    MemoryUsedGb,
}

impl Series {
    fn value(self, point: &MetricPoint) -> Option<f64> {
        match self {
            Series::TrainingLoss => point.training_loss,
            Series::ValidationLoss => point.validation_loss,
            Series::LearningRate => point.learning_rate,
            Series::GradNorm => point.grad_norm,
            Series::TokensPerSecond => point.tokens_per_second,
            Series::GpuUtilization => point.gpu_utilization.map(|v| v as f64),
            Series::MemoryUsedGb => point.memory_used_gb,
        }
    }
}

pub type HistoryStream = BoxStream<'static, Result<MetricPoint, DbError>>;

/// A job's per-step metrics, oldest first, as the query asks; streamed from the database.
pub async fn stream(
    state: &AppState,
    user: &CurrentUser,
    id: Uuid,
    query: &HistoryQuery,
) -> ServiceResult<HistoryStream> {
    visible_job(state, user, id).await?;
    let mut errors = Vec::new();
    let in_range = |value: Option<i64>, range: std::ops::RangeInclusive<i64>| {
        value.is_none_or(|v| range.contains(&v))
    };
    if !in_range(query.limit, 1..=MAX_POINTS) {
        errors.push(FieldError::new("limit", "must be between 1 and 100000"));
    }
    if !in_range(query.interval, 1..=i64::MAX) {
        errors.push(FieldError::new("interval", "must be at least 1"));
    }
    if !in_range(query.max_points, 4..=MAX_POINTS) {
        errors.push(FieldError::new(
            "max_points",
            "must be between 4 and 100000",
        ));
    }
    if query.max_points.is_some() {
        for (field, given) in [("limit", query.limit), ("interval", query.interval)] {
            if given.is_some() {
                errors.push(FieldError::new(field, "cannot be combined with max_points"));
            }
        }
    } else if query.series.is_some() {
        errors.push(FieldError::new("series", "applies only with max_points"));
    }
    if !errors.is_empty() {
        return Err(ServiceError::Validation(errors));
    }
    let Some(max_points) = query.max_points else {
        let (interval, limit) = (query.interval.unwrap_or(1), query.limit.unwrap_or(100));
        return Ok(metrics::history_stream(&state.db, id, interval, limit).boxed());
    };
    let Some(range) = metrics::step_range(&state.db, id).await? else {
        return Ok(futures::stream::empty().boxed());
    };
    let rows = metrics::history_stream(&state.db, id, 1, i64::MAX);
    let buckets = MinMaxBuckets::new(
        range,
        (max_points - 2) / 2,
        query.series.unwrap_or_default(),
    );
    Ok(Downsampled {
        rows,
        buckets,
        ready: VecDeque::new(),
        finished: false,
    }
    .boxed())
}

/// Points a dashboard chart draws: about [`CHART_POINTS`] spread over the run and the
/// latest evaluations, each read by index seeks, so the page costs the same at step 100
/// and at step 1,000,000.
pub async fn chart_points(state: &AppState, job_id: Uuid) -> ServiceResult<Vec<MetricPoint>> {
    let Some(range) = metrics::step_range(&state.db, job_id).await? else {
        return Ok(Vec::new());
    };
    let mut points = metrics::sampled(&state.db, job_id, range, CHART_POINTS).await?;
    let evaluations = metrics::evaluations(&state.db, job_id, CHART_POINTS).await?;
    points.extend(evaluations);
    points.sort_by_key(|p| p.step);
    points.dedup_by_key(|p| p.step);
    Ok(points)
}

/// The evaluation with the lowest validation loss, which the loss chart marks.
pub async fn best_evaluation(state: &AppState, job_id: Uuid) -> ServiceResult<Option<MetricPoint>> {
    Ok(metrics::best_evaluation(&state.db, job_id).await?)
}

/// About as many points as a chart is pixels wide.
pub const CHART_POINTS: i64 = 400;

/// Min/max downsampling of one series over equal step buckets, fed in step order: each
/// bucket gives the points holding its minimum and maximum (so spikes survive), and the
/// series' first and last points are always kept.
struct MinMaxBuckets {
    series: Series,
    first_step: i64,
    width: i64,
    bucket: Option<i64>,
    low: Option<(f64, MetricPoint)>,
    high: Option<(f64, MetricPoint)>,
    last: Option<MetricPoint>,
    emitted_step: Option<i64>,
}

impl MinMaxBuckets {
    fn new((first, last): (i64, i64), buckets: i64, series: Series) -> MinMaxBuckets {
        let span = last - first + 1;
        MinMaxBuckets {
            series,
            first_step: first,
            width: (span + buckets.max(1) - 1) / buckets.max(1),
            bucket: None,
            low: None,
            high: None,
            last: None,
            emitted_step: None,
        }
    }

    fn push(&mut self, point: MetricPoint, out: &mut VecDeque<MetricPoint>) {
        let Some(value) = self.series.value(&point) else {
            return;
        };
        if self.last.is_none() {
            self.emit(point.clone(), out);
        }
        let bucket = (point.step - self.first_step).div_euclid(self.width.max(1));
        if self.bucket != Some(bucket) {
            self.flush(out);
            self.bucket = Some(bucket);
        }
        if self.low.as_ref().is_none_or(|(low, _)| value < *low) {
            self.low = Some((value, point.clone()));
        }
        if self.high.as_ref().is_none_or(|(high, _)| value > *high) {
            self.high = Some((value, point.clone()));
        }
        self.last = Some(point);
    }

    /// Emits the current bucket's extremes in step order.
    fn flush(&mut self, out: &mut VecDeque<MetricPoint>) {
        let mut extremes: Vec<MetricPoint> = [self.low.take(), self.high.take()]
            .into_iter()
            .flatten()
            .map(|(_, point)| point)
            .collect();
        extremes.sort_by_key(|p| p.step);
        for point in extremes {
            self.emit(point, out);
        }
    }

    fn finish(&mut self, out: &mut VecDeque<MetricPoint>) {
        self.flush(out);
        if let Some(last) = self.last.take() {
            self.emit(last, out);
        }
    }

    /// Emits a point once, in step order.
    fn emit(&mut self, point: MetricPoint, out: &mut VecDeque<MetricPoint>) {
        if self.emitted_step.is_none_or(|step| point.step > step) {
            self.emitted_step = Some(point.step);
            out.push_back(point);
        }
    }
}

struct Downsampled<S> {
    rows: S,
    buckets: MinMaxBuckets,
    ready: VecDeque<MetricPoint>,
    finished: bool,
}

impl<S> Stream for Downsampled<S>
where
    S: Stream<Item = Result<MetricPoint, DbError>> + Unpin,
{
    type Item = Result<MetricPoint, DbError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(point) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(point)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match std::task::ready!(this.rows.poll_next_unpin(cx)) {
                Some(Ok(point)) => this.buckets.push(point, &mut this.ready),
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    this.buckets.finish(&mut this.ready);
                    this.finished = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: i64, loss: f64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: None,
            training_loss: Some(loss),
            validation_loss: None,
            learning_rate: None,
            grad_norm: None,
            tokens_per_second: None,
            gpu_utilization: None,
            memory_used_gb: None,
            recorded_at: chrono::Utc::now(),
        }
    }

    fn downsample(points: &[MetricPoint], max_points: i64) -> Vec<i64> {
        let range = (points[0].step, points[points.len() - 1].step);
        let mut buckets = MinMaxBuckets::new(range, (max_points - 2) / 2, Series::TrainingLoss);
        let mut out = VecDeque::new();
        for p in points {
            buckets.push(p.clone(), &mut out);
        }
        buckets.finish(&mut out);
        out.into_iter().map(|p| p.step).collect()
    }

    #[test]
    fn keeps_spikes_and_both_ends_within_the_budget() {
        // A falling curve with one spike up and one dip down.
        let points: Vec<MetricPoint> = (1..=10_000)
            .map(|step| {
                let loss = match step {
                    4_321 => 9.0,
                    7_777 => 0.01,
                    _ => 3.0 / (1.0 + step as f64 / 500.0),
                };
                point(step, loss)
            })
            .collect();
        let steps = downsample(&points, 102);
        assert!(steps.len() <= 102, "{}", steps.len());
        assert!(steps.len() > 90, "{}", steps.len());
        assert_eq!(steps[0], 1);
        assert_eq!(steps.last(), Some(&10_000));
        assert!(
            steps.contains(&4_321) && steps.contains(&7_777),
            "{steps:?}"
        );
        assert!(
            steps.windows(2).all(|w| w[0] < w[1]),
            "ascending, once each"
        );
    }

    #[test]
    fn a_short_history_comes_back_whole() {
        let points: Vec<MetricPoint> = (1..=5).map(|s| point(s, s as f64)).collect();
        assert_eq!(downsample(&points, 100), [1, 2, 3, 4, 5]);
    }
}
