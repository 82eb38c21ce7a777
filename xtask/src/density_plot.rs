//! The plot of `cargo xtask bench density --sweep`: memory per idle VM, ping p99 and the busy
//! VM's share against the number of idle VMs, as a self-contained SVG (three panels, no
//! scripts, no external fonts), so that docs/ can show it as an image.

use std::fmt::Write;

/// One run of the sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    /// Idle VMs in the run.
    pub vms: u64,
    /// Frames in use at the engine's peak per idle VM, MiB.
    pub mib_per_vm: f64,
    /// Ping answer delay p99 while the busy VM computes, ms.
    pub ping_p99_ms: f64,
    /// The busy VM's share of the machine over its work, percent.
    pub busy_percent: f64,
}

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 220.0;
const MARGIN_L: f64 = 55.0;
const MARGIN_T: f64 = 40.0;
const MARGIN_B: f64 = 45.0;
const GAP: f64 = 30.0;

/// One panel: its title, the value of each point, a reference line (value, label) and the
/// y range's top.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    values: Vec<f64>,
    reference: (f64, &'a str),
    top: f64,
}

/// The SVG for `points` (sorted by `vms` here): memory per idle VM against the VM's own size
/// `vm_mib` (what each VM holds without multiplexing), ping p99 against the 10 ms target, the
/// busy VM's share against the 90% target.
pub fn svg(points: &[SweepPoint], vm_mib: u64, title: &str) -> String {
    let mut points = points.to_vec();
    points.sort_by_key(|p| p.vms);
    let max_n = points.iter().map(|p| p.vms).max().unwrap_or(1).max(1) as f64;
    let top = |values: &[f64], reference: f64| {
        let m = values.iter().copied().fold(reference, f64::max);
        nice_ceiling(m * 1.1)
    };
    let mem: Vec<f64> = points.iter().map(|p| p.mib_per_vm).collect();
    let p99: Vec<f64> = points.iter().map(|p| p.ping_p99_ms).collect();
    let busy: Vec<f64> = points.iter().map(|p| p.busy_percent).collect();
    let panels = [
        Panel {
            title: "memory per idle VM",
            unit: "MiB",
            top: top(&mem, vm_mib as f64),
            values: mem,
            reference: (vm_mib as f64, "without multiplexing"),
        },
        Panel {
            title: "ping p99 while the busy VM computes",
            unit: "ms",
            top: top(&p99, 10.0),
            values: p99,
            reference: (10.0, "target 10 ms"),
        },
        Panel {
            title: "busy VM's share of the machine",
            unit: "%",
            values: busy,
            reference: (90.0, "target 90%"),
            top: 100.0,
        },
    ];
    let width = MARGIN_L + 3.0 * PANEL_W + 2.0 * (GAP + MARGIN_L) + 20.0;
    let height = MARGIN_T + PANEL_H + MARGIN_B;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(
        s,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.0}\" y=\"16\" font-size=\"13\" text-anchor=\"middle\">{}</text>",
        width / 2.0,
        escape(title)
    );
    for (k, panel) in panels.iter().enumerate() {
        let x0 = MARGIN_L + k as f64 * (PANEL_W + GAP + MARGIN_L);
        let y0 = MARGIN_T;
        let x = |n: u64| x0 + n as f64 / max_n * PANEL_W;
        let y = |v: f64| y0 + PANEL_H - (v / panel.top).clamp(0.0, 1.0) * PANEL_H;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} ({})</text>",
            x0 + PANEL_W / 2.0,
            y0 - 8.0,
            escape(panel.title),
            panel.unit
        );
        // Axes, with ticks at 0, a half and the top; the x axis at 0, a half and max N.
        let _ = writeln!(
            s,
            "<polyline points=\"{x0:.1},{y0:.1} {x0:.1},{yb:.1} {xr:.1},{yb:.1}\" fill=\"none\" \
             stroke=\"black\"/>",
            yb = y0 + PANEL_H,
            xr = x0 + PANEL_W
        );
        for frac in [0.0, 0.5, 1.0] {
            let v = panel.top * frac;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x0 - 4.0,
                y(v) + 4.0,
                format_value(v)
            );
            let n = (max_n * frac).round() as u64;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>",
                x(n),
                y0 + PANEL_H + 14.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">idle VMs</text>",
            x0 + PANEL_W / 2.0,
            y0 + PANEL_H + 30.0
        );
        let (rv, label) = panel.reference;
        let _ = writeln!(
            s,
            "<line x1=\"{x0:.1}\" y1=\"{ry:.1}\" x2=\"{xr:.1}\" y2=\"{ry:.1}\" stroke=\"gray\" \
             stroke-dasharray=\"4 3\"/>\n<text x=\"{xr:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" \
             fill=\"gray\">{}</text>",
            escape(label),
            ry = y(rv),
            xr = x0 + PANEL_W,
            ly = y(rv) - 4.0
        );
        let line: Vec<String> = points
            .iter()
            .zip(&panel.values)
            .map(|(p, &v)| format!("{:.1},{:.1}", x(p.vms), y(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"2\"/>",
            line.join(" ")
        );
        for (p, &v) in points.iter().zip(&panel.values) {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#1f5fa8\"><title>{} idle VMs: \
                 {} {}</title></circle>",
                x(p.vms),
                y(v),
                p.vms,
                format_value(v),
                panel.unit
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v` (and at least 1).
fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(1.0);
    let mut unit = 10f64.powf(v.log10().floor());
    loop {
        for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
            if m * unit >= v {
                return m * unit;
            }
        }
        unit *= 10.0;
    }
}

fn format_value(v: f64) -> String {
    if v >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_panels_with_a_point_per_run_and_the_reference_lines() {
        let points = [
            SweepPoint {
                vms: 100,
                mib_per_vm: 4.7,
                ping_p99_ms: 4.5,
                busy_percent: 67.5,
            },
            SweepPoint {
                vms: 24,
                mib_per_vm: 6.1,
                ping_p99_ms: 6.0,
                busy_percent: 90.0,
            },
        ];
        let svg = svg(&points, 16, "density <sweep>");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<circle").count(),
            6,
            "two points in each of three panels"
        );
        assert_eq!(svg.matches("stroke-dasharray").count(), 3);
        assert!(svg.contains("density &lt;sweep&gt;"), "text is escaped");
        assert!(svg.contains("<title>24 idle VMs: 6.1 MiB</title>"));
        assert!(svg.contains("<title>100 idle VMs: 68 %</title>"));
        assert!(svg.contains("without multiplexing") && svg.contains("target 10 ms"));
        // Sorted by N: the 24-VM point comes first on each line.
        let first_line = svg.lines().find(|l| l.contains("stroke-width")).unwrap();
        let xs: Vec<f64> = first_line
            .split('"')
            .nth(1)
            .unwrap()
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert!(xs[0] < xs[1]);
    }

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.3), 1.0);
        assert_eq!(nice_ceiling(17.6), 20.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(22.0), 25.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }
}
