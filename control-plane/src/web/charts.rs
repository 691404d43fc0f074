//! Line charts as inline SVG, drawn on the server: axes with tick labels, a legend, and
//! each point's value in a `<title>` the browser shows on hover. Long series are thinned
//! to at most `MAX_POINTS` per line, always keeping the last point.

use std::fmt::Write;

const MAX_POINTS: usize = 400;
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;
const COLORS: [&str; 4] = ["#2563eb", "#dc2626", "#059669", "#d97706"];

/// A point the chart calls out, with a dashed line down to the x axis.
pub struct Marker {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

pub struct Series<'a> {
    pub name: &'a str,
    /// (x, y) in data units; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if finite.len() <= MAX_POINTS {
        return finite;
    }
    let stride = finite.len().div_ceil(MAX_POINTS);
    let mut kept: Vec<(f64, f64)> = finite.iter().copied().step_by(stride).collect();
    if let (Some(last), Some(kept_last)) = (finite.last(), kept.last()) {
        if kept_last != last {
            kept.push(*last);
        }
    }
    kept
}

/// A compact number for hover titles and tick labels: 1.2e-4, 0.53, 12.5, 1200. Written
/// from integers where it can ([`write_fixed`]): a chart titles every point it draws.
struct Compact(f64);

impl std::fmt::Display for Compact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.0;
        let magnitude = value.abs();
        if magnitude != 0.0 && !(1e-2..1e5).contains(&magnitude) {
            return write!(f, "{value:.1e}");
        }
        let decimals = if magnitude >= 100.0 { 0 } else { 3 };
        write_fixed(f, value, decimals, true)
    }
}

/// A tick label with enough digits to tell neighbouring ticks `spacing` apart.
fn tick(value: f64, spacing: f64) -> String {
    let magnitude = value.abs().max(spacing.abs());
    if !spacing.is_finite() || spacing <= 0.0 {
        return Compact(value).to_string();
    }
    if !(1e-3..1e5).contains(&magnitude) {
        return format!("{value:.2e}");
    }
    let decimals = (-spacing.log10()).ceil().clamp(0.0, 8.0) as usize;
    let text = format!("{value:.decimals$}");
    // The left margin holds about seven characters; longer labels would be clipped.
    if text.len() > MAX_TICK_CHARS {
        format!("{value:.1e}")
    } else {
        text
    }
}

/// The longest tick label the left margin shows whole.
const MAX_TICK_CHARS: usize = 7;

/// The y range to draw: the data's, widened to at least 1% of its magnitude so a nearly
/// flat series gets ticks a few digits can tell apart.
fn y_range(min: f64, max: f64) -> (f64, f64) {
    let magnitude = min.abs().max(max.abs());
    let least = if magnitude == 0.0 {
        1.0
    } else {
        magnitude * 0.01
    };
    if max - min >= least {
        return (min, max);
    }
    let middle = (min + max) / 2.0;
    (middle - least / 2.0, middle + least / 2.0)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart of `series` against a shared x axis labelled `x_label`; an empty
/// chart says so instead of drawing axes over nothing.
pub fn line_chart(title: &str, x_label: &str, series: &[Series<'_>]) -> String {
    marked_line_chart(title, x_label, series, None)
}

/// A line chart with `marker` called out (when it lies in the chart's x range).
pub fn marked_line_chart(
    title: &str,
    x_label: &str,
    series: &[Series<'_>],
    marker: Option<&Marker>,
) -> String {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.name, thin(&s.points)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}">"#,
        escape(title)
    );
    if lines.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" class="empty">No data yet</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return svg;
    }
    let all = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all {
        x_min = x_min.min(*x);
        x_max = x_max.max(*x);
        y_min = y_min.min(*y);
        y_max = y_max.max(*y);
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    (y_min, y_max) = y_range(y_min, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
    let sy = |y: f64| TOP + (1.0 - (y - y_min) / (y_max - y_min)) * plot_h;
    for i in 0..=4 {
        let fraction = f64::from(i) / 4.0;
        let y_value = y_min + fraction * (y_max - y_min);
        let y = sy(y_value);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="tick" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            tick(y_value, (y_max - y_min) / 4.0)
        );
        let x_value = x_min + fraction * (x_max - x_min);
        let _ = write!(
            svg,
            r#"<text class="tick" x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x_value),
            HEIGHT - BOTTOM + 16.0,
            tick(x_value, (x_max - x_min) / 4.0)
        );
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0,
        escape(x_label)
    );
    for (index, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points=""#
        );
        for (index, (x, y)) in points.iter().enumerate() {
            let separator = if index == 0 { "" } else { " " };
            let _ = write!(svg, "{separator}{},{}", Tenths(sx(*x)), Tenths(sy(*y)));
        }
        svg.push_str(r#""/>"#);
        // A lone point has no line to show it: draw its dot visibly.
        let dot = if points.len() == 1 { "dot solo" } else { "dot" };
        let hover_name = escape(name);
        for (x, y) in points {
            let _ = write!(
                svg,
                r#"<circle class="{dot}" cx="{}" cy="{}" r="3" fill="{color}"><title>{} at {}: {}</title></circle>"#,
                Tenths(sx(*x)),
                Tenths(sy(*y)),
                hover_name,
                Compact(*x),
                Compact(*y)
            );
        }
        let legend_x = LEFT + 8.0 + index as f64 * 130.0;
        let _ = write!(
            svg,
            r#"<rect x="{legend_x:.1}" y="{TOP}" width="10" height="10" fill="{color}"/><text class="legend" x="{:.1}" y="{}">{}</text>"#,
            legend_x + 14.0,
            TOP + 9.0,
            escape(name)
        );
    }
    if let Some(marker) = marker.filter(|m| (x_min..=x_max).contains(&m.x) && m.y.is_finite()) {
        let (x, y) = (sx(marker.x), sy(marker.y.clamp(y_min, y_max)));
        let anchor = if x > LEFT + plot_w / 2.0 {
            "end"
        } else {
            "start"
        };
        let shift = if anchor == "end" { -6.0 } else { 6.0 };
        let _ = write!(
            svg,
            r##"<g class="marker"><line x1="{x:.1}" x2="{x:.1}" y1="{y:.1}" y2="{:.1}" stroke="#111827" stroke-dasharray="3 3"/><circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="none" stroke="#111827" stroke-width="1.5"/><text class="legend" x="{:.1}" y="{:.1}" text-anchor="{anchor}">{}</text></g>"##,
            HEIGHT - BOTTOM,
            x + shift,
            (y - 8.0).max(TOP + 22.0),
            escape(&marker.label)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A coordinate to one decimal: a page writes thousands of coordinates.
struct Tenths(f64);

impl std::fmt::Display for Tenths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_fixed(f, self.0, 1, false)
    }
}

/// `value` to `decimals` places, written from its scaled integer (`{:.N}` takes the exact
/// float-formatting path, costly when a page writes thousands of numbers); with `trim`,
/// without trailing zeros or a bare point.
fn write_fixed(
    f: &mut std::fmt::Formatter<'_>,
    value: f64,
    decimals: u32,
    trim: bool,
) -> std::fmt::Result {
    let scale = 10_u64.pow(decimals);
    let scaled = (value * scale as f64).round() as i64;
    let sign = if scaled < 0 { "-" } else { "" };
    let scaled = scaled.unsigned_abs();
    let (whole, mut fraction, mut digits) = (scaled / scale, scaled % scale, decimals as usize);
    while trim && digits > 0 && fraction % 10 == 0 {
        fraction /= 10;
        digits -= 1;
    }
    if digits == 0 {
        write!(f, "{sign}{whole}")
    } else {
        write!(f, "{sign}{whole}.{fraction:0digits$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenths_match_one_decimal_formatting() {
        for value in [0.0, 0.04, 0.05, 1.25, 12.349, 419.96, -2.75, 1e6] {
            assert_eq!(
                Tenths(value).to_string(),
                format!("{:.1}", (value * 10.0_f64).round() / 10.0),
                "{value}"
            );
        }
    }

    #[test]
    fn compact_numbers_match_three_decimal_formatting_trimmed() {
        for value in [
            0.0, 0.01, 0.0312, 0.53, 1.25, 2.5, 12.3456, 99.9996, -0.75, 250.4, 1e-4,
        ] {
            let expected = if value != 0.0 && !(1e-2..1e5).contains(&f64::abs(value)) {
                format!("{value:.1e}")
            } else if value.abs() >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{:.3}", (value * 1000.0_f64).round() / 1000.0)
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_owned()
            };
            assert_eq!(Compact(value).to_string(), expected, "{value}");
        }
        assert_eq!(Compact(-0.0001).to_string(), "-1.0e-4");
        assert_eq!(Compact(-0.0).to_string(), "0");
    }

    #[test]
    fn long_series_are_thinned_keeping_the_last_point() {
        let points: Vec<(f64, f64)> = (1..=10_000).map(|s| (s as f64, 1.0 / s as f64)).collect();
        let kept = thin(&points);
        assert!(kept.len() <= MAX_POINTS + 1);
        assert_eq!(kept.last(), points.last());
    }

    #[test]
    fn ticks_tell_close_values_apart() {
        assert_eq!(tick(0.0312, 0.0005), "0.0312");
        assert_eq!(tick(0.0317, 0.0005), "0.0317");
        assert_eq!(tick(250.0, 50.0), "250");
        assert_eq!(tick(8.9e-5, 2.2e-5), "8.90e-5");
    }

    #[test]
    fn ticks_fit_the_margin() {
        // A nearly flat memory series once read "0777702" with its head clipped.
        assert_eq!(tick(0.0777702, 2e-7), "7.8e-2");
        let (low, high) = y_range(0.0777702, 0.0777710);
        assert!(high - low >= 0.0777710 * 0.01 - 1e-12);
        let spacing = (high - low) / 4.0;
        assert!(
            tick(low, spacing).len() <= MAX_TICK_CHARS,
            "{}",
            tick(low, spacing)
        );
        assert_eq!(y_range(0.0, 0.0), (-0.5, 0.5));
    }

    #[test]
    fn a_marker_is_called_out_inside_the_range_only() {
        let series = [Series {
            name: "validation loss",
            points: vec![(1.0, 3.0), (2.0, 2.5), (3.0, 2.8)],
        }];
        let inside = Marker {
            x: 2.0,
            y: 2.5,
            label: "best · step 2".into(),
        };
        let svg = marked_line_chart("Loss", "step", &series, Some(&inside));
        assert!(svg.contains(r#"<g class="marker">"#), "{svg}");
        assert!(svg.contains("best · step 2"));
        let outside = Marker { x: 9.0, ..inside };
        let svg = marked_line_chart("Loss", "step", &series, Some(&outside));
        assert!(!svg.contains("marker"), "{svg}");
    }

    #[test]
    fn charts_have_legends_hover_values_and_escape_names() {
        let svg = line_chart(
            "Loss",
            "step",
            &[Series {
                name: "train <loss>",
                points: vec![(1.0, 2.5), (2.0, 1.25)],
            }],
        );
        assert!(svg.contains("train &lt;loss&gt; at 2: 1.25"), "{svg}");
        assert!(svg.contains(r#"aria-label="Loss""#));
        assert!(line_chart("Loss", "step", &[]).contains("No data yet"));
    }
}
