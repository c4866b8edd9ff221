//! The report's PNG chart, drawn by hand: one row per scenario with a step series, two panels
//! (deliveries/s and p99 per step), the gateway in blue and the reference (limit server,
//! `pg_recvlogical`, …) in orange. Text uses a built-in 3×5 pixel font, so no system fonts are
//! needed.

use serde_json::Value;
use std::path::Path;

const W: usize = 1000;
const ROW: usize = 220;
const BG: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];
const GATEWAY: [u8; 3] = [31, 119, 180];
const REFERENCE: [u8; 3] = [255, 127, 14];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        let mut px = vec![0; w * h * 3];
        for p in px.chunks_mut(3) {
            p.copy_from_slice(&BG);
        }
        Canvas { w, h, px }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, c);
            }
        }
    }

    /// A line two pixels thick (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x, y, 2, 2, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3×5 font at `scale` pixels per dot.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        self.rect(cx + col * scale, y + row as i64 * scale, scale, scale, c);
                    }
                }
            }
            cx += 4 * scale;
        }
    }
}

/// 3×5 glyphs, one row per byte (bit 2 = left column).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '/' => [1, 1, 2, 4, 4],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        '_' => [0, 0, 0, 0, 7],
        '"' | '\'' => [5, 5, 0, 0, 0],
        _ => [0, 0, 0, 0, 0],
    }
}

/// A step series: (label, gateway value, reference value) per step.
struct Series {
    title: String,
    reference: String,
    deliveries: Vec<(Option<f64>, Option<f64>)>,
    p99: Vec<(Option<f64>, Option<f64>)>,
}

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

/// The series of a scenario document, if its steps carry deliveries/s.
fn series(doc: &Value) -> Option<Series> {
    let scenario = doc["scenario"].as_str().unwrap_or("?");
    let steps = doc["steps"].as_array()?;
    let latency = if scenario == "pg-changes" {
        "latency.p95_ms"
    } else {
        "latency.p99_ms"
    };
    let mut s = Series {
        title: scenario.to_owned(),
        reference: String::new(),
        deliveries: Vec::new(),
        p99: Vec::new(),
    };
    for step in steps {
        let results = step["results"].as_array()?;
        let g = results.iter().find(|r| r["server"] == "gateway");
        let r = results
            .iter()
            .find(|r| r["server"] == "limit-server")
            .or_else(|| results.iter().find(|r| r["server"] != "gateway"));
        if let Some(name) = r.and_then(|r| r["server"].as_str()) {
            s.reference = name.to_owned();
        }
        let d = |v: Option<&Value>| v.and_then(|v| get(v, "deliveries_per_s"));
        let l = |v: Option<&Value>| v.and_then(|v| get(v, latency));
        s.deliveries.push((d(g), d(r)));
        s.p99.push((l(g), l(r)));
    }
    s.deliveries.iter().any(|(g, _)| g.is_some()).then_some(s)
}

fn short(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}m", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 10.0 || x == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// One panel: both series over the steps, y from 0 to the maximum.
fn panel(
    c: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    title: &str,
    points: &[(Option<f64>, Option<f64>)],
) {
    c.text(x, y - 16, title, 2, AXIS);
    let max = points
        .iter()
        .flat_map(|(a, b)| [*a, *b])
        .flatten()
        .fold(0.0f64, f64::max)
        .max(1e-9);
    for k in 0..=4 {
        let gy = y + h - h * k / 4;
        c.line((x, gy), (x + w, gy), GRID);
        c.text(x - 44, gy - 5, &short(max * k as f64 / 4.0), 2, AXIS);
    }
    c.line((x, y), (x, y + h), AXIS);
    c.line((x, y + h), (x + w, y + h), AXIS);
    let n = points.len().max(2) as i64 - 1;
    let at = |i: usize, v: f64| (x + w * i as i64 / n, y + h - (v / max * h as f64) as i64);
    for (pick, colour) in [(0, GATEWAY), (1, REFERENCE)] {
        let mut last = None;
        for (i, p) in points.iter().enumerate() {
            let v = if pick == 0 { p.0 } else { p.1 };
            if let Some(v) = v {
                let pt = at(i, v);
                c.rect(pt.0 - 3, pt.1 - 3, 7, 7, colour);
                if let Some(prev) = last {
                    c.line(prev, pt, colour);
                }
                last = Some(pt);
            } else {
                last = None;
            }
        }
    }
    for i in 0..points.len() {
        let (px, _) = at(i, 0.0);
        c.text(px - 2, y + h + 6, &(i + 1).to_string(), 2, AXIS);
    }
}

/// Writes the chart of `docs` (scenario JSON documents) to `path`.
pub fn write(docs: &[Value], path: &Path) -> anyhow::Result<()> {
    let all: Vec<Series> = docs.iter().filter_map(series).collect();
    let h = 60 + ROW * all.len().max(1);
    let mut c = Canvas::new(W, h);
    c.text(
        20,
        12,
        "deliveries/s and p99 ms (p95 for pg-changes) per step",
        2,
        AXIS,
    );
    c.rect(20, 36, 14, 8, GATEWAY);
    c.text(40, 35, "gateway", 2, AXIS);
    c.rect(140, 36, 14, 8, REFERENCE);
    c.text(
        160,
        35,
        "reference (limit server, or named per row)",
        2,
        AXIS,
    );
    if all.is_empty() {
        c.text(20, 80, "no step series in these documents", 2, AXIS);
    }
    for (i, s) in all.iter().enumerate() {
        let top = 60 + (ROW * i) as i64;
        let title = if s.reference.is_empty() || s.reference == "limit-server" {
            s.title.clone()
        } else {
            format!("{} vs {}", s.title, s.reference)
        };
        c.text(20, top + 8, &title, 2, AXIS);
        panel(
            &mut c,
            (80, top + 50, 380, 130),
            "deliveries/s",
            &s.deliveries,
        );
        panel(&mut c, (580, top + 50, 380, 130), "latency ms", &s.p99);
    }
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&c.px)?;
    writer.finish()?;
    Ok(())
}
